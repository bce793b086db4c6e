"""Point groups as rotation matrices, and exact group averages of volumes on the spiflow grid.

An operation is a 3 × 3 orthogonal matrix ``g`` acting on column vectors; the group
average of an intensity volume is ``V_G(q) = (1/|G|) Σ_{g∈G} V(g q)``, which is invariant
under every ``g ∈ G`` (``V_G(h q) = V_G(q)`` since ``g h`` runs over G).

Groups (:func:`point_group`), axes fixed to the particle frame's x, y, z:

* ``C1``: identity. ``Ci``: identity and inversion (``−1``): for intensities, inversion is
  Friedel's law ``I(−q) = I(q)``, so ``Ci`` is the Friedel-only symmetrisation used for
  proteins (``point_group("C1", friedel=True)``).
* ``Cn``: n-fold rotations about z (any n ≥ 1). ``D2``: the identity and 180° about x, y, z.
  ``D4``: 4-fold about z and 2-folds about x, y and the diagonals x = ±y.
* ``T``: the 12 rotations of the tetrahedron; ``Th``: T × inversion (24), the sign flips with
  cyclic axis permutations (the average of Zhuang et al.'s reference code).
* ``O``: the 24 rotations of the cube. ``Oh``: all 48 signed 3 × 3 permutation matrices
  (O and O × inversion), the symmetry of a cube, an octahedron and an fcc nanocrystal
  centred on an atom (Zhuang et al., IUCrJ 9, 204 (2022): Oh-symmetrised gold nanoparticles).

Grid-aligned operations (signed permutation matrices: C1, Ci, C2, C4, D2, D4, T, Th, O, Oh) map
voxels of a centred odd cubic grid exactly onto voxels, so :func:`symmetrize` averages
with index permutations and flips, no interpolation: the result is exactly invariant
(up to the float rounding of the sum). Other operations (C3, C6, …) raise ValueError.
Works on torch tensors (differentiable: permute/flip/mean; usable inside training) and
on numpy arrays.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from scipy.spatial import cKDTree

GROUPS = ("C1", "Ci", "D2", "D4", "T", "Th", "O", "Oh")  # plus "Cn" for any integer n >= 1


def _signed_permutations() -> np.ndarray:
    """All 48 signed permutation matrices (48, 3, 3), the group Oh."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            out.append(m)
    return np.asarray(out)


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    m = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    return np.where(np.abs(m) < 1e-15, 0.0, np.round(m, 15))


def point_group(name: str, friedel: bool = False) -> np.ndarray:
    """The operations of point group ``name`` as matrices (G, 3, 3) float64, identity first.

    name: "C1", "Ci", "Cn" (n an integer, n-fold axis z), "D2", "D4", "T", "Th", "O" or "Oh".
    friedel: add the inversion (the closure ``G ∪ −G``), i.e. Friedel's law for intensities.
    Raises ValueError for an unknown name.
    """
    oh = _signed_permutations()
    det = np.linalg.det(oh)
    if name == "C1":
        ops = np.eye(3)[None]
    elif name == "Ci":
        ops = np.stack([np.eye(3), -np.eye(3)])
    elif name.startswith("C") and name[1:].isdigit() and int(name[1:]) >= 1:
        n = int(name[1:])
        ops = np.stack([_rot_z(2 * math.pi * k / n) for k in range(n)])
    elif name == "D2":
        ops = np.stack([np.diag(d) for d in ([1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1])]).astype(float)
    elif name == "D4":  # rotations of O that keep the z axis (up to sign)
        ops = np.stack([m for m, d in zip(oh, det) if d > 0 and abs(m[2, 2]) == 1])
    elif name in ("T", "Th"):  # even axis permutations (det |m| = +1) with signs
        ops = np.stack([m for m, d in zip(oh, det) if np.linalg.det(np.abs(m)) > 0 and (d > 0 or name == "Th")])
    elif name == "O":
        ops = oh[det > 0]
    elif name == "Oh":
        ops = oh
    else:
        raise ValueError(f"unknown point group {name!r}: use C1, Ci, Cn (n = 1, 2, …), D2, D4, T, Th, O or Oh")
    if friedel:
        ops = np.concatenate([ops, -ops])
    return _unique(ops)


def _unique(ops: np.ndarray) -> np.ndarray:
    """Distinct matrices in first-seen order (identity stays first)."""
    keep: list[np.ndarray] = []
    for m in ops:
        if not any(np.allclose(m, k, atol=1e-12) for k in keep):
            keep.append(m)
    return np.asarray(keep)


