#!/usr/bin/env python
"""Label-free fine-tuning of a trained ae3d network on held-out intensities (no truth used),
then the network's errors against the truth before and after.

    PYTHONPATH=pkg python benchmarks/ae3d_finetune.py CHECKPOINT [--n N] [--size LOW HIGH] [--seed S]
        [--n-test K] [--epochs E] [--lr LR] [--batch-size B] [--threads T]

The held-out set is :func:`spiflow.bragg.simulate_crystals` with seed S (the benchmark
``ae3d_phasing.py`` uses ``dataset.seed + 1`` = 2025) and default crystal settings but n and
the size range; fine-tuning is :func:`spiflow.ae3d.finetune` (physics loss only).
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from spiflow import ae3d, bragg
from spiflow.settings import CrystalsSettings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=17)
    p.add_argument("--size", type=float, nargs=2, default=[2.2, 3.0])
    p.add_argument("--seed", type=int, default=2025)
    p.add_argument("--n-test", type=int, default=12)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    test = bragg.simulate_crystals(CrystalsSettings(n=a.n, size_range_voxels=list(a.size)), a.n_test, a.seed)
    model = ae3d.load_model(a.checkpoint)
    truth = test.amplitude.astype(np.float64) * np.exp(1j * test.phase.astype(np.float64))

    def errors():
        pred = ae3d.predict(model, test.intensity, test.measured)
        e = [bragg.complex_errors(pred[i], truth[i], test.grid, test.intensity[i], test.measured)
             for i in range(len(pred))]
        return np.median([x["complex_error"] for x in e]), np.median([x["fourier_error"] for x in e])

    print(f"load {os.getloadavg()[0]:.1f}; before: median complex error {errors()[0]:.3f}, "
          f"Fourier error {errors()[1]:.3f}", flush=True)
    t0 = time.perf_counter()
    losses = ae3d.finetune(model, test.intensity, test.measured, epochs=a.epochs, lr=a.lr, batch_size=a.batch_size)
    after = errors()
    print(f"fine-tuned {a.epochs} epochs in {time.perf_counter() - t0:.0f} s: physics loss {losses[0]:.4f} -> "
          f"{losses[-1]:.4f}; after: median complex error {after[0]:.3f}, Fourier error {after[1]:.3f}; "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
