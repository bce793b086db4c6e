"""selfsup across processes (DistributedDataParallel, spiflow.distributed): two gloo ranks on
CPU train the pose-search warm start on the tiny high-signal case of tests/test_selfsup.py.

A two-rank run is not the one-process run to floating-point tolerance (each step averages
two batches' gradients, BatchNorm keeps per-rank statistics, augmentation draws per rank), so
it is checked against the truth: the same orientation bound as one process. Within a run both
ranks end with the same bits (merged poses, gathered refinement, gains and encoder poses),
and the finished checkpoint the ranks wrote resumes to the same result."""
import numpy as np
import pytest
import torch
import torch.distributed as dist

from spiflow.distributed import run_local
from spiflow.metrics import orientation_errors
from test_selfsup import SEARCH, _run, rich  # noqa: F401  (rich: the tiny high-signal frames, a fixture)

KEYS = ("intensity", "quaternion", "gain", "encoder_quaternion")


def _worker(d, tmp):
    """One rank: the run with a checkpoint and log, then a rerun that resumes the finished checkpoint."""
    dist.init_process_group("gloo")
    out = {}
    for name in ("run", "resumed"):
        res = _run(d, config=SEARCH, checkpoint_path=tmp / "two.pt", log_path=tmp / "two.csv")
        out.update({f"{name}_{k}": getattr(res, k) for k in KEYS})
        out[f"{name}_loss"] = res.log["loss"].to_numpy()
    np.savez(tmp / f"rank{dist.get_rank()}.npz", **out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_orient_and_agree(rich, tmp_path):  # noqa: F811
    run_local(_worker, 2, rich, tmp_path)
    two, other = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    for key in two.files:  # merged poses, gathered refinement: the same bits on both ranks
        np.testing.assert_array_equal(two[key], other[key])
    for key in KEYS:  # the finished checkpoint resumes to the same result
        np.testing.assert_array_equal(two[f"resumed_{key}"], two[f"run_{key}"])
    assert len(two["run_loss"]) == SEARCH["epochs"]
    assert torch.load(tmp_path / "two.pt", weights_only=True)["epoch"] == SEARCH["epochs"]
    error = np.median(orientation_errors(two["run_quaternion"], rich["quaternion"])[0])
    assert error < 8.0, error  # one process: 5.0° (tests/test_selfsup.py); random: ≈ 126°
    assert two["run_gain"].mean() == pytest.approx(1.0)
