"""Tests of spiflow.phasing: recovery of a known object from exact |F|², errors, PRTF, bad inputs."""
import numpy as np
import pytest
import torch

from spiflow.align import align_density
from spiflow.grid import Grid, density_to_structure_factor
from spiflow.phasing import parse_schedule, phase
from spiflow.settings import PhasingSettings

N = 33
GRID = Grid(N, 1.0 / (N * 2.0))  # 2 Å voxels, 66 Å box
FAST = dict(schedule="RAAR:150,ER:20", n_cycles=2, final_er=30, n_restarts=6, n_average=3)


def blobs(seed=7, nb=5):
    """Asymmetric positive object (Gaussian blobs, e/Å³) within ±11 Å: ≥ 2× oversampled per axis."""
    rng = np.random.default_rng(seed)
    r = GRID.r_axis
    X = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1)
    cen, amp, s = rng.uniform(-7, 7, (nb, 3)), rng.uniform(0.5, 1.5, nb), rng.uniform(2.4, 4.0, nb)
    return sum(a * np.exp(-((X - c) ** 2).sum(-1) / (2 * w * w)) for c, a, w in zip(cen, amp, s))


@pytest.fixture(scope="module")
def truth():
    rho = blobs()
    intensity = (density_to_structure_factor(torch.as_tensor(rho), GRID).abs() ** 2).numpy()
    return rho, intensity


@pytest.fixture(scope="module")
def result(truth):
    return phase(truth[1], GRID, PhasingSettings(**FAST), seed=1, device="cpu")


def test_recovers_known_object(truth, result):
    rho, intensity = truth
    aligned, info = align_density(result.density, rho)
    assert info["cc"] > 0.95
    assert result.density.shape == (N, N, N) and result.density.dtype == np.float32
    assert result.support.shape == (N, N, N) and result.support.dtype == bool
    assert result.errors.shape == (6,) and len(result.chosen) == 3
    assert result.errors[result.chosen[0]] == result.errors.min() < 0.1
    # units: the returned density reproduces the data through the grid's own convention
    F = density_to_structure_factor(torch.as_tensor(result.density, dtype=torch.float64), GRID).abs().numpy()
    A = np.sqrt(intensity)
    assert np.linalg.norm(F - A) / np.linalg.norm(A) < 0.1
    assert abs(result.density.sum() - rho.sum()) < 0.05 * rho.sum()  # F(0) = total electrons


def test_errors_decrease_and_log(result):
    log = result.log
    assert list(log.columns) == ["restart", "iteration", "algorithm", "fourier_error", "support_size"]
    assert set(log.algorithm) == {"RAAR", "ER"} and set(log.restart) == set(range(6))
    for _, rows in log.groupby("restart"):
        assert rows.fourier_error.iloc[-1] < 0.5 * rows.fourier_error.iloc[0]
        assert rows.support_size.iloc[-1] < rows.support_size.iloc[0]  # shrinkwrap tightened it
    assert log.iteration.max() == 2 * 170 + 30


def test_prtf(result):
    assert result.prtf.shape == result.prtf_q.shape == (20,)
    assert np.all(np.diff(result.prtf_q) > 0) and result.prtf_q[-1] < GRID.q_max
    ok = np.isfinite(result.prtf)
    assert ok.sum() >= 18 and np.all((result.prtf[ok] >= 0) & (result.prtf[ok] <= 1 + 1e-9))
    assert np.nanmean(result.prtf[:5]) > 0.9


def test_recovers_object_with_beamstop_hole(truth):
    rho, intensity = truth
    measured = GRID.q_norm() > 2.5 * GRID.dq  # 81 low-q voxels free, including q = 0
    noisy = intensity.copy()
    noisy[~measured] = -1.0  # unmeasured values are ignored (and negatives clipped)
    res = phase(noisy, GRID, PhasingSettings(**FAST), measured=measured, seed=2, device="cpu")
    _, info = align_density(res.density, rho)
    assert info["cc"] > 0.95


def test_hio_er_schedule_and_reproducible(truth):
    cfg = PhasingSettings(schedule="HIO:30,ER:10", n_cycles=1, final_er=5, n_restarts=3, n_average=2)
    a = phase(truth[1], GRID, cfg, seed=5, device="cpu")
    b = phase(truth[1], GRID, cfg, seed=5, device="cpu")
    c = phase(truth[1], GRID, cfg, seed=6, device="cpu")
    assert np.array_equal(a.density, b.density) and np.array_equal(a.errors, b.errors)
    assert not np.array_equal(a.errors, c.errors)
    assert set(a.log.algorithm) == {"HIO", "ER"}


def test_parse_schedule():
    assert parse_schedule("RAAR:300, er:50") == [("RAAR", 300), ("ER", 50)]
    assert parse_schedule(["HIO:10", ("ER", 5)]) == [("HIO", 10), ("ER", 5)]
    for bad in ["", "RAAR", "RAAR:0", "FOO:10", "RAAR:ten", "RAAR:10:2", []]:
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_bad_inputs(truth):
    intensity = truth[1]
    cfg = PhasingSettings(schedule="ER:2", n_cycles=1, final_er=1, n_restarts=2, n_average=1)
    with pytest.raises(ValueError, match="shape"):
        phase(intensity[:-2, :-2, :-2], GRID, cfg)
    with pytest.raises(ValueError, match="NaN"):
        phase(np.where(GRID.q_norm() == 0, np.nan, intensity), GRID, cfg)
    with pytest.raises(ValueError, match="zero"):
        phase(np.zeros_like(intensity), GRID, cfg)
    with pytest.raises(ValueError, match="measured"):
        phase(intensity, GRID, cfg, measured=np.ones((N, N, N)))
    with pytest.raises(ValueError, match="zero"):
        phase(intensity, GRID, cfg, measured=np.zeros((N, N, N), bool))
    for schedule in ("RAAR:-5", "RAAR:0"):  # the pattern of the settings; the count in phase()
        with pytest.raises(ValueError, match="schedule"):
            phase(intensity, GRID, PhasingSettings(schedule=schedule))
    with pytest.raises(ValueError, match="n_average"):
        phase(intensity, GRID, PhasingSettings(n_restarts=2, n_average=3))
    for bad in [dict(n_restarts=0), dict(n_average=0), dict(n_cycles=0), dict(final_er=-1), dict(beta_raar=1.5),
                dict(sigma_end=0.0), dict(shrinkwrap_threshold=1.0), dict(n_restarts=2.0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            PhasingSettings(**bad)

