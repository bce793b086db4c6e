"""Every CUDA path of spiflow against the CPU on one tiny case, in one command: ``make gpu-check``.

    python benchmarks/gpu_check.py                 # CUDA vs CPU; exits 0 (skipped) where there is no CUDA
    python benchmarks/gpu_check.py --device cpu    # the same comparisons CPU vs CPU (checks this script)

Simulates a tiny data set on the CPU (2CEX, the test workflow's sizes: 120 patterns of
16² pixels), then runs each path on the CPU and on the device, and compares:

* simulate: the molecular transform |F(q)|² at 4,000 q points (:func:`spiflow.scattering.structure_factor`,
  cufinufft where installed, else torch's exact sums) against the CPU's exact sums;
* EMC dense and sparse (:func:`spiflow.emc.run_emc`, float64, 3 global + 1 local iteration):
  intensity, gains, orientations, log-likelihood;
* M-TIP (:func:`spiflow.mtip.run_mtip`, float64, one merge → phase → match iteration):
  intensity, orientations, phasing error;
* selfsup (:func:`spiflow.selfsup.run_selfsup`, one epoch of a few steps, no AMP): the
  epoch's loss and the decoded intensity;
* phasing (:func:`spiflow.phasing.phase`, ER with shrinkwrap from the same random start):
  the final Fourier errors and the density.

Prints one table row per check (seconds on each side, the compared quantity, its value and
tolerance) and exits 1 when any check is outside its tolerance. Tolerances are set for
float64 paths (1e-6) and, where a path is chaotic (phasing's thresholds, learned training
with non-deterministic CUDA reductions), looser and stated in the table. Not yet run on a
GPU (README, "One reconstruction across processes": which CUDA paths have run).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pkg"))

TINY = {"dataset": {"n_patterns": 120, "seed": 3, "chunk_frames": 60},
        "beam": {"mean_photons_per_pattern": 2000.0},
        "detector": {"n_pixels": 16, "pixel_size_m": 2.0e-3, "beam_stop_radius_m": 2.0e-3},
        "simulate": {"pilot_orientations": 16}, "sample": {"path": str(REPO / "data" / "2cex.pdb")}}


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def orientation_agreement(qa, qb, deg: float = 0.5) -> float:
    """Fraction of frames whose two quaternions are within ``deg`` degrees."""
    dot = np.clip(np.abs(np.sum(np.asarray(qa) * np.asarray(qb), 1)), 0, 1)
    return float(np.mean(2 * np.degrees(np.arccos(dot)) <= deg))


def timed(fn, device: str):
    import torch
    t0 = time.perf_counter()
    out = fn(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def tiny_data(work: Path):
    """The tiny patterns store (simulated on the CPU) as (photons, valid, q, pixel_factor, grid, truth intensity)."""
    from spiflow.config import load_config
    from spiflow.io import open_dataset
    from spiflow.simulate import simulate
    from spiflow.stores import grid_of, open_patterns

    cfg = load_config(REPO / "config" / "config.yaml", overrides=dict(TINY, device="cpu"))
    simulate(cfg, work / "patterns.zarr", work / "truth.zarr", progress=False)
    pat, photons = open_patterns(work / "patterns.zarr")
    truth = open_dataset(work / "truth.zarr").intensity.values
    return (np.asarray(photons[:]), pat.valid.values, pat.q.values.astype(np.float64),
            pat.pixel_factor.values.astype(np.float64), grid_of(pat), truth)


def checks(data):
    """(name, run(device) -> dict, compare(dev_out, cpu_out) -> [(quantity, value, tolerance, ok)])."""
    photons, valid, q, pf, grid, truth = data

    def simulate_fn(device):
        from spiflow.scattering import structure_factor
        from spiflow.structure import read_structure
        atoms = read_structure(TINY["sample"]["path"])
        pts = np.random.default_rng(0).uniform(-1, 1, (4000, 3)) * grid.q_max / np.sqrt(3)
        method = "auto" if device != "cpu" else "direct"
        return {"I": np.abs(structure_factor(atoms, pts, method=method, device=device, eps=1e-9)) ** 2}

    def emc_fn(fmt):
        def run(device):
            from spiflow.emc import run_emc
            from spiflow.settings import EMCSettings
            cfg = EMCSettings(num_div=2, iterations=3, n_starts=1, refine_iterations=1, dtype="float64",
                              photon_format=fmt)
            res = run_emc(photons, valid, q, pf, grid, cfg, device=device, progress=False)
            return {"W": res.intensity, "gain": res.gain, "quat": res.quaternion,
                    "ll": res.log.log_likelihood.to_numpy()}
        return run

    def emc_cmp(a, b):
        return [("intensity rel. L2", rel(a["W"], b["W"]), 1e-5), ("gain rel. L2", rel(a["gain"], b["gain"]), 1e-6),
                ("log-likelihood rel.", rel(a["ll"], b["ll"]), 1e-9),
                ("frames ≠ orientation", 1 - orientation_agreement(a["quat"], b["quat"]), 0.0)]

    def mtip_fn(device):
        from spiflow.mtip import run_mtip
        from spiflow.settings import MTIPSettings
        cfg = MTIPSettings(num_div=2, iterations=1, refine_iterations=0, dtype="float64")
        res = run_mtip(photons, valid, q, pf, grid, cfg, device=device, progress=False)
        return {"W": res.intensity, "quat": res.quaternion, "err": res.log.phasing_error.to_numpy()}

    def mtip_cmp(a, b):  # one phasing from the same start: FFT rounding only
        return [("intensity rel. L2", rel(a["W"], b["W"]), 1e-3), ("phasing error rel.", rel(a["err"], b["err"]), 1e-4),
                ("frames ≠ orientation", 1 - orientation_agreement(a["quat"], b["quat"]), 0.02)]

    def selfsup_fn(device):
        import torch
        from spiflow.selfsup import run_selfsup
        from spiflow.settings import SelfSupSettings
        torch.manual_seed(0)
        cfg = SelfSupSettings(epochs=1, batch_size=40, siren_width=32, siren_layers=3, encoder_width=8,
                              encoder_stages=2, amp=False, amortize_steps=20, amortize_batch=16)  # the amortization runs too
        res = run_selfsup(photons, valid, q, pf, grid, cfg, seed=0, device=device, progress=False)
        return {"W": res.intensity, "loss": res.log["loss"].to_numpy()}

    def selfsup_cmp(a, b):  # three optimiser steps; CUDA's reductions are not bitwise the CPU's
        return [("epoch loss rel.", rel(a["loss"], b["loss"]), 1e-3), ("intensity rel. L2", rel(a["W"], b["W"]), 1e-2)]

    def phase_fn(device):
        from spiflow.phasing import phase
        from spiflow.settings import PhasingSettings
        cfg = PhasingSettings(schedule="ER:40", n_cycles=1, final_er=10, n_restarts=2, n_average=1,
                              shrinkwrap_every=20)
        res = phase(truth, grid, cfg, seed=0, device=device)
        return {"rho": res.density, "err": res.errors}

    def phase_cmp(a, b):  # ER with shrinkwrap thresholds: small FFT differences may move the support
        return [("final errors rel.", rel(a["err"], b["err"]), 1e-3), ("density rel. L2", rel(a["rho"], b["rho"]), 1e-2)]

    return [("simulate |F|²", simulate_fn, lambda a, b: [("|F|² rel. L2", rel(a["I"], b["I"]), 1e-5)]),
            ("EMC dense", emc_fn("dense"), emc_cmp), ("EMC sparse", emc_fn("sparse"), emc_cmp),
            ("M-TIP", mtip_fn, mtip_cmp), ("selfsup", selfsup_fn, selfsup_cmp), ("phasing", phase_fn, phase_cmp)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (default cuda)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: skipped, no CUDA device here (torch.cuda.is_available() is False); "
              "run it where a GPU is lent. Nothing was compared.")
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        data = tiny_data(Path(tmp))
        for name, fn, compare in checks(data):
            try:
                ref, t_cpu = timed(fn, "cpu")
                out, t_dev = timed(fn, args.device)
                results = [(k, v, tol, v <= tol) for k, v, tol in compare(out, ref)]
            except Exception as exc:  # a path that fails on the device is a failed check
                t_cpu = t_dev = float("nan")
                results = [(f"error: {type(exc).__name__}: {exc}"[:120], float("nan"), float("nan"), False)]
            for k, v, tol, ok in results:
                rows.append((name, t_cpu, t_dev, k, v, tol, ok))
                failed += not ok
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"gpu-check: {args.device} ({name}) against cpu, torch {torch.__version__}")
    print(f"| check | cpu s | {args.device} s | quantity | value | tolerance | ok |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, tc, td, k, v, tol, ok in rows:
        print(f"| {name} | {tc:.2f} | {td:.2f} | {k} | {v:.3g} | {tol:.3g} | {'yes' if ok else 'NO'} |")
    print(f"gpu-check: {len(rows) - failed} of {len(rows)} comparisons within tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
