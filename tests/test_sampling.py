"""Tests of the refined-600-cell SO(3) sampling."""
import numpy as np
import pytest
from scipy import integrate, stats
from scipy.spatial import cKDTree

from spiflow.rotation import random_quaternions
from spiflow.sampling import (NEIGHBOUR_FACTOR, angular_step_deg, coarse_to_fine, n_orientations, nearest_samples,
                              so3_sampling)


def _nearest_angles(samples, points, k=1):
    """Rotation angle (deg) from each point to its k-th nearest sample (q ~ −q)."""
    tree = cKDTree(np.concatenate([samples, -samples]))
    d, _ = tree.query(points, k=k)
    d = d if k == 1 else d[:, k - 1]
    return np.degrees(4 * np.arcsin(np.clip(d / 2, 0, 1)))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_counts_norms_signs_and_uniqueness(n):
    q, w = so3_sampling(n)
    assert q.shape == (n_orientations(n), 4) == (10 * (5 * n ** 3 + n), 4) and w.shape == (len(q),)
    assert q.dtype == np.float64 and w.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-12)
    assert (q[:, 0] >= 0).all()
    first = q[np.arange(len(q)), np.argmax(np.abs(q) > 1e-9, axis=1)]
    assert (first > 0).all()  # canonical representative of each ± pair
    assert _nearest_angles(q, q, k=2).min() > 1.0  # no two equal up to sign


def test_known_counts_and_errors():
    assert len(so3_sampling(1)[0]) == 60 and len(so3_sampling(2)[0]) == 420
    assert len(so3_sampling(10)[0]) == n_orientations(10) == 50_100
    for bad in (0, -1, 1.5):
        for f in (so3_sampling, angular_step_deg, n_orientations):
            with pytest.raises(ValueError):
                f(bad)


def test_cached_results_are_copies():
    q, w = so3_sampling(2)
    q[:] = 0
    w[:] = 0
    q2, w2 = so3_sampling(2)
    assert np.abs(q2).sum() > 0 and w2.sum() == pytest.approx(1)


def test_coverage_shrinks_like_one_over_n():
    points = random_quaternions(20_000, np.random.default_rng(3))
    worst = [_nearest_angles(so3_sampling(n)[0], points).max() for n in (2, 3, 4, 5)]
    assert all(a > b for a, b in zip(worst, worst[1:]))
    scaled = np.array(worst) * np.array([2, 3, 4, 5])
    assert scaled.min() > 40 and scaled.max() < 56  # ≈ 53° / n (Loh & Elser: 0.944 / n rad)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_angular_step_matches_measured_nearest_neighbour_angle(n):
    q, _ = so3_sampling(n)
    measured = np.median(_nearest_angles(q, q, k=2))
    assert measured == pytest.approx(angular_step_deg(n), rel=0.05)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_weights_give_uniform_averages(n):
    q, w = so3_sampling(n)
    assert (w > 0).all() and w.sum() == pytest.approx(1, abs=1e-12)
    x, y, z = q[:, 1], q[:, 2], q[:, 3]
    r = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - q[:, 0] * z)], axis=1)  # two entries of R
    np.testing.assert_allclose(w @ r, 0, atol=1e-12)  # Haar mean of R is 0
    np.testing.assert_allclose(np.einsum("m,mi,mj->ij", w, q, q), np.eye(4) / 4, atol=1e-12)
    # A non-invariant smooth test function: E[exp(κ (q·a)²)] on S³, (q·a)² ~ Beta(1/2, 3/2).
    kappa, a = 3.0, np.random.default_rng(0).normal(size=4)
    a /= np.linalg.norm(a)
    exact = integrate.quad(lambda t: np.exp(kappa * t) * stats.beta(0.5, 1.5).pdf(t), 0, 1)[0]
    f = np.exp(kappa * (q @ a) ** 2)
    weighted, plain = abs(w @ f / exact - 1), abs(f.mean() / exact - 1)
    assert weighted < 2e-6 and weighted < plain / 2


def test_large_sampling_is_fast():
    import time
    t0 = time.perf_counter()
    q, w = so3_sampling(9)  # not cached by the other tests
    assert time.perf_counter() - t0 < 5
    assert len(q) == 36_540


def test_coarse_to_fine_cells_and_neighbours():
    """Every fine sample's parent is its nearest coarse sample (checked by brute force); with
    num_div 4 over 2 every coarse rotation is a fine one and heads its own cell; the
    neighbour pairs are symmetric, include each sample itself and lie within the stated angle."""
    fine, _ = so3_sampling(4)
    coarse, _ = so3_sampling(2)
    parent, group, edges = coarse_to_fine(4, 2)
    brute = np.abs(fine @ coarse.T)
    assert np.allclose(brute[np.arange(len(fine)), parent], brute.max(1))
    assert np.array_equal(nearest_samples(coarse, 2), np.arange(len(coarse)))
    assert len(np.unique(parent)) == len(coarse) and group.max() < 60
    pairs = set(map(tuple, edges))
    assert all((b, a) in pairs for a, b in pairs) and all((a, a) in pairs for a in range(len(coarse)))
    angle = 2 * np.degrees(np.arccos(np.clip(np.abs(np.sum(coarse[edges[:, 0]] * coarse[edges[:, 1]], 1)), 0, 1)))
    assert angle.max() <= NEIGHBOUR_FACTOR * 76.0 / 2 + 1e-9 and len(edges) > 2 * len(coarse)
    with pytest.raises(ValueError, match="below the fine"):
        coarse_to_fine(2, 2)
