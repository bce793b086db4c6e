"""The tiny workflow of test_workflow.py through a real SLURM, with the profiles
profiles/slurm and profiles/slurm-local.

Needs snakemake-executor-plugin-slurm and a SLURM cluster that answers sinfo/sbatch here,
such as the single-node one `workflow/slurm/start-local-slurm.sh` starts (as root; .ci/run
runs it). Without one, the tests skip and say why (pytest -rs prints the reason).
"""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_workflow import TINY

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ["--profile", str(ROOT / "profiles" / "slurm"), "--profile", str(ROOT / "profiles" / "slurm-local")]
SLURM_RULES = {"simulate", "orient_emc", "phase", "evaluate"}
LOCAL_RULES = {"summary", "all"}  # the Snakefile's localrules (seconds each), and `all`
START = "start one as root with: bash workflow/slurm/start-local-slurm.sh"


def slurm_unavailable():
    """None where SLURM can run jobs here, else the reason it cannot."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[test]')"
    for tool in ("sinfo", "sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            return f"no SLURM here: `{tool}` is not on PATH ({START})"
    try:  # answers at once, where sinfo retries for 10 s when the controller is down
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"no SLURM here: scontrol ping did not answer within 30 s ({START})"
    if ping.returncode != 0:
        msg = ((ping.stdout + ping.stderr).strip().splitlines() or ["failed"])[0]
        return f"no SLURM here: scontrol ping: {msg} ({START})"
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return f"no SLURM here: sinfo did not answer within 30 s ({START})"
    if res.returncode != 0:
        return f"no SLURM here: sinfo failed: {(res.stderr or res.stdout).strip()[:300]} ({START})"
    usable = [line for line in res.stdout.splitlines()
              if line.split()[:1] == ["up"] and line.split()[1].rstrip("*~#") in ("idle", "mix")]
    if not usable:
        return f"SLURM has no idle node in an up partition: sinfo says {res.stdout.strip()!r} ({START})"
    return None


REASON = slurm_unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=str(REASON))]


def snakemake_slurm(work, *args, check=True):
    """Snakemake with the profiles slurm + slurm-local (status by squeue: the local SLURM has
    no accounting database), run in `work`: at most 2 cores per job (the local node may have
    only 2), first status check after 2 s, SLURM logs kept, sbatch calls logged."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), *PROFILES, "--cores", "2",
           "--configfile", str(work / "tiny.yaml"), "--slurm-init-seconds-before-status-checks", "2",
           "--slurm-keep-successful-logs", "--verbose", "--show-failed-logs", *args]
    res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=1200)
    if check and res.returncode != 0:
        out = "\n".join(line for line in (res.stdout + res.stderr).splitlines()
                        if not line.startswith(("sbatch call", "DEBUG")))  # without --verbose's chatter
        raise AssertionError(f"snakemake --profile slurm failed:\n{out[-8000:]}")
    return res


def sbatch_calls(text):
    """{rule: [sbatch command lines]} from Snakemake's --verbose output."""
    calls = {}
    for line in text.splitlines():
        if "sbatch call: sbatch" in line:
            rule = re.search(r"--comment '?rule_([A-Za-z_]+?)(?:_wildcards_[^ ']*)?'? ", line).group(1)
            calls.setdefault(rule, []).append(line[line.index("sbatch "):])
    return calls


def tasks_profile(work, rule="orient_emc", tasks=2):
    """A third profile (after slurm, slurm-local) that gives ``rule`` ``tasks`` SLURM tasks of
    one CPU each (the README's profile lines, uncommented: tasks, mpi: srun), so one EMC run
    spreads over the ranks srun starts. Later profiles replace whole keys: the rest is
    profiles/slurm's."""
    base = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    profile = work / "profile-tasks"
    profile.mkdir()
    (profile / "config.yaml").write_text(yaml.safe_dump({
        "set-threads": {**base["set-threads"], rule: 1},
        "set-resources": {**base["set-resources"], rule: {**base["set-resources"][rule], "tasks": tasks,
                                                          "mpi": "srun"}}}))
    return ["--profile", str(profile)]


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm")
    # emc only: every method adds SLURM jobs of ~20 s start-up each. EMC runs on 2 ranks, the
    # 2 tasks of its SLURM job, started by srun (spiflow.launch)
    (work / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "reconstruction": {"methods": ["emc"]},
                                                    "emc": {**TINY["emc"], "processes": 2}}))
    res = snakemake_slurm(work, *tasks_profile(work))
    return work, res.stdout + res.stderr


