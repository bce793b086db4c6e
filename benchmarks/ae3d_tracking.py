#!/usr/bin/env python
"""Latent tracking of a slowly changing crystal by bounded extremum seeking, with a network
trained elsewhere (no retraining): the stages of rules ae3d_series and ae3d_track
(:func:`spiflow.estrack.stage_series`, :func:`spiflow.estrack.stage_track`) on the settings
of a config file.

    PYTHONPATH=pkg python benchmarks/ae3d_tracking.py --checkpoint OUT/model.pt [--configfile FILE]
        [--threads 2] [--out benchmarks/results/ae3d-tracking]

The series, ES and iterative settings are ``ae3d.tracking`` of the config (the seed
``dataset.seed + 2``). Writes ``OUT/series/crystals{,_truth}.zarr``, ``OUT/tracking.csv``
(per frame and method), ``OUT/tracking.md`` (summary, 1-minute load averages) and
``OUT/tracking.png``, the files of the rules.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from spiflow import estrack
from spiflow.config import load_config
from spiflow.rules import stage_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--configfile", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ae3d-tracking")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    config = load_config(*([a.configfile] if a.configfile else []))
    out = Path(a.out)
    series = (out / "series" / "crystals.zarr", out / "series" / "crystals_truth.zarr")
    estrack.stage_series(stage_config(config, "ae3d_series"), *series)
    estrack.stage_track(stage_config(config, "ae3d_track"), *series, a.checkpoint, out / "tracking.csv",
                        out / "tracking.md", out / "tracking.png", progress=True)
    print((out / "tracking.md").read_text())


if __name__ == "__main__":
    main()
