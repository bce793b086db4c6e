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
support. Initial phases: uniform random (seeded). Each of these steps is a public function
(:func:`modulus_projection`, :func:`support_projection`, :func:`phasing_step`,
:func:`shrinkwrap`, :func:`autocorrelation_support`), used by :func:`phase` and by the
phasing inside :mod:`spiflow.mtip`.

Complex densities (Bragg CDI, :mod:`spiflow.bragg`): :func:`phase_complex` runs the same
projections on a complex iterate with full complex FFTs and no positivity (support only, as
Bragg CDI needs: Robinson & Harder, Nat. Mater. 8, 291 (2009)); the Fourier modulus is
imposed on measured voxels only (missing data stay free), the intensity is not
Friedel-symmetrised (a complex object's is not), and the iteration may start from a given
density and support (e.g. a network's output: "network + N refinement iterations").

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
from spiflow.settings import PhasingSettings

ALGORITHMS = ("ER", "HIO", "RAAR")
_AXES = (-3, -2, -1)


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


def _check_settings(cfg: PhasingSettings) -> list[tuple[str, int]]:
    """The parsed schedule; ValueError when n_average exceeds n_restarts (pydantic checks the rest)."""
    if cfg.n_average > cfg.n_restarts:
        raise ValueError(f"phase.n_average ({cfg.n_average}) exceeds phase.n_restarts ({cfg.n_restarts})")
    return parse_schedule(cfg.schedule)


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


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (..., n, n, n) real, periodic, blurred by a Gaussian of standard deviation
    ``sigma`` voxels (multiplication of its real FFT by ``exp(−2π² σ² |f|²)``, f in cycles
    per voxel). Same shape and real dtype."""
    n = x.shape[-1]
    f = torch.fft.fftfreq(n, device=x.device)
    fz = torch.fft.rfftfreq(n, device=x.device)
    f2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fz[None, None, :] ** 2
    h = torch.exp(-2 * math.pi ** 2 * torch.as_tensor(sigma, dtype=torch.float32, device=x.device) ** 2 * f2)
    return torch.fft.irfftn(torch.fft.rfftn(x, dim=_AXES) * h, s=(n, n, n), dim=_AXES)


def half_spectrum(volume: torch.Tensor) -> torch.Tensor:
    """A centred reciprocal-space volume (..., n, n, n), n odd, in the un-centred layout of
    ``torch.fft.rfftn`` of an (n, n, n) real array: (..., n, n, n // 2 + 1). Only for
    Friedel-symmetric volumes (the other half is their mirror)."""
    return torch.fft.ifftshift(volume, dim=_AXES)[..., :volume.shape[-1] // 2 + 1]


def autocorrelation_support(intensity, measured, grid: Grid, threshold: float, device) -> torch.Tensor:
    """First support: the autocorrelation of the density (inverse transform of the measured
    ``intensity`` (n, n, n), centred, 0 where ``measured`` is False), blurred by 1 voxel
    (:func:`gaussian_blur`), thresholded at ``threshold`` × its maximum. It contains the
    object's support (Fienup 1982). Computed in float64 on the CPU, blurred in float32 on
    ``device``; returns (n, n, n) bool in the un-centred real-space layout."""
    I = torch.where(torch.as_tensor(measured).cpu(), torch.as_tensor(intensity).cpu().double(), 0.0)
    patt = structure_factor_to_density(I, grid).real.float().to(device)
    patt = gaussian_blur(torch.fft.ifftshift(patt, dim=_AXES), 1.0)
    return patt > threshold * patt.max()


def modulus_projection(x: torch.Tensor, amplitude: torch.Tensor, measured: torch.Tensor):
    """Fourier-modulus projection ``P_M`` (Fienup 1982): the transform of the iterate
    ``x`` (..., n, n, n) gets the modulus ``amplitude`` on ``measured`` voxels, its phases
    kept (unmeasured voxels are left free).

    Real ``x``: amplitude (n, n, n // 2 + 1) real and measured (same shape, bool) are the
    target modulus of ``torch.fft.rfftn(x)`` and its mask in the half-spectrum layout
    (:func:`half_spectrum`). Complex ``x``: they are (n, n, n), the modulus of
    ``torch.fft.fftn(x)`` in the un-centred layout (``ifftshift`` of a centred volume).
    Returns ``(y, |FFT(x)|)``: y = P_M x, real or complex like x; the modulus for
    :func:`fourier_error`."""
    n = x.shape[-1]
    G = torch.fft.fftn(x, dim=_AXES) if x.is_complex() else torch.fft.rfftn(x, dim=_AXES)
    mag = G.abs()
    G = G * torch.where(measured, amplitude / mag.clamp_min(1e-30), 1.0)
    y = torch.fft.ifftn(G, dim=_AXES) if x.is_complex() else torch.fft.irfftn(G, s=(n, n, n), dim=_AXES)
    return y, mag


def fourier_error(modulus: torch.Tensor, amplitude: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """``‖|F| − A‖ / ‖A‖`` over the measured voxels of the full spectrum, from the
    ``modulus`` of :func:`modulus_projection`, ``amplitude`` and ``measured``: half-spectrum
    (..., n, n, n // 2 + 1) for a real iterate (n odd: every k_z > 0 plane stands for itself
    and its mirror) or the full (..., n, n, n) for a complex one. Shape (...)."""
    wz = torch.full((modulus.shape[-1],), 2.0, device=modulus.device)
    wz[0] = 1.0
    if modulus.shape[-1] == modulus.shape[-3]:  # full spectrum (complex iterate)
        wz[:] = 1.0
    norm = (measured * wz * amplitude ** 2).sum(_AXES)
    return torch.sqrt((measured * wz * (modulus - amplitude) ** 2).sum(_AXES) / norm)


def _check_positivity(y: torch.Tensor, positivity: bool) -> None:
    if positivity and y.is_complex():
        raise ValueError("positivity needs a real iterate: phase a complex density with positivity=False")


def support_projection(y: torch.Tensor, support: torch.Tensor, positivity: bool = True) -> torch.Tensor:
    """``P_S``: y inside the support (where also ``y ≥ 0`` with ``positivity``), 0 elsewhere.
    A complex ``y`` needs ``positivity=False`` (ValueError otherwise)."""
    _check_positivity(y, positivity)
    return y * (support & (y >= 0)) if positivity else y * support


def phasing_step(algorithm: str, x: torch.Tensor, y: torch.Tensor, support: torch.Tensor, beta: float,
                 positivity: bool = True) -> torch.Tensor:
    """One update of the real iterate ``x`` given ``y = P_M x`` (:func:`modulus_projection`),
    per voxel (module docstring): ER ``P_S y`` and HIO (Fienup, Appl. Opt. 21, 2758 (1982))
    ``y`` where ``r ∈ S`` and ``y ≥ 0`` else ``x − β y``; RAAR (D. R. Luke, Inverse Problems
    21, 37 (2005)) ``y`` where ``r ∈ S`` and ``2y − x ≥ 0`` else ``β x + (1 − 2β) y``. Without
    ``positivity`` the conditions are ``r ∈ S`` alone (required for a complex iterate, whose
    updates are the same formulas on complex values). ``beta`` is unused by ER. Raises
    ValueError for an algorithm not in :data:`ALGORITHMS` or positivity with a complex ``x``."""
    _check_positivity(y, positivity)
    if algorithm == "ER":
        return support_projection(y, support, positivity)
    if algorithm == "HIO":
        keep = support & (y >= 0) if positivity else support
        return torch.where(keep, y, x - beta * y)
    if algorithm == "RAAR":
        keep = support & (torch.sub(y, x, alpha=0.5) >= 0) if positivity else support  # 2y − x ≥ 0
        return torch.where(keep, y, torch.add(beta * x, y, alpha=1 - 2 * beta))
    raise ValueError(f"phasing algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def shrinkwrap(density: torch.Tensor, support: torch.Tensor, sigma: float, threshold: float,
               positivity: bool = True, max_fraction: float | None = None) -> torch.Tensor:
    """Shrinkwrap support update (Marchesini et al., PRB 68, 140101 (2003)).

    The estimate ``density`` (..., n, n, n) inside ``support`` (its positive part with
    ``positivity``, else its modulus) is blurred by σ = ``sigma`` voxels
    (:func:`gaussian_blur`); the new support is where the blur exceeds ``threshold`` × its
    maximum (the old support where the estimate is empty), optionally cut to the
    ``max_fraction`` × n³ voxels of largest blur. Returns a bool tensor like ``support``."""
    est = (density.clamp_min(0) if positivity else density.abs()) * support
    blur = gaussian_blur(est, sigma)
    peak = blur.amax(_AXES, keepdim=True)
    new = torch.where(peak > 0, blur > threshold * peak, support)
    if max_fraction is not None:
        k = max(1, int(max_fraction * blur.shape[-1] ** 3))
        kth = blur.flatten(-3).topk(k, dim=-1).values[..., -1, None, None, None]
        new &= blur >= kth
    return new


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


def run_schedule(x: torch.Tensor, A: torch.Tensor, M: torch.Tensor, S: torch.Tensor, cfg: PhasingSettings,
                 sched: list[tuple[str, int]]):
    """The iterations of ``cfg`` on the batch of iterates ``x`` (R, n, n, n), real or complex
    (:func:`modulus_projection` layouts of ``A`` and ``M``), supports ``S`` (R, n, n, n) bool:
    ``sched`` (:func:`parse_schedule`) ``cfg.n_cycles`` times with shrinkwrap every
    ``cfg.shrinkwrap_every`` iterations (σ from ``sigma_start`` to ``sigma_end``), then
    ``cfg.final_er`` ER iterations with the support fixed. Returns ``(x, S, log rows)``, rows
    as in :class:`PhasingResult`."""
    steps = [a for _ in range(cfg.n_cycles) for a in sched]
    total = sum(c for _, c in steps)  # iterations with shrinkwrap; then final ER, support fixed
    if cfg.final_er:
        steps.append(("ER", cfg.final_er))
    pos, R = cfg.positivity, x.shape[0]
    rows, it = [], 0
    for name, count in steps:
        final = it >= total
        beta = cfg.beta_raar if name == "RAAR" else cfg.beta_hio
        for j in range(count):
            y, mag = modulus_projection(x, A, M)
            x = phasing_step(name, x, y, S, beta, pos)
            it += 1
            if not final and cfg.shrinkwrap_every and it % cfg.shrinkwrap_every == 0:
                sigma = cfg.sigma_start + (cfg.sigma_end - cfg.sigma_start) * min(1.0, it / total)
                S = shrinkwrap(y, S, sigma, cfg.shrinkwrap_threshold, pos, cfg.max_support_fraction)
            if it % cfg.log_every == 0 or j == count - 1:
                err, size = fourier_error(mag, A, M).cpu().numpy(), S.sum(_AXES).cpu().numpy()
                rows += [dict(restart=r, iteration=it, algorithm=name, fourier_error=float(err[r]),
                              support_size=int(size[r])) for r in range(R)]
    return x, S, rows


def _rank_restarts(x, S, A, M, cfg: PhasingSettings, positivity: bool, fft, dtype, align):
    """After the schedule: the restarts' final Fourier-modulus errors (R,), the ``n_average``
    best (best first), their densities in the centred layout (numpy ``dtype``) aligned on the
    best by ``align(moving, reference) -> (aligned, info)``, and the supports (R, n, n, n)
    centred. Without ``final_er`` the support (and positivity) projection is scored."""
    if not cfg.final_er:
        x = support_projection(x, S, positivity)
    errors = fourier_error(fft(x, dim=_AXES).abs(), A, M).cpu().numpy().astype(np.float64)
    chosen = np.argsort(errors, kind="stable")[:cfg.n_average]
    dens = torch.fft.fftshift(x, dim=_AXES).cpu().numpy().astype(dtype)
    best = dens[chosen[0]]
    aligned = [best] + [align(dens[k], best)[0] for k in chosen[1:]]
    return errors, chosen, aligned, torch.fft.fftshift(S, dim=_AXES).cpu().numpy()


def phase(intensity, grid: Grid, settings: PhasingSettings | None = None, measured=None, seed: int = 0,
          device: str | torch.device = "auto") -> PhasingResult:
    """Retrieve a real, positive density (e/Å³) from ``intensity`` (n, n, n) = |F|² in electrons².

    intensity: on ``grid`` (centred, n = grid.n), negatives clipped to 0, Friedel-symmetrised.
    settings: :class:`spiflow.settings.PhasingSettings` (default: its defaults).
    measured: optional (n, n, n) bool; where False (beam-stop hole, corners beyond the
    detector) the Fourier modulus is left free. A voxel counts as measured if it or its
    Friedel mate is. seed: restarts' random phases (reproducible on a given device).
    Returns a :class:`PhasingResult`. Raises ValueError on bad shapes, NaN, all-zero
    intensity, a bad schedule or ``n_average > n_restarts``.
    """
    cfg = settings or PhasingSettings()
    sched = _check_settings(cfg)
    I, m = _prepare(intensity, measured, grid)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    n, R, h = grid.n, cfg.n_restarts, grid.n // 2 + 1
    v = grid.voxel_size ** 3
    # Un-centred layout: rfftn(x)(k) = F(−k) / v for real x (F as in grid.density_to_structure_factor);
    # I(−k) = I(k), so the target modulus of rfftn(x) is √I / v.
    A = half_spectrum(torch.as_tensor(np.sqrt(I) / v)).float().to(dev)
    M = half_spectrum(torch.as_tensor(m)).to(dev)

    # initial support: blurred autocorrelation, thresholded; initial iterate: random phases in it
    S = autocorrelation_support(I, m, grid, cfg.autocorr_threshold, dev).expand(R, n, n, n).clone()
    gen = torch.Generator().manual_seed(int(seed))
    phi = (2 * math.pi * torch.rand((R, n, n, h), generator=gen)).to(dev)
    x = torch.fft.irfftn(A * torch.polar(torch.ones_like(phi), phi), s=(n, n, n), dim=_AXES) * S

    x, S, rows = run_schedule(x, A, M, S, cfg, sched)
    errors, chosen, aligned, supp = _rank_restarts(x, S, A, M, cfg, cfg.positivity, torch.fft.rfftn, np.float64,
                                                   align_density)
    mean = np.mean(aligned, axis=0)
    curve, q_centres = prtf(aligned, I, m, grid, cfg.n_shells)
    shift = tuple(int(s) for s in np.rint(grid.center - _circular_centroid(mean)))
    return PhasingResult(
        density=np.roll(mean, shift, axis=(0, 1, 2)).astype(np.float32),
        support=np.roll(supp[chosen[0]], shift, axis=(0, 1, 2)),
        errors=errors, chosen=chosen,
        log=pd.DataFrame(rows, columns=["restart", "iteration", "algorithm", "fourier_error", "support_size"]),
        prtf=curve, prtf_q=q_centres)


@dataclass
class ComplexPhasingResult:
    """Output of :func:`phase_complex`.

    density (n, n, n) complex64 on the centred grid (mean of the chosen restarts after
    :func:`spiflow.bragg.align_complex`, centred by the circular centroid of its modulus), in
    the units of ``√intensity`` per voxel (``|FFT(density)| ≈ √I``); support (n, n, n) bool
    (best restart's, same shift); errors (restarts,) final Fourier-modulus errors on measured
    voxels; chosen (n_average,) restart indices, best first; log as :class:`PhasingResult`.
    """

    density: np.ndarray
    support: np.ndarray
    errors: np.ndarray
    chosen: np.ndarray
    log: pd.DataFrame


def phase_complex(intensity, settings: PhasingSettings | None = None, measured=None, seed: int = 0,
                  device: str | torch.device = "cpu", start=None, support=None) -> ComplexPhasingResult:
    """Retrieve a complex density ``d(r) = ρ e^{iφ}`` from a Bragg-CDI ``intensity`` (n, n, n)
    (photons, centred on the Bragg peak at index n // 2; negatives clipped to 0; not
    Friedel-symmetrised): support-only ER / HIO / RAAR with shrinkwrap (module docstring) on
    complex iterates, with the sign convention of :func:`spiflow.grid.density_to_structure_factor`
    (``|F(q)|² = I(q)`` for ``F = v Σ d e^{+2πi q·r}``, as :func:`spiflow.bragg.far_field`).

    settings: :class:`spiflow.settings.PhasingSettings` with ``positivity=False`` (default:
    its defaults with positivity off). measured: optional (n, n, n) bool; False voxels (beam
    stop, gaps) are left free. seed: the restarts' random phases. start: optional (n, n, n)
    complex centred density to start from (one run, ``n_restarts`` ignored; rescaled so that
    its Fourier modulus best matches ``√I``), e.g. a network's output; support: optional
    (n, n, n) bool first support (default: the thresholded autocorrelation, or with ``start``
    its modulus blurred by ``sigma_end`` and thresholded at ``shrinkwrap_threshold``).
    Returns a :class:`ComplexPhasingResult`. Raises ValueError for non-cubic or non-finite
    input, masks or starts of another shape, all-zero measured intensity, positivity on,
    a bad schedule or ``n_average`` above the number of runs.
    """
    from .bragg import align_complex  # bragg imports metrics and stores; import late

    cfg = settings or PhasingSettings(positivity=False)
    if cfg.positivity:
        raise ValueError("phase_complex: a complex density has no sign; set phase.positivity to false")
    sched = parse_schedule(cfg.schedule)
    I = np.asarray(intensity.cpu() if isinstance(intensity, torch.Tensor) else intensity, dtype=np.float64)
    n = I.shape[0]
    if I.ndim != 3 or I.shape != (n, n, n) or n < 3:
        raise ValueError(f"intensity must be a cubic (n, n, n) volume, got shape {I.shape}")
    if not np.isfinite(I).all():
        raise ValueError("intensity contains NaN or infinite values")
    m = np.ones(I.shape, bool) if measured is None else np.asarray(measured)
    if m.shape != I.shape or m.dtype != bool:
        raise ValueError(f"measured must be a bool array of shape {I.shape}, got {m.dtype} {m.shape}")
    I = np.where(m, np.clip(I, 0, None), 0.0)
    if not (I > 0).any():
        raise ValueError("intensity is zero on every measured voxel; nothing to phase")
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    # F(q) = v Σ d(r) e^{+2πi q·r} (spiflow.grid) is fftn(d)(−k): the target modulus of fftn
    # of the un-centred iterate at k is √I(−k) (un-centred index −k mod n: flip, roll by one)
    def minus_k(t):
        return torch.roll(torch.flip(torch.fft.ifftshift(t, dim=_AXES), _AXES), (1, 1, 1), _AXES)
    A = minus_k(torch.as_tensor(np.sqrt(I))).float().to(dev)
    M = minus_k(torch.as_tensor(m)).to(dev)
    if start is not None:
        x0 = torch.as_tensor(np.asarray(start), dtype=torch.complex64)
        if x0.shape != I.shape or not torch.isfinite(torch.view_as_real(x0)).all():
            raise ValueError(f"start must be a finite (n, n, n) = {I.shape} density, got {tuple(x0.shape)}")
        x = torch.fft.ifftshift(x0, dim=_AXES).to(dev)[None]
        Fm = torch.fft.fftn(x, dim=_AXES).abs()
        k = (M * Fm * A).sum() / (M * Fm ** 2).sum().clamp_min(1e-30)
        x = x * k
    R = 1 if start is not None else cfg.n_restarts
    if cfg.n_average > R:
        raise ValueError(f"phase.n_average ({cfg.n_average}) exceeds the number of runs ({R})")
    if support is not None:
        S0 = torch.as_tensor(np.asarray(support))
        if S0.shape != I.shape or S0.dtype != torch.bool:
            raise ValueError(f"support must be a bool array of shape {I.shape}")
        S = torch.fft.ifftshift(S0, dim=_AXES).to(dev)
    elif start is not None:
        S = shrinkwrap(x[0], torch.ones_like(x[0].real, dtype=torch.bool), cfg.sigma_end, cfg.shrinkwrap_threshold,
                       positivity=False)
    else:
        # the modulus of the (complex) autocorrelation, blurred by 1 voxel, thresholded (as
        # autocorrelation_support, which takes its real part: that of a real object); missing
        # voxels filled by normalised convolution (blur(I m) / blur(m), σ 1.5 voxels) so that a
        # hole at the peak does not remove the autocorrelation's pedestal
        It, mt = torch.as_tensor(I), torch.as_tensor(m, dtype=torch.float64)
        fill = gaussian_blur(It, 1.5) / gaussian_blur(mt, 1.5).clamp_min(1e-6)
        It = torch.where(torch.as_tensor(m), It, fill.clamp_min(0))
        patt = gaussian_blur(torch.fft.ifftn(torch.fft.ifftshift(It, dim=_AXES)).abs().float().to(dev), 1.0)
        S = patt > cfg.autocorr_threshold * patt.max()
    S = S.expand(R, n, n, n).clone()
    if start is None:
        gen = torch.Generator().manual_seed(int(seed))
        phi = (2 * math.pi * torch.rand((R, n, n, n), generator=gen)).to(dev)
        x = torch.fft.ifftn(A * torch.polar(torch.ones_like(phi), phi), dim=_AXES) * S
    x, S, rows = run_schedule(x, A, M, S, cfg, sched)
    errors, chosen, aligned, supp = _rank_restarts(x, S, A, M, cfg, False, torch.fft.fftn, np.complex128,
                                                   align_complex)
    mean = np.mean(aligned, axis=0)
    shift = tuple(int(s) for s in np.rint(n // 2 - _circular_centroid(np.abs(mean))))
    return ComplexPhasingResult(
        density=np.roll(mean, shift, axis=(0, 1, 2)).astype(np.complex64),
        support=np.roll(supp[chosen[0]], shift, axis=(0, 1, 2)), errors=errors, chosen=chosen,
        log=pd.DataFrame(rows, columns=["restart", "iteration", "algorithm", "fourier_error", "support_size"]))
