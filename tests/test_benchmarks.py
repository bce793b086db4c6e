"""The benchmark scripts run: benchmarks/run.py's --tiny smoke run and benchmarks/emc_accuracy.py on
its simulated patterns, without Dragonfly; benchmarks/orientation_limit.py on a tiny nanoparticle run."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_tiny_run(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny", "--no-dragonfly",
                           "--threads", "1", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = {(r["section"], r["variant"].split(" β=")[0]) for r in rows}
    for want in [("simulate", "simulate stage"), ("emc", "EMC dense"), ("emc", "EMC sparse"),
                 ("emc", "E-step GEMM"), ("formats", "EMC dense"), ("formats", "EMC sparse"),
                 ("phase", "RAAR/ER + shrinkwrap"), ("emc", "E-step search exhaustive"),
                 ("emc", "E-step search coarse_to_fine")]:
        assert want in got, want
    assert all(float(r["value"]) > 0 for r in rows)
    assert not any(r["tool"] == "dragonfly" for r in rows)
    md = (out / "results.md").read_text()
    assert "| section | problem |" in md and "load average" in md
    # the accuracy benchmark on the same patterns: one row per search, scored against the truth
    sim = work / "sim_40_16_500"
    acc = tmp_path / "accuracy"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "emc_accuracy.py"), "--patterns",
                           str(sim / "patterns.zarr"), "--truth", str(sim / "truth.zarr"), "--num-div", "2",
                           "--iterations", "3", "--no-dragonfly", "--threads", "1", "--out", str(acc)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(acc / "results.csv")))
    assert [r["variant"] for r in rows] == ["exhaustive", "coarse_to_fine"]
    assert all(0 <= float(r["median_error_deg"]) <= 180 and float(r["s_per_iteration"]) > 0 for r in rows)
    assert all(int(r["iterations"]) == 3 for r in rows)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "emc_accuracy.py"), "--patterns",
                           str(sim / "patterns.zarr"), "--truth", str(sim / "truth.zarr"), "--num-div", "2",
                           "--start", "random", "--iterations", "2", "--searches", "coarse_to_fine", "--no-dragonfly",
                           "--threads", "1", "--out", str(acc)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(acc / "results.csv")))
    assert len(rows) == 1 and rows[0]["start"] == "random" and int(rows[0]["iterations"]) == 2


def test_gpu_check_skips_cleanly_without_cuda():
    """make gpu-check on a machine without CUDA: a clear "skipped" line and exit status 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu-check: skipped, no CUDA device here" in proc.stdout


@pytest.mark.slow  # two subprocesses: about 15 s
def test_orientation_limit_runs_on_a_small_nanoparticle_run(tmp_path):
    """benchmarks/orientation_limit.py on a 12-frame nanoparticle run at high signal: every
    frame oriented against its own true intensity (to well below what random orientations
    give modulo Oh, about 45°) and against the nearest reference state, one csv row each."""
    import yaml

    from spiflow import config as cfg
    from spiflow import simulate

    config = cfg.validate(cfg.merge({
        "sample": {"kind": "nanoparticles", "nanoparticles": {"size_range_angstrom": [8.0, 12.0]},
                   "reference_states": 2},
        "dataset": {"n_patterns": 12, "seed": 4, "chunk_frames": 5},
        "detector": {"n_pixels": 12, "pixel_size_m": 2.6e-3, "beam_stop_radius_m": 2e-3},
        "beam": {"mean_photons_per_pattern": 1e5}, "simulate": {"pilot_orientations": 8},
        "evaluate": {"symmetry": "Oh"}}, {}))
    run = tmp_path / "run"
    simulate.simulate(config, run / "simulate" / "patterns.zarr", run / "simulate" / "truth.zarr", progress=False)
    (run / "evaluate").mkdir()
    (run / "evaluate" / "config.yaml").write_text(yaml.safe_dump(config))
    for model in ("own", "nearest_state"):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "orientation_limit.py"), str(run),
                               "--frames", "12", "--num-div", "4", "--model", model, "--csv", str(tmp_path / "e.csv")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "median error" in proc.stdout
        rows = pd.read_csv(tmp_path / "e.csv")
        assert len(rows) == 12 and ((rows.error_deg >= 0) & (rows.error_deg <= 180)).all()
        if model == "own":  # num_div 4 (step ≈ 13°): measured median 9.3°
            assert rows.error_deg.median() < 20, rows.error_deg.tolist()
