#!/usr/bin/env python
"""EMC speed at equal accuracy: spiflow's searches and Dragonfly on the same patterns, scored
against the truth.

    python benchmarks/emc_accuracy.py --patterns results/default/simulate/patterns.zarr \\
        --truth results/default/simulate/truth.zarr --num-div 6 [--start truth|random] \\
        [--iterations 30] [--searches exhaustive,coarse_to_fine] [--no-dragonfly] \\
        [--out benchmarks/results/accuracy]

``--start truth`` (quick: a few minutes): every tool starts from the true intensity (photons
per unit pixel factor, the units of both) and the true gains and runs ``--iterations``
iterations at β = 1, the end of an EMC run, where both spend their time per iteration at the
accuracy the sampling allows (spiflow: :func:`spiflow.emc.expectation_step` with ``passes``, each
pass's model and gains feeding the next, timed without the set-up as Dragonfly's log times
its iterations; Dragonfly:
``start_model_file`` and ``scale_file``). ``--start random`` (Dragonfly takes about 25
minutes at num_div 6 on 2 cores): every run from one random start (Dragonfly has one), ``--iterations`` global iterations, β from
``EMCSettings.beta_start`` times ``beta_factor`` every ``beta_every`` iterations up to 1 (the
default schedule; Dragonfly's ``beta_schedule`` with its cap at 1 is the same), gains fitted,
no local refinement (both end at the sampling's limit), the same orientation pixels
(Dragonfly's detector mask 1 on spiflow's central merge-only pixels, ``run.export_for_dragonfly``).
spiflow runs with its other defaults (resolution marching included). Reported per run: wall
seconds, median seconds per iteration (all, and over the iterations at β = 1), and the median
orientation error against the true orientations after removing the global rotation
(:func:`spiflow.metrics.orientation_errors`; for Dragonfly the better of its quaternions
and their conjugates, one choice for all frames, since its convention may be the inverse
rotation). ``--refine`` adds a spiflow run with its default local refinement (where spiflow
goes past the sampling; Dragonfly has no counterpart in this comparison).

Writes ``results.csv`` and ``results.md`` into ``--out``; wall-clock timings, the 1-minute
load average at the start and end of each run beside them.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the shared helpers: loading, Dragonfly export and runs)


def _errors(q_est: np.ndarray, q_true: np.ndarray) -> float:
    from spiflow.metrics import orientation_errors
    return float(np.median(orientation_errors(q_est, q_true)[0]))


def spiflow_from_truth(photons, valid, q, pf, grid, W, gain, q_true, num_div: int, passes: int, search: str,
                       device: str) -> dict:
    """``passes`` chained global passes of :func:`spiflow.emc.expectation_step` at β 1 from
    the true model W (n, n, n) and gains (frames,); seconds per pass without the set-up
    (Dragonfly's log times its iterations alone too); wall_s with it."""
    from spiflow.emc import expectation_step
    from spiflow.settings import EMCSettings
    cfg = EMCSettings(num_div=num_div, search=search, orientation_min_radius_voxels=bench.MIN_RADIUS)
    load0, t0 = bench.load_average(), time.perf_counter()
    res = expectation_step(photons, valid, q, pf, grid, W, gain, cfg, beta=1.0, device=device, passes=passes)
    wall = time.perf_counter() - t0
    return {"tool": "spiflow", "variant": search, "wall_s": wall,
            "s_per_iteration": float(np.median(res["seconds"])), "s_per_iteration_beta1": float(np.median(res["seconds"])),
            "iterations": passes, "median_error_deg": _errors(res["quaternion"], q_true),
            "orientations_per_frame": res["stats"]["orientations_per_frame"],
            "neglected_mass": res["stats"]["neglected_mass"], "load_start": load0, "load_end": bench.load_average()}


def spiflow_run(photons, valid, q, pf, grid, q_true, num_div: int, iterations: int, search: str,
                refine: bool, device: str) -> dict:
    """One spiflow EMC run (see the module docstring); returns the row's measurements."""
    from spiflow.emc import run_emc
    from spiflow.settings import EMCSettings
    cfg = EMCSettings(num_div=num_div, iterations=iterations, n_starts=1, search=search,
                      orientation_min_radius_voxels=bench.MIN_RADIUS,
                      refine_iterations=EMCSettings().refine_iterations if refine else 0)
    load0, t0 = bench.load_average(), time.perf_counter()
    res = run_emc(photons, valid, q, pf, grid, cfg, device=device, progress=False)
    wall = time.perf_counter() - t0
    log = res.log
    glob = log[log["step_deg"].isna()] if "step_deg" in log else log
    at1 = glob[glob["beta"] >= 1.0]
    return {"tool": "spiflow", "variant": f"{search}{' + refinement' if refine else ''}", "wall_s": wall,
            "s_per_iteration": float(np.median(glob["seconds"])),
            "s_per_iteration_beta1": float(np.median(at1["seconds"])) if len(at1) else float("nan"),
            "iterations": len(glob), "median_error_deg": _errors(res.quaternion, q_true),
            "orientations_per_frame": float(glob["orientations_per_frame"].iloc[-1]),
            "neglected_mass": float(glob["neglected_mass"].iloc[-1]), "load_start": load0,
            "load_end": bench.load_average()}


def dragonfly_run(patterns: Path, q_true, num_div: int, iterations: int, threads: int, work: Path,
                  timeout: float, start: tuple | None = None) -> dict:
    """Dragonfly on the exported patterns: with ``start = (W, gain)`` from that model and those
    gains at β 1, else from its random start with spiflow's default β schedule. Its last
    output's orientations (index into its own quaternion list) are scored against the truth."""
    import h5py
    from spiflow.settings import EMCSettings
    d = EMCSettings()
    ph, det = bench.export_for_dragonfly(patterns, work)
    load0, extra = bench.load_average(), {}
    if start is not None:
        with h5py.File(work / "start.h5", "w") as f:
            f["intens"] = np.asarray(start[0], np.float64)[None]
            f["scale"] = np.asarray(start[1], np.float64)
        extra = {"start_model_file": work / "start.h5", "scale_file": work / "start.h5"}
        beta, schedule = 1.0, (1.0, 1000)
    else:
        beta, schedule = d.beta_start, (d.beta_factor, d.beta_every)
    r = bench.emc_dragonfly(ph, det, num_div, iterations, threads, work / f"nd{num_div}", timeout,
                            beta=beta, beta_schedule=schedule, extra=extra)
    out = sorted((work / f"nd{num_div}" / "output").glob("output_*.h5"))[-1]
    with h5py.File(out, "r") as f:
        quats = f["quaternions"][:, :4][f["orientations"][:]]
    conj = quats * np.array([1, -1, -1, -1])
    err = min(_errors(quats, q_true), _errors(conj, q_true))
    times = bench.parse_dragonfly_log(work / f"nd{num_div}" / "EMC.log")
    betas = [1.0 if start is not None else min(1.0, beta * schedule[0] ** ((i - 1) // schedule[1]))
             for i in range(1, len(times) + 1)]
    at1 = [t for t, b in zip(times, betas) if b >= 1.0]
    return {"tool": "dragonfly", "variant": f"dragonfly.emc -t {threads}", "wall_s": r["wall"],
            "s_per_iteration": float(np.median(times)),
            "s_per_iteration_beta1": float(np.median(at1)) if at1 else float("nan"),
            "iterations": len(times), "median_error_deg": err,
            "orientations_per_frame": float(bench.n_orientations(num_div)), "neglected_mass": 0.0,
            "load_start": load0, "load_end": bench.load_average()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patterns", type=Path, required=True)
    ap.add_argument("--truth", type=Path, required=True)
    ap.add_argument("--num-div", type=int, default=6)
    ap.add_argument("--start", choices=("truth", "random"), default="truth")
    ap.add_argument("--iterations", type=int, default=None, help="default: 3 from the truth, 30 from random")
    ap.add_argument("--searches", default="exhaustive,coarse_to_fine")
    ap.add_argument("--refine", action="store_true", help="also spiflow's coarse_to_fine with local refinement")
    ap.add_argument("--no-dragonfly", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dragonfly-timeout", type=float, default=7200)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy"))
    args = ap.parse_args(argv)
    import pandas as pd
    import torch
    import xarray as xr
    from spiflow.stores import photon_scale
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    photons, valid, q, pf, grid = bench.load_patterns(args.patterns)
    pat, tr = xr.open_zarr(args.patterns), xr.open_zarr(args.truth)
    q_true = tr.quaternion.values
    W = tr.intensity.values.astype(np.float64) * photon_scale(pat)
    gain = tr.gain.values.astype(np.float64)
    truth = args.start == "truth"
    its = args.iterations or (3 if truth else 30)
    rows = []

    def done(row):
        rows.append(dict(row, start=args.start, num_div=args.num_div, frames=len(photons)))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
        pd.DataFrame(rows).to_csv(args.out / "results.csv", index=False)

    for search in [s for s in args.searches.split(",") if s]:
        if truth:
            done(spiflow_from_truth(photons, valid, q, pf, grid, W, gain, q_true, args.num_div, its, search, args.device))
        else:
            done(spiflow_run(photons, valid, q, pf, grid, q_true, args.num_div, its, search, False, args.device))
    if args.refine and not truth:
        done(spiflow_run(photons, valid, q, pf, grid, q_true, args.num_div, its, "coarse_to_fine", True, args.device))
    if not args.no_dragonfly and bench.dragonfly_available():
        done(dragonfly_run(args.patterns, q_true, args.num_div, its, args.threads, args.out / "dragonfly",
                           args.dragonfly_timeout, (W, gain) if truth else None))
    df = pd.DataFrame(rows)
    (args.out / "results.md").write_text(df.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
