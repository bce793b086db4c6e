"""Evaluation numbers: Fourier shell correlation, resolution, intensity and orientation errors.

Pure functions of arrays (numpy or torch in, numpy / pandas / float out). Conventions of
docs/conventions.md: q in Å⁻¹ without 2π, resolution d = 1/q Å, volumes on :class:`spiflow.grid.Grid`
(centred, axes qx, qy, qz), quaternions [w, x, y, z] active, frame i records I(R_iᵀ q).

Resolution shells: voxel k belongs to shell ``round(|q| / (shell_width dq))``; shell
centres run from q = 0 up to the grid's ``q_max = (n // 2) dq``, so the corners of the
cube beyond the last shell are excluded.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from spiflow.grid import Grid, density_to_structure_factor
from spiflow.rotation import BEAM_FLIP, angle_between, matrix_to_quaternion, mean_rotation, quaternion_to_matrix

FSC_THRESHOLDS = (0.5, 0.143)  # the customary 0.5 and Rosenthal & Henderson, JMB 333, 721 (2003)


def _array(x, name: str, dtype=None) -> np.ndarray:
    """``x`` as a numpy array (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)
    if a.size and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_volume(a: np.ndarray, grid: Grid, name: str) -> None:
    if a.shape != (grid.n,) * 3:
        raise ValueError(f"{name} has shape {a.shape}, expected {(grid.n,) * 3} for the grid")


def _shells(grid: Grid, shell_width: int) -> tuple[np.ndarray, int]:
    """Shell index of every voxel (n, n, n) and the number of shells kept (0 … last)."""
    if int(shell_width) != shell_width or shell_width < 1:
        raise ValueError(f"shell_width must be a positive integer (in voxels), got {shell_width}")
    width = shell_width * grid.dq
    idx = np.rint(grid.q_norm() / width).astype(np.int64)
    return idx, grid.center // shell_width + 1


def _shell_sum(sel: np.ndarray, x: np.ndarray, n_shells: int) -> np.ndarray:
    total = np.bincount(sel, weights=x.real, minlength=n_shells)
    if np.iscomplexobj(x):
        total = total + 1j * np.bincount(sel, weights=x.imag, minlength=n_shells)
    return total


def _shell_table(a: np.ndarray, b: np.ndarray, grid: Grid, shell_width: int, mask, pearson: bool,
                 column: str) -> pd.DataFrame:
    """Per-shell ``Re Σ a b* / sqrt(Σ|a|² Σ|b|²)`` (after removing shell means if ``pearson``)."""
    idx, n_shells = _shells(grid, shell_width)
    keep = idx < n_shells
    if mask is not None:
        m = _array(mask, "mask").astype(bool)
        _check_volume(m, grid, "mask")
        keep &= m
    sel, a, b = idx[keep], a[keep], b[keep]
    count = np.bincount(sel, minlength=n_shells).astype(float)
    if pearson:
        with np.errstate(invalid="ignore", divide="ignore"):
            a = a - (_shell_sum(sel, a, n_shells) / count)[sel]
            b = b - (_shell_sum(sel, b, n_shells) / count)[sel]
    cross = np.bincount(sel, weights=(a * np.conj(b)).real, minlength=n_shells)
    pa = np.bincount(sel, weights=np.abs(a) ** 2, minlength=n_shells)
    pb = np.bincount(sel, weights=np.abs(b) ** 2, minlength=n_shells)
    denom = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, cross / np.where(denom > 0, denom, 1.0), np.nan)
        q = np.arange(n_shells) * shell_width * grid.dq
        res = np.where(q > 0, 1.0 / np.where(q > 0, q, 1.0), np.inf)
    return pd.DataFrame({"q_inv_angstrom": q, "resolution_angstrom": res, column: corr,
                         "n_voxels": count.astype(np.int64)})


def shell_correlation(a, b, grid: Grid, shell_width: int = 1, mask=None, pearson: bool = False) -> pd.DataFrame:
    """Correlation of two q-space volumes shell by shell.

    a, b: (n, n, n) real or complex on ``grid`` (structure factors, intensities).
    Per shell: ``cc = Re Σ a b* / sqrt(Σ|a|² Σ|b|²)``; with ``pearson=True`` each shell's
    mean is subtracted first (the Pearson correlation, for intensities, which are positive
    and would otherwise correlate trivially). ``mask`` (n, n, n) bool restricts the voxels.
    Returns a DataFrame ``q_inv_angstrom`` (shell centre), ``resolution_angstrom`` (1/q,
    inf at q = 0), ``cc`` (NaN where a shell is empty or has zero power / variance),
    ``n_voxels``. Raises ValueError for a shape mismatch or non-finite values.
    """
    a = _array(a, "a")
    b = _array(b, "b")
    _check_volume(a, grid, "a")
    _check_volume(b, grid, "b")
    return _shell_table(a, b, grid, shell_width, mask, pearson, "cc")


