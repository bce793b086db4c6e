"""Complex objects of Bragg coherent diffraction imaging (Bragg CDI): faceted nanocrystals
with a displacement field, their 3D intensities, and the comparison of complex densities.

Physics (Robinson & Harder, Nat. Mater. 8, 291 (2009); Pfeifer et al., Nature 442, 63
(2006)). Near a Bragg reflection with reciprocal-lattice vector ``g`` (Å⁻¹, no 2π, as in
docs/conventions.md: ``|g| = 1/d_hkl``) a crystal whose atoms are displaced by ``u(r)`` (Å)
scatters like the complex density ``d(r) = ρ(r) e^{iφ(r)}`` with ``φ(r) = 2π g·u(r)``
(= ``G·u`` with the 2π-convention vector ``G = 2π g``). ``ρ`` is the crystal's shape
function (amplitude, 1 inside, dimensionless), ``φ`` in radians. The far field around the
peak, at ``Δq = q − g``, is ``F(Δq) = Σ_r d(r) exp(2πi Δq·r) v`` (the sign of
:func:`spiflow.grid.density_to_structure_factor`) and the measured intensity ``|F|²``.

Grid. The object lives on the odd cubic real-space grid of :class:`spiflow.grid.Grid`
(``n`` voxels per side, voxel ``a`` Å, index ``n // 2`` at r = 0), the intensity on its
reciprocal grid (``Δq`` step ``1 / (n a)`` Å⁻¹, index ``n // 2`` the Bragg peak). Odd ``n``
keeps the conjugate-inversion (twin) ``d*(−r)`` on the grid (a flip of the three axes); the
default ``n = 33 = 2⁵ + 1`` also suits the stride-2 network of :mod:`spiflow.ae3d`.
Oversampling: every particle fits in a cube of side ``n / 2`` (checked), so the intensity is
oversampled at least twice per axis (Miao et al., Nature 400, 342 (1999)).

Shapes (:func:`crystal_shape`): fcc nanocrystals bounded by the six {100} and eight {111}
facets, each facet at its own distance ``R f`` from the centre (``R`` ~ U[size range]
voxels, ``f`` ~ U[0.75, 1] per {100} facet and U[0.75, 1] · √3 · ``truncation`` per {111}
facet, truncation ~ U[0.55, 0.85]), i.e. randomly truncated, non-symmetric Wulff-like
polyhedra, under a uniformly random rotation; edges antialiased over one voxel.

Displacement (:func:`displacement_phase`), only its component along ``ĝ`` enters φ:

* a strain gradient: ``u_g(r) = u_max Q(r/R) / max_particle |Q|`` with ``Q(s) = sᵀ K s``, K a
  random symmetric 3 × 3 matrix (entries N(0, 1)); u_max ~ U[0, max_displacement] Å.
  (A homogeneous strain, linear in r, would only move the peak off the grid centre.)
* screw dislocations along a random line ξ through a random point p of the particle:
  ``u_g = (b_g / 2π) θ`` with θ the azimuth around the line and ``b_g = d_hkl`` the Burgers
  vector's component along ĝ, so ``g·b = 1`` and φ winds by 2π around the line (a phase
  vortex, as imaged by Clark et al., Nat. Commun. 6, 7354 (2015)).

Intensity (:func:`expected_intensity`, :func:`simulate_crystals`): ``|F|²`` scaled so that
its sum over the grid is ``photons`` (expected photons of the whole 3D data set), then
Poisson noise (counts), then the missing data (``measured`` False): a beam-stop-like ball of
radius ``beam_stop_radius_voxels`` around the peak and a detector gap, the slab
``|Δq_x index − n//2 − gap_offset| < gap_width / 2`` (both optional; voxels of the grid).

Comparison (:func:`align_complex`, :func:`complex_errors`): a measured intensity
determines ``d`` only up to a global phase ``e^{iα}``, an integer translation and the twin
``d*(−r)``; these are removed exactly (translation and phase by the maximum of the
cross-correlation, computed by FFT; twin by the better of the two) before comparing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.spatial.transform import Rotation

from .grid import Grid, density_to_structure_factor
from .io import derived_seed
from .metrics import fsc, resolution_at
from .stores import write_crystals

FACET_NORMALS = np.concatenate([
    np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=np.float64),
    np.array([[i, j, k] for i in (1, -1) for j in (1, -1) for k in (1, -1)], dtype=np.float64) / math.sqrt(3),
])  # the six {100} then the eight {111} facet normals of a cubic crystal
CIRCUMRADIUS_FACTOR = 1.25  # bound of |r| / R over the shapes of crystal_shape (checked in tests)
PARAMETER_NAMES = ("radius_voxels", "truncation", "max_displacement_angstrom", "dislocations")


def bragg_vector(hkl, lattice_angstrom: float) -> np.ndarray:
    """Reciprocal-lattice vector ``g = (h, k, l) / a`` (3,) in Å⁻¹ (no 2π; ``|g| = 1/d_hkl``)
    of a cubic lattice with constant ``lattice_angstrom``. Raises ValueError for (0, 0, 0)
    or a non-positive lattice constant."""
    h = np.asarray(hkl, dtype=np.float64)
    if h.shape != (3,) or not np.any(h) or not lattice_angstrom > 0:
        raise ValueError(f"need a non-zero hkl (3,) and lattice constant > 0, got {hkl}, {lattice_angstrom}")
    return h / lattice_angstrom


def _coords(n: int) -> np.ndarray:
    """Voxel coordinates (n, n, n, 3) relative to the centre voxel n // 2."""
    ax = np.arange(n) - n // 2
    return np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), axis=-1).astype(np.float64)