def is_grid_aligned(op: np.ndarray) -> bool:
    """True when ``op`` is a signed permutation matrix (maps grid voxels onto voxels)."""
    op = np.asarray(op)
    return bool(np.all(np.isin(np.round(op, 12), (-1.0, 0.0, 1.0))) and np.all(np.abs(op).sum(0) == 1)
                and np.all(np.abs(op).sum(1) == 1))


def _axes_and_flips(op: np.ndarray) -> tuple[list[int], list[int]]:
    """For ``(g q)_i = s_i q_{π(i)}``: the flipped axes ``{i : s_i = −1}`` and ``π⁻¹``."""
    perm = [int(np.flatnonzero(op[i])[0]) for i in range(3)]  # π(i)
    flips = [i for i in range(3) if op[i, perm[i]] < 0]
    inverse = [perm.index(k) for k in range(3)]
    return flips, inverse


def apply_operation(volume, op: np.ndarray):
    """``W(q) = V(g q)`` on the centred odd grid for a grid-aligned ``op`` (3, 3).

    volume: (..., n, n, n) torch tensor or numpy array, axes (qx, qy, qz); index
    ``c = n // 2`` is q = 0, so ``W[a] = V[c + g (a − c)]``. Exact (a permutation of voxels).
    Raises ValueError for an operation that is not a signed permutation.
    """
    if not is_grid_aligned(op):
        raise ValueError("operation is not grid-aligned (not a signed permutation matrix); "
                         "only C1, Ci, C2, C4, D2, D4, T, Th, O and Oh average exactly on the grid")
    is_np = isinstance(volume, np.ndarray)
    v = torch.as_tensor(volume)
    flips, inverse = _axes_and_flips(np.asarray(op))
    lead = v.dim() - 3
    if flips:
        v = torch.flip(v, dims=[lead + i for i in flips])
    v = v.permute(*range(lead), *(lead + i for i in inverse))
    return v.numpy() if is_np else v


def symmetrize(volume, ops: np.ndarray | str, friedel: bool = False):
    """Exact group average ``(1/|G|) Σ_g V(g q)`` of ``volume`` (..., n, n, n).

    ops: (G, 3, 3) operations forming a group (e.g. :func:`point_group`) or a group name.
    friedel: add the inversion to the group. Torch in → torch out (differentiable,
    same device and dtype); numpy in → numpy out. The average of a positive volume is
    positive. A group of signed permutations factors as ``G = S · T`` (S its sign-flip
    subgroup, T one element per axis permutation), so ``|S| + |T|`` passes replace ``|G|``
    (14 instead of 48 for Oh). Raises ValueError for operations that are not grid-aligned.
    """
    if isinstance(ops, str):
        ops = point_group(ops, friedel)
    elif friedel:
        ops = _unique(np.concatenate([ops, -np.asarray(ops)]))
    ops = np.asarray(ops)
    is_np = isinstance(volume, np.ndarray)
    v = torch.as_tensor(volume)
    signs, perms = _factor(ops)
    for stage in (signs, perms):
        v = sum(apply_operation(v, op) for op in stage) / len(stage)
    return v.numpy() if is_np else v


def _factor(ops: np.ndarray) -> tuple[list, list]:
    """``(S, T)`` with every ``g = s t`` uniquely: S the diagonal (sign) operations, T the
    first operation of each axis permutation; ``([I], ops)`` when that does not hold."""
    if not all(is_grid_aligned(m) for m in ops):
        return [np.eye(3)], list(ops)
    signs = [m for m in ops if np.all(np.abs(m) == np.eye(3))]
    perms: dict[tuple, np.ndarray] = {}
    for m in ops:
        perms.setdefault(tuple(np.abs(m).argmax(1)), m)
    if len(signs) * len(perms) != len(ops):
        return [np.eye(3)], list(ops)
    return signs, list(perms.values())


def atoms_invariant(positions: np.ndarray, ops: np.ndarray | str, tol: float = 1e-6) -> bool:
    """True when the point set ``positions`` (M, 3) Å maps onto itself under every operation.

    Each ``g r_j`` must lie within ``tol`` Å of some atom (nearest neighbour, scipy cKDTree).
    """
    ops = point_group(ops) if isinstance(ops, str) else np.asarray(ops)
    tree = cKDTree(positions)
    for op in ops:
        dist, _ = tree.query(positions @ op.T)
        if dist.max() > tol:
            return False
    return True
