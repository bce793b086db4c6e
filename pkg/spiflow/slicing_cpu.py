"""CPU kernels of the slicing and merging in :mod:`spiflow.slicing`, compiled with numba, and
of two steps of :mod:`spiflow.emc`: the coarse-to-fine E-step's cell blocks
(:func:`block_products`) and the exhaustive E-step's row posterior (:func:`posterior_rows`).

torch's CPU 3D grid sampler is a generic scalar loop: on one AMD EPYC core (beside another
job) its input gradient (the merge) cost about 270 ns a point for EMC's two channels, 4× its
forward and 2–3× this module's merge, and made EMC on a large, sparsely lit detector slower
than Dragonfly's C (benchmarks/README.md).
These kernels use the same trilinear weights as ``grid_sample(mode="bilinear",
padding_mode="zeros", align_corners=True)`` (a corner outside the grid reads 0 and receives
nothing; a NaN point reads 0; tested against it), are parallel over the first point axis
(orientations), and merge into one copy of the volume per thread with a voxel's channels
side by side. The ``*_rotations`` kernels rotate each pixel themselves (9 multiply-adds),
so the (R, P, 3) coordinates are never stored; :func:`slice_channels_rotated` also reads
the 64 taps of a tricubic B-spline directly. Compiled on first use and cached on disk by
numba (10–30 s once per change of this file, then about 1 s a process). CUDA tensors keep grid_sample, which is
parallel over points there.

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
    """numba's threads set to torch's (``spiflow.pipeline.configure_threads``); returns them.

    The first call launches numba's thread pool, whose OpenMP layer sets OpenMP's thread
    count, and with it torch's, to ``NUMBA_NUM_THREADS`` (all cores; measured): torch's is
    set back, so that a stage or rank keeps the threads it was given."""
    t = torch.get_num_threads()
    n = max(1, min(t, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    if torch.get_num_threads() != t:
        torch.set_num_threads(t)
    return n


if numba is not None:
    @njit(cache=True, inline="always")
    def _from_coords(coords, a, b, h):
        """Voxel coordinates (x, y, z) of point (a, b) of grid_sample coordinates."""
        return (coords[a, b, 0] + 1.0) * h, (coords[a, b, 1] + 1.0) * h, (coords[a, b, 2] + 1.0) * h

    @njit(cache=True, inline="always")
    def _from_rotation(q, rs, a, b, h):
        """Voxel coordinates of pixel b under rotation a: ``q_b · rs_a`` (grid_sample
        coordinates, :func:`scaled_rotations`), unnormalised."""
        q0, q1, q2 = q[b, 0], q[b, 1], q[b, 2]
        return ((q0 * rs[a, 0, 0] + q1 * rs[a, 1, 0] + q2 * rs[a, 2, 0] + 1.0) * h,
                (q0 * rs[a, 0, 1] + q1 * rs[a, 1, 1] + q2 * rs[a, 2, 1] + 1.0) * h,
                (q0 * rs[a, 0, 2] + q1 * rs[a, 1, 2] + q2 * rs[a, 2, 2] + 1.0) * h)

    @njit(cache=True, inline="always")
    def _face_corner(x, y, z, m, n, ch):
        """Corner m (0 … 7, bits x, y, z) of the cell of a point whose cell crosses a face:
        (flat index into an (n, n, n, ch) volume, trilinear weight), index −1 outside."""
        ix, iy, iz = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
        dx, dy, dz = m & 1, (m >> 1) & 1, (m >> 2) & 1
        i, j, k = ix + dx, iy + dy, iz + dz
        if i < 0 or i >= n or j < 0 or j >= n or k < 0 or k >= n:
            return -1, 0.0
        fx, fy, fz = x - ix, y - iy, z - iz
        w = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy) * (fz if dz else 1.0 - fz)
        return ((k * n + j) * n + i) * ch, w

    @njit(cache=True, inline="always")
    def _sample(vol, x, y, z, n):
        """Trilinear value of vol (n³,) flat (z, y, x) at voxel coordinates (x, y, z)."""
        if x >= 0.0 and x < n - 1 and y >= 0.0 and y < n - 1 and z >= 0.0 and z < n - 1:
            ix, iy, iz = int(x), int(y), int(z)  # the whole cell inside: no checks
            fx, fy, fz = x - ix, y - iy, z - iz
            gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
            sy, sz = n, n * n
            o = iz * sz + iy * sy + ix
            return (gz * (gy * (gx * vol[o] + fx * vol[o + 1]) + fy * (gx * vol[o + sy] + fx * vol[o + sy + 1]))
                    + fz * (gy * (gx * vol[o + sz] + fx * vol[o + sz + 1])
                            + fy * (gx * vol[o + sz + sy] + fx * vol[o + sz + sy + 1])))
        acc = 0.0
        if x > -1.0 and x < n and y > -1.0 and y < n and z > -1.0 and z < n:  # False for NaN
            for m in range(8):
                o, w = _face_corner(x, y, z, m, n, 1)
                if o >= 0:
                    acc += w * vol[o]
        return acc

    @njit(cache=True, inline="always")
    def _add2(acc, o, w, v0, v1):
        acc[o] += w * v0
        acc[o + 1] += w * v1

    @njit(cache=True, inline="always")
    def _spread(acc, x, y, z, n, values, a, b):
        """acc (n³ · ch,) flat (z, y, x, channel) += trilinear weights × values[:, a, b]."""
        ch = values.shape[0]
        if x >= 0.0 and x < n - 1 and y >= 0.0 and y < n - 1 and z >= 0.0 and z < n - 1:
            ix, iy, iz = int(x), int(y), int(z)
            fx, fy, fz = x - ix, y - iy, z - iz
            gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
            sx, sy, sz = ch, ch * n, ch * n * n
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
                return
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
            for m in range(8):
                o, w = _face_corner(x, y, z, m, n, ch)
                if o >= 0:
                    for c in range(ch):
                        acc[o + c] += w * values[c, a, b]

    @njit(parallel=True, cache=True, boundscheck=False)
    def _slice_coords(vol, n, coords, out):  # vol (n³,), coords (A, B, 3), out (A, B)
        h = 0.5 * (n - 1)
        for a in prange(out.shape[0]):
            for b in range(out.shape[1]):
                x, y, z = _from_coords(coords, a, b, h)
                out[a, b] = _sample(vol, x, y, z, n)

    @njit(parallel=True, cache=True, boundscheck=False)
    def _slice_rotations(vol, n, q, rs, out):  # q (B, 3), rs (A, 3, 3), out (A, B)
        h = 0.5 * (n - 1)
        for a in prange(out.shape[0]):
            for b in range(out.shape[1]):
                x, y, z = _from_rotation(q, rs, a, b, h)
                out[a, b] = _sample(vol, x, y, z, n)

    @njit(parallel=True, cache=True, boundscheck=False)
    def _merge_coords(copies, n, coords, values):  # copies (T, n³ · ch) zeroed, values (ch, A, B)
        T, A = copies.shape[0], values.shape[1]
        h, per = 0.5 * (n - 1), (A + T - 1) // T
        for t in prange(T):
            for a in range(t * per, min(A, (t + 1) * per)):
                for b in range(values.shape[2]):
                    x, y, z = _from_coords(coords, a, b, h)
                    _spread(copies[t], x, y, z, n, values, a, b)

    @njit(parallel=True, cache=True, boundscheck=False)
    def _merge_rotations(copies, n, q, rs, values):
        T, A = copies.shape[0], values.shape[1]
        h, per = 0.5 * (n - 1), (A + T - 1) // T
        for t in prange(T):
            for a in range(t * per, min(A, (t + 1) * per)):
                for b in range(values.shape[2]):
                    x, y, z = _from_rotation(q, rs, a, b, h)
                    _spread(copies[t], x, y, z, n, values, a, b)


    @njit(cache=True, inline="always")
    def _bspline_weights(x):
        """(first tap, 4 weights) of the uniform cubic B-spline at coordinate x: taps
        i − 1 … i + 2 for i = ⌊x⌋, weights β³(t + 1), β³(t), β³(t − 1), β³(t − 2), t = x − i."""
        i = int(np.floor(x))
        t = x - i
        t2, u = t * t, 1.0 - t
        return (i - 1, u * u * u / 6.0, (3.0 * t2 * t - 6.0 * t2 + 4.0) / 6.0,
                (-3.0 * t2 * t + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t2 * t / 6.0)

    @njit(parallel=True, cache=True, boundscheck=False)
    def _channels_rotations(vol, n, q, rs, cubic, out):  # vol (ch, n³), out (ch, A, B)
        ch, h = vol.shape[0], 0.5 * (n - 1)
        sy, sz = n, n * n
        for a in prange(out.shape[1]):
            wx, wy, wz = np.empty(4), np.empty(4), np.empty(4)
            for b in range(out.shape[2]):
                x, y, z = _from_rotation(q, rs, a, b, h)
                if not cubic:
                    for c in range(ch):
                        out[c, a, b] = _sample(vol[c], x, y, z, n)
                    continue
                if not (x > -3.0 and x < n + 2 and y > -3.0 and y < n + 2 and z > -3.0 and z < n + 2):
                    for c in range(ch):
                        out[c, a, b] = 0.0
                    continue
                ix, wx[0], wx[1], wx[2], wx[3] = _bspline_weights(x)
                iy, wy[0], wy[1], wy[2], wy[3] = _bspline_weights(y)
                iz, wz[0], wz[1], wz[2], wz[3] = _bspline_weights(z)
                inside = ix >= 0 and ix + 3 < n and iy >= 0 and iy + 3 < n and iz >= 0 and iz + 3 < n
                for c in range(ch):
                    v = vol[c]
                    acc = 0.0
                    for k in range(4):
                        kk = iz + k
                        if not inside and (kk < 0 or kk >= n):
                            continue
                        for j in range(4):
                            jj = iy + j
                            if not inside and (jj < 0 or jj >= n):
                                continue
                            o = kk * sz + jj * sy
                            w = wz[k] * wy[j]
                            if inside:
                                acc += w * (wx[0] * v[o + ix] + wx[1] * v[o + ix + 1]
                                            + wx[2] * v[o + ix + 2] + wx[3] * v[o + ix + 3])
                            else:
                                for i in range(4):
                                    if 0 <= ix + i < n:
                                        acc += w * wx[i] * v[o + ix + i]
                    out[c, a, b] = acc


if numba is not None:
    @njit(parallel=True, cache=True, boundscheck=False, fastmath=True)
    def _block_products(A, B, rows, n_rows, cols, col_start, n_cols, out_start, out):
        """Block j: ``out[out_start[j] + a · n_cols[j] + i] = A[rows[j] + a] · B[cols[col_start[j] + i]]``
        for a < n_rows[j], i < n_cols[j] (dot products over the last axis); parallel over blocks."""
        P = A.shape[1]
        zero = np.zeros(1, dtype=A.dtype)[0]  # accumulate in A's precision, as a GEMM does
        for j in prange(rows.shape[0]):
            r0, nr, nc, c0, o0 = rows[j], n_rows[j], n_cols[j], col_start[j], out_start[j]
            for i in range(nc):
                k = cols[c0 + i]
                for a in range(nr):
                    acc = zero
                    for p in range(P):
                        acc += A[r0 + a, p] * B[k, p]
                    out[o0 + a * nc + i] = acc


if numba is not None:
    @njit(parallel=True, cache=True, boundscheck=False, fastmath=True)
    def _posterior_rows(L, P, logw, beta, constants, s_dot, models, out, model_mass, best):
        """Row i (a frame) of the exhaustive E-step's posterior, in five passes over the row
        while it sits in cache (see :func:`posterior_rows`); out[:, 0…5] = log Σ, 1 / Σ,
        Σ P logw, Σ P log P, Σ P s_dot, mass left out. The row's arithmetic stays in L's
        dtype (a float32 exp is 3× a float64 one here); the sums are float64."""
        b, m = L.shape
        per = m // models
        log_floor, threshold = constants[0, 0], constants[0, 1]
        for i in prange(b):
            for j in range(m):
                L[i, j] = L[i, j] * beta + logw[j]
            mx, arg = L[i, 0], 0  # the max of the stored (rounded) values, so its exp is 1
            for j in range(m):
                if L[i, j] > mx:
                    mx, arg = L[i, j], j
            total = 0.0
            for j in range(m):
                x = max(L[i, j] - mx, log_floor)
                L[i, j] = x
                e = np.exp(x)
                P[i, j] = e
                total += e
            inv, log_total = 1.0 / total, np.log(total)
            constants[i, 2], constants[i, 3] = inv, log_total  # rounded to L's dtype
            inv_t, log_total_t = constants[i, 2], constants[i, 3]
            pw, plogp, psd, left = 0.0, 0.0, 0.0, 0.0
            for j in range(m):
                p = P[i, j] * inv_t
                lp = L[i, j] - log_total_t
                L[i, j] = lp
                pw += p * logw[j]
                plogp += p * lp
                psd += p * s_dot[j]
            for k in range(models):  # a pass of its own: in the loop above it cost 30 %
                mass = 0.0
                for j in range(k * per, (k + 1) * per):
                    mass += P[i, j]
                model_mass[i, k] = mass * inv
            for j in range(m):
                p = P[i, j] * inv_t
                if p < threshold:
                    left += p
                    p = 0.0
                P[i, j] = p
            out[i, 0], out[i, 1], out[i, 2] = mx + log_total, inv, pw
            out[i, 3], out[i, 4], out[i, 5] = plogp, psd, left
            best[i] = arg


def posterior_rows(L: torch.Tensor, P: torch.Tensor, logw: torch.Tensor, beta: float, log_floor: float,
                   s_dot: torch.Tensor, threshold: float, models: int):
    """The soft posterior of :mod:`spiflow.emc`'s exhaustive E-step, row by row (one frame
    a row, parallel over frames, each row read five times while it sits in cache; the
    formulas, and the torch path this equals, are documented in :mod:`spiflow.emc`):
    L (b, m) the log-likelihoods, contiguous, overwritten with log P; P (b, m) receives P,
    with the entries below ``threshold`` set to 0 (left out of the merge); logw, s_dot (m,);
    the m columns are ``models`` runs of equal length. CPU tensors of one float dtype
    (:func:`available`). Returns (log Σ_r w_r e^{βL_r}, 1 / Σ (= max P), Σ_r P_r log w_r,
    Σ_r P_r log P_r, Σ_r P_r s_dot_r, mass left out) each (b,) float64, the mass of each
    run (b, models) float64 before the cut, and the first index of max P (b,) int64.
    Raises ValueError if L or P is not contiguous."""
    if not (L.is_contiguous() and P.is_contiguous()):
        raise ValueError("posterior_rows: L and P must be contiguous (they are written in place)")
    _threads()
    b = L.shape[0]
    out, model_mass = np.empty((b, 6)), np.empty((b, models))
    best = np.empty(b, dtype=np.int64)
    dt = _np(L).dtype
    constants = np.empty((b, 4), dtype=dt)  # per row: log floor, threshold, then 1 / Σ and log Σ in L's dtype
    constants[:, 0], constants[:, 1] = log_floor, threshold
    _posterior_rows(_np(L), _np(P), _np(logw), dt.type(beta), constants, _np(s_dot), int(models), out,
                    model_mass, best)
    return (*torch.from_numpy(out).T, torch.from_numpy(model_mass), torch.from_numpy(best))


def block_products(A: torch.Tensor, B: torch.Tensor, rows, n_rows, cols, col_start, n_cols, out_start,
                   out: torch.Tensor) -> None:
    """Dense blocks of a sampled product ``A Bᵀ``, written into the flat ``out`` (CPU, one float
    dtype): block j is rows ``rows[j] … rows[j] + n_rows[j] − 1`` of A (R, P) against rows
    ``cols[col_start[j] … col_start[j] + n_cols[j] − 1]`` of B (N, P), stored row-major from
    ``out[out_start[j]]``. Each row of B is read once per block and reused for the block's
    rows of A (a block of EMC's coarse-to-fine pattern: a coarse cell's fine rotations against
    the frames that keep it). Integer arguments are (J,) int64 arrays except ``cols``.
    Raises nothing of its own."""
    _threads()
    _block_products(_np(A), _np(B), *(np.ascontiguousarray(x, dtype=np.int64) for x in
                                      (rows, n_rows, cols, col_start, n_cols, out_start)), out.numpy())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def scaled_rotations(rotations: torch.Tensor, q_max: float) -> torch.Tensor:
    """(R, 3, 3) matrices ``rs`` (Å) with grid_sample coordinates ``q_p · rs_r`` of ``R_rᵀ q_p``
    (:func:`spiflow.slicing.grid_coordinates`: axes reordered (z, y, x), divided by q_max in
    Å⁻¹), for rotations (R, 3, 3)."""
    return (rotations.flip(-1) / q_max).contiguous()  # columns (z, y, x)


def slice_trilinear(volume: torch.Tensor, coords: torch.Tensor | None = None, q: torch.Tensor | None = None,
                    rs: torch.Tensor | None = None) -> torch.Tensor:
    """Trilinear samples of ``volume`` (n, n, n), in its dtype: (A, B) at ``coords``
    (A, B, 3) (module docstring), or (R, P) at pixels ``q`` (P, 3, Å⁻¹) under ``rs``
    (R, 3, 3, Å) of :func:`scaled_rotations` (no coordinates in memory). CPU tensors of one
    float dtype (:func:`available`); raises nothing of its own."""
    _threads()
    n, vol = volume.shape[-1], _np(volume).reshape(-1)
    if coords is not None:
        out = torch.empty(coords.shape[:2], dtype=volume.dtype)
        _slice_coords(vol, n, _np(coords), out.numpy())
    else:
        out = torch.empty((rs.shape[0], q.shape[0]), dtype=volume.dtype)
        _slice_rotations(vol, n, _np(q), _np(rs), out.numpy())
    return out


def merge_trilinear(accum: torch.Tensor, values: torch.Tensor, copies_bytes: float,
                    coords: torch.Tensor | None = None, q: torch.Tensor | None = None,
                    rs: torch.Tensor | None = None) -> None:
    """``accum[c] +=`` the trilinear merge of ``values[c]`` (ch, A, B) at ``coords`` (A, B, 3),
    or at pixels ``q`` (B, 3) under ``rs`` (A, 3, 3): accum (ch, n, n, n). One zeroed copy
    of accum per thread, at most ``copies_bytes`` of them (then fewer threads), summed at the
    end; the copies hold the channels of a voxel side by side, so that a point's updates
    share cache lines. Units are those of values; raises nothing of its own."""
    ch, n = accum.shape[0], accum.shape[-1]
    T = max(1, min(_threads(), values.shape[1], int(copies_bytes // max(1, accum.numel() * accum.element_size()))))
    copies = torch.zeros((T, n ** 3 * ch), dtype=accum.dtype)
    if coords is not None:
        _merge_coords(copies.numpy(), n, _np(coords), _np(values))
    else:
        _merge_rotations(copies.numpy(), n, _np(q), _np(rs), _np(values))
    merged = copies[0] if T == 1 else copies.sum(0)
    accum += merged.view(n, n, n, ch).permute(3, 0, 1, 2)


def slice_channels_rotated(volume: torch.Tensor, q: torch.Tensor, rs: torch.Tensor, cubic: bool) -> torch.Tensor:
    """Every channel of ``volume`` (ch, n, n, n) at pixels ``q`` (P, 3) under ``rs`` (R, 3, 3)
    of :func:`scaled_rotations`: (ch, R, P), trilinear, or with ``cubic`` the tricubic
    B-spline whose coefficients ``volume`` holds (64 taps a point; taps outside read 0;
    weights of the uniform cubic B-spline, Unser 1999). Raises nothing of its own."""
    _threads()
    ch, n = volume.shape[0], volume.shape[-1]
    out = torch.empty((ch, rs.shape[0], q.shape[0]), dtype=volume.dtype)
    _channels_rotations(_np(volume).reshape(ch, -1), n, _np(q), _np(rs), bool(cubic), out.numpy())
    return out


def compile_kernels(dtypes=(torch.float32, torch.float64)) -> float:
    """Compile (or load from numba's cache) every kernel for ``dtypes`` on tiny inputs, so
    that a timing that follows measures no compilation; returns the seconds it took (0
    without numba)."""
    if numba is None:
        return 0.0
    import time
    t0 = time.perf_counter()
    for dt in dtypes:
        vol, q, rs = torch.zeros((2, 4, 4, 4), dtype=dt), torch.zeros((3, 3), dtype=dt), torch.eye(3, dtype=dt)[None]
        coords, values = torch.zeros((1, 3, 3), dtype=dt), torch.zeros((2, 1, 3), dtype=dt)
        slice_trilinear(vol[0], coords=coords)
        slice_trilinear(vol[0], q=q, rs=rs)
        for ch in (1, 2):
            merge_trilinear(vol[:ch].clone(), values[:ch], 1e9, coords=coords)
            merge_trilinear(vol[:ch].clone(), values[:ch], 1e9, q=q, rs=rs)
        for cubic in (False, True):
            slice_channels_rotated(vol, q, rs, cubic)
        L = torch.zeros((1, 2), dtype=dt)
        posterior_rows(L, L.clone(), L[0].clone(), 1.0, -80.0, L[0].clone(), 0.0, 1)
    return time.perf_counter() - t0
