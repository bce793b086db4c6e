"""How well can any method orient these frames? The orientation error when every frame is
oriented against its *own* true intensity (a heterogeneous sample: its own size and shape),
or (``--model nearest_state``) against the reference state nearest to its conformation.

For a subset of the frames of a simulated run, each frame's particle is rebuilt from its true
conformation (``sample.atoms``), its intensity |F|² computed on the run's grid
(:func:`spiflow.simulate.volumes`), and one exhaustive E-step (:func:`spiflow.emc.expectation_step`,
β 1, every valid pixel, the true gain) picks the most probable orientation of the
``--num-div`` sampling against it. The error against the true orientation is taken modulo
the run's ``evaluate.symmetry``, as ``evaluate`` does. This is an oracle: no method knows a
frame's own intensity, so its median bounds from below what a method that orients against
a shared model (EMC's models, M-TIP, the VAE) can reach with this sampling; the sampling
itself adds a floor (about 3.4° median at num_div 10 on a well-oriented particle, README).

    PYTHONPATH=pkg python3 benchmarks/orientation_limit.py results/nanoparticle --frames 150

Prints the median, the share of frames more than 5° and 20° off, and the median per bin
of the second conformation parameter (the truncation for nanoparticles); ``--csv`` writes
one row per frame. Reads the run's ``evaluate/config.yaml``, ``simulate/patterns.zarr`` and
``simulate/truth.zarr``. Raises FileNotFoundError for a missing store, ValueError for a
homogeneous run (no conformations).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pkg"))

from spiflow import metrics  # noqa: E402
from spiflow.emc import expectation_step  # noqa: E402
from spiflow.latent import match_states  # noqa: E402
from spiflow import stores  # noqa: E402
from spiflow.settings import EMCSettings  # noqa: E402
from spiflow.simulate import build_sample, volumes  # noqa: E402
from spiflow.symmetry import point_group  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="results/RUN of a simulated heterogeneous run")
    ap.add_argument("--frames", type=int, default=150, help="frames, evenly spaced over the run's")
    ap.add_argument("--num-div", type=int, default=10, help="orientation sampling of the E-step")
    ap.add_argument("--model", choices=["own", "nearest_state"], default="own",
                    help="own: each frame's own true intensity; nearest_state: the truth store's reference "
                    "state nearest to the frame's conformation (what perfectly classified discrete models "
                    "at those states would give)")
    ap.add_argument("--csv", type=Path, default=None, help="write one row per frame here")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    config = yaml.safe_load((args.run / "evaluate" / "config.yaml").read_text())
    truth = xr.open_zarr(args.run / "simulate" / "truth.zarr")
    if "conformation" not in truth:
        raise ValueError(f"{args.run}: a homogeneous run (no conformation in its truth store)")
    pat, photons = stores.open_patterns(str(args.run / "simulate" / "patterns.zarr"))
    grid, scale = stores.grid_of(pat), stores.photon_scale(pat)
    valid, q, pf = pat.valid.values, pat.q.values.astype(np.float64), pat.pixel_factor.values.astype(np.float64)
    sample, _ = build_sample(config)
    conf, quat, gain = truth.conformation.values, truth.quaternion.values, truth.gain.values
    n = len(conf)
    pick = np.unique(np.linspace(0, n - 1, min(args.frames, n)).round().astype(int))
    settings = EMCSettings(num_div=args.num_div, search="exhaustive", photon_format="dense", dtype="float64",
                           orientation_min_radius_voxels=config["emc"]["orientation_min_radius_voxels"])
    sym = point_group(config["evaluate"]["symmetry"])
    states, spread = truth.state_intensity.values, np.ptp(conf, axis=0)
    rows, est, t0 = [], [], time.perf_counter()
    for i in pick:
        if args.model == "own":
            intensity, _ = volumes(sample.atoms(conf[i]), grid, config["simulate"]["nufft_eps"])
        else:
            intensity = states[int(match_states(conf[i:i + 1], truth.state_conformation.values, spread)[0])]
        res = expectation_step(np.asarray(photons[i:i + 1]), valid, q, pf, grid, intensity * scale, gain[i:i + 1],
                               settings, beta=1.0)
        rows.append({"frame": int(i), **{str(p): float(conf[i, j]) for j, p in enumerate(truth.parameter.values)}})
        est.append(res["quaternion"][0])
    # the model is in the truth's frame, so the fitted global rotation is the identity up to noise
    err, _ = metrics.orientation_errors(np.array(est), quat[pick], symmetry=sym)
    df = pd.DataFrame(rows).assign(error_deg=err)
    e = df.error_deg.to_numpy()
    print(f"{args.run}: {len(df)} frames, num_div {args.num_div}, each against {args.model} true intensity "
          f"({time.perf_counter() - t0:.0f} s)")
    print(f"median error {np.median(e):.2f} deg (modulo {config['evaluate']['symmetry']}); "
          f"> 5 deg: {np.mean(e > 5):.1%}; > 20 deg: {np.mean(e > 20):.1%}")
    if conf.shape[1] > 1:
        name = str(truth.parameter.values[1])
        bins = pd.cut(df[name], 4)
        print(df.groupby(bins, observed=True).error_deg.agg(["median", "count"]).to_string())
    if args.csv is not None:
        df.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
