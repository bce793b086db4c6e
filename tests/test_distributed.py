"""One reconstruction across processes (spiflow.distributed): two gloo ranks on CPU give the
one-process result to floating-point tolerance (summation order differs), checkpoints move
between process counts, and an error on one rank stops both."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import yaml

from conftest import ROOT, TINY, snakemake
from spiflow.distributed import FrameRange, Ranks, frame_ranges, run_local
from spiflow.io import open_dataset
from spiflow.launch import launch_command, run_stage, slurm_tasks
from spiflow.settings import EMCSettings
from test_emc import SMALL, _run, data  # noqa: F401  (data: the EMC tests' synthetic frames, a fixture)

torch.set_num_threads(2)

#: every feature of the schedule: random starts on the first frames at a coarser sampling,
#: annealing β every iteration, local refinement, sparse photons, checkpoints and the log
FULL = dict(SMALL, iterations=4, beta_every=1, beta_factor=2.0, n_starts=2, start_iterations=2, start_frames=120,
            start_num_div=1, refine_iterations=2, photon_format="sparse", search="coarse_to_fine",
            resolution_start=0.6, resolution_iterations=3)  # marching and the coarse-to-fine search across ranks too
SHORT = dict(SMALL, iterations=2)
LONG = dict(SMALL, iterations=4)


def test_frame_ranges_follow_chunks():
    assert frame_ranges(10, 1) == [(0, 10)]
    assert frame_ranges(10, 2) == [(0, 5), (5, 10)]
    assert frame_ranges(250, 2, chunk=50) == [(0, 100), (100, 250)]  # 5 chunks: 2 + 3
    assert frame_ranges(101, 3, chunk=50) == [(0, 50), (50, 100), (100, 101)]
    with pytest.raises(ValueError, match="cannot be shared by 3 ranks"):
        frame_ranges(100, 3, chunk=50)
    a = np.arange(40).reshape(10, 2, 2)
    view = FrameRange(a, 5, 10)
    assert view.shape == (5, 2, 2) and np.array_equal(view[1:3], a[6:8]) and np.array_equal(view[:], a[5:])


def test_one_process_ranks_are_the_identity():
    r, x = Ranks(), torch.tensor([1.0, 2.0, 4.0])
    assert r.sum_(x) is x and r.gather(x, [3]) is x and r.broadcast({"a": 1}) == {"a": 1}
    assert r.mean(x).item() == x.mean().item() and r.std(x) == pytest.approx(x.double().std().item())
    assert r.total(1, 2.5) == [1.0, 2.5] and r.bytes_communicated == 0
    with pytest.raises(KeyError):
        r.agree(KeyError("x"))


def _worker(d, tmp):
    """One rank: the FULL run, a resume of a one-process checkpoint, a run with a bad frame."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    res = _run(d, config=FULL, checkpoint_path=tmp / "full2.pt", log_path=tmp / "full2.csv")
    out.update({f"full_{k}": getattr(res, k) for k in ("intensity", "weight", "quaternion", "gain",
                                                         "probability_max")})
    out["full_loglik"] = res.log["log_likelihood"].to_numpy()
    res = _run(d, config=LONG, checkpoint_path=tmp / "resume.pt")
    out.update(resume_intensity=res.intensity, resume_gain=res.gain, resume_quaternion=res.quaternion,
               resume_loglik=res.log["log_likelihood"].to_numpy())
    bad = d["photons"].copy()
    bad[150, 3, 3] = -1  # in rank 1's frames 100:200
    try:
        _run(d, photons=bad, config=SMALL)
        message = "no error"
    except (ValueError, RuntimeError) as exc:
        message = f"{type(exc).__name__}: {exc}"
    (tmp / f"error{rank}.json").write_text(json.dumps(message))
    if rank == 0:
        np.savez(tmp / "rank0.npz", **out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process(data, tmp_path):  # noqa: F811
    one = _run(data, config=FULL, checkpoint_path=tmp_path / "full1.pt", log_path=tmp_path / "full1.csv")
    _run(data, config=SHORT, checkpoint_path=tmp_path / "resume.pt")  # a one-process checkpoint ...
    long1 = _run(data, config=LONG)  # ... that the two ranks continue to LONG's iterations
    run_local(_worker, 2, data, tmp_path)
    two = np.load(tmp_path / "rank0.npz")

    assert one.log["start"].max() == 1 and len(one.log) == 2 * 2 + 2 + 2  # two starts, global, local
    np.testing.assert_allclose(two["full_loglik"], one.log["log_likelihood"], rtol=1e-9)
    np.testing.assert_allclose(two["full_intensity"], one.intensity, rtol=1e-5, atol=1e-6 * one.intensity.max())
    np.testing.assert_allclose(two["full_weight"], one.weight, rtol=1e-5)
    np.testing.assert_allclose(two["full_gain"], one.gain, rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(two["full_quaternion"] * one.quaternion, 1)), 1.0, atol=1e-9)
    np.testing.assert_allclose(two["full_probability_max"], one.probability_max, rtol=1e-9)
    # rank 0 wrote the log and a checkpoint with every frame's gains and orientations
    log2 = np.loadtxt(tmp_path / "full2.csv", delimiter=",", skiprows=1, usecols=3)
    np.testing.assert_allclose(log2, one.log["log_likelihood"], rtol=1e-9)
    ck1, ck2 = (torch.load(tmp_path / f"full{k}.pt", weights_only=True) for k in (1, 2))
    for key in ("gain", "quaternion", "probability_max", "model", "weight"):
        np.testing.assert_allclose(ck2[key].numpy(), ck1[key].numpy(), rtol=1e-5, atol=1e-9 * ck1[key].abs().max())
    assert ck2["fingerprint"] == ck1["fingerprint"] and ck2["local_done"] == ck1["local_done"] == 2

    # the two ranks resumed the one-process checkpoint after iteration 2 and went on to 4
    np.testing.assert_allclose(two["resume_loglik"], long1.log["log_likelihood"], rtol=1e-9)
    np.testing.assert_allclose(two["resume_intensity"], long1.intensity, rtol=1e-5, atol=1e-6 * long1.intensity.max())
    np.testing.assert_allclose(two["resume_gain"], long1.gain, rtol=1e-9)
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["iteration"] == 4

    # a negative count in rank 1's frames: rank 1 names the frames, rank 0 stops too
    err0, err1 = (json.loads((tmp_path / f"error{r}.json").read_text()) for r in (0, 1))
    assert err1.startswith("ValueError: photons[100:200]") and "negative" in err1
    assert err0 == "RuntimeError: rank(s) [1] failed; see their error"