def crystal_shape(n: int, radius: float, rng: np.random.Generator, truncation: float | None = None):
    """Amplitude ρ (n, n, n) float64 in [0, 1] of a random faceted crystal (module docstring)
    of size ``radius`` voxels, and its truncation. Each facet k is the half-space
    ``n_k · R r ≤ d_k`` (R a random rotation), antialiased: ``ρ = Π_k clip(½ + d_k − n_k·Rr,
    0, 1)``. Raises ValueError when the particle may not fit in ``n / 2`` voxels (oversampling
    below 2), i.e. ``2 · CIRCUMRADIUS_FACTOR · radius + 1 > n / 2``."""
    if 2 * CIRCUMRADIUS_FACTOR * radius + 1 > n / 2:
        raise ValueError(f"a crystal of radius {radius} voxels does not fit n/2 = {n / 2} voxels "
                         f"(oversampling < 2): need radius <= {(n / 2 - 1) / (2 * CIRCUMRADIUS_FACTOR):.2f}")
    if truncation is None:
        truncation = float(rng.uniform(0.55, 0.85))
    f = np.concatenate([rng.uniform(0.75, 1.0, 6), rng.uniform(0.75, 1.0, 8) * math.sqrt(3) * truncation])
    rot = Rotation.random(random_state=rng).as_matrix()
    r = _coords(n) @ rot.T  # the crystal frame's coordinates of every voxel
    rho = np.ones((n, n, n))
    for normal, fk in zip(FACET_NORMALS, f):
        rho *= np.clip(0.5 + radius * fk - r @ normal, 0.0, 1.0)
    return rho, truncation


