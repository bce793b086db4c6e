"""Start one stage of the workflow across processes: ``torchrun`` on one node, ``srun``
across the tasks of a SLURM allocation.

:func:`run_stage` is what the rules' scripts call: with ``processes = 1`` it runs the
stage (a :mod:`spiflow.pipeline` function) in this process; with more it writes the stage's
arguments to a JSON file next to its checkpoint and starts ``processes`` copies of
``python -m spiflow.launch FILE`` (:func:`main`), the ranks of one
:mod:`torch.distributed` group (:mod:`spiflow.distributed`), and waits for them:

* inside a SLURM allocation with more than one task (``SLURM_JOB_ID`` and ``SLURM_NTASKS``
  > 1 in the environment, e.g. a Snakemake job submitted by snakemake-executor-plugin-slurm
  with the resources ``tasks`` and ``mpi``: README, "One reconstruction across
  processes"): ``srun --ntasks=processes --kill-on-bad-exit=1``, the rendezvous at the
  allocation's first node (``MASTER_ADDR``, a free ``MASTER_PORT``); each task maps
  ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` to ``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``;
* otherwise ``python -m torch.distributed.run --standalone --nproc_per_node=processes``
  (torchrun) on this node.

The ranks' output goes to this process's standard output and error (the rule's log).
Rank 0 writes the stage's outputs. Under torchrun every rank gets ``threads // processes``
CPU threads; under srun ``threads`` (each task's ``--cpus-per-task``).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

#: the stages that run across processes: name → function of :mod:`spiflow.pipeline`
STAGES = {"emc": "stage_emc", "mtip": "stage_mtip", "selfsup": "stage_selfsup"}


def slurm_job(job_id: str) -> dict[str, str]:
    """The fields of ``scontrol show job --oneliner JOB_ID`` (``NumTasks``, ``NodeList``, …);
    empty when scontrol is missing or fails."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def slurm_tasks(env=None) -> int:
    """The tasks of the SLURM allocation this process runs in, 0 outside SLURM (no
    ``SLURM_JOB_ID``): ``SLURM_NTASKS``, or where that was removed (the Snakemake jobstep
    plugin keeps only the job's identity for the job's own commands) the job's ``NumTasks``
    from scontrol (:func:`slurm_job`); 1 when neither says."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return 0
    if "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return int(slurm_job(env["SLURM_JOB_ID"]).get("NumTasks", "1"))


def _first_node(env) -> str:
    """The allocation's first host (``scontrol show hostnames`` of ``SLURM_JOB_NODELIST``, or
    of the job's ``NodeList`` where the variable was removed), else this host."""
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not nodelist and "SLURM_JOB_ID" in env:
        nodelist = slurm_job(env["SLURM_JOB_ID"]).get("NodeList")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return socket.gethostname()


def launch_command(processes: int, spec: str | os.PathLike, key: str, env=None) -> tuple[list[str], dict]:
    """The command line and the extra environment that start ``processes`` ranks of
    ``python -m spiflow.launch spec`` (module docstring: srun inside a SLURM allocation of
    more than one task, else torchrun). key: the setting, named in errors. Raises
    ValueError when the SLURM allocation has fewer tasks than ``processes``."""
    from .distributed import free_port

    env = os.environ if env is None else env
    tasks = slurm_tasks(env)
    child = ["-m", "spiflow.launch", str(spec)]
    if tasks > 1:
        if tasks < processes:
            raise ValueError(f"{key} = {processes}, but this SLURM allocation has {tasks} tasks: give the rule the "
                             f"resource tasks={processes} (README, 'One reconstruction across processes')")
        return (["srun", f"--ntasks={processes}", "--kill-on-bad-exit=1", sys.executable, *child],
                {"MASTER_ADDR": _first_node(env), "MASTER_PORT": str(free_port())})
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            *child], {}


def _stream(f):
    """f's file descriptor for a child process, or None (inherit) when it has none."""
    try:
        f.flush()
        return f.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def run_stage(stage: str, config: dict, processes: int, threads: int | None = None, progress: bool = True,
              **args) -> None:
    """Run pipeline stage ``stage`` (a key of :data:`STAGES`) with ``config`` and keyword
    ``args`` (paths: JSON-serialisable) in one process, or across ``processes`` ranks
    (module docstring); threads: the CPU threads of the whole stage (None: torch's).
    Raises ValueError for an unknown stage or processes < 1, RuntimeError naming the
    stage when the ranks fail (their errors are in the log)."""
    from . import pipeline

    if stage not in STAGES:
        raise ValueError(f"no stage {stage!r} runs across processes; known: {sorted(STAGES)}")
    key = f"{stage}.processes"
    if processes < 1:
        raise ValueError(f"{key} must be >= 1, got {processes}")
    if processes == 1:
        getattr(pipeline, STAGES[stage])(config, progress=progress, **args)
        return
    folder = Path(args.get("checkpoint") or args.get("log_csv") or ".").parent
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / f".launch-{stage}-{os.getpid()}.json"
    # srun: each task has the rule's threads as its --cpus-per-task; torchrun: they share them
    per_rank = (threads or 1) if slurm_tasks() > 1 else max(1, (threads or os.cpu_count() or 1) // processes)
    spec.write_text(json.dumps({"stage": stage, "config": config, "args": args, "threads": per_rank,
                                "progress": progress}))
    try:
        cmd, extra = launch_command(processes, spec, key)
        env = dict(os.environ, OMP_NUM_THREADS=str(per_rank), **extra)
        logging.getLogger(__name__).info("%s across %d processes: %s", stage, processes, " ".join(cmd))
        rc = subprocess.run(cmd, env=env, stdout=_stream(sys.stdout), stderr=_stream(sys.stderr)).returncode
    finally:
        spec.unlink(missing_ok=True)
    if rc != 0:
        raise RuntimeError(f"stage {stage} across {processes} processes failed (exit status {rc}); "
                           f"the ranks' errors are in the log above")


def main(argv=None) -> int:
    """One rank: ``python -m spiflow.launch SPEC.json`` (written by :func:`run_stage`)."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # started by srun
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format=f"%(asctime)s rank {rank} %(name)s %(levelname)s %(message)s")
    from . import pipeline

    pipeline.configure_threads(spec["threads"])
    try:
        getattr(pipeline, STAGES[spec["stage"]])(spec["config"], progress=spec["progress"] and rank == 0,
                                                 **spec["args"])
    except BaseException:
        logging.getLogger("spiflow").exception("rank %d failed", rank)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
