"""Fused trilinear slicing and merging of a model volume at rotated detector pixels.

Every reconstruction method (EMC, M-TIP, the VAE) reads a model ``W`` on a
:class:`~spiflow.grid.Grid` at ``R_rᵀ q_p`` (frame i records ``I(R_iᵀ q)``, docs/conventions.md) and
merges photons back with the adjoint. These kernels are torch's ``grid_sample`` and its
input gradient on CUDA, and numba kernels on CPU (:mod:`spiflow.slicing_cpu`): the same
trilinear weights as :func:`spiflow.grid.slice_volume` / :func:`spiflow.grid.merge_into`
(corners outside the grid read 0 and merge nothing; tested) but much faster
(benchmarks/README.md). :func:`slice_channels` slices several
channels at once and :func:`slice_bspline` interpolates tricubic B-splines with the same
kernel (the simulate stage's ``slice`` transform).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import slicing_cpu
from .grid import Grid, friedel_symmetrize, rotated_points

#: voxels between the grid's faces and the points :func:`slice_bspline` reads: the prefilter
#: of :func:`bspline_coefficients` assumes mirror-symmetric data beyond the faces, and the
#: error that makes in the coefficients decays as |√3 − 2|ᵈ ≈ 0.27ᵈ at d voxels from a face
#: (Unser 1999): 4e-4 of the values' scale at 6 voxels, of which 2 are the taps' own reach.
BSPLINE_MARGIN = 8


def grid_coordinates(q_valid: torch.Tensor, rotations: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``R_rᵀ q_p`` as :func:`torch.nn.functional.grid_sample` coordinates, (R, P, 3).

    grid_sample with ``align_corners=True`` maps −1 … 1 onto voxel 0 … n−1, i.e. onto
    q = −q_max … q_max, and orders the last axis (z, y, x) (fastest volume axis first)."""
    return rotated_points(q_valid, slicing_cpu.scaled_rotations(rotations, grid.q_max))


#: cap on the per-thread copies of the model that :func:`merge_model` accumulates into on CPU.
MERGE_COPIES_BYTES = 256e6


