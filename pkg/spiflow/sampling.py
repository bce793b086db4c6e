"""Near-uniform sampling of SO(3) by refining the 600-cell (Loh & Elser, PRE 80, 026705 (2009)).

Unit quaternions cover the 3-sphere S³ twice (q and −q are one rotation). The 600-cell is
the regular 4-polytope whose 120 vertices (the binary icosahedral group) lie on S³:

* 8 of the form (±1, 0, 0, 0) (all positions),
* 16 of the form (±½, ±½, ±½, ±½),
* 96 even permutations of ½(±φ, ±1, ±1/φ, 0), φ = (1 + √5) / 2.

Nearest neighbours have dot product φ/2 (36° apart on S³, a 72° rotation); its 600 cells
are the regular tetrahedra spanned by 4 mutually neighbouring vertices. Every cell is
filled with the barycentric points ``(i v0 + j v1 + k v2 + l v3) / n``, ``i+j+k+l = n``,
points shared by neighbouring cells are kept once, and all are projected onto S³. That
gives ``120 + 720 (n−1) + 1200 (n−1)(n−2)/2 + 600 (n−1)(n−2)(n−3)/6 = 20 (5n³ + n)``
points, closed under q → −q; one of each ± pair is kept, so ``10 (5n³ + n)`` rotations.

Weights. A cell lies in the hyperplane ``{x: x·m = h}`` (m its unit normal, h its
distance from 0, the same for all cells). The central projection p ↦ p/|p| maps a flat
volume element dV at p to the solid angle ``dΩ = cos θ dV / |p|³`` with
``cos θ = h / |p|`` (the angle between the ray and the normal), i.e. ``dΩ = h dV / |p|⁴``.
The barycentric points are uniform in flat volume, so each point stands for the solid
angle ∝ ``1 / |p|⁴``, p the unprojected point; the weights are that, normalised to sum 1
(the Haar measure of SO(3) is the uniform measure on S³).
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np

PHI = (1 + math.sqrt(5)) / 2

#: ``angular_step_deg(n) = STEP_CONSTANT_DEG / n``. Measured with this module for
#: n = 1 … 10: the rotation angle from a sample to its nearest other sample is 72° / n for
#: n ≤ 2 and 69°–76° / n (median 73.5° ± 0.7° / n, mean 73.5° ± 0.4° / n) for n ≥ 3. The
#: covering radius (largest angle from any rotation to its nearest sample, 200 000 random
#: rotations) is 53° / n ≈ 0.93 / n rad (mean 31° / n), which is Loh & Elser's ≈ 0.944 / n.
STEP_CONSTANT_DEG = 73.5
#: ``covering radius = COVERING_RADIUS_DEG / n``: the largest rotation angle from any rotation
#: to its nearest sample, measured as above (200 000 random rotations, n = 1 … 10).
COVERING_RADIUS_DEG = 53.0


def _vertices() -> np.ndarray:
    """The 120 unit quaternions of the 600-cell, (120, 4) float64."""
    verts = []
    for pos in range(4):
        for s in (1.0, -1.0):
            v = np.zeros(4)
            v[pos] = s
            verts.append(v)
    verts.extend(0.5 * np.array(signs) for signs in itertools.product((1.0, -1.0), repeat=4))
    base = (PHI, 1.0, 1 / PHI, 0.0)
    even = [p for p in itertools.permutations(range(4))
            if sum(p[i] > p[j] for i in range(4) for j in range(i + 1, 4)) % 2 == 0]
    for perm in even:  # perm[k] = which base value goes to coordinate k
        for signs in itertools.product((1.0, -1.0), repeat=3):
            vals = np.array(base[:3]) * signs
            v = np.zeros(4)
            for k in range(4):
                if perm[k] < 3:
                    v[k] = vals[perm[k]]
            verts.append(0.5 * v)
    return np.array(verts)


def _cells(verts: np.ndarray) -> np.ndarray:
    """The 600 tetrahedral cells as sorted vertex-index quadruples, (600, 4) int64."""
    adj = np.abs(verts @ verts.T - PHI / 2) < 1e-9
    cells = []
    for a in range(len(verts)):
        nb = np.flatnonzero(adj[a])
        nb = nb[nb > a]
        for b, c, d in itertools.combinations(nb, 3):
            if adj[b, c] and adj[b, d] and adj[c, d]:
                cells.append((a, b, c, d))
    cells = np.array(cells, dtype=np.int64)
    if cells.shape != (600, 4):  # pragma: no cover - guards the construction itself
        raise RuntimeError(f"600-cell construction found {len(cells)} cells")
    return cells


def _canonical_sign(q: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """+1 where the first component with |c| > tol is positive, else −1; shape (M,)."""
    nonzero = np.abs(q) > tol
    first = np.argmax(nonzero, axis=1)
    return np.sign(q[np.arange(len(q)), first])


@functools.lru_cache(maxsize=8)
def _sampling(num_div: int) -> tuple[np.ndarray, np.ndarray]:
    verts = _vertices()
    cells = _cells(verts)
    n = num_div
    comp = np.array([c for c in itertools.product(range(n + 1), repeat=4) if sum(c) == n],
                    dtype=np.int64)  # (K, 4) barycentric numerators
    # Exact key of each point: its (vertex index, coefficient) pairs with coefficient > 0,
    # sorted by vertex index (cells are sorted, absent vertices get (-1, 0) and sort first).
    vidx = np.where(comp[None, :, :] > 0, cells[:, None, :], -1)  # (600, K, 4)
    coef = np.broadcast_to(comp[None], vidx.shape)
    order = np.argsort(vidx, axis=-1, kind="stable")
    vidx = np.take_along_axis(vidx, order, -1)
    coef = np.take_along_axis(coef, order, -1)
    keys = np.concatenate([vidx, coef], axis=-1).reshape(-1, 8)
    _, first = np.unique(keys, axis=0, return_index=True)
    flat_cell = first // len(comp)
    flat_comp = first % len(comp)
    p = np.einsum("mk,mkd->md", comp[flat_comp] / n, verts[cells[flat_cell]])  # unprojected
    norm = np.linalg.norm(p, axis=1)
    quat = p / norm[:, None]
    keep = _canonical_sign(quat) > 0
    quat, norm = quat[keep], norm[keep]
    quat[np.abs(quat) < 1e-12] = 0.0
    weight = norm ** -4.0
    weight /= weight.sum()
    return quat, weight


def _check_num_div(num_div: int) -> None:
    if int(num_div) != num_div or num_div < 1:
        raise ValueError(f"num_div must be an integer >= 1, got {num_div}")


def n_orientations(num_div: int) -> int:
    """Number of rotations of :func:`so3_sampling`: ``10 (5n³ + n)``, n = num_div (the
    barycentric points of the 600 cells, one of each ± pair: module docstring).
    Raises ValueError if ``num_div < 1``."""
    _check_num_div(num_div)
    return 10 * (5 * int(num_div) ** 3 + int(num_div))


def so3_sampling(num_div: int) -> tuple[np.ndarray, np.ndarray]:
    """Quaternions and quadrature weights of the refined 600-cell sampling of SO(3).

    num_div: the refinement n >= 1 (each 600-cell edge split into n). Returns
    ``quats`` (M, 4) float64 unit ``[w, x, y, z]`` with M = :func:`n_orientations`, one of each
    ± pair (w > 0; for w = 0 the first nonzero component is positive), and ``weights``
    (M,) float64 ∝ ``1/|p|⁴`` (p the unprojected point, see the module docstring),
    summing to 1. Results are cached; copies are returned. Nearest-neighbour spacing:
    :func:`angular_step_deg`. Raises ValueError if ``num_div < 1``.
    """
    _check_num_div(num_div)
    quat, weight = _sampling(int(num_div))
    return quat.copy(), weight.copy()


def angular_step_deg(num_div: int) -> float:
    """Typical rotation angle (degrees) between neighbouring samples of :func:`so3_sampling`.

    ``STEP_CONSTANT_DEG / num_div`` = 73.5° / n ≈ 1.28 / n rad, the measured median
    nearest-neighbour rotation angle (72° / n exactly for n ≤ 2). A random rotation lies
    on average 31° / n and at most 53° / n ≈ 0.93 / n rad (Loh & Elser's ≈ 0.944 / n)
    from its nearest sample. Raises ValueError if ``num_div < 1``.
    """
    _check_num_div(num_div)
    return STEP_CONSTANT_DEG / num_div


def local_rotations(step_deg: float, radius_steps: int) -> np.ndarray:
    """Small rotations about the identity for a local orientation search, (J, 4) quaternions.

    The rotation vectors ``ω = step · (i, j, k)`` (integers, |ω| ≤ radius_steps · step; the
    rotation by |ω| about ω/|ω|) form a cubic lattice in the tangent space of SO(3) at the
    identity; near it the Haar measure is uniform in ω to ``1 − |ω|²/12``, so the samples
    are near-uniform and need no weights for radii of a few degrees. step_deg > 0 in
    degrees; radius_steps an integer >= 1. The identity comes first; J = 123 for
    radius_steps 3. Quaternions ``[cos(|ω|/2), sin(|ω|/2) ω/|ω|]``, w > 0. Raises ValueError
    for a non-positive step or radius.
    """
    if not step_deg > 0:
        raise ValueError(f"local search step must be > 0 degrees, got {step_deg}")
    if int(radius_steps) != radius_steps or radius_steps < 1:
        raise ValueError(f"local search radius must be an integer >= 1 steps, got {radius_steps}")
    k = int(radius_steps)
    lattice = np.array(list(itertools.product(range(-k, k + 1), repeat=3)), dtype=np.float64)
    lattice = lattice[np.linalg.norm(lattice, axis=1) <= k + 1e-9]
    lattice = lattice[np.argsort(np.linalg.norm(lattice, axis=1), kind="stable")]  # identity first
    omega = np.deg2rad(step_deg) * lattice
    angle = np.linalg.norm(omega, axis=1)
    axis = np.divide(omega, angle[:, None], out=np.zeros_like(omega), where=angle[:, None] > 0)
    return np.concatenate([np.cos(angle / 2)[:, None], np.sin(angle / 2)[:, None] * axis], axis=1)


def nearest_samples(quats: np.ndarray, num_div: int) -> np.ndarray:
    """Index of the nearest :func:`so3_sampling` (num_div) rotation to each quaternion.

    quats: (N, 4) unit quaternions ``[w, x, y, z]`` (either sign). Returns (N,) int64: the
    sample with the largest ``|q · s|`` (the smallest rotation angle ``2 arccos |q · s|``),
    found with a k-d tree over the samples and their negatives (on S³ the largest |dot| is
    the smallest chord to ±s). Ties (equidistant samples) go to either. Used by
    :func:`coarse_to_fine` and :mod:`spiflow.emc`'s hierarchical search. Raises ValueError
    if ``num_div < 1``."""
    from scipy.spatial import cKDTree

    ref, _ = so3_sampling(num_div)
    tree = cKDTree(np.concatenate([ref, -ref]))
    _, idx = tree.query(np.asarray(quats, dtype=np.float64))
    return np.asarray(idx, dtype=np.int64) % len(ref)


#: :func:`coarse_to_fine`'s neighbours of a coarse sample: the samples within this many
#: times the largest nearest-neighbour angle, ``76° / n`` (module constants): the first ring.
NEIGHBOUR_FACTOR = 1.2


@functools.lru_cache(maxsize=4)
def _coarse_to_fine(fine_div: int, coarse_div: int, group_div: int):
    from scipy.spatial import cKDTree

    fine, _ = so3_sampling(fine_div)
    coarse, _ = so3_sampling(coarse_div)
    parent = nearest_samples(fine, coarse_div)
    group = nearest_samples(coarse, group_div)
    angle = np.deg2rad(NEIGHBOUR_FACTOR * 76.0 / coarse_div)
    tree = cKDTree(np.concatenate([coarse, -coarse]))
    pairs = tree.query_ball_point(coarse, np.sqrt(2 - 2 * np.cos(angle / 2)))  # chord of rotation angle
    rows = np.repeat(np.arange(len(coarse)), [len(p) for p in pairs])
    cols = np.concatenate([np.asarray(p, dtype=np.int64) for p in pairs]) % len(coarse)
    edges = np.unique(np.stack([rows, cols], 1), axis=0)
    return parent, group, edges


def coarse_to_fine(fine_div: int, coarse_div: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest-neighbour hierarchy between two :func:`so3_sampling` levels.

    Returns ``(parent, group, neighbours)``: ``parent`` (M_fine,) int64, the nearest coarse rotation of every fine one (so
    the fine samples are partitioned into the Voronoi cells of the coarse ones, about
    ``(fine_div / coarse_div)³`` each), and ``group`` (M_coarse,) int64, the nearest of the
    60 rotations of the 600-cell's vertices (num_div 1) to every coarse one (compact sets
    of coarse rotations that a search evaluates together). A coarse posterior that keeps
    coarse rotation c keeps its whole cell ``parent == c`` at the fine level (the adaptive
    oversampling of Scheres, J. Struct. Biol. 180, 519 (2012)). ``neighbours`` (E, 2) int64:
    the pairs (a, b) of coarse rotations at most ``NEIGHBOUR_FACTOR · 76° / coarse_div``
    apart, (a, a) included: a coarse posterior peaked on the wrong one of two neighbouring
    coarse rotations (frequent at high signal, when the fine optimum lies between them)
    still reaches the right cell through them. Cached; copies are returned.
    Raises ValueError unless ``1 <= coarse_div < fine_div``."""
    _check_num_div(fine_div)
    _check_num_div(coarse_div)
    if not coarse_div < fine_div:
        raise ValueError(f"coarse num_div {coarse_div} must be below the fine num_div {fine_div}")
    parent, group, edges = _coarse_to_fine(int(fine_div), int(coarse_div), 1)
    return parent.copy(), group.copy(), edges.copy()
