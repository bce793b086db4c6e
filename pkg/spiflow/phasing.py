"""Iterative phase retrieval of a real, positive density from a 3D intensity (M-TIP style).

Projections (real iterate ``x``, ``P_M`` = Fourier-modulus projection on measured voxels,
``P_S`` = support + positivity, ``y = P_M x``):

* ER  (Fienup, Appl. Opt. 21, 2758 (1982)):  ``x ← P_S y``.
* HIO (same):  ``x ← y`` where ``r ∈ S`` and ``y ≥ 0``, else ``x − β y`` (β ≈ 0.9).
* RAAR (D. R. Luke, Inverse Problems 21, 37 (2005)):
  ``x ← [β/2 (R_S R_M + 1) + (1 − β) P_M] x`` with ``R = 2P − 1``, per voxel
  ``y`` where ``r ∈ S`` and ``2y − x ≥ 0``, else ``β x + (1 − 2β) y`` (β ≈ 0.87).

Shrinkwrap (Marchesini et al., PRB 68, 140101 (2003)): every ``shrinkwrap_every``
iterations the support becomes ``{blur_σ(P_S y) > threshold · max}`` (the current estimate
inside the support, so that unconstrained low-q modes outside it cannot inflate it) with σ (voxels)
decreasing linearly from ``sigma_start`` to ``sigma_end`` over the schedule; optionally capped
to the ``max_support_fraction`` brightest voxels. Initial support: the thresholded, slightly
blurred autocorrelation (inverse transform of the intensity), which contains the object's
support. Initial phases: uniform random (seeded).

Restarts run batched as one (restarts, n, n, n) tensor with real FFTs (complex64) on any
device; each finishes with ``final_er`` ER iterations and is scored only by its data
consistency ``‖ |F| − A ‖ / ‖A‖`` on measured voxels (``A = √I``). The best ``n_average``
are registered to the best one (translation + inversion, :func:`spiflow.align.align_density`)
and averaged; the PRTF (Chapman et al., JOSA A 23, 1179 (2006)) measures the phase
reproducibility across them. Internally the DFT is used in the un-centred layout; the result
is in e/Å³ on the centred real-space grid, consistent with
:func:`spiflow.grid.density_to_structure_factor`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from spiflow.align import align_density
from spiflow.grid import Grid, density_to_structure_factor, structure_factor_to_density
from spiflow.io import resolve_device

ALGORITHMS = ("ER", "HIO", "RAAR")
_AXES = (-3, -2, -1)


@dataclass
class PhasingConfig:
    """Settings of :func:`phase`. Iteration counts are per cycle of ``schedule``.

    schedule: ``"RAAR:200,ER:20"`` or ``[("RAAR", 200), ("ER", 20)]``, run ``n_cycles`` times,
    then ``final_er`` ER iterations with the support fixed. Shrinkwrap is active during the
    cycles only (``shrinkwrap_every = 0`` disables it). Its defaults (σ 3 → 1.5 voxels,
    threshold 0.1) are looser than Marchesini's (→ 1.5, 0.2) because low-resolution SPI
    densities have soft edges: for Gaussian-blob test objects a σ = 1, 0.15 support already
    truncates ~12 % of ‖F‖. Sizes are voxels; betas dimensionless.
    """

    schedule: str | Sequence = "RAAR:200,ER:20"
    n_cycles: int = 3
    final_er: int = 50
    n_restarts: int = 8
    n_average: int = 4
    beta_hio: float = 0.9
    beta_raar: float = 0.87
    positivity: bool = True
    shrinkwrap_every: int = 20
    sigma_start: float = 3.0
    sigma_end: float = 1.5
    shrinkwrap_threshold: float = 0.1
    max_support_fraction: float | None = None
    autocorr_threshold: float = 0.04
    n_shells: int = 20
    log_every: int = 10


@dataclass
class PhasingResult:
    """Output of :func:`phase`.

    density (n, n, n) float32 e/Å³ (average of the chosen restarts, centred on the grid by its
    circular centroid); support (n, n, n) bool (best restart's final support, same shift);
    errors (restarts,) final Fourier-modulus errors; chosen (n_average,) restart indices, best
    first; log DataFrame (restart, iteration, algorithm, fourier_error, support_size) every
    ``log_every`` iterations and at the end of each segment, the error being that of the
    iterate entering the iteration (``‖|F| − A‖/‖A‖`` on measured voxels);
    prtf (n_shells,) and prtf_q (n_shells,) shell-centre |q| in Å⁻¹ (NaN: no measured voxel).
    """

    density: np.ndarray
    support: np.ndarray
    errors: np.ndarray
    chosen: np.ndarray
    log: pd.DataFrame
    prtf: np.ndarray
    prtf_q: np.ndarray


def parse_schedule(schedule) -> list[tuple[str, int]]:
    """``"RAAR:300,ER:50"`` or a list of ``"NAME:COUNT"`` / ``(NAME, COUNT)`` → [(NAME, COUNT)].

    Names are case-insensitive among ER, HIO, RAAR; counts positive integers.
    Raises ValueError (quoting the bad item) otherwise or when empty.
    """
    items = schedule.split(",") if isinstance(schedule, str) else list(schedule)
    out = []
    for item in items:
        if isinstance(item, str):
            parts = item.strip().split(":")
        else:
            parts = list(item)
        try:
            name, count = str(parts[0]).strip().upper(), int(str(parts[1]).strip())
            if len(parts) != 2 or name not in ALGORITHMS or count <= 0:
                raise ValueError
        except (ValueError, IndexError):
            raise ValueError(f"bad phasing schedule item {item!r} in {schedule!r}: expected "
                             f"NAME:COUNT with NAME in {ALGORITHMS} and COUNT a positive integer") from None
        out.append((name, count))
    if not out:
        raise ValueError(f"empty phasing schedule {schedule!r}")
    return out


def _check_config(cfg: PhasingConfig) -> list[tuple[str, int]]:
    sched = parse_schedule(cfg.schedule)
    for name in ("n_cycles", "n_restarts", "n_average", "n_shells", "log_every"):
        if int(getattr(cfg, name)) != getattr(cfg, name) or getattr(cfg, name) < 1:
            raise ValueError(f"phasing {name} must be a positive integer, got {getattr(cfg, name)}")
    for name in ("final_er", "shrinkwrap_every"):
        if int(getattr(cfg, name)) != getattr(cfg, name) or getattr(cfg, name) < 0:
            raise ValueError(f"phasing {name} must be an integer >= 0, got {getattr(cfg, name)}")
    if cfg.n_average > cfg.n_restarts:
        raise ValueError(f"n_average ({cfg.n_average}) exceeds n_restarts ({cfg.n_restarts})")
    for name in ("beta_hio", "beta_raar"):
        if not 0 < getattr(cfg, name) <= 1:
            raise ValueError(f"phasing {name} must be in (0, 1], got {getattr(cfg, name)}")
    for name in ("sigma_start", "sigma_end"):
        if not getattr(cfg, name) > 0:
            raise ValueError(f"phasing {name} must be > 0 voxels, got {getattr(cfg, name)}")
    for name in ("shrinkwrap_threshold", "autocorr_threshold"):
        if not 0 < getattr(cfg, name) < 1:
            raise ValueError(f"phasing {name} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.max_support_fraction is not None and not 0 < cfg.max_support_fraction <= 1:
        raise ValueError(f"max_support_fraction must be in (0, 1], got {cfg.max_support_fraction}")
    return sched


def _prepare(intensity, measured, grid: Grid):
    """Validated, clipped, Friedel-symmetrised intensity and measured mask (numpy float64/bool)."""
    I = np.asarray(intensity.cpu() if isinstance(intensity, torch.Tensor) else intensity, dtype=np.float64)
    shape = (grid.n,) * 3
    if I.shape != shape:
        raise ValueError(f"intensity shape {I.shape} does not match the grid {shape}")
    if not np.isfinite(I).all():
        raise ValueError("intensity contains NaN or infinite values")
    if measured is None:
        m = np.ones(shape, dtype=bool)
    else:
        m = np.asarray(measured.cpu() if isinstance(measured, torch.Tensor) else measured)
        if m.shape != shape or m.dtype != bool:
            raise ValueError(f"measured must be a bool array of shape {shape}, got {m.dtype} {m.shape}")
    I = np.clip(I, 0, None)
    If, mf = I[::-1, ::-1, ::-1], m[::-1, ::-1, ::-1]  # I(−q) on the centred odd grid
    I = np.where(m & mf, 0.5 * (I + If), np.where(m, I, If))
    m = m | mf
    if not (I[m] > 0).any():
        raise ValueError("intensity is zero on every measured voxel; nothing to phase")
    return np.where(m, I, 0.0), m


def _gaussian_filter(grid_n: int, sigma, device) -> torch.Tensor:
    """Half-spectrum transfer function(s) of a Gaussian blur of width σ voxels: (..., n, n, n//2+1)."""
    f = torch.fft.fftfreq(grid_n, device=device)
    fz = torch.fft.rfftfreq(grid_n, device=device)
    f2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fz[None, None, :] ** 2
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
    return torch.exp(-2 * math.pi ** 2 * s ** 2 * f2)


def _circular_centroid(rho: np.ndarray) -> np.ndarray:
    """Centroid (3,) in voxels of a non-negative density on a periodic box (first Fourier phase)."""
    n = rho.shape[0]
    w = np.clip(rho, 0, None)
    theta = 2 * np.pi * np.arange(n) / n
    out = []
    for ax in range(3):
        prof = w.sum(axis=tuple(a for a in range(3) if a != ax))
        out.append(np.angle((prof * np.exp(1j * theta)).sum()) / (2 * np.pi) * n)
    return np.mod(out, n)


def prtf(densities: Sequence, intensity: np.ndarray, measured: np.ndarray, grid: Grid, n_shells: int = 20):
    """Phase retrieval transfer function of aligned densities (K, n, n, n) in e/Å³.

    Chapman et al. (2006): ``PRTF(q) = |⟨F_k(q) e^{iφ_0}⟩| / √I(q)`` with the modulus of every
    ``F_k`` (:func:`spiflow.grid.density_to_structure_factor`) set to the measured ``√I``, i.e.
    ``|⟨F_k / |F_k|⟩|`` (alignment already removed the phase offsets), averaged over the
    measured voxels with I > 0 in ``n_shells`` equal shells of |q| from 0 to ``grid.q_max``.
    1 where all restarts agree, → 1/√K for random phases. Returns (prtf, q_centres Å⁻¹);
    shells without measured voxels are NaN.
    """
    F = torch.stack([density_to_structure_factor(torch.as_tensor(np.asarray(d), dtype=torch.float64), grid)
                     for d in densities])
    unit = (F / F.abs().clamp_min(1e-300)).mean(0).abs().numpy()
    edges = np.linspace(0, grid.q_max, n_shells + 1)
    shell = np.digitize(grid.q_norm(), edges) - 1
    use = measured & (intensity > 0) & (shell >= 0) & (shell < n_shells)
    num = np.bincount(shell[use], unit[use], minlength=n_shells)
    cnt = np.bincount(shell[use], minlength=n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(cnt > 0, num / cnt, np.nan)
    return out, 0.5 * (edges[1:] + edges[:-1])


def phase(intensity, grid: Grid, config: PhasingConfig | None = None, measured=None, seed: int = 0,
          device: str | torch.device = "auto") -> PhasingResult:
    """Retrieve a real, positive density (e/Å³) from ``intensity`` (n, n, n) = |F|² in electrons².

    intensity: on ``grid`` (centred, n = grid.n), negatives clipped to 0, Friedel-symmetrised.
    measured: optional (n, n, n) bool; where False (beam-stop hole, corners beyond the
    detector) the Fourier modulus is left free. A voxel counts as measured if it or its
    Friedel mate is. seed: restarts' random phases (reproducible on a given device).
    Returns a :class:`PhasingResult`. Raises ValueError on bad shapes, NaN, all-zero
    intensity, a bad schedule or non-positive sizes in ``config``.
    """
    cfg = config or PhasingConfig()
    sched = _check_config(cfg)
    I, m = _prepare(intensity, measured, grid)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    n, R, h = grid.n, cfg.n_restarts, grid.n // 2 + 1
    v = grid.voxel_size ** 3
    # Un-centred layout: rfftn(x)(k) = F(−k) / v for real x (F as in grid.density_to_structure_factor);
    # I(−k) = I(k), so the target modulus of rfftn(x) is √I / v.
    A = torch.as_tensor(np.fft.ifftshift(np.sqrt(I) / v)[..., :h], dtype=torch.float32, device=dev)
    M = torch.as_tensor(np.fft.ifftshift(m)[..., :h], device=dev)
    wz = torch.full((h,), 2.0, device=dev)
    wz[0] = 1.0  # rfft half-spectrum weights (n odd: only k_z = 0 is self-conjugate)
    Aw = (M * wz * A ** 2).sum()

    def modulus(x):
        G = torch.fft.rfftn(x, dim=_AXES)
        mag = G.abs()
        y = torch.fft.irfftn(G * torch.where(M, A / mag.clamp_min(1e-30), 1.0), s=(n, n, n), dim=_AXES)
        return y, mag

    def error(mag):
        return torch.sqrt((M * wz * (mag - A) ** 2).sum(_AXES) / Aw)

    # initial support: blurred autocorrelation, thresholded; initial iterate: random phases in it
    patt = structure_factor_to_density(torch.as_tensor(np.where(m, I, 0.0)), grid).real.float().to(dev)
    patt = torch.fft.irfftn(torch.fft.rfftn(torch.fft.ifftshift(patt, dim=_AXES)) * _gaussian_filter(n, 1.0, dev)[0],
                            s=(n, n, n))
    S = (patt > cfg.autocorr_threshold * patt.max()).expand(R, n, n, n).clone()
    gen = torch.Generator().manual_seed(int(seed))
    phi = (2 * math.pi * torch.rand((R, n, n, h), generator=gen)).to(dev)
    x = torch.fft.irfftn(A * torch.polar(torch.ones_like(phi), phi), s=(n, n, n), dim=_AXES) * S

    steps = [a for _ in range(cfg.n_cycles) for a in sched]
    total = sum(c for _, c in steps)  # iterations with shrinkwrap; then final ER, support fixed
    if cfg.final_er:
        steps.append(("ER", cfg.final_er))
    pos = cfg.positivity
    rows, it = [], 0
    for name, count in steps:
        final = it >= total
        for j in range(count):
            y, mag = modulus(x)
            if name == "ER":
                x = y * (S & (y >= 0)) if pos else y * S
            elif name == "HIO":
                keep = S & (y >= 0) if pos else S
                x = torch.where(keep, y, x - cfg.beta_hio * y)
            else:
                b = cfg.beta_raar
                keep = S & (torch.sub(y, x, alpha=0.5) >= 0) if pos else S  # 2y − x ≥ 0
                x = torch.where(keep, y, torch.add(b * x, y, alpha=1 - 2 * b))
            it += 1
            if not final and cfg.shrinkwrap_every and it % cfg.shrinkwrap_every == 0:
                sigma = cfg.sigma_start + (cfg.sigma_end - cfg.sigma_start) * min(1.0, it / total)
                est = (y.clamp_min(0) if pos else y.abs()) * S
                blur = torch.fft.irfftn(torch.fft.rfftn(est, dim=_AXES) * _gaussian_filter(n, sigma, dev),
                                        s=(n, n, n), dim=_AXES)
                peak = blur.amax(_AXES, keepdim=True)
                S = torch.where(peak > 0, blur > cfg.shrinkwrap_threshold * peak, S)  # empty estimate: keep S
                if cfg.max_support_fraction is not None:
                    k = max(1, int(cfg.max_support_fraction * n ** 3))
                    kth = blur.reshape(R, -1).topk(k, dim=1).values[:, -1].reshape(R, 1, 1, 1)
                    S &= blur >= kth
            if it % cfg.log_every == 0 or j == count - 1:
                err, size = error(mag).cpu().numpy(), S.sum(_AXES).cpu().numpy()
                rows += [dict(restart=r, iteration=it, algorithm=name, fourier_error=float(err[r]),
                              support_size=int(size[r])) for r in range(R)]

    if not cfg.final_er:  # score the support/positivity-constrained estimate
        x = x * (S & (x >= 0)) if pos else x * S
    errors = error(torch.fft.rfftn(x, dim=_AXES).abs()).cpu().numpy().astype(np.float64)
    chosen = np.argsort(errors, kind="stable")[:cfg.n_average]
    dens = torch.fft.fftshift(x, dim=_AXES).cpu().numpy().astype(np.float64)
    supp = torch.fft.fftshift(S, dim=_AXES).cpu().numpy()
    best = dens[chosen[0]]
    aligned = [best] + [align_density(dens[k], best)[0] for k in chosen[1:]]
    mean = np.mean(aligned, axis=0)
    curve, q_centres = prtf(aligned, I, m, grid, cfg.n_shells)
    shift = tuple(int(s) for s in np.rint(grid.center - _circular_centroid(mean)))
    return PhasingResult(
        density=np.roll(mean, shift, axis=(0, 1, 2)).astype(np.float32),
        support=np.roll(supp[chosen[0]], shift, axis=(0, 1, 2)),
        errors=errors, chosen=chosen,
        log=pd.DataFrame(rows, columns=["restart", "iteration", "algorithm", "fourier_error", "support_size"]),
        prtf=curve, prtf_q=q_centres)