def fsc(vol1, vol2, grid: Grid, shell_width: int = 1) -> pd.DataFrame:
    """Fourier shell correlation of two real densities (van Heel & Schatz, JSB 151, 250 (2005)).

    vol1, vol2: (n, n, n) densities in e/Å³ on the real-space grid of ``grid`` (voxel
    ``1/(n dq)`` Å). Their structure factors F1, F2 (:func:`spiflow.grid.density_to_structure_factor`)
    give per shell ``FSC = Re Σ F1 F2* / sqrt(Σ|F1|² Σ|F2|²)``, shells ``shell_width`` · dq
    wide with centres 0 … q_max. FSC is invariant to scaling either volume but not to
    translation (a shift t multiplies F by exp(2πi q·t)).

    Returns a DataFrame with columns ``q_inv_angstrom, resolution_angstrom, fsc, n_voxels``
    (resolution = 1/q Å, inf at q = 0; fsc NaN for a shell with zero power).
    Raises ValueError for complex input, a shape mismatch or non-finite values.
    """
    v1 = _array(vol1, "vol1")
    v2 = _array(vol2, "vol2")
    if np.iscomplexobj(v1) or np.iscomplexobj(v2):
        raise ValueError("fsc takes real densities; use shell_correlation for q-space volumes")
    _check_volume(v1, grid, "vol1")
    _check_volume(v2, grid, "vol2")
    F1 = density_to_structure_factor(torch.from_numpy(v1.astype(np.float64)), grid).numpy()
    F2 = density_to_structure_factor(torch.from_numpy(v2.astype(np.float64)), grid).numpy()
    return _shell_table(F1, F2, grid, shell_width, None, False, "fsc")


def resolution_at(fsc_table: pd.DataFrame, threshold: float) -> float:
    """Resolution in Å where the FSC first drops below ``threshold`` (e.g. 0.5 or 0.143).

    The q = 0 shell and NaN shells are ignored; the crossing between the last shell at or
    above the threshold and the first below it is linearly interpolated in q, and 1/q of
    that point is returned. If the first shell (q > 0) is already below, its resolution is
    returned. If the FSC never drops below the threshold, the finest resolution of the
    table (1/q of its last shell, i.e. 1/q_max) is returned: a lower bound on what the data
    could show, limited by the grid rather than by the reconstruction.
    Raises ValueError when the table lacks the columns or has no shell with q > 0.
    """
    if not {"q_inv_angstrom", "fsc"} <= set(fsc_table.columns):
        raise ValueError("fsc table needs the columns q_inv_angstrom and fsc")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    t = fsc_table.sort_values("q_inv_angstrom")
    q = t["q_inv_angstrom"].to_numpy(float)
    f = t["fsc"].to_numpy(float)
    ok = (q > 0) & np.isfinite(f)
    q, f = q[ok], f[ok]
    if q.size == 0:
        raise ValueError("fsc table has no shell with q > 0 and a finite fsc")
    below = np.nonzero(f < threshold)[0]
    if below.size == 0:
        return float(1.0 / q[-1])
    i = below[0]
    if i == 0:
        return float(1.0 / q[0])
    qc = q[i - 1] + (f[i - 1] - threshold) / (f[i - 1] - f[i]) * (q[i] - q[i - 1])
    return float(1.0 / qc)


def intensity_cc(recon, truth, mask, grid: Grid, shell_width: int = 1) -> float:
    """Mean over resolution shells of the per-shell Pearson correlation of two intensities.

    recon, truth: (n, n, n) intensities on ``grid``, already in the same frame (see
    :func:`align_intensity`); mask: (n, n, n) bool of voxels to compare, or None for all.
    A plain voxel-wise Pearson correlation is dominated by the few central voxels, whose
    intensity exceeds that at the edge by orders of magnitude (|F|² falls like q⁻⁴), so it
    is close to 1 for any roughly right low-resolution model. Correlating within each shell
    and averaging the shells with equal weight gives every resolution range the same say,
    and is also independent of any radial (shell-wise) scale, e.g. the arbitrary overall
    scale of an EMC model. Shells with < 2 voxels in the mask or zero variance (including
    q = 0) are skipped. Returns a float in [−1, 1]; raises ValueError for shape mismatch,
    non-finite values or when no shell can be compared.
    """
    table = shell_correlation(recon, truth, grid, shell_width=shell_width, mask=mask, pearson=True)
    cc = table["cc"].to_numpy()[(table["n_voxels"].to_numpy() >= 2)]
    cc = cc[np.isfinite(cc)]
    if cc.size == 0:
        raise ValueError("intensity_cc: no shell with at least 2 masked voxels and non-zero variance")
    return float(cc.mean())


