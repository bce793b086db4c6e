"""Registration of volumes: densities (translation + inversion) and intensities (rotation).

* :func:`align_density` — a phased density is defined only up to a translation and an
  inversion ``ρ(−r)`` (the enantiomer). Both ``moving`` and its inversion are registered to
  ``reference`` by the peak of the FFT cross-correlation, refined to sub-voxel precision by
  a parabola through the peak and its neighbours along each axis, and applied as a Fourier
  shift (periodic box).
* :func:`rotate_volume` — ``out(x) = volume(Rᵀ x)`` about the grid centre, trilinear,
  in voxel coordinates (the same for q-space and real-space grids).
* :func:`align_intensity_rotation` — the frame of an EMC reconstruction is arbitrary: find
  ``A`` with ``moving(q) ≈ reference(A q)`` by a global search over an SO(3) sampling
  followed by local refinement on successively finer grids of small rotations.

Frame relations (derived in :func:`align_intensity_rotation`): if ``F_m(q) = F_r(A q)`` then
``ρ_m(r) = ρ_r(A r)`` and both volumes are brought into the reference frame by
``rotate_volume(volume_moving, A)``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from spiflow.grid import Grid, rotated_points, slice_volume
from spiflow.rotation import multiply, quaternion_to_matrix
from spiflow.sampling import so3_sampling

_AXES = (-3, -2, -1)


def _as_tensor(x, name: str, dtype=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 3 or len(set(t.shape)) != 1:
        raise ValueError(f"{name} must be a cubic (n, n, n) volume, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t.to(dtype) if dtype is not None else t


def _like_input(t: torch.Tensor, template):
    return t if isinstance(template, torch.Tensor) else t.cpu().numpy()


def pearson(a, b) -> float:
    """Pearson correlation of two arrays of equal shape (flattened)."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double().flatten()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def fourier_shift(volume: torch.Tensor, shift) -> torch.Tensor:
    """Periodic shift of a real volume (..., n, n, n) by ``shift`` (3,) voxels (any real values).

    ``out(i) = volume(i − shift)``: integer shifts equal ``torch.roll(volume, shift)``;
    fractional ones use the phase ramp ``exp(−2πi k·shift / n)`` on the DFT.
    """
    shift = np.asarray(shift, dtype=np.float64)
    ints = np.round(shift)
    out = torch.roll(volume, tuple(int(s) for s in ints), dims=_AXES)
    frac = shift - ints
    if np.all(np.abs(frac) < 1e-9):
        return out
    n = volume.shape[-1]
    real_dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32
    f = torch.fft.fftfreq(n, dtype=torch.float64, device=volume.device)
    phase = (f[:, None, None] * frac[0] + f[None, :, None] * frac[1] + f[None, None, :] * frac[2])
    ramp = torch.exp(-2j * math.pi * phase).to(torch.complex128 if real_dtype == torch.float64 else torch.complex64)
    return torch.fft.ifftn(torch.fft.fftn(out.to(real_dtype), dim=_AXES) * ramp, dim=_AXES).real


def _parabola_offset(cm: float, c0: float, cp: float) -> float:
    den = cm - 2 * c0 + cp
    return 0.0 if den >= 0 else float(np.clip(0.5 * (cm - cp) / den, -0.5, 0.5))


