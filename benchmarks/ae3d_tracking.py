#!/usr/bin/env python
"""Latent tracking of a slowly changing crystal by bounded extremum seeking (spiflow.estrack).

    PYTHONPATH=pkg python benchmarks/ae3d_tracking.py --checkpoint OUT/ae3d.pt [--configfile FILE]
        [--frames 20] [--steps 150] [--alpha A] [--gain K] [--out benchmarks/results/ae3d-tracking]

A series of ``--frames`` intensities of one crystal (:func:`spiflow.bragg.simulate_series`,
the ``ae3d.crystals`` settings, seed ``dataset.seed + 2``: not a training object) whose
strain amplitude ramps from ``--u0`` to ``--u1`` Å; per frame: the encoder alone, the
ES-tracked latent (``--steps`` ES steps per frame, no labels, no retraining) and iterative
phasing (``spiflow.ae3d.ITERATIVE_SETTINGS`` with ``--cycles`` cycles x ``--restarts``
restarts from random phases). Writes ``OUT/tracking.csv``, ``OUT/tracking.md`` (medians,
1-minute load average) and ``OUT/tracking.png`` (complex error and ES cost vs frame).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

from spiflow import ae3d, bragg, estrack
from spiflow.settings import settings


def plot(table, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from spiflow.plots import save_figure
    fig = Figure(figsize=(8, 3.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for method, grp in table.groupby("method", sort=False):
        ax1.plot(grp["frame"], grp["complex_error"], marker="o", ms=3, label=method)
        if grp["physics_loss"].notna().any():
            ax2.plot(grp["frame"], grp["physics_loss"], marker="o", ms=3, label=method)
    ax1.set_xlabel("frame")
    ax1.set_ylabel("complex error (ambiguities removed)")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("frame")
    ax2.set_ylabel("Fourier-modulus loss C")
    ax2.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--configfile", default=None)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--u0", type=float, default=0.1)
    p.add_argument("--u1", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--alpha", type=float, default=estrack.DEFAULT_ALPHA)
    p.add_argument("--gain", type=float, default=estrack.DEFAULT_GAIN)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ae3d-tracking")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = settings(yaml.safe_load(Path(a.configfile).read_text()) if a.configfile else {})
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = ae3d.load_model(a.checkpoint)
    series = bragg.simulate_series(cfg.ae3d.crystals, a.frames, cfg.dataset.seed + 2, (a.u0, a.u1))
    it = ae3d.ITERATIVE_SETTINGS.model_copy(update={"n_cycles": a.cycles, "n_restarts": a.restarts})
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    table = estrack.track_series(model, series, a.steps, a.alpha, a.gain, iterative=it, progress=True)
    wall = time.perf_counter() - t0
    table.to_csv(out / "tracking.csv", index=False)
    plot(table, out / "tracking.png")
    cols = ["complex_error", "phase_rmse_rad", "amplitude_fsc_mean", "fourier_error", "physics_loss", "seconds"]
    summ = table.groupby("method", sort=False)[cols].median().reset_index()
    piv = table.pivot(index="frame", columns="method", values="complex_error")
    below_enc = int((piv["ES-tracked latent"] < piv["encoder"]).sum())
    below_it = int((piv["ES-tracked latent"] < piv["iterative"]).sum())
    text = [f"# ES latent tracking ({a.frames} frames, n = {series.grid.n}, u_max {a.u0} -> {a.u1} A)", "",
            f"checkpoint `{a.checkpoint}`; ES: {a.steps} steps/frame, alpha {a.alpha}, gain {a.gain}; "
            f"iterative: {a.cycles} cycles x {a.restarts} restarts", "",
            f"wall {wall:.0f} s ({a.threads} threads); 1-minute load average {load0:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end", "",
            f"frames where the tracked latent's complex error is below the encoder's: {below_enc}/{a.frames}; "
            f"below iterative phasing's: {below_it}/{a.frames}", "",
            "medians over frames:", "", summ.to_markdown(index=False, floatfmt=".3g")]
    (out / "tracking.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
