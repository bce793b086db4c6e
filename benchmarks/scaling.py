"""One EMC reconstruction across processes (spiflow.distributed): seconds per iteration and
frames/s at 1 and 2 processes, bytes communicated per iteration, peak memory per rank.

    python benchmarks/scaling.py                       # the measurement of the README (≈ 10 min on 2 cores)
    python benchmarks/scaling.py --frames 400 --num-div 2 --memory-frames 0 --out /tmp/s   # seconds

The patterns are simulated once with the workflow's defaults (benchmarks/run.py
``simulate_spiflow``: 2CEX, ``--pixels``² detector) into a Zarr store; EMC reads it the way
the workflow does (:func:`spiflow.stores.open_patterns`), each rank only its own chunks. Runs:
1 process × 1 thread, 1 process × 2 threads, 2 processes × 1 thread (gloo, on this machine),
each in fresh processes (:func:`spiflow.distributed.run_local`). Per rank it records the
median seconds of the global iterations (``iterations``, dense photons, float32, no random
starts, no local refinement), the bytes it sent into collectives per iteration (logged by
:mod:`spiflow.emc`) and its peak resident memory (``ru_maxrss``). With ``--memory-frames`` it
repeats the 1- and 2-process runs on the frames tiled to that many (one iteration) for the
peak memory per rank. Writes ``scaling.csv`` and ``scaling.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "pkg"))
sys.path.insert(0, str(REPO / "benchmarks"))


class _Bytes(logging.Handler):
    """Collects the bytes per iteration that spiflow.emc logs across ranks."""

    def __init__(self):
        super().__init__()
        self.values = []

    def emit(self, record):
        m = re.search(r"(\d+) bytes sent into collectives", record.getMessage())
        if m:
            self.values.append(int(m.group(1)))


def _worker(patterns: str, settings: dict, out: str) -> None:
    """One rank (or the one process): EMC on the store; its timings, bytes and memory to JSON."""
    import torch
    from spiflow.emc import run_emc
    from spiflow.settings import EMCSettings
    from spiflow.stores import grid_of, open_patterns

    handler = _Bytes()
    logging.getLogger("spiflow.emc").addHandler(handler)
    logging.getLogger("spiflow.emc").setLevel(logging.INFO)
    pat, photons = open_patterns(patterns)
    t0 = time.perf_counter()
    res = run_emc(photons, pat.valid.values, pat.q.values.astype(np.float64),
                  pat.pixel_factor.values.astype(np.float64), grid_of(pat), EMCSettings(**settings), device="cpu",
                  progress=False)
    rank = int(os.environ.get("RANK", "0"))
    Path(out.format(rank=rank)).write_text(json.dumps({
        "rank": rank, "world": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads(),
        "seconds": res.log["seconds"].tolist(), "wall": time.perf_counter() - t0,
        "bytes_per_iteration": handler.values, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "log_likelihood": float(res.log["log_likelihood"].iloc[-1])}))


def measure(patterns: Path, settings: dict, world: int, threads: int, work: Path) -> list[dict]:
    """Run the worker on ``world`` ranks of ``threads`` threads; the ranks' records."""
    from spiflow.distributed import run_local

    out = work / f"w{world}t{threads}-{{rank}}.json"
    load0 = os.getloadavg()[0]
    run_local(_worker, world, str(patterns), settings, str(out), threads=threads)
    recs = [json.loads(Path(str(out).format(rank=r)).read_text()) for r in range(world)]
    for r in recs:
        r.update(load_start=load0, load_end=os.getloadavg()[0])
    return recs


def tile(src: Path, dst: Path, frames: int) -> None:
    """A copy of the patterns store src with its frames repeated up to ``frames``."""
    import shutil

    import zarr

    shutil.copytree(src, dst)
    group = zarr.open_group(str(dst), mode="r+")
    for name, arr in group.arrays():  # photons and the per-frame coordinates, in their own chunks
        if (arr.metadata.dimension_names or [None])[0] != "frame":
            continue
        old = np.asarray(arr)
        arr.resize((frames,) + old.shape[1:])
        arr[:] = np.arange(frames) if name == "frame" else np.concatenate([old] * -(-frames // len(old)))[:frames]
    zarr.consolidate_metadata(str(dst))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=3000, help="simulated frames (the workflow's default 3,000)")
    ap.add_argument("--pixels", type=int, default=40, help="detector pixels per side (default 40, the workflow's)")
    ap.add_argument("--num-div", type=int, default=6, help="EMC orientation sampling (6: 10,860 orientations)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--memory-frames", type=int, default=30000, help="frames of the peak-memory runs (0: none)")
    ap.add_argument("--memory-num-div", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d") + "-cpu-2cores-distributed")
    args = ap.parse_args(argv)
    from run import simulate_spiflow  # benchmarks/run.py

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sim = simulate_spiflow(args.frames, args.pixels, 3000.0, "cpu", work / "sim")
        settings = dict(num_div=args.num_div, iterations=args.iterations, n_starts=1, refine_iterations=0,
                        photon_format="dense", dtype="float32", beta_start=1.0, beta_factor=1.0)
        for world, threads in [(1, 1), (1, 2), (2, 1)]:
            for r in measure(sim["patterns"], settings, world, threads, work):
                rows.append(dict(r, case="timing", frames=args.frames, num_div=args.num_div))
        if args.memory_frames:
            big = work / "big.zarr"
            tile(sim["patterns"], big, args.memory_frames)
            mem = dict(settings, num_div=args.memory_num_div, iterations=1, memory_budget_gb=4.0)
            for world in (1, 2):
                for r in measure(big, mem, world, 1, work):
                    rows.append(dict(r, case="memory", frames=args.memory_frames, num_div=args.memory_num_div))
    import pandas as pd

    df = pd.DataFrame(rows)
    df["seconds_per_iteration"] = df.seconds.map(lambda s: float(np.median(s)) if s else np.nan)
    df["frames_per_second"] = df.frames / df.seconds_per_iteration
    df["bytes_per_iteration"] = df.bytes_per_iteration.map(lambda b: int(np.median(b)) if b else 0)
    df = df.drop(columns=["seconds"])
    df.to_csv(out / f"{args.tag}.csv", index=False)
    (out / f"{args.tag}.md").write_text(f"# {args.tag}\n\n" + df.to_markdown(index=False) + "\n")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