def align_density(moving, reference, allow_inversion: bool = True, subvoxel: bool = True):
    """Register ``moving`` to ``reference`` by translation and (optionally) inversion.

    moving, reference: (n, n, n) real densities on the same centred grid (numpy or torch).
    Inversion is ``ρ(−r)``, on the centred odd grid a flip of all three axes (index
    ``i → n−1−i``). For each candidate ``c`` (``moving``, flipped ``moving``) the circular
    cross-correlation ``C(s) = Σ_i ref(i) c(i − s) = IDFT(DFT(ref) · conj DFT(c))(s)`` is
    maximised over integer ``s``; each axis is then refined by a parabola through the peak
    and its two neighbours. Shifts are periodic (the box is treated as a torus).

    Returns ``(aligned, info)``: ``aligned`` (n, n, n) is ``fourier_shift(c, shift)`` of the
    better candidate (array type of ``moving``; float64 if it was, else float32), and ``info`` is a dict with
    ``shift_voxels`` (3,) float64 (``aligned(i) = c(i − shift)``), ``inverted`` (bool) and
    ``cc`` (Pearson correlation of ``aligned`` with ``reference``).
    Raises ValueError for non-cubic or mismatched shapes, NaN, or constant volumes.
    """
    m = _as_tensor(moving, "moving", torch.float64)
    r = _as_tensor(reference, "reference", torch.float64).to(m.device)
    if m.shape != r.shape:
        raise ValueError(f"moving {tuple(m.shape)} and reference {tuple(r.shape)} shapes differ")
    if m.std() == 0 or r.std() == 0:
        raise ValueError("cannot align a constant volume")
    n = m.shape[0]
    R = torch.fft.fftn(r, dim=_AXES)
    best = None
    for inverted in ((False, True) if allow_inversion else (False,)):
        c = torch.flip(m, dims=_AXES) if inverted else m
        C = torch.fft.ifftn(R * torch.fft.fftn(c, dim=_AXES).conj(), dim=_AXES).real
        peak = np.unravel_index(int(torch.argmax(C)), C.shape)
        shift = np.array([(p + n // 2) % n - n // 2 for p in peak], dtype=np.float64)
        if subvoxel:
            for ax in range(3):
                idx = [list(peak) for _ in range(3)]
                idx[0][ax] = (peak[ax] - 1) % n
                idx[2][ax] = (peak[ax] + 1) % n
                shift[ax] += _parabola_offset(*(float(C[tuple(i)]) for i in idx))
        aligned = fourier_shift(c, shift)
        cc = pearson(aligned, r)
        if best is None or cc > best[1]["cc"]:
            best = (aligned, {"shift_voxels": shift, "inverted": inverted, "cc": cc})
    is64 = str(getattr(moving, "dtype", "")).endswith("float64")
    return _like_input(best[0].to(torch.float64 if is64 else torch.float32), moving), best[1]


def rotate_volume(volume, rotation, chunk: int = 1 << 20):
    """``out(x) = volume(Rᵀ x)`` at every voxel ``x`` (voxel offsets from the centre n // 2).

    volume: (n, n, n), n odd (numpy or torch); rotation: (3, 3) active rotation ``R``.
    The content of ``volume`` is rotated by ``R`` about the grid centre: a feature at
    offset ``y`` moves to ``R y``. Trilinear interpolation (:func:`spiflow.grid.slice_volume`),
    points sampled outside the grid read 0. Only voxel coordinates are used, so the call is
    identical for q-space and real-space grids (no spacing argument is needed).
    Returns the same array type as ``volume``. Raises ValueError for bad shapes / even n.
    """
    v = _as_tensor(volume, "volume")
    if not v.is_floating_point():
        v = v.to(torch.float32)
    R = torch.as_tensor(np.asarray(rotation) if not isinstance(rotation, torch.Tensor) else rotation)
    if R.shape != (3, 3):
        raise ValueError(f"rotation must be (3, 3), got {tuple(R.shape)}")
    g = Grid(v.shape[0], 1.0)  # voxel units; raises ValueError for even n
    pts = torch.as_tensor(g.q_points().reshape(-1, 3), dtype=v.dtype, device=v.device)
    R = R.to(dtype=v.dtype, device=v.device)
    out = torch.empty(pts.shape[0], dtype=v.dtype, device=v.device)
    for s in range(0, pts.shape[0], chunk):
        out[s:s + chunk] = slice_volume(v, rotated_points(pts[s:s + chunk], R[None])[0], g)
    return _like_input(out.reshape(v.shape), volume)


# ----------------------------------------------------------------------------- rotations


def global_rotations(num_div: int) -> np.ndarray:
    """Quaternions (M, 4) float64 covering SO(3) for the global search: the 600-cell
    refinement :func:`spiflow.sampling.so3_sampling` (num_div), M =
    :func:`spiflow.sampling.n_orientations` (num_div) (3,240 for 4).

    Raises ValueError unless num_div is a positive integer.
    """
    if int(num_div) != num_div or num_div < 1:
        raise ValueError(f"num_div must be a positive integer, got {num_div}")
    quats, _ = so3_sampling(int(num_div))
    return np.asarray(quats, dtype=np.float64)


def _axis_angle_quats(vecs: np.ndarray) -> np.ndarray:
    """Quaternions (K, 4) of rotation vectors (K, 3) in radians."""
    ang = np.linalg.norm(vecs, axis=1)
    axis = vecs / np.where(ang > 0, ang, 1.0)[:, None]
    return np.concatenate([np.cos(ang / 2)[:, None], np.sin(ang / 2)[:, None] * axis], axis=1)


def _shell_index(grid: Grid) -> torch.Tensor:
    return torch.as_tensor(np.rint(grid.q_norm() / grid.dq).astype(np.int64))


def _feature(volume: torch.Tensor, grid: Grid, transform: str) -> torch.Tensor:
    """Per-voxel feature whose correlation is maximised (see align_intensity_rotation)."""
    I = volume.clamp_min(0).double()
    if transform == "q2":
        return (I * torch.as_tensor(grid.q_norm() ** 2)).float()
    shell = _shell_index(grid).flatten()
    nsh = int(shell.max()) + 1
    count = torch.bincount(shell, minlength=nsh).double().clamp_min(1)
    mean_i = torch.bincount(shell, I.flatten(), minlength=nsh) / count
    L = torch.log(I.flatten() + 1e-3 * mean_i[shell] + 1e-30)
    mean_l = torch.bincount(shell, L, minlength=nsh) / count
    return (L - mean_l[shell]).reshape(volume.shape).float()


def _weighted_pearson(x: torch.Tensor, Y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of x (P,) with each row of Y (K, P), point weights w (K, P) or (P,)."""
    w = w.expand_as(Y)
    sw = w.sum(-1, keepdim=True).clamp_min(1e-12)
    xc = x - (w * x).sum(-1, keepdim=True) / sw
    yc = Y - (w * Y).sum(-1, keepdim=True) / sw
    cov = (w * xc * yc).sum(-1)
    return cov / ((w * xc * xc).sum(-1) * (w * yc * yc).sum(-1)).sqrt().clamp_min(1e-30)


def align_intensity_rotation(moving, reference, grid: Grid, mask=None, num_div: int = 4,
                             reference_mask=None, n_points: int = 3000, n_points_global: int = 1000,
                             transform: str = "log", q_range: tuple[float, float] | None = None,
                             n_candidates: int = 4, min_step_deg: float = 0.1, seed: int = 0,
                             chunk: int = 256):
    """Rotation ``A`` (3, 3) with ``moving(q) ≈ reference(A q)``, and its correlation.

    moving, reference: (n, n, n) intensities on ``grid`` (numpy or torch, electrons²).
    mask: optional (n, n, n) bool on the moving grid — voxels where ``moving`` is meaningful
    (e.g. measured); reference_mask likewise for ``reference`` (sampled at ``A q``, used as
    point weights). Points are also restricted to ``q_range`` (Å⁻¹; default ``3 dq`` to
    ``0.9 q_max``).

    Feature (``transform``): ``"log"`` (default) is ``log(I + 10⁻³ Ī(|q|)) − ⟨·⟩_shell``.
    Intensities fall by orders of magnitude with |q|, so a raw Pearson is dominated by the
    few lowest shells; the radial profile carries no orientation information and is removed,
    the log gives every speckle (and every shell) a comparable weight and the floor keeps
    near-zero (noisy) voxels from dominating. ``"q2"`` is ``I |q|²`` (a milder flattening).
    ``n_points`` voxels (the first ``n_points_global`` of them for the global search) are
    drawn at random (``seed``) with probability ∝ 1/|q|², i.e.
    uniformly in |q|: low shells (wide speckles, large capture range for the coarse search)
    are not swamped by the far more numerous outer voxels, which still give the precision.

    Search: every rotation of :func:`global_rotations` (num_div) is scored by the Pearson
    correlation of the moving features with ``reference`` sliced trilinearly at ``A q``
    (batched ``rotated_points`` + ``slice_volume``, ``chunk`` rotations at a time); the
    ``n_candidates`` best are refined by a pattern search: the 27 rotations
    ``exp([ω]) A`` with ``ω ∈ {−δ, 0, δ}³``, moving to the best and halving ``δ`` when the
    centre wins, from δ ≈ half the sampling spacing down to ``min_step_deg``.
    Friedel symmetry ``I(q) = I(−q)`` makes ``A`` and ``−A`` equivalent, so no improper
    rotation is searched.

    Use of ``A`` (``F_m(q) = F_r(A q)`` ⇔ ``ρ_m(r) = ρ_r(A r)`` with ``r' = A r``, det A = 1):
    ``rotate_volume(moving_volume, A)`` gives ``v(Aᵀ x)``, i.e. the intensity or the density
    of the moving reconstruction in the reference frame.

    Returns ``(A, cc)``: A (3, 3) float64 numpy, cc the correlation of the features.
    Raises ValueError for mismatched shapes, NaN, unknown transform or too few voxels.
    """
    if transform not in ("log", "q2"):
        raise ValueError(f"transform must be 'log' or 'q2', got {transform!r}")
    mov = _as_tensor(moving, "moving", torch.float64).cpu()
    ref = _as_tensor(reference, "reference", torch.float64).cpu()
    if mov.shape != (grid.n,) * 3 or ref.shape != mov.shape:
        raise ValueError(f"moving {tuple(mov.shape)} and reference {tuple(ref.shape)} must be "
                         f"({grid.n}, {grid.n}, {grid.n}) to match the grid")
    qn = grid.q_norm()
    lo, hi = q_range if q_range is not None else (3 * grid.dq, 0.9 * grid.q_max)
    keep = (qn >= lo) & (qn <= hi)
    if mask is not None:
        mask = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
        if mask.shape != keep.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the volumes")
        keep &= mask
    idx = np.flatnonzero(keep)
    if idx.size < 50:
        raise ValueError(f"only {idx.size} voxels in the mask and q range; need at least 50")
    rng = np.random.default_rng(seed)
    p = 1.0 / qn.ravel()[idx] ** 2
    idx = rng.choice(idx, size=min(n_points, idx.size), replace=False, p=p / p.sum())

    x = _feature(mov, grid, transform).flatten()[torch.as_tensor(idx)]
    fref = _feature(ref, grid, transform)
    wref = None
    if reference_mask is not None:
        rm = torch.as_tensor(np.asarray(reference_mask.cpu() if isinstance(reference_mask, torch.Tensor)
                                        else reference_mask, dtype=np.float32))
        if rm.shape != fref.shape:
            raise ValueError(f"reference_mask shape {tuple(rm.shape)} does not match the volumes")
        wref = rm
    q = torch.as_tensor(grid.q_points().reshape(-1, 3)[idx], dtype=torch.float32)

    def score(quats: np.ndarray, npts: int) -> np.ndarray:
        mats = quaternion_to_matrix(torch.as_tensor(quats, dtype=torch.float32))
        out = []
        for s in range(0, len(mats), chunk):
            pts = rotated_points(q[:npts], mats[s:s + chunk].transpose(-1, -2))  # A q, (K, P, 3)
            Y = slice_volume(fref, pts, grid)
            w = slice_volume(wref, pts, grid) if wref is not None else torch.ones(1, pts.shape[1])
            out.append(_weighted_pearson(x[:npts], Y, w))
        return torch.cat(out).double().numpy()

    quats = global_rotations(num_div)
    cc = score(quats, n_points_global)
    order = np.argsort(-cc)[:n_candidates]
    spacing = (8 * math.pi ** 2 / len(quats)) ** (1 / 3)  # typical neighbour distance, rad
    offsets = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = 13  # index of (0, 0, 0) in offsets
    # pattern search, all candidates advanced together (one batched score call per round)
    cur = quats[order]
    cur_cc = score(cur, n_points)
    step = np.full(len(cur), spacing / 2)
    for _ in range(200):
        active = np.flatnonzero(step >= math.radians(min_step_deg))
        if active.size == 0:
            break
        pert = torch.as_tensor(_axis_angle_quats((offsets[None] * step[active, None, None]).reshape(-1, 3)))
        cand = multiply(pert, torch.as_tensor(cur[active]).repeat_interleave(27, 0)).numpy()
        sc = score(cand, n_points).reshape(active.size, 27)
        for i, k in enumerate(active):
            j = int(np.argmax(sc[i]))
            if j == centre or sc[i, j] <= cur_cc[k]:
                step[k] /= 2
            else:
                cur[k], cur_cc[k] = cand[i * 27 + j], sc[i, j]
    best = int(np.argmax(cur_cc))
    A = quaternion_to_matrix(torch.as_tensor(cur[best], dtype=torch.float64)).numpy()
    return A, float(cur_cc[best])
