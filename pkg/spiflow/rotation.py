"""Unit quaternions and rotation matrices (torch, batched).

Convention (docs/conventions.md): quaternions are ``[w, x, y, z]``, scalar first, canonicalised to
``w >= 0``; ``R(quat)`` is the active, right-handed rotation of the particle, so frame
*i* records ``I(R_iᵀ q_pixel)``. Formulae: J. Diebel, "Representing attitude: Euler
angles, unit quaternions, and rotation vectors" (2006), eq. 125 (matrix from quaternion);
K. Shoemake, Graphics Gems III (1992) p. 124 (uniform random quaternions).
"""
from __future__ import annotations

import math

import numpy as np
import torch


BEAM_FLIP = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
"""M (3, 3) float64, the rotation by π about the beam axis (+z, docs/conventions.md), applied in
the lab frame: a frame at ``M R`` records nearly the pattern of R (the Friedel mate,
:func:`spiflow.selfsup.mate_chordal`)."""


def quaternion_to_matrix(quat: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of unit quaternions.

    quat: (..., 4) ``[w, x, y, z]`` (normalised here). Returns (..., 3, 3), the active
    rotation ``R`` with ``R @ v`` rotating a column vector ``v``.
    """
    q = quat / quat.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(q.shape[:-1] + (3, 3))


def matrix_to_quaternion(mat: torch.Tensor) -> torch.Tensor:
    """Quaternions ``[w, x, y, z]`` (w >= 0) of rotation matrices (..., 3, 3).

    Uses the numerically stable branch choice of Shepperd (1978): the largest of
    ``4w², 4x², 4y², 4z²`` picks the formula. Returns (..., 4).
    """
    m = mat
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    cand = torch.stack([
        torch.stack([1 + m00 + m11 + m22, m[..., 2, 1] - m[..., 1, 2],
                     m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22,
                     m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0],
                     1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
        torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0],
                     m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
    ], dim=-2)  # (..., 4 candidates, 4)
    diag = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22,
                        1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    best = diag.argmax(-1)
    q = torch.gather(cand, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    return canonical(q / q.norm(dim=-1, keepdim=True))


def canonical(quat: torch.Tensor) -> torch.Tensor:
    """Flip the sign of quaternions with ``w < 0`` (q and −q are the same rotation)."""
    sign = torch.where(quat[..., :1] < 0, -1.0, 1.0).to(quat.dtype)
    return quat * sign


def multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamilton product ``a ⊗ b`` of quaternions (..., 4): ``R(a⊗b) = R(a) R(b)``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], dim=-1)


def conjugate(quat: torch.Tensor) -> torch.Tensor:
    """Inverse of unit quaternions: ``[w, −x, −y, −z]``."""
    return quat * torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=quat.dtype, device=quat.device)


def angle_between(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rotation angle in degrees of ``R(a)ᵀ R(b)`` (0 … 180°), for (..., 4) quaternions.

    ``2 atan2(|vec(a* ⊗ b)|, |scalar(a* ⊗ b)|)``, accurate near 0° (unlike ``2 acos|a·b|``).
    """
    d = multiply(conjugate(a), b)
    return torch.rad2deg(2 * torch.atan2(d[..., 1:].norm(dim=-1), d[..., 0].abs()))


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` quaternions uniform on SO(3) (Haar measure), shape (n, 4), float64, w >= 0.

    Shoemake's method: u1, u2, u3 ~ U(0, 1) give
    ``w = √u1 cos 2πu3, x = √(1−u1) sin 2πu2, y = √(1−u1) cos 2πu2, z = √u1 sin 2πu3``.
    Raises ValueError for negative ``n``.
    """
    if n < 0:
        raise ValueError(f"number of quaternions must be >= 0, got {n}")
    u1, u2, u3 = rng.random((3, n))
    q = np.stack([
        np.sqrt(u1) * np.cos(2 * math.pi * u3),
        np.sqrt(1 - u1) * np.sin(2 * math.pi * u2),
        np.sqrt(1 - u1) * np.cos(2 * math.pi * u2),
        np.sqrt(u1) * np.sin(2 * math.pi * u3),
    ], axis=1)
    q[q[:, 0] < 0] *= -1
    return q


def mean_rotation(mats: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rotation closest (Frobenius) to the weighted sum of rotation matrices (n, 3, 3).

    The projection of ``M = Σ w_i R_i`` onto SO(3) by SVD, ``U diag(1, 1, det UVᵀ) Vᵀ``
    (Moakher, SIAM J. Matrix Anal. Appl. 24, 1 (2002)). Returns (3, 3).
    """
    if weights is None:
        weights = torch.ones(mats.shape[0], dtype=mats.dtype, device=mats.device)
    m = (weights[:, None, None] * mats).sum(0)
    u, _, vt = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vt))
    fix = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return u @ fix @ vt
