"""The benchmark script (benchmarks/run.py) runs: its --tiny smoke run, without Dragonfly."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_script_tiny_run(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--tiny", "--no-dragonfly",
                           "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    got = {(r["section"], r["variant"].split(" β=")[0]) for r in rows}
    for want in [("simulate", "simulate stage"), ("emc", "EMC dense"), ("emc", "EMC sparse"),
                 ("emc", "E-step GEMM"), ("formats", "EMC dense"), ("formats", "EMC sparse"),
                 ("phase", "RAAR/ER + shrinkwrap")]:
        assert want in got, want
    assert all(float(r["value"]) > 0 for r in rows)
    assert not any(r["tool"] == "dragonfly" for r in rows)
    md = (out / "results.md").read_text()
    assert "| section | problem |" in md and "load average" in md


def test_gpu_check_skips_cleanly_without_cuda():
    """make gpu-check on a machine without CUDA: a clear "skipped" line and exit status 0."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gpu-check: skipped, no CUDA device here" in proc.stdout
