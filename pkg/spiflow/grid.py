"""The cubic reciprocal-space grid and trilinear slicing / merging on it.

Convention (docs/conventions.md): the intensity volume is sampled on an ``n × n × n`` grid (``n``
odd) centred on q = 0, voxel spacing ``dq`` in Å⁻¹ (crystallographic, no 2π); index
``c = n // 2`` is q = 0 and the axes are ``(qx, qy, qz)``. The matching real-space grid
has voxel size ``1 / (n dq)`` Å and the same centring.

Slicing and merging use the same trilinear weights, so merging is the exact adjoint
(transpose) of slicing: ``<slice(V, q), v> = <V, merge(q, v)>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Grid:
    """Cubic grid of ``n`` (odd) voxels per side, spacing ``dq`` Å⁻¹, centred on q = 0.

    Raises ValueError if ``n`` is not an odd integer >= 3 or ``dq`` is not positive.
    """

    n: int
    dq: float

    def __post_init__(self):
        if int(self.n) != self.n or self.n < 3 or self.n % 2 == 0:
            raise ValueError(f"grid size must be an odd integer >= 3, got {self.n}")
        if not self.dq > 0:
            raise ValueError(f"grid spacing dq must be > 0 Å⁻¹, got {self.dq}")

    @property
    def center(self) -> int:
        return self.n // 2

    @property
    def q_axis(self) -> np.ndarray:
        """Reciprocal-space axis values in Å⁻¹, shape (n,)."""
        return (np.arange(self.n) - self.center) * self.dq

    @property
    def q_max(self) -> float:
        """|q| of the largest sphere inside the cube, Å⁻¹ (the grid's Nyquist along an axis)."""
        return self.center * self.dq

    @property
    def voxel_size(self) -> float:
        """Real-space voxel size ``1 / (n dq)`` in Å."""
        return 1.0 / (self.n * self.dq)

    @property
    def r_axis(self) -> np.ndarray:
        """Real-space axis values in Å, shape (n,), centred like the q axis."""
        return (np.arange(self.n) - self.center) * self.voxel_size

    def q_norm(self) -> np.ndarray:
        """|q| of every voxel in Å⁻¹, shape (n, n, n)."""
        ax = self.q_axis
        return np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)

    def q_points(self) -> np.ndarray:
        """q vector of every voxel in Å⁻¹, shape (n, n, n, 3), float64."""
        ax = self.q_axis
        return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1)


def trilinear_weights(q: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat voxel indices and trilinear weights of points ``q`` (..., 3) in Å⁻¹.

    Returns ``idx`` (..., 8) int64 into the flattened ``n³`` volume and ``w`` (..., 8) in
    the dtype of ``q``. Corners outside the grid get weight 0 (index clamped), so points
    beyond the cube contribute nothing.
    """
    n = grid.n
    f = q / grid.dq + grid.center
    i0 = torch.floor(f)
    t = f - i0
    i0 = i0.long()
    idx, w = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                ix, iy, iz = i0[..., 0] + dx, i0[..., 1] + dy, i0[..., 2] + dz
                wx = t[..., 0] if dx else 1 - t[..., 0]
                wy = t[..., 1] if dy else 1 - t[..., 1]
                wz = t[..., 2] if dz else 1 - t[..., 2]
                inside = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (iz >= 0) & (iz < n)
                flat = (ix.clamp(0, n - 1) * n + iy.clamp(0, n - 1)) * n + iz.clamp(0, n - 1)
                idx.append(flat)
                w.append(torch.where(inside, wx * wy * wz, torch.zeros_like(wx)))
    return torch.stack(idx, -1), torch.stack(w, -1)


def slice_volume(volume: torch.Tensor, q: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Trilinear interpolation of ``volume`` (n, n, n) at points ``q`` (..., 3) Å⁻¹.

    Returns (...) values; points outside the grid read 0.
    """
    idx, w = trilinear_weights(q.to(volume.dtype), grid)
    return (volume.reshape(-1)[idx] * w).sum(-1)


def merge_into(accum: torch.Tensor, q: torch.Tensor, values: torch.Tensor, grid: Grid) -> None:
    """Add ``values`` (...) at points ``q`` (..., 3) into ``accum`` (n, n, n), in place.

    Each value is spread over its 8 neighbouring voxels with the trilinear weights of
    :func:`trilinear_weights` (the adjoint of :func:`slice_volume`).
    """
    idx, w = trilinear_weights(q.to(accum.dtype), grid)
    accum.view(-1).index_add_(0, idx.reshape(-1), (w * values.to(accum.dtype)[..., None]).reshape(-1))


def rotated_points(q: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """``R_rᵀ q_p`` for every rotation r (R, 3, 3) and point p (P, 3): returns (R, P, 3).

    This is where frame r samples the particle's intensity (docs/conventions.md: ``I(R_iᵀ q)``).
    In row-vector form ``(Rᵀ q)ᵀ = qᵀ R``, one batched matrix product.
    """
    return torch.matmul(q.to(rotations.dtype), rotations)


def friedel_symmetrize(volume: torch.Tensor) -> torch.Tensor:
    """``(V(q) + V(−q)) / 2`` on the centred odd grid (flip of all three axes)."""
    return 0.5 * (volume + torch.flip(volume, dims=(-3, -2, -1)))


def structure_factor_to_density(F: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Electron density (n, n, n) in e/Å³ from the structure factor ``F`` (n, n, n) in electrons.

    With ``F(q) = Σ_j f_j exp(+2πi q·r_j)`` (docs/conventions.md) the inverse is
    ``ρ(r) = ∫ F(q) exp(−2πi q·r) d³q ≈ dq³ Σ_k F(q_k) exp(−2πi q_k·r)``, a forward DFT
    on the centred grids (q = 0 and r = 0 at index n // 2). Returns a complex tensor;
    the density of a real object is its real part.
    """
    Fs = torch.fft.ifftshift(F, dim=(-3, -2, -1))
    rho = torch.fft.fftn(Fs, dim=(-3, -2, -1)) * grid.dq ** 3
    return torch.fft.fftshift(rho, dim=(-3, -2, -1))


def density_to_structure_factor(rho: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Structure factor ``F(q_k) = v Σ_n ρ(r_n) exp(+2πi q_k·r_n)`` in electrons.

    ``rho`` (n, n, n) in e/Å³ on the centred real-space grid, ``v = voxel_size³`` Å³, real
    or complex (float64 / complex128 computed in double precision). Exact inverse of
    :func:`structure_factor_to_density`. Returns complex (n, n, n).
    """
    double = rho.dtype in (torch.float64, torch.complex128)
    rs = torch.fft.ifftshift(rho.to(torch.complex128 if double else torch.complex64),
                             dim=(-3, -2, -1))
    F = torch.fft.ifftn(rs, dim=(-3, -2, -1)) * (grid.n ** 3 * grid.voxel_size ** 3)
    return torch.fft.fftshift(F, dim=(-3, -2, -1))