def _pieces(coords: torch.Tensor, bytes_per_piece: float = 0.0) -> int:
    """Batch entries to split C orientations into. torch's CPU 3D grid sampler (forward and
    backward) runs in parallel over the batch only, so on CPU the orientations are split
    into one batch entry per thread (at most ``MERGE_COPIES_BYTES / bytes_per_piece``);
    on CUDA the kernels are parallel over points already: 1."""
    if coords.device.type != "cpu":
        return 1
    cap = int(MERGE_COPIES_BYTES // bytes_per_piece) if bytes_per_piece > 0 else coords.shape[0]
    return max(1, min(torch.get_num_threads(), coords.shape[0], cap))


def _batched(coords: torch.Tensor, pieces: int) -> torch.Tensor:
    """(C, P, 3) → (pieces, ⌈C / pieces⌉, P, 1, 3), padded with points outside the grid
    (they read 0 and merge nothing)."""
    C, P = coords.shape[:2]
    per = -(-C // pieces)
    if per * pieces > C:
        coords = torch.cat([coords, coords.new_full((per * pieces - C, P, 3), 2.0)])
    return coords.reshape(pieces, per, P, 1, 3)


def slice_model(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear slices (C, P) of ``volume`` (n, n, n) at ``coords`` (C, P, 3) of
    :func:`grid_coordinates`; equal to :func:`spiflow.grid.slice_volume` at ``R_rᵀ q_p`` (the
    same trilinear weights, corners outside the grid read 0), as one fused kernel: on CPU the
    numba kernel of :mod:`spiflow.slicing_cpu` (grid_sample where it does not apply, one batch
    entry per thread: :func:`_pieces`), on CUDA grid_sample."""
    if slicing_cpu.available(volume, coords):
        return slicing_cpu.slice_trilinear(volume, coords)
    C, P = coords.shape[:2]
    B = _pieces(coords)
    out = F.grid_sample(volume.expand(B, 1, *volume.shape), _batched(coords, B), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out.reshape(-1, P)[:C]


def slice_channels(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear slices (ch, C, P) of every channel of ``volume`` (ch, n, n, n) at ``coords``
    (C, P, 3) of :func:`grid_coordinates`: :func:`slice_model` of each channel, in one fused
    call (the coordinates are unnormalised once for all channels)."""
    C, P = coords.shape[:2]
    B = _pieces(coords)
    out = F.grid_sample(volume.expand(B, *volume.shape), _batched(coords, B), mode="bilinear",
                        padding_mode="zeros", align_corners=True)  # (B, ch, per, P, 1)
    return out.transpose(0, 1).reshape(volume.shape[0], -1, P)[:, :C]


def bspline_coefficients(volume: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients (..., n, n, n) float64 of samples ``volume`` (..., n, n, n)
    (real; the leading axes are channels): the separable recursive prefilter of M. Unser,
    "Splines: a perfect fit for signal and image processing", IEEE Signal Process. Mag. 16(6),
    22 (1999), as :func:`scipy.ndimage.spline_filter` with mirror boundaries. Interpolating
    them with :func:`slice_bspline` reproduces ``volume`` at the voxels."""
    from scipy import ndimage

    v = np.asarray(volume, dtype=np.float64)
    flat = v.reshape((-1,) + v.shape[-3:])
    out = np.stack([ndimage.spline_filter(c, order=3, mode="mirror") for c in flat])
    return out.reshape(v.shape)


def _bspline_taps(u: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two linear fetches that make one cubic B-spline tap set along each axis: for
    normalised coordinates ``u`` (..., 3) (grid_sample convention, grid of n voxels a side),
    returns positions (2, ..., 3) (normalised) and weights (2, ..., 3) with, per axis,
    ``Σ_m c_{i+m} β³(t − m) = g0 lerp(c, h0) + g1 lerp(c, h1)`` (Sigg & Hadwiger, "Fast
    third-order texture filtering", GPU Gems 2, ch. 20 (2005), eqs. 20.2–20.4)."""
    a = 0.5 * (n - 1)
    x = u * a + a
    i = torch.floor(x)
    t = x - i
    # from the B-spline weights w0..w3 of t: g0 = w0 + w1 = (5 − 3t − 3t² + 2t³)/6, g1 = 1 − g0,
    # h0 = i − 1 + w1/g0 with w1 = (4 − 6t² + 3t³)/6, h1 = i + 1 + w3/g1 with w3 = t³/6
    t2 = t * t
    t3 = t2 * t
    p0 = 2 * t3 - 3 * t2 - 3 * t + 5  # 6 g0
    s = 2.0 / (n - 1)
    h = torch.stack([(3 * t3 - 6 * t2 + 4) / p0 + (i - 1), t3 / (6 - p0) + (i + 1)]) * s - 1
    return h, torch.stack([p0 / 6, 1 - p0 / 6])


def slice_bspline(coefficients: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Tricubic B-spline interpolation (ch, C, P) of the channels of a volume whose
    :func:`bspline_coefficients` are ``coefficients`` (ch, n, n, n), at ``coords`` (C, P, 3) of
    :func:`grid_coordinates`. Evaluated as 8 trilinear fetches per point with positive weights
    (:func:`_bspline_taps` along each axis; Sigg & Hadwiger 2005), i.e. one
    :func:`slice_channels` call on 8 C rows; the 4³ taps of a point must lie inside the grid
    (keep points :data:`BSPLINE_MARGIN` voxels from the faces). Error O(h⁴) for smooth
    volumes, against O(h²) for trilinear :func:`slice_channels`; 8× the reads."""
    C, P = coords.shape[:2]
    h, g = _bspline_taps(coords, coefficients.shape[-1])  # (2, C, P, 3) each
    a, b, c = h[:, None, None, ..., 0], h[None, :, None, ..., 1], h[None, None, :, ..., 2]
    pos = torch.stack(torch.broadcast_tensors(a, b, c), -1)  # (2, 2, 2, C, P, 3)
    w = g[:, None, None, ..., 0] * g[None, :, None, ..., 1] * g[None, None, :, ..., 2]  # (2, 2, 2, C, P)
    vals = slice_channels(coefficients, pos.view(8 * C, P, 3))  # (ch, 8 C, P)
    return (vals.view(-1, 8, C, P) * w.view(8, C, P)).sum(1)


def slice_channels_rotated(volume: torch.Tensor, q_valid: torch.Tensor, rotations: torch.Tensor, grid: Grid,
                           cubic: bool) -> torch.Tensor:
    """Every channel (ch, R, P) of ``volume`` (ch, n, n, n) at ``R_rᵀ q_p``: trilinear
    (:func:`slice_channels`) or, with ``cubic``, the tricubic B-spline of coefficients
    ``volume`` (:func:`slice_bspline`). On CPU one numba kernel (the B-spline's 64 taps read
    directly, no coordinates in memory: :mod:`spiflow.slicing_cpu`)."""
    q_valid, rotations = q_valid.to(volume.dtype), rotations.to(volume.dtype)
    if slicing_cpu.available(volume, q_valid, rotations):
        return slicing_cpu.slice_channels_rotated(volume, q_valid, slicing_cpu.scaled_rotations(rotations, grid.q_max),
                                                  cubic)
    return (slice_bspline if cubic else slice_channels)(volume, grid_coordinates(q_valid, rotations, grid))


def merge_model(accum: torch.Tensor, coords: torch.Tensor, values: torch.Tensor) -> None:
    """``accum[c] += merge(values[c])`` for channels c: accum (ch, n, n, n), values (ch, C, P).

    The adjoint of :func:`slice_model` (grid_sample's input gradient), equal to
    :func:`spiflow.grid.merge_into` at ``R_rᵀ q_p`` but one fused pass for all channels: on
    CPU the numba kernel of :mod:`spiflow.slicing_cpu` (else grid_sample's input gradient),
    into one copy of accum per thread (at most :data:`MERGE_COPIES_BYTES`), then summed; on
    CUDA grid_sample's input gradient."""
    if slicing_cpu.available(accum, coords, values):
        slicing_cpu.merge_trilinear(accum, values, MERGE_COPIES_BYTES, coords=coords)
        return
    ch, C, P = values.shape
    B = _pieces(coords, accum.numel() * accum.element_size())
    per = -(-C // B)
    if per * B > C:
        values = torch.cat([values, values.new_zeros((ch, per * B - C, P))], 1)
    values = values.reshape(ch, B, per, P).transpose(0, 1).contiguous()[..., None]
    grad = torch.ops.aten.grid_sampler_3d_backward(
        values, accum.expand(B, *accum.shape), _batched(coords, B), 0, 0, True, [True, False])[0]
    accum += grad[0] if B == 1 else grad.sum(0)


def slice_rotated(volume: torch.Tensor, q_valid: torch.Tensor, rotations: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``slice_model(volume, grid_coordinates(q_valid, rotations, grid))``: slices (R, P) of
    ``volume`` (n, n, n) at ``R_rᵀ q_p`` for rotations (R, 3, 3) and pixels q_valid (P, 3)
    in Å⁻¹. On CPU the numba kernel rotates each pixel itself, so the (R, P, 3) coordinates
    are never in memory (in a profile their batched 3 × 3 product cost about two thirds of
    grid_sample's slicing). Raises nothing of its own."""
    q_valid, rotations = q_valid.to(volume.dtype), rotations.to(volume.dtype)
    if slicing_cpu.available(volume, q_valid, rotations):
        return slicing_cpu.slice_trilinear(volume, q=q_valid, rs=slicing_cpu.scaled_rotations(rotations, grid.q_max))
    return slice_model(volume, grid_coordinates(q_valid, rotations, grid))


def merge_rotated(accum: torch.Tensor, q_valid: torch.Tensor, rotations: torch.Tensor, grid: Grid,
                  values: torch.Tensor) -> None:
    """``merge_model(accum, grid_coordinates(q_valid, rotations, grid), values)``: accum
    (ch, n, n, n) += the merge of values (ch, R, P) at ``R_rᵀ q_p``, without the coordinates
    in memory on CPU (:func:`slice_rotated`). Raises nothing of its own."""
    q_valid, rotations = q_valid.to(accum.dtype), rotations.to(accum.dtype)
    if slicing_cpu.available(accum, q_valid, rotations, values):
        slicing_cpu.merge_trilinear(accum, values, MERGE_COPIES_BYTES, q=q_valid,
                                    rs=slicing_cpu.scaled_rotations(rotations, grid.q_max))
        return
    merge_model(accum, grid_coordinates(q_valid, rotations, grid), values)


def merge_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """The merged model ``F[num] / F[den]`` (n, n, n), 0 where ``F[den] = 0``; F is
    :func:`spiflow.grid.friedel_symmetrize`, applied to numerator and denominator *before*
    dividing so that the model is Friedel symmetric (num, den: merge accumulators of
    :func:`merge_model`, photons and ``Σ φ s`` respectively)."""
    num, den = friedel_symmetrize(num), friedel_symmetrize(den)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0)
