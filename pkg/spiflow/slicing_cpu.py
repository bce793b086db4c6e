"""CPU kernels of :func:`spiflow.slicing.slice_model` and :func:`~spiflow.slicing.merge_model`.

torch's CPU 3D grid sampler is a generic scalar loop: measured on 2 AMD EPYC cores, its
input gradient (the merge) costs about 180 ns per point and channel pair, 4× the forward,
and made EMC on a large, sparsely lit detector slower than Dragonfly's C (benchmarks/). These
are the same trilinear weights (``grid_sample(mode="bilinear", padding_mode="zeros",
align_corners=True)``: a corner outside the grid reads 0 and receives nothing; a NaN point
reads 0) compiled with numba (cached after the first call), parallel over the first
point axis, each thread merging into its own copy of the volume. CUDA tensors keep
grid_sample, which is parallel over points there.

Coordinates are grid_sample's: (..., 3) ordered (x, y, z) = (last, middle, first volume axis),
−1 … 1 spanning voxel 0 … n − 1 (:func:`spiflow.slicing.grid_coordinates`).
"""
from __future__ import annotations

import numpy as np
import torch

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - a dependency; without it grid_sample serves
    numba = None

#: whether the numba kernels are used for CPU tensors (tests switch it off to compare paths)
ENABLED = numba is not None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the numba kernels apply: numba present and :data:`ENABLED`, CPU float32/64
    tensors of one dtype, no autograd needed (the kernels have no backward)."""
    if not ENABLED:
        return False
    dt = tensors[0].dtype
    if dt not in (torch.float32, torch.float64):
        return False
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return not grad and all(t.device.type == "cpu" and t.dtype == dt for t in tensors)


def _threads() -> int:
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


if numba is not None:
    @njit(cache=True, inline="always")
    def _cell(coords, a, b, h):
        """Voxel coordinates (x, y, z) of point (a, b): grid_sample's unnormalisation."""
        return (coords[a, b, 0] + 1.0) * h, (coords[a, b, 1] + 1.0) * h, (coords[a, b, 2] + 1.0) * h

    @njit(cache=True, inline="always")
    def _weight(d, f):
        return f if d else 1.0 - f

    @njit(parallel=True, cache=True, boundscheck=False)
    def _slice(vol, coords, out):  # vol (n³,) flat, coords (A, B, 3), out (A, B)
        n = int(round(vol.shape[0] ** (1.0 / 3.0)))
        h, sy, sz = 0.5 * (n - 1), n, n * n
        for a in prange(coords.shape[0]):
            for b in range(coords.shape[1]):
                x, y, z = _cell(coords, a, b, h)
                acc = 0.0
                if x >= 0.0 and x < n - 1 and y >= 0.0 and y < n - 1 and z >= 0.0 and z < n - 1:
                    ix, iy, iz = int(x), int(y), int(z)  # the whole cell inside: no checks
                    fx, fy, fz = x - ix, y - iy, z - iz
                    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                    o = iz * sz + iy * sy + ix
                    acc = (gz * (gy * (gx * vol[o] + fx * vol[o + 1])
                                 + fy * (gx * vol[o + sy] + fx * vol[o + sy + 1]))
                           + fz * (gy * (gx * vol[o + sz] + fx * vol[o + sz + 1])
                                   + fy * (gx * vol[o + sz + sy] + fx * vol[o + sz + sy + 1])))
                elif x > -1.0 and x < n and y > -1.0 and y < n and z > -1.0 and z < n:
                    ix, iy, iz = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
                    fx, fy, fz = x - ix, y - iy, z - iz
                    for dz in range(2):
                        for dy in range(2):
                            for dx in range(2):
                                i, j, k = ix + dx, iy + dy, iz + dz
                                if 0 <= i < n and 0 <= j < n and 0 <= k < n:
                                    acc += (_weight(dz, fz) * _weight(dy, fy) * _weight(dx, fx)
                                            * vol[k * sz + j * sy + i])
                out[a, b] = acc

    @njit(cache=True, inline="always")
    def _add2(acc, o, w, v0, v1):
        acc[o] += w * v0
        acc[o + 1] += w * v1

    @njit(parallel=True, cache=True, boundscheck=False)
    def _merge(copies, coords, values):  # copies (T, n³ · ch) zeroed, (z, y, x, channel) order
        T, ch = copies.shape[0], values.shape[0]
        n = int(round((copies.shape[1] // ch) ** (1.0 / 3.0)))
        h, sx, sy, sz = 0.5 * (n - 1), ch, ch * n, ch * n * n
        A = coords.shape[0]
        per = (A + T - 1) // T
        for t in prange(T):
            acc = copies[t]
            for a in range(t * per, min(A, (t + 1) * per)):
                for b in range(coords.shape[1]):
                    x, y, z = _cell(coords, a, b, h)
                    if x >= 0.0 and x < n - 1 and y >= 0.0 and y < n - 1 and z >= 0.0 and z < n - 1:
                        ix, iy, iz = int(x), int(y), int(z)
                        fx, fy, fz = x - ix, y - iy, z - iz
                        gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                        o = iz * sz + iy * sy + ix * sx
                        w0, w1, w2, w3 = gz * gy * gx, gz * gy * fx, gz * fy * gx, gz * fy * fx
                        w4, w5, w6, w7 = fz * gy * gx, fz * gy * fx, fz * fy * gx, fz * fy * fx
                        if ch == 2:  # EMC's numerator and denominator: unrolled, 2× faster
                            v0, v1 = values[0, a, b], values[1, a, b]
                            _add2(acc, o, w0, v0, v1)
                            _add2(acc, o + sx, w1, v0, v1)
                            _add2(acc, o + sy, w2, v0, v1)
                            _add2(acc, o + sy + sx, w3, v0, v1)
                            _add2(acc, o + sz, w4, v0, v1)
                            _add2(acc, o + sz + sx, w5, v0, v1)
                            _add2(acc, o + sz + sy, w6, v0, v1)
                            _add2(acc, o + sz + sy + sx, w7, v0, v1)
                            continue
                        for c in range(ch):
                            v = values[c, a, b]
                            oc = o + c
                            acc[oc] += w0 * v
                            acc[oc + sx] += w1 * v
                            acc[oc + sy] += w2 * v
                            acc[oc + sy + sx] += w3 * v
                            acc[oc + sz] += w4 * v
                            acc[oc + sz + sx] += w5 * v
                            acc[oc + sz + sy] += w6 * v
                            acc[oc + sz + sy + sx] += w7 * v
                    elif x > -1.0 and x < n and y > -1.0 and y < n and z > -1.0 and z < n:
                        ix, iy, iz = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
                        fx, fy, fz = x - ix, y - iy, z - iz
                        for dz in range(2):
                            for dy in range(2):
                                for dx in range(2):
                                    i, j, k = ix + dx, iy + dy, iz + dz
                                    if 0 <= i < n and 0 <= j < n and 0 <= k < n:
                                        w = _weight(dz, fz) * _weight(dy, fy) * _weight(dx, fx)
                                        o = k * sz + j * sy + i * sx
                                        for c in range(ch):
                                            acc[o + c] += w * values[c, a, b]


def slice_trilinear(volume: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear samples (A, B) of ``volume`` (n, n, n) at ``coords`` (A, B, 3) (module
    docstring), in the volume's dtype."""
    _threads()
    out = torch.empty(coords.shape[:2], dtype=volume.dtype)
    _slice(volume.detach().contiguous().view(-1).numpy(), coords.detach().contiguous().numpy(), out.numpy())
    return out


def merge_trilinear(accum: torch.Tensor, coords: torch.Tensor, values: torch.Tensor,
                    copies_bytes: float) -> None:
    """``accum[c] +=`` the trilinear merge of ``values[c]`` (ch, A, B) at ``coords``
    (A, B, 3): accum (ch, n, n, n). One zeroed copy of accum per thread, at most
    ``copies_bytes`` of them (then fewer threads), summed at the end; the copies hold the
    channels of a voxel side by side, so that a point's updates share cache lines."""
    ch, n = accum.shape[0], accum.shape[-1]
    T = max(1, min(_threads(), coords.shape[0], int(copies_bytes // max(1, accum.numel() * accum.element_size()))))
    copies = torch.zeros((T, n ** 3 * ch), dtype=accum.dtype)
    _merge(copies.numpy(), coords.detach().contiguous().numpy(), values.detach().contiguous().numpy())
    merged = copies[0] if T == 1 else copies.sum(0)
    accum += merged.view(n, n, n, ch).permute(3, 0, 1, 2)