def orientation_errors(q_est, q_true, robust_fraction: float = 0.5, symmetry=None,
                       candidates: int = 32, friedel_mate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame orientation errors after removing EMC's arbitrary global rotation.

    q_est, q_true: (N, 4) quaternions [w, x, y, z]. The model frame is arbitrary: with
    ``W(q) = I(A q)`` the estimates satisfy ``R_true = R_est Aᵀ``, so the best global
    ``G`` minimises ``Σ ‖R_true_i − R_est_i G‖_F``, i.e. G is the projection onto SO(3) of
    ``Σ R_est_iᵀ R_true_i`` (:func:`spiflow.rotation.mean_rotation`). To be robust to
    outliers (frames EMC placed wrongly), G is estimated once from all frames, then again
    from the ``robust_fraction`` (default 50 %) of frames with the smallest errors.

    symmetry: optional (K, 3, 3) point-group operations of the particle (particle frame,
    :func:`spiflow.symmetry.point_group`; improper ones are dropped, the identity kept).
    A particle with ``ρ(g r) = ρ(r)`` gives the same pattern at ``R`` and ``R g``, so the
    error of frame i is ``min_g ∠(R_true_i g, R_est_i G)`` and the frames' g_i and G are
    fitted by alternation, started from the best of ``candidates`` single-frame guesses
    ``G = R_est_kᵀ R_true_k`` (the plain mean of a symmetric set of rotations is
    meaningless). friedel_mate: also count ``M R_true_i g`` as a match, M the rotation by π
    about the beam axis (:data:`spiflow.rotation.BEAM_FLIP`): one pattern tells R from M R only
    through the Ewald sphere's curvature (:func:`spiflow.selfsup.mate_chordal`), so this is the
    error of an orientation read from a pattern alone, fitted like the symmetry.
    Returns ``(errors_deg (N,), G (3, 3))``: the angles in degrees (0 … 180) and G (≈ Aᵀ).
    Raises ValueError for shapes other than matching (N, 4), N = 0, zero-norm or non-finite
    quaternions, or symmetry operations that are not (K, 3, 3) orthogonal matrices.
    """
    qe = _array(q_est, "q_est", np.float64)
    qt = _array(q_true, "q_true", np.float64)
    if qe.ndim != 2 or qe.shape[1] != 4 or qe.shape != qt.shape:
        raise ValueError(f"quaternions must both be (N, 4); got {qe.shape} and {qt.shape}")
    if qe.shape[0] == 0:
        raise ValueError("no frames to compare")
    if np.any(np.linalg.norm(qe, axis=1) == 0) or np.any(np.linalg.norm(qt, axis=1) == 0):
        raise ValueError("zero-norm quaternion")
    if not 0 < robust_fraction <= 1:
        raise ValueError(f"robust_fraction must be in (0, 1], got {robust_fraction}")
    ops = np.eye(3)[None] if symmetry is None else _array(symmetry, "symmetry", np.float64)
    if ops.ndim != 3 or ops.shape[1:] != (3, 3) or not np.allclose(ops @ ops.transpose(0, 2, 1), np.eye(3), atol=1e-6):
        raise ValueError(f"symmetry must be (K, 3, 3) orthogonal matrices, got shape {ops.shape}")
    ops = ops[np.linalg.det(ops) > 0]  # proper rotations; the identity once
    ops = np.concatenate([np.eye(3)[None], ops[~np.all(np.isclose(ops, np.eye(3)), axis=(1, 2))]])
    r_est = quaternion_to_matrix(torch.from_numpy(qe))
    r_true = quaternion_to_matrix(torch.from_numpy(qt))
    sym_true = r_true[:, None] @ torch.from_numpy(ops)[None]  # (N, K, 3, 3): R_true g
    if friedel_mate:  # and M R_true g (∠(M A, B) = ∠(A, M B) for the involution M)
        sym_true = torch.cat([sym_true, BEAM_FLIP @ sym_true], 1)
    q_sym = matrix_to_quaternion(sym_true)
    n, k = len(qe), max(1, int(np.ceil(robust_fraction * len(qe))))

    def angles(G):  # (N, K): ∠(R_true_i g, R_est_i G) in degrees
        return angle_between(q_sym, matrix_to_quaternion(r_est @ G)[:, None])

    def refit(rel):  # G from all frames, then from the robust_fraction closest
        G = mean_rotation(rel)
        return mean_rotation(rel[torch.argsort(angles(G).min(1).values)[:k]])

    if sym_true.shape[1] == 1:
        G = refit(r_est.transpose(-1, -2) @ r_true)
    else:
        picks = np.random.default_rng(0).choice(n, size=min(candidates, n), replace=False)
        G = min((r_est[i].T @ r_true[i] for i in picks), key=lambda g: float(angles(g).min(1).values.median()))
        for _ in range(3):  # alternate: each frame's nearest symmetry mate, then G
            G = refit(r_est.transpose(-1, -2) @ sym_true[torch.arange(n), angles(G).argmin(1)])
    return angles(G).min(1).values.numpy(), G.numpy()


def gain_pearson(est, true) -> float:
    """Pearson correlation of estimated and true per-frame gains, (N,) each.

    Returns NaN when either has zero variance (e.g. a method that does not estimate
    gains). Raises ValueError for shape mismatch, N < 2 or non-finite values.
    """
    e = _array(est, "est", np.float64)
    t = _array(true, "true", np.float64)
    if e.shape != t.shape or e.ndim != 1:
        raise ValueError(f"gains must both be (N,); got {e.shape} and {t.shape}")
    if e.size < 2:
        raise ValueError("gain_pearson needs at least 2 frames")
    e, t = e - e.mean(), t - t.mean()
    denom = np.sqrt((e * e).sum() * (t * t).sum())
    return float((e * t).sum() / denom) if denom > 0 else float("nan")