def displacement_phase(rho: np.ndarray, g: np.ndarray, radius: float,
                       max_displacement: float, dislocations: int, rng: np.random.Generator) -> np.ndarray:
    """Phase φ = 2π g·u (n, n, n) in radians of the displacement field of the module
    docstring for the particle ``rho`` (n, n, n) of size ``radius`` voxels: a strain gradient
    with ``max_particle |u_g| = max_displacement`` Å plus ``dislocations`` screw dislocations
    (``g·b = 1``). ``g`` (3,) Å⁻¹. u is in Å and φ does not depend on the voxel size (Å per
    voxel): it enters only through ``radius``."""
    n = rho.shape[0]
    r = _coords(n)
    inside = rho > 0.5
    K = rng.normal(size=(3, 3))
    K = 0.5 * (K + K.T)
    s = r / radius
    Q = np.einsum("...i,ij,...j->...", s, K, s)
    peak = np.abs(Q[inside]).max() if inside.any() else 1.0
    u_g = max_displacement * Q / peak  # Å along ĝ
    gnorm = float(np.linalg.norm(g))
    d_hkl = 1.0 / gnorm
    pts = np.argwhere(inside)
    for _ in range(dislocations):
        p = pts[rng.integers(len(pts))] - n // 2 + rng.uniform(-0.5, 0.5, 3)
        xi = rng.normal(size=3)
        xi /= np.linalg.norm(xi)
        e1 = np.cross(xi, [1.0, 0.0, 0.0] if abs(xi[0]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(xi, e1)
        rel = r - p
        theta = np.arctan2(rel @ e2, rel @ e1)
        u_g = u_g + d_hkl / (2 * math.pi) * theta
    return 2 * math.pi * gnorm * u_g


def far_field(density, grid: Grid) -> torch.Tensor:
    """Complex far field ``F`` (n, n, n) complex128 (electrons × the density's unit, here the
    dimensionless ρ times Å³) of a complex density (n, n, n) on the centred grid:
    :func:`spiflow.grid.density_to_structure_factor` (``F(Δq) = v Σ d(r) e^{2πi Δq·r}``)."""
    d = torch.as_tensor(np.asarray(density), dtype=torch.complex128)
    return density_to_structure_factor(d, grid)


def expected_intensity(density, grid: Grid, photons: float) -> np.ndarray:
    """Noise-free intensity (n, n, n) float64 in photons: ``|F|²`` of :func:`far_field`
    scaled to sum to ``photons`` over the grid. Raises ValueError for a zero density."""
    I = far_field(density, grid).abs().numpy() ** 2
    total = I.sum()
    if not total > 0:
        raise ValueError("the density is zero: no intensity")
    return I * (photons / total)


def missing_data_mask(n: int, beam_stop_radius: float, gap_width: float, gap_offset: int = 0) -> np.ndarray:
    """``measured`` (n, n, n) bool on the reciprocal grid: False inside the beam-stop-like ball
    ``|index − n//2| < beam_stop_radius`` (voxels) around the Bragg peak and in the detector
    gap, the slab ``|i_x − n//2 − gap_offset| < gap_width / 2`` (0 disables either)."""
    r = _coords(n)
    hole = np.linalg.norm(r, axis=-1) < beam_stop_radius
    gap = np.abs(r[..., 0] - gap_offset) < gap_width / 2
    return ~(hole | gap)


@dataclass
class CrystalSet:
    """Output of :func:`simulate_crystals` for ``N`` objects on ``grid`` (n³).

    intensity (N, n, n, n) float32: Poisson counts, photons, 0 where not measured;
    measured (n, n, n) bool; amplitude (N, n, n, n) float32 ρ ∈ [0, 1]; phase (N, n, n, n)
    float32 φ in radians (meaningful where ρ > 0); params (N, 4) float64 with columns
    :data:`PARAMETER_NAMES`; grid the :class:`~spiflow.grid.Grid` (dq in Å⁻¹)."""

    intensity: np.ndarray
    measured: np.ndarray
    amplitude: np.ndarray
    phase: np.ndarray
    params: np.ndarray
    grid: Grid


def crystal_grid(settings) -> Grid:
    """The :class:`~spiflow.grid.Grid` of a :class:`spiflow.settings.CrystalsSettings`:
    ``n`` voxels of ``voxel_angstrom`` Å, so ``dq = 1 / (n · voxel)`` Å⁻¹."""
    return Grid(settings.n, 1.0 / (settings.n * settings.voxel_angstrom))


def simulate_crystal(settings, seed: int, index: int):
    """Object ``index`` of the set with ``seed``: ``(amplitude, phase, noisy intensity,
    params)`` as in :class:`CrystalSet` (one object; noise drawn with ``measured`` applied).
    Object i draws from ``default_rng(derived_seed(seed, i))`` alone, so a set does not depend
    on how it is chunked."""
    cfg = settings
    rng = np.random.default_rng(derived_seed(seed, index))
    grid = crystal_grid(cfg)
    radius = float(rng.uniform(*cfg.size_range_voxels))
    rho, trunc = crystal_shape(cfg.n, radius, rng)
    umax = float(rng.uniform(0.0, cfg.max_displacement_angstrom))
    g = bragg_vector(cfg.hkl, cfg.lattice_angstrom)
    phi = displacement_phase(rho, g, radius, umax, cfg.dislocations, rng)
    mu = expected_intensity(rho * np.exp(1j * phi), grid, cfg.photons)
    measured = missing_data_mask(cfg.n, cfg.beam_stop_radius_voxels, cfg.gap_width_voxels, cfg.gap_offset_voxels)
    counts = np.where(measured, rng.poisson(mu), 0).astype(np.float32)
    return (rho.astype(np.float32), np.where(rho > 0, phi, 0.0).astype(np.float32), counts,
            np.array([radius, trunc, umax, cfg.dislocations], dtype=np.float64))


def simulate_crystals(settings, n_objects: int, seed: int, start: int = 0) -> CrystalSet:
    """Objects ``start … start + n_objects − 1`` of the seeded set (:func:`simulate_crystal`)
    for a :class:`spiflow.settings.CrystalsSettings`. Raises ValueError when ``n_objects`` < 1
    or the largest size does not fit (:func:`crystal_shape`)."""
    if n_objects < 1:
        raise ValueError(f"n_objects must be >= 1, got {n_objects}")
    parts = [simulate_crystal(settings, seed, start + i) for i in range(n_objects)]
    amp, phi, counts, params = (np.stack(x) for x in zip(*parts))
    measured = missing_data_mask(settings.n, settings.beam_stop_radius_voxels, settings.gap_width_voxels,
                                 settings.gap_offset_voxels)
    return CrystalSet(counts, measured, amp, phi, params, crystal_grid(settings))


def simulate_series(settings, frames: int, seed: int, displacement_range=(0.1, 0.8), radius_range=None) -> CrystalSet:
    """A slowly changing crystal over ``frames`` time steps (for latent tracking,
    :mod:`spiflow.estrack`): one crystal of :func:`crystal_shape` (facet distances, truncation
    and rotation drawn once from ``default_rng(derived_seed(seed, 0))``) with one strain
    gradient (the matrix K of :func:`displacement_phase` drawn once), whose largest
    displacement ``u_max`` (Å) ramps linearly from ``displacement_range[0]`` to
    ``displacement_range[1]`` and whose size R (voxels) ramps over ``radius_range`` (default:
    fixed at the middle of ``settings.size_range_voxels``). The phase therefore grows as
    φ_t = 2π |g| u_max(t) Q(r/R_t) / max|Q|; ``settings.dislocations`` screw dislocations are
    placed once (their points depend only on the first frame's shape when R is fixed).
    Frame t's Poisson noise draws from ``derived_seed(seed, t + 1)``. Returns a
    :class:`CrystalSet` whose objects are the frames (params: R, truncation, u_max,
    dislocations). Raises ValueError for ``frames`` < 1 or a size that does not fit."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    cfg = settings
    grid = crystal_grid(cfg)
    lo, hi = cfg.size_range_voxels
    r0, r1 = radius_range if radius_range is not None else (0.5 * (lo + hi),) * 2
    g = bragg_vector(cfg.hkl, cfg.lattice_angstrom)
    measured = missing_data_mask(cfg.n, cfg.beam_stop_radius_voxels, cfg.gap_width_voxels, cfg.gap_offset_voxels)
    out = []
    for t in range(frames):
        s = t / max(frames - 1, 1)
        radius = float(r0 + s * (r1 - r0))
        umax = float(displacement_range[0] + s * (displacement_range[1] - displacement_range[0]))
        rng = np.random.default_rng(derived_seed(seed, 0))  # the same draws every frame: one crystal
        rho, trunc = crystal_shape(cfg.n, radius, rng)
        phi = displacement_phase(rho, g, radius, umax, cfg.dislocations, rng)
        mu = expected_intensity(rho * np.exp(1j * phi), grid, cfg.photons)
        counts = np.where(measured, np.random.default_rng(derived_seed(seed, t + 1)).poisson(mu), 0)
        out.append((rho.astype(np.float32), np.where(rho > 0, phi, 0.0).astype(np.float32),
                    counts.astype(np.float32), np.array([radius, trunc, umax, cfg.dislocations], dtype=np.float64)))
    amp, phi, counts, params = (np.stack(x) for x in zip(*out))
    return CrystalSet(counts, measured, amp, phi, params, grid)


# ---------------------------------------------------------------------------- comparison

def twin(density) -> np.ndarray:
    """The twin (conjugate inversion) ``d*(−r)`` of a complex density (..., n, n, n) on the
    centred odd grid: it has the same ``|F|²`` (``F → F*``)."""
    return np.conj(np.flip(np.asarray(density), axis=(-3, -2, -1)))


def _best_shift(moving: np.ndarray, reference: np.ndarray):
    """(|c|max, shift (3,) int, c at the max) of the circular cross-correlation
    ``c(t) = Σ_r reference(r) conj(moving(r − t))``."""
    c = np.fft.ifftn(np.fft.fftn(reference) * np.conj(np.fft.fftn(moving)))
    k = int(np.argmax(np.abs(c)))
    idx = np.unravel_index(k, c.shape)
    return float(np.abs(c.flat[k])), np.array(idx), c.flat[k]


def align_complex(estimate, truth, allow_twin: bool = True):
    """``estimate`` (n, n, n) complex moved onto ``truth`` (n, n, n) complex: the twin
    (:func:`twin`) if it matches better (``allow_twin``), the integer circular translation
    and the global phase that maximise ``|Σ truth · conj(moved)|`` (exactly undoing
    translations by whole voxels and any global phase). Returns ``(aligned, info)`` with
    info ``{"twin": bool, "shift": (3,) voxels, "phase_offset": radians added}``. Raises
    ValueError for shapes that differ or are not 3D."""
    est, ref = np.asarray(estimate, dtype=np.complex128), np.asarray(truth, dtype=np.complex128)
    if est.shape != ref.shape or est.ndim != 3:
        raise ValueError(f"estimate {est.shape} and truth {ref.shape} must be the same 3D shape")
    best = None
    for is_twin in ((False, True) if allow_twin else (False,)):
        cand = twin(est) if is_twin else est
        score, shift, c = _best_shift(cand, ref)
        if best is None or score > best[0] * (1 + 1e-9):
            best = (score, shift, c, is_twin, cand)
    _, shift, c, is_twin, cand = best
    alpha = float(np.angle(c))
    aligned = np.roll(cand, tuple(int(s) for s in shift), axis=(0, 1, 2)) * np.exp(1j * alpha)
    return aligned, {"twin": is_twin, "shift": shift, "phase_offset": alpha}


def complex_errors(estimate, truth, grid: Grid, intensity=None, measured=None, support_threshold: float = 0.5,
                   allow_twin: bool = True) -> dict:
    """Errors of a complex density ``estimate`` against ``truth`` (both (n, n, n) complex on
    ``grid``) after :func:`align_complex` (global phase, translation, twin) and the best real
    scale of the estimate (``Re⟨a, t⟩ / ‖a‖²``; a measured intensity sets no absolute scale):

    * ``complex_error``: ``‖s a − t‖ / ‖t‖`` over the grid (Fienup's invariant error;
      0 for a perfect result, ≈ 1.4 for an unrelated one);
    * ``phase_rmse_rad``: RMS of the wrapped phase difference over the support (voxels with
      ``|t| > support_threshold · max|t|``), weighted equally;
    * ``amplitude_fsc_mean``: the mean over shells (q > 0) of the FSC of the amplitudes
      ``|a|`` and ``|t|`` (:func:`spiflow.metrics.fsc`), and ``amplitude_resolution_05``
      (Å, 0.5 crossing);
    * ``fourier_error``: ``‖ s|F_a| − √I ‖ / ‖√I‖`` over ``measured`` voxels (all when None),
      ``I`` = ``intensity`` (default: the truth's ``|F|²``), s the best scale;
    * ``twin``, ``shift`` as found.
    Raises ValueError on shape mismatches.
    """
    t = np.asarray(truth, dtype=np.complex128)
    a, info = align_complex(estimate, t, allow_twin)
    s = float(np.vdot(a, t).real / max(np.vdot(a, a).real, 1e-300))
    a = s * a
    err = float(np.linalg.norm(a - t) / np.linalg.norm(t))
    supp = np.abs(t) > support_threshold * np.abs(t).max()
    dphi = np.angle(a[supp] * np.conj(t[supp]))
    table = fsc(np.abs(a), np.abs(t), grid)
    Fa = far_field(a, grid).abs().numpy()
    A = np.sqrt(np.clip(np.asarray(intensity, dtype=np.float64), 0, None)) if intensity is not None \
        else far_field(t, grid).abs().numpy()
    m = np.ones(A.shape, bool) if measured is None else np.asarray(measured, dtype=bool)
    k = float((Fa[m] * A[m]).sum() / max((Fa[m] ** 2).sum(), 1e-300))
    ferr = float(np.linalg.norm(k * Fa[m] - A[m]) / np.linalg.norm(A[m]))
    shells = table[table["q_inv_angstrom"] > 0]
    return {"complex_error": err, "phase_rmse_rad": float(np.sqrt(np.mean(dphi ** 2))),
            "amplitude_fsc_mean": float(np.nanmean(shells["fsc"])),
            "amplitude_resolution_05": resolution_at(table, 0.5), "fourier_error": ferr,
            "twin": info["twin"], "shift": tuple(int(x) for x in info["shift"])}


def errors_table(rows: list[dict]) -> pd.DataFrame:
    """One row per (object, method) result of :func:`complex_errors` (plus the caller's
    columns) as a DataFrame; ``shift`` written as a string."""
    df = pd.DataFrame(rows)
    if "shift" in df:
        df["shift"] = df["shift"].astype(str)
    return df


def write_crystal_set(crystals: CrystalSet, intensity_path, truth_path, chunk_objects: int, attrs: dict) -> None:
    """The two stores of a :class:`CrystalSet` (:func:`spiflow.stores.write_crystals`): what a
    Bragg-CDI experiment records, ``intensity (object, qx, qy, qz)`` photons and ``measured``,
    at ``intensity_path``; the truth (``amplitude``, ``phase`` rad, ``params``) kept apart at
    ``truth_path``. attrs (both): e.g. the settings and seed."""
    g = crystals.grid
    write_crystals(intensity_path, {"intensity": (crystals.intensity, "photons")}, g, attrs, chunk_objects, "q",
                   measured=crystals.measured)
    write_crystals(truth_path, {"amplitude": (crystals.amplitude, "1"), "phase": (crystals.phase, "radian")}, g,
                   attrs, chunk_objects, "r", params=crystals.params, parameter_names=PARAMETER_NAMES)


def read_crystal_set(intensity_path, truth_path=None) -> CrystalSet:
    """A :class:`CrystalSet` from the stores of :func:`write_crystal_set` (``amplitude``,
    ``phase`` and ``params`` None without ``truth_path``). Raises FileNotFoundError or
    ValueError naming a missing or unreadable store."""
    from .io import open_dataset
    ds = open_dataset(intensity_path, "crystals store")
    grid = Grid(int(ds.attrs["recon_grid_n"]), float(ds.attrs["recon_grid_dq"]))
    amp = phase = params = None
    if truth_path is not None:
        t = open_dataset(truth_path, "crystals truth store")
        amp, phase, params = t["amplitude"].values, t["phase"].values, t["params"].values
    return CrystalSet(ds["intensity"].values, ds["measured"].values, amp, phase, params, grid)
