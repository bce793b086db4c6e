"""Why selfsup did not orient (issue 12): the learning problem taken apart on simulated data.

Modes, each trained on the first ``--frames`` patterns of a simulated run (the truth is
read here, by the diagnosis only, never by :func:`spiflow.selfsup.run_selfsup`):

* ``supervised``: the encoder trained with the TRUE rotations as labels (chordal loss
  ``‖R − R_true‖²_F``; the decoder frozen at the true intensity): can the network read an
  orientation from a pattern at this signal at all?
* ``frozen``: the decoder frozen at the true intensity (a voxel decoder holding
  ``log W_true``), the encoder trained by the photon loss alone.
* ``joint``: the full method of Chen et al. as it was (``search_epochs: 0``).
* ``search``: the remedy, the pose-search warm start (``search_epochs`` > 0), encoder-only
  poses reported per epoch.
* ``simulated``: the encoder trained by :func:`spiflow.selfsup.amortize` on patterns
  simulated from the TRUE intensity at known rotations (gains: the frames' maximum-likelihood
  gains at their true poses), ``amortize_steps`` of ``amortize_batch``; scored on the real
  frames, also modulo the Friedel mate (``friedel_mate``). ``--plain-pose-loss`` replaces
  the mate-aware pose loss by the plain chordal distance (the diagnosis of the mate).

After every epoch the encoder's rotations on the unaugmented patterns are compared with the
truth after the best global rotation (:func:`spiflow.metrics.orientation_errors`). Writes
``<out>/selfsup_diagnosis.csv`` (mode, epoch, seconds, median error in degrees) and a figure.

    PYTHONPATH=pkg python3 benchmarks/selfsup_diagnosis.py results/all_methods --frames 1000 \\
        --epochs 8 --out docs/figures
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from spiflow import stores
from spiflow.io import open_dataset, radial_log_profile, validate_detector_inputs
from spiflow.metrics import orientation_errors
from spiflow.selfsup import (EncoderInputs, FrameStream, SelfSupModel, infer, run_selfsup, train_epoch)
from spiflow.settings import SelfSupSettings


def load(run: Path, frames: int):
    """(photons, valid, q, pixel_factor, grid, true W in photons per unit pixel factor, true quaternions)."""
    pat, photons = stores.open_patterns(str(run / "simulate/patterns.zarr"))
    tr = open_dataset(str(run / "simulate/truth.zarr"), "truth store")
    scale = stores.photon_scale(pat)
    W = tr.intensity.values.astype(np.float64) * scale * tr.gain.values.mean()
    return (np.asarray(photons[:frames]), pat.valid.values, pat.q.values.astype(np.float64),
            pat.pixel_factor.values.astype(np.float64), stores.grid_of(pat), W, tr.quaternion.values[:frames])


def median_error(quat: np.ndarray, truth: np.ndarray) -> float:
    return float(np.median(orientation_errors(quat, truth)[0]))


def run_frozen(data, settings: SelfSupSettings, epochs: int, supervised: bool, seed: int = 0):
    """Encoder training against the decoder frozen at the true intensity; per-epoch rows."""
    photons, valid, q, pf, grid, W, truth = data
    frames, valid, qv, sv = validate_detector_inputs(photons, valid, q, pf, grid)
    stream = FrameStream(photons, valid, settings.chunk_frames, settings.batch_size, seed, True)
    sum_counts = photons[:, valid].sum(0).astype(np.float64)
    profile = torch.as_tensor(radial_log_profile(sum_counts, qv, sv, frames, grid, settings.radial_baseline))
    torch.manual_seed(seed)
    model = SelfSupModel(settings.model_copy(update={"decoder": "voxel"}), valid.shape, grid, profile)
    u = torch.as_tensor(grid.q_points().reshape(-1, 3) / grid.q_max, dtype=torch.float32)
    with torch.no_grad():
        base = model.log_intensity(u).reshape(W.shape)  # the radial baseline alone (decoder at 0)
        model.decoder.volume.copy_(torch.log(torch.as_tensor(W).clamp_min(W.max() * 1e-8)).float() - base)
    model.decoder.volume.requires_grad_(False)
    inputs = EncoderInputs(valid, photons[:, valid].sum(1).mean(), settings, "cpu")
    q_unit = torch.as_tensor(qv / grid.q_max, dtype=torch.float32)
    log_s = torch.as_tensor(np.log(sv), dtype=torch.float32)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                            weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    poses = torch.as_tensor(truth, dtype=torch.float32) if supervised else None
    rows, t0 = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        stream.set_epoch(epoch)
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        train_epoch(model, stream, inputs, opt, sched, q_unit, log_s, settings.loss, gen, False,
                    _NoBar(), poses, settings.pose_weight)
        quat = infer(model, stream, inputs, grid, settings.batch_size, "cpu", False)["quaternion"]
        rows.append({"epoch": epoch, "seconds": time.perf_counter() - t0, "median_error_deg": median_error(quat, truth)})
        print(rows[-1], flush=True)
    return rows


class _NoBar:
    def update(self, n):
        pass


def run_simulated(data, settings: SelfSupSettings, seed: int = 0):
    """The encoder amortized on patterns simulated from the true intensity; one row."""
    from spiflow import selfsup

    photons, valid, q, pf, grid, W, truth = data
    frames, valid_, qv, sv = validate_detector_inputs(photons, valid, q, pf, grid)
    stream = FrameStream(photons, valid_, settings.chunk_frames, settings.batch_size, seed, True)
    inputs = EncoderInputs(valid_, photons[:, valid_].sum(1).mean(), settings, "cpu")
    search = selfsup.PoseSearch(stream, qv, sv, grid, settings, "cpu")
    Wt = torch.as_tensor(W, dtype=torch.float32)
    gains = search.gains(Wt, torch.as_tensor(truth, dtype=torch.float32))
    torch.manual_seed(seed)
    model = SelfSupModel(settings, valid_.shape, grid, torch.zeros(grid.n))
    t0 = time.perf_counter()
    out = selfsup.amortize(model, Wt, gains, search, inputs, settings, seed)
    quat = infer(model, stream, inputs, grid, settings.batch_size, "cpu", False)["quaternion"]
    row = {"epoch": 1, "seconds": time.perf_counter() - t0, "median_error_deg": median_error(quat, truth),
           "mate_median_error_deg": float(np.median(orientation_errors(quat, truth, friedel_mate=True)[0])),
           "patterns": settings.amortize_steps * settings.amortize_batch, **out}
    print(row, flush=True)
    return [row]


def run_method(data, settings: SelfSupSettings, seed: int = 0):
    """The real :func:`run_selfsup` with an epoch callback that scores the encoder (and the searched poses)."""
    photons, valid, q, pf, grid, W, truth = data
    rows, t0 = [], time.perf_counter()
    frames, valid_, qv, sv = validate_detector_inputs(photons, valid, q, pf, grid)
    stream = FrameStream(photons, valid_, settings.chunk_frames, settings.batch_size, seed, True)
    inputs = EncoderInputs(valid_, photons[:, valid_].sum(1).mean(), settings, "cpu")

    def callback(epoch, model, poses):
        quat = infer(model, stream, inputs, grid, settings.batch_size, "cpu", False)["quaternion"]
        row = {"epoch": epoch, "seconds": time.perf_counter() - t0, "median_error_deg": median_error(quat, truth)}
        if poses is not None:
            row["search_median_error_deg"] = median_error(poses.double().cpu().numpy(), truth)
        rows.append(row)
        print(row, flush=True)

    res = run_selfsup(photons, valid, q, pf, grid, settings, seed=seed, device="cpu", progress=False,
                      epoch_callback=callback)
    rows[-1]["final_refined_median_error_deg"] = median_error(res.quaternion, truth)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="results/<run> of a simulated run (simulate/patterns.zarr, truth.zarr)")
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--modes", default="supervised,frozen,joint,search")
    ap.add_argument("--search-epochs", type=int, default=None, help="search mode: selfsup.search_epochs "
                    "(default: the settings' value, else half the epochs)")
    ap.add_argument("--set", action="append", default=[], help="selfsup setting key=value (YAML value)")
    ap.add_argument("--out", type=Path, default=Path("docs/figures"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plain-pose-loss", action="store_true", help="diagnosis: the plain chordal pose loss "
                    "||R - R_pose||^2 instead of the Friedel-mate-aware one (spiflow.selfsup.mate_chordal)")
    args = ap.parse_args(argv)
    if args.plain_pose_loss:
        from spiflow import selfsup
        selfsup.mate_chordal = lambda R, T: (R - T).square().sum((1, 2))
    torch.set_num_threads(args.threads)
    import yaml
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    base = SelfSupSettings(**{"epochs": args.epochs, **overrides})
    data = load(args.run, args.frames)
    load_avg = os.getloadavg()[0]
    table = []
    for mode in args.modes.split(","):
        print(f"== {mode}", flush=True)
        if mode in ("supervised", "frozen"):
            rows = run_frozen(data, base, args.epochs, supervised=mode == "supervised")
        elif mode == "joint":
            rows = run_method(data, base.model_copy(update={"search_epochs": 0}))
        elif mode == "simulated":
            rows = run_simulated(data, base)
        elif mode == "search":
            se = args.search_epochs if args.search_epochs is not None else (base.search_epochs or args.epochs // 2)
            rows = run_method(data, base.model_copy(update={"search_epochs": se}))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        table += [{"mode": mode, "frames": args.frames, "load_1min": load_avg, **r} for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(table)
    df.to_csv(args.out / "selfsup_diagnosis.csv", index=False)
    print(df.to_string(index=False))
    plot(df, args.out / "selfsup_diagnosis.png")


def plot(df: pd.DataFrame, path: Path) -> None:
    """Median orientation error against epoch, one line per mode (the searched poses dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for mode, g in df.groupby("mode", sort=False):
        ax.plot(g["epoch"], g["median_error_deg"], "o-", ms=3, label=f"{mode} (encoder)")
        if "search_median_error_deg" in g and g["search_median_error_deg"].notna().any():
            ax.plot(g["epoch"], g["search_median_error_deg"], "x--", label=f"{mode} (searched poses)")
    ax.set(xlabel="epoch", ylabel="median orientation error (°)", yscale="log",
           title=f"selfsup diagnosis: {int(df['frames'].iloc[0])} frames of 2CEX")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