def test_tiny_workflow_through_slurm(slurm_run):
    work, log = slurm_run
    r = work / "results" / "tiny"
    summary = pd.read_csv(r / "evaluate" / "summary.csv")
    assert list(summary.method) == ["emc"]
    assert (r / "phase" / "emc" / "density.mrc").stat().st_size > 0
    assert (r / "evaluate" / "emc" / "fsc.csv").exists()
    assert (r / "evaluate" / "fsc.png").stat().st_size > 1000

    # every job but the localrules went to SLURM: its job id in Snakemake's log, the SLURM
    # log file that slurmd wrote for it (named by the job id), the sbatch call
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+)\)", log)
    assert len(submitted) == 4, log[-4000:]  # simulate, orient_emc, phase, evaluate
    assert set(re.findall(r"^localrule (\w+):", log, re.M)) == LOCAL_RULES
    slurm_logs = (work / ".snakemake" / "slurm_logs").resolve()
    for jobid, path in submitted:
        f = Path(path).resolve()
        assert f.name == f"{jobid}.log" and f.is_relative_to(slurm_logs) and f.exists(), path
        assert "--executor slurm-jobstep" in f.read_text()  # the job ran Snakemake inside SLURM
    assert {p.name.removeprefix("rule_") for p in slurm_logs.iterdir()} == SLURM_RULES

    # SLURM itself saw them finish (squeue keeps finished jobs for MinJobAge seconds)
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    q = subprocess.run(["squeue", "--states=all", "-h", "--name", run_id, "-o", "%i|%T"],
                       capture_output=True, text=True, timeout=30, check=True)
    states = dict(line.split("|") for line in q.stdout.split())
    assert states, f"squeue knows no job of run {run_id}"
    assert set(states) <= {jobid for jobid, _ in submitted}
    assert set(states.values()) == {"COMPLETED"}, states

    # EMC ran as 2 ranks, started by srun inside its 2-task allocation: the same EMC as one
    # process (tests/test_distributed.py holds the equality; here the launch)
    job_log = (r / "logs" / "orient_emc.log").read_text()
    assert "emc across 2 processes: srun --ntasks=2" in job_log, job_log[-3000:]


def test_profile_resources_reach_sbatch(slurm_run):
    _, log = slurm_run
    calls = sbatch_calls(log)
    assert set(calls) == SLURM_RULES
    (emc,) = calls["orient_emc"]
    assert "--ntasks=2" in emc and "--cpus-per-task=1" in emc  # tasks_profile: 2 ranks of 1 thread
    assert "-t 240" in emc  # runtime from the profile's set-resources
    assert "--mem 6096" in emc  # mem_mb from the rule: 2 x memory_budget_gb (2) + 2 GB
    (sim,) = calls["simulate"]
    assert "--cpus-per-task=2" in sim and "--mem 4000" in sim and "-t 30" in sim
    (ev,) = calls["evaluate"]
    assert "--cpus-per-task=1" in ev and "--mem 4000" in ev and "-t 30" in ev
    assert not any("--gpu" in c or "--gres" in c for cs in calls.values() for c in cs)  # device: auto


def test_gpu_rules_ask_slurm_for_a_gpu(slurm_run):
    """With device: cuda, orient_emc asks SLURM for one GPU (sbatch --gpus=1). A node without
    GPUs refuses the job at once; a GPU cluster runs it. Either way the request shows."""
    work, _ = slurm_run
    # device is a param of every numerical stage, so it would rerun simulate first: only the forced job here
    res = snakemake_slurm(work, "--config", "device=cuda", "--forcerun", "orient_emc", "--until", "orient_emc",
                          "--rerun-triggers", "mtime", check=False)
    (emc,) = sbatch_calls(res.stdout + res.stderr)["orient_emc"]
    assert "--gpus=1" in emc and "--cpus-per-task=2" in emc  # without tasks_profile: the rule's threads