def test_launch_command_torchrun_or_srun(tmp_path):
    cmd, extra = launch_command(3, tmp_path / "s.json", "emc.processes", env={})
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"] and extra == {}
    assert cmd[-3:] == ["-m", "spiflow.launch", str(tmp_path / "s.json")]
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
    cmd, extra = launch_command(4, "s.json", "emc.processes", env=slurm)
    assert cmd[:3] == ["srun", "--ntasks=4", "--kill-on-bad-exit=1"] and int(extra["MASTER_PORT"]) > 0
    with pytest.raises(ValueError, match="emc.processes = 8, but this SLURM allocation has 4 tasks"):
        launch_command(8, "s.json", "emc.processes", env=slurm)
    assert slurm_tasks({"SLURM_NTASKS": "4"}) == 0  # not inside an allocation


def test_slurm_tasks_from_scontrol_when_the_jobstep_removed_them(tmp_path, monkeypatch):
    """Snakemake's jobstep plugin keeps only SLURM_JOB_ID (and the like) for the rule's
    commands: the task count and nodes then come from ``scontrol show job``."""
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n"
                    "if [ \"$1 $2\" = 'show job' ]; then echo 'JobId=7 NumTasks=3 NodeList=nodeA,nodeB'; "
                    "else echo nodeA; echo nodeB; fi\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    assert slurm_tasks({"SLURM_JOB_ID": "7"}) == 3
    cmd, extra = launch_command(3, "s.json", "emc.processes", env={"SLURM_JOB_ID": "7"})
    assert cmd[:2] == ["srun", "--ntasks=3"] and extra["MASTER_ADDR"] == "nodeA"
    with pytest.raises(ValueError, match="has 3 tasks"):
        launch_command(4, "s.json", "emc.processes", env={"SLURM_JOB_ID": "7"})
    with pytest.raises(ValueError, match="no stage 'phase'"):
        run_stage("phase", {}, 2)


@pytest.mark.slow
def test_workflow_runs_emc_on_two_processes(tmp_path):
    """orient_emc with emc.processes: 2 runs under torchrun through Snakemake and writes what
    one process writes (to summation-order tolerance, in float64)."""
    # float64: in float32 the summation order (ranks, numba's threads) flipped some hard local
    # assignments, moving 1 % of the voxels by up to 2× (measured)
    emc = {**TINY["emc"], "dtype": "float64"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "emc": {**emc, "processes": 2}}))
    run = tmp_path / "results" / "tiny"
    snakemake(tmp_path, targets=[str((run / "recon/emc/intensity.zarr").relative_to(tmp_path))])
    log = (run / "logs" / "orient_emc.log").read_text()
    assert "torch.distributed.run --standalone --nproc_per_node=2" in log and "rank 1 " in log
    config = {"emc": {**EMCSettings().model_dump(), **emc}, "dataset": TINY["dataset"], "device": "cpu"}
    one = tmp_path / "one"
    run_stage("emc", config, 1, progress=False, patterns=str(run / "simulate/patterns.zarr"),
              intensity=str(one / "intensity.zarr"), orientations=str(one / "orientations.zarr"),
              log_csv=str(one / "log.csv"), checkpoint=str(one / "checkpoint.pt"))
    for store, names in [("intensity.zarr", ["intensity"]), ("orientations.zarr", ["quaternion", "gain"])]:
        a, b = open_dataset(run / "recon/emc" / store), open_dataset(one / store)
        for name in names:
            x, y = a[name].values, b[name].values
            if name == "quaternion":
                x, y = np.abs(np.sum(x * y, -1)), np.ones(len(x))
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9 * np.abs(y).max())
    np.testing.assert_allclose(pd.read_csv(run / "recon/emc/emc_log.csv").log_likelihood,
                               pd.read_csv(one / "log.csv").log_likelihood, rtol=1e-9)


def test_torch_threads_survive_numba_pool_launch():
    """A rank keeps the threads it was given: the first numba kernel launches numba's OpenMP
    pool, which used to raise torch's threads to all cores (two ranks × two threads on two
    cores). In a fresh process, since the pool launches once per process."""
    code = ("import torch; torch.set_num_threads(1)\n"
            "from spiflow import slicing_cpu\n"
            "slicing_cpu.numba is None or slicing_cpu._threads()\n"
            "assert torch.get_num_threads() == 1, torch.get_num_threads()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "pkg")))
    assert res.returncode == 0, res.stderr[-2000:]
