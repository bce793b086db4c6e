"""Point groups and exact group averages on the grid (spiflow.symmetry)."""
import numpy as np
import pytest
import torch

from spiflow.grid import Grid
from spiflow.symmetry import apply_operation, atoms_invariant, is_grid_aligned, point_group, symmetrize


def _is_group(ops):
    keys = {tuple(np.round(m, 9).ravel()) for m in ops}
    return all(tuple(np.round(a @ b, 9).ravel()) in keys for a in ops for b in ops)


def test_oh_has_48_distinct_orthogonal_operations_and_is_a_group():
    ops = point_group("Oh")
    assert ops.shape == (48, 3, 3)
    assert len({tuple(m.ravel()) for m in ops}) == 48
    np.testing.assert_allclose(ops @ ops.transpose(0, 2, 1), np.broadcast_to(np.eye(3), ops.shape), atol=1e-12)
    assert sorted(np.round(np.linalg.det(ops)).tolist()) == [-1.0] * 24 + [1.0] * 24
    assert any(np.array_equal(m, -np.eye(3)) for m in ops)  # inversion (Friedel)
    assert _is_group(ops)


@pytest.mark.parametrize("name, friedel, order", [("C1", False, 1), ("C1", True, 2), ("Ci", False, 2),
                                                  ("C2", False, 2), ("C4", True, 8), ("C3", False, 3),
                                                  ("D2", False, 4), ("D4", False, 8), ("T", False, 12),
                                                  ("Th", False, 24), ("T", True, 24), ("O", False, 24),
                                                  ("Oh", True, 48)])
def test_group_orders_and_closure(name, friedel, order):
    ops = point_group(name, friedel)
    assert len(ops) == order and _is_group(ops)
    np.testing.assert_array_equal(ops[0], np.eye(3))


def test_apply_operation_reads_v_at_g_q():
    """W[a] = V[c + g (a − c)] checked by explicit index arithmetic for every Oh operation."""
    n = 5
    c = n // 2
    v = np.random.default_rng(0).random((n, n, n))
    a = np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)
    for g in point_group("Oh"):
        b = (c + (a - c) @ g.T).astype(int)
        np.testing.assert_array_equal(apply_operation(v, g).reshape(-1), v[b[:, 0], b[:, 1], b[:, 2]])


def test_apply_operation_matches_an_analytic_function_of_q():
    grid = Grid(7, 0.1)
    qp = grid.q_points()
    f = lambda q: np.sin(3 * q[..., 0] + 1) * np.cos(5 * q[..., 1] - 0.3 * q[..., 2]) + q[..., 2] ** 3  # noqa: E731
    for g in point_group("Oh")[::5]:
        np.testing.assert_allclose(apply_operation(f(qp), g), f(qp @ g.T), atol=1e-12)


@pytest.mark.parametrize("name, friedel", [("Oh", False), ("C1", True), ("D2", True), ("C4", False)])
def test_symmetrized_volume_is_exactly_invariant_under_every_operation(name, friedel):
    v = np.random.default_rng(1).random((2, 9, 9, 9))  # batch of two volumes
    ops = point_group(name, friedel)
    s = symmetrize(v, ops)
    for g in ops:
        np.testing.assert_allclose(apply_operation(s, g), s, rtol=1e-14, atol=0)
    np.testing.assert_allclose(symmetrize(s, ops), s, rtol=1e-14)  # a projection
    np.testing.assert_allclose(s.mean(), v.mean(), rtol=1e-13)  # a permutation average keeps the sum
    direct = sum(apply_operation(v, g) for g in ops) / len(ops)  # the unfactored average
    np.testing.assert_allclose(s, direct, rtol=1e-13)


def test_symmetrize_is_differentiable_in_torch():
    v = torch.rand(7, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.rand(7, 7, 7, dtype=torch.float64)
    (symmetrize(v, "Oh") * w).sum().backward()
    torch.testing.assert_close(v.grad, symmetrize(w, "Oh"))  # the average is self-adjoint
    assert torch.autograd.gradcheck(lambda x: symmetrize(x, "D2", friedel=True), (torch.rand(1, 5, 5, 5, dtype=torch.float64,
                                                                                           requires_grad=True),))


def test_non_grid_aligned_group_is_refused():
    assert not is_grid_aligned(point_group("C3")[1])
    with pytest.raises(ValueError, match="grid-aligned"):
        symmetrize(np.zeros((5, 5, 5)), "C3")
    with pytest.raises(ValueError, match="unknown point group"):
        point_group("T7")


def test_atoms_invariant():
    cube = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
    assert atoms_invariant(cube, "Oh")
    assert not atoms_invariant(cube * [1, 1, 2], "Oh") and atoms_invariant(cube * [1, 1, 2], "D4")
