"""Interrupting a run and rerunning it: Ctrl-C, a killed job, SIGKILL of everything, SIGTERM.

One tiny workflow up to EMC (long enough to interrupt) goes through, in turn:
1. Ctrl-C (SIGINT to Snakemake's process group) during EMC: Snakemake leaves its
   incomplete-output markers, and a plain (dry) run refuses to start (IncompleteFilesException;
   checked after this step and after step 3 wherever markers were left, at least once);
2. ``--rerun-incomplete``: EMC resumes from its checkpoint; during it the EMC job alone gets
   SIGTERM (a SLURM time limit): the job fails, Snakemake removes its outputs;
3. a plain rerun resumes again; during it everything is killed with SIGKILL (a lost node);
4. ``--unlock`` (the lock a killed Snakemake may leave), then ``--rerun-incomplete`` runs
   to the end.
Afterwards the simulated data were never rewritten, EMC resumed three times from later and
later checkpoints, and its log holds every iteration exactly once.
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from test_workflow import ROOT, TINY

ITERATIONS = 400
CONFIG = {**TINY, "run": "intr", "reconstruction": {"methods": ["emc"]},
          "emc": {"num_div": 3, "iterations": ITERATIONS, "beta_every": 150, "refine_iterations": 2}}


def _start(work, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(work),
           "--cores", "2", "--configfile", str(work / "c.yaml"), "--until", "orient_emc", *args]
    # Ctrl-C as a terminal gives it: SIGINT at its default. An ignored signal is inherited through
    # exec (and Python then keeps ignoring it), and after the rest of the suite the test process
    # may ignore SIGINT: in CI the EMC job ran on through the Ctrl-C below.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _checkpoint_iteration(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def _wait_for_checkpoint(proc, path: Path, after: int, log: Path | None = None, timeout: float = 240) -> int:
    """Wait until this run's EMC job has written a checkpoint past iteration ``after``; returns
    its iteration. With ``log`` (removed before the run started) the job must first have logged
    its resume, and the checkpoint must be past that: a job of the previous run, still ending
    after its SIGTERM, may write one more checkpoint before this run's job starts."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        resumed = _resumed(log.read_text()) if log is not None and log.exists() else []
        floor = max([after, *resumed])
        it = _checkpoint_iteration(path)
        if (log is None or resumed) and floor < it < ITERATIONS - 100:
            return it
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("no EMC checkpoint appeared in time")


def _resumed(log_text: str) -> list[int]:
    """The iterations after which the EMC log says it resumed."""
    return [int(line.rsplit(" ", 1)[1]) for line in log_text.splitlines() if "EMC resumes from checkpoint" in line]


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` in the process tree (by the parent ids in /proc/PID/stat),
    whatever its session or group."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _job_pids(session: int, name: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == session and name in (d / "cmdline").read_text():
                    pids.append(int(d.name))
            except (OSError, ProcessLookupError):
                pass
    return pids


def _refuses(work, *errors) -> bool:
    """Whether Snakemake left incomplete-output markers; if so, check that a dry run then
    refuses to start with one of ``errors``."""
    markers = list((work / ".snakemake" / "incomplete").glob("*"))
    if markers:
        rc, out = _finish(_start(work, "-n"))
        assert rc != 0 and any(e in out for e in errors), out[-2000:]
    return bool(markers)


def _finish(proc, timeout=300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc to find the EMC job")
def test_interrupted_runs_resume_from_the_checkpoint_and_lose_nothing(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    r = tmp_path / "results" / "intr"
    ckpt, emc_log = r / "recon" / "emc" / "checkpoint.pt", r / "recon" / "emc" / "emc_log.csv"
    job_log = r / "logs" / "orient_emc.log"  # removed before each rerun: then it is that run's own

    # 1. Ctrl-C during EMC
    proc = _start(tmp_path)
    k1 = _wait_for_checkpoint(proc, ckpt, 0)
    patterns_written = (r / "simulate" / "patterns.zarr" / "zarr.json").stat().st_mtime_ns
    # a terminal's Ctrl-C reaches the jobs too, whatever their group: every process below
    # Snakemake (only the EMC job runs now), held still first, so that a fast EMC (80
    # iterations/s on a quiet machine) cannot finish between the checkpoint seen and the signal
    jobs = _descendants(proc.pid)
    for pid in jobs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    assert jobs and _checkpoint_iteration(ckpt) < ITERATIONS, "EMC ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    for pid in jobs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
            os.kill(pid, signal.SIGCONT)  # the pending SIGINT is delivered as it resumes
    _finish(proc, 120)  # Snakemake's own exit status after Ctrl-C varies (asyncio shutdown)
    assert not (r / "recon" / "emc" / "intensity.zarr").exists()
    refused = [_refuses(tmp_path, "IncompleteFilesException")]

    # 2. --rerun-incomplete; the EMC job alone gets SIGTERM
    job_log.unlink(missing_ok=True)
    proc = _start(tmp_path, "--rerun-incomplete")
    k2 = _wait_for_checkpoint(proc, ckpt, k1, job_log)
    log2 = job_log.read_text()
    pids = _job_pids(proc.pid, "orient_emc")
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    rc, out = _finish(proc)
    assert pids and rc != 0 and "Error in rule orient_emc" in out, (pids, out[-3000:])
    assert "SystemExit: 143" in job_log.read_text()

    # 3. plain rerun (Snakemake cleaned up the failed job); SIGKILL to everything
    job_log.unlink(missing_ok=True)
    proc = _start(tmp_path)
    k3 = _wait_for_checkpoint(proc, ckpt, k2, job_log)
    log3 = job_log.read_text()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    refused.append(_refuses(tmp_path, "LockException", "IncompleteFilesException"))
    assert any(refused)  # Snakemake's incomplete-output handling was exercised

    # 4. a killed Snakemake may leave its lock and incomplete markers: --unlock, then
    # --rerun-incomplete to the end
    assert _finish(_start(tmp_path, "--unlock"))[0] == 0
    job_log.unlink(missing_ok=True)
    rc, out = _finish(_start(tmp_path, "--rerun-incomplete"))
    assert rc == 0, out[-3000:]
    log4 = job_log.read_text()
    assert not re.search(r"^(local)?rule simulate:", out, re.M)  # finished work is never redone
    assert (r / "simulate" / "patterns.zarr" / "zarr.json").stat().st_mtime_ns == patterns_written

    resumed = [it for log in (log2, log3, log4) for it in _resumed(log)]
    assert len(resumed) == 3 and resumed[0] >= k1 and resumed[1] >= k2 and resumed[2] >= k3
    assert resumed == sorted(resumed) and resumed[0] < resumed[2]
    log = pd.read_csv(emc_log)
    main = log[log.iteration > CONFIG["emc"].get("start_iterations", 21)]
    assert list(main.iteration) == list(range(main.iteration.min(), ITERATIONS + 3))  # + 2 local iterations
    assert not log.duplicated(["iteration", "start"]).any()
    assert (r / "recon" / "emc" / "intensity.zarr" / "zarr.json").exists()
