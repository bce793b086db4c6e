#!/usr/bin/env python
"""Direct ML phasing (method ae3d) against iterative phasing, on held-out Bragg-CDI crystals.

    PYTHONPATH=pkg python benchmarks/ae3d_phasing.py [--configfile FILE] [--threads N]
        [--out benchmarks/results/ae3d] [--train-only] [--n-test K] [--set ae3d.KEY=VALUE ...]

Simulates ``ae3d.n_train`` crystals (seed ``dataset.seed``) and ``n_test`` held-out ones
(seed ``dataset.seed + 1``) with :mod:`spiflow.bragg`, trains :mod:`spiflow.ae3d` (checkpoint
``OUT/ae3d.pt``, resumed when present; log ``OUT/train_log.csv``), then measures per object
(:func:`spiflow.ae3d.compare_methods`): the network alone, iterative phasing (HIO/ER and
RAAR/ER) from random starts at growing budgets, the network + ``refine_iterations`` ER
iterations and the network + one HIO/ER or RAAR/ER cycle, with the
errors of :func:`spiflow.bragg.complex_errors` and wall seconds. Writes ``OUT/results.csv``,
``OUT/results.md`` (with the settings, the training time and the 1-minute load average) and
``OUT/slices.png`` (central slices of the first held-out object).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

from spiflow import ae3d, bragg
from spiflow.settings import settings


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configfile", default=None)
    p.add_argument("--set", action="append", default=[], help="ae3d.KEY=VALUE (YAML value), may repeat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ae3d")
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="load OUT/ae3d.pt instead of training")
    p.add_argument("--n-test", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    raw = yaml.safe_load(Path(a.configfile).read_text()) if a.configfile else {}
    for item in a.set:
        key, value = item.split("=", 1)
        node = raw
        parts = key.split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1]] = yaml.safe_load(value)
    cfg = settings(raw)
    ac, seed = cfg.ae3d, cfg.dataset.seed
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()[0]
    if a.eval_only:
        model, log = ae3d.load_model(out / "ae3d.pt"), pd.read_csv(out / "train_log.csv")
    else:
        t0 = time.perf_counter()
        train = bragg.simulate_crystals(ac.crystals, ac.n_train, seed)
        t_sim = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, log = ae3d.train_ae3d(ac, train, seed, out / "ae3d.pt", out / "train_log.csv", progress=True)
        t_train = time.perf_counter() - t0
        del train
        print(f"simulated {ac.n_train} in {t_sim:.0f} s; trained in {t_train:.0f} s (this call), "
              f"{log['seconds'].sum():.0f} s over all epochs", flush=True)
    if a.train_only:
        return
    test = bragg.simulate_crystals(ac.crystals, a.n_test or ac.n_test, seed + 1)
    slices: dict = {}
    table = ae3d.compare_methods(model, test, ac.refine_iterations, progress=True, slices=slices)
    ae3d.plot_complex_slices({k: slices[k] for k in ae3d.SLICES_METHODS if k in slices}, out / "slices.png")
    table.to_csv(out / "results.csv", index=False)
    summary = ae3d.summarize(table)
    load1 = os.getloadavg()[0]
    text = [f"# ae3d vs iterative phasing ({len(test.intensity)} held-out crystals, n = {ac.crystals.n})", "",
            f"settings: `{ac.model_dump()}`", "",
            f"training: {ac.epochs} epochs, {log['seconds'].sum():.0f} s ({a.threads} threads); "
            f"1-minute load average {load0:.1f} at start, {load1:.1f} at end", "",
            summary.to_markdown(index=False, floatfmt=".3g")]
    (out / "results.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
