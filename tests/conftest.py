"""Shared by the workflow tests: the tiny configuration, Snakemake as a subprocess, and one
tiny end-to-end run per test session (tests/test_workflow.py, tests/test_rerun.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "run": "tiny",
    "sample": {"path": str(ROOT / "data" / "2cex.pdb")},
    "dataset": {"n_patterns": 120, "seed": 3, "chunk_frames": 50},
    "beam": {"mean_photons_per_pattern": 2000.0},
    "detector": {"n_pixels": 12, "pixel_size_m": 2.6e-3, "beam_stop_radius_m": 2.0e-3},
    "simulate": {"pilot_orientations": 16},
    "reconstruction": {"methods": ["truth", "emc", "mtip", "selfsup", "mtip_selfsup"]},
    "emc": {"num_div": 2, "iterations": 3, "refine_iterations": 2},
    "mtip": {"num_div": 2, "iterations": 2},
    "selfsup": {"epochs": 2, "batch_size": 40, "siren_width": 32, "siren_layers": 3, "encoder_width": 8,
                "encoder_stages": 2, "amortize_steps": 10, "amortize_batch": 16},
    "phase": {"n_restarts": 2, "n_average": 2, "n_cycles": 1, "schedule": "RAAR:30,ER:10", "final_er": 10},
    "evaluate": {"align_num_div": 1, "montage_frames": 4},
}


def snakemake(workdir, *args, check=True, configfile="tiny.yaml", targets=()):
    """Snakemake on this repository's Snakefile in ``workdir`` with ``workdir/configfile``;
    raises AssertionError with the end of its output when it fails and ``check``."""
    cmd = [sys.executable, "-m", "snakemake", *targets, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--configfile", str(workdir / configfile), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"snakemake failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    return res


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A directory where the workflow ran once on :data:`TINY` (``tiny.yaml``)."""
    work = tmp_path_factory.mktemp("workflow")
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    snakemake(work)
    return work

