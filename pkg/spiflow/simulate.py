"""The simulate stage: noisy single-particle diffraction patterns of a real structure.

Expected photon count of pixel p in frame i (Als-Nielsen & McMorrow, eq. 4.5, for
scattering by bound electrons in the kinematic approximation):

    μ_ip = g_i · J · r_e² · Ω_p · P_p · |F(R_iᵀ q_p)|²

with J the nominal fluence (photons/Å²), r_e the classical electron radius, Ω_p P_p the
pixel factor (solid angle × polarisation), g_i the per-shot gain (fluence jitter, mean 1
over the data set), F the molecular transform (electrons) and R_i the frame's rotation.
Counts are Poisson(μ) plus optional Gaussian read-out noise, converted back to whole
photons (rounded, clipped at 0), as integrating detectors report them.

F at the rotated pixels: exact per pixel (``simulate.transform`` auto / nufft / direct:
:func:`spiflow.scattering.expected_counts`), or, with ``simulate.transform: slice``,
computed once on a fine grid and interpolated per frame (:class:`SliceTransform`; its
docstring gives the measured accuracy, e.g. median 1.1e-3 relative error of μ with the
default cubic B-spline).

Patterns are written chunk by chunk into ``patterns.zarr``; ground truth (quaternions,
gains, intensity volume on the reconstruction grid, electron density) into ``truth.zarr``
(layouts: :mod:`spiflow.stores`).
Every random stream derives from ``dataset.seed``; frame i's noise from (seed, i) alone,
so results do not depend on chunking. That also makes sharding exact: with
``simulate.shards`` > 1, :func:`simulate_shard` writes the frames of one
:func:`shard_ranges` range (whole chunks) into its own store and :func:`gather_shards`
copies them, chunk by chunk, into ``patterns.zarr``: the same bytes as :func:`simulate`.

Heterogeneous samples (``sample.kind`` interpolation, mixture, nanoparticles; built by
:func:`build_sample` with :mod:`spiflow.hetero`): frame i has its own conformation
parameters c_i (drawn for all frames from one seeded stream) and F is that of
``sample.atoms(c_i)``. The truth store then also holds

* ``conformation (frame, parameter)``: c_i, with the parameter names as coordinates;
* ``intensity``, ``density``: those of the *reference conformation* (attribute
  ``reference_conformation``): the centre of the parameter ranges (t = mid-range for an
  interpolation; mid size and mid truncation for nanoparticles) or, for a mixture, the
  state of largest fraction. They are what a single-structure method is compared with;
* ``state_conformation (state, parameter)``, ``state_intensity (state, qx, qy, qz)``,
  ``state_density (state, x, y, z)``: reference states that ``evaluate`` matches recovered
  states against: every state of a mixture; for continuous parameters
  ``sample.reference_states`` bin centres per parameter (their grid for two parameters).
"""
from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from . import __version__, hetero, stores
from .detector import CLASSICAL_ELECTRON_RADIUS_ANGSTROM, Detector, reconstruction_grid
from .grid import Grid, structure_factor_to_density
from .io import resolve_device
from .rotation import quaternion_to_matrix, random_quaternions
from .rules import check_sample, sample_files, shard_ranges
from .scattering import expected_counts, form_factor, structure_factor_grid
from .slicing import BSPLINE_MARGIN, bspline_coefficients, slice_channels_rotated
from .structure import Atoms, read_structure

log = logging.getLogger(__name__)
MEASURED_DISTRIBUTION = Path(__file__).with_name("data") / "image_distribution_by_photon_count.npy"


def detector_from_config(config: dict) -> Detector:
    """The :class:`Detector` described by the ``detector`` and ``beam`` config sections."""
    d = config["detector"]
    return Detector(n_pixels=d["n_pixels"], pixel_size_m=d["pixel_size_m"], distance_m=d["distance_m"],
                    photon_energy_ev=config["beam"]["photon_energy_ev"],
                    beam_stop_radius_m=d["beam_stop_radius_m"], polarization=d["polarization"],
                    invalid_rectangles=[list(r) for r in d["invalid_rectangles"]])


def draw_gains(n: int, distribution: str, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Per-shot gains (n,), normalised to mean exactly 1 over the data set.

    ``none``: all 1. ``gamma``: shape 1/spread² (coefficient of variation = spread).
    ``lognormal``: σ with exp(σ²) − 1 = spread². ``measured``: photons per pattern drawn
    from the LCLS AMO86615 histogram (bin centres, uniform jitter within a bin).
    Raises ValueError for an unknown distribution.
    """
    if distribution == "none" or (spread == 0 and distribution in ("gamma", "lognormal")):
        g = np.ones(n)
    elif distribution == "gamma":
        k = 1.0 / spread ** 2
        g = rng.gamma(k, 1.0 / k, n)
    elif distribution == "lognormal":
        sigma = math.sqrt(math.log1p(spread ** 2))
        g = rng.lognormal(-sigma ** 2 / 2, sigma, n)
    elif distribution == "measured":
        centres, frac = np.load(MEASURED_DISTRIBUTION)
        width = centres[1] - centres[0]
        g = rng.choice(centres, size=n, p=frac / frac.sum()) + (rng.random(n) - 0.5) * width
    else:
        raise ValueError(f"beam.gain_distribution must be none, gamma, lognormal or measured, got {distribution!r}")
    return g / g.mean()


def build_sample(config: dict):
    """The configured sample: ``(None, Atoms)`` for ``sample.kind: structure``, else
    ``(hetero sample, None)`` (:mod:`spiflow.hetero`: draw(n, rng), atoms(params), radius).

    Raises FileNotFoundError / ValueError whose message starts with the config key at fault
    (e.g. ``sample.interpolation.end_path``).
    """
    check_sample(config)  # files exist, ranges ordered, one fraction per mixture file
    s = config["sample"]
    kind = s["kind"]
    read_kw = dict(hydrogens=s["hydrogens"], hetatm=s["hetatm"], waters=s["waters"])
    if kind == "structure":
        return None, read_structure(s["path"], **read_kw)

    def key_error(key, exc):
        return type(exc)(f"sample.{key}: {exc}")

    if kind == "interpolation":
        o = s["interpolation"]
        try:
            return hetero.matched_interpolation(s["path"], o["end_path"], o["chain"], tuple(o["t_range"])), None
        except ValueError as exc:
            raise key_error("interpolation.chain", exc) from None
    if kind == "mixture":
        o = s["mixture"]
        try:
            return hetero.Mixture.from_files(o["paths"], o["fractions"] or [1.0] * len(o["paths"]), **read_kw), None
        except (ValueError, FileNotFoundError) as exc:
            raise key_error("mixture.paths", exc) from None
    if kind == "nanoparticles":
        o = s["nanoparticles"]
        try:
            return hetero.GoldNanoparticles(tuple(o["size_range_angstrom"]), tuple(o["truncation_range"]),
                                            o["lattice_angstrom"], o["element"]), None
        except ValueError as exc:
            raise key_error("nanoparticles", exc) from None
    raise ValueError(f"sample.kind must be structure, interpolation, mixture or nanoparticles, got {kind!r}")


def reference_states(sample, config: dict) -> tuple[np.ndarray, np.ndarray]:
    """(reference conformation (P,), reference states (S, P)) of a heterogeneous sample.

    Continuous parameters: the centre of each range, and ``sample.reference_states`` bin
    centres per range (their Cartesian grid for P > 1). Mixture: the state of largest
    fraction (the first on a tie), and every state.
    """
    if isinstance(sample, hetero.Mixture):
        return (np.array([float(np.argmax(sample.fractions))]),
                np.arange(len(sample.states), dtype=float)[:, None])
    ranges = ([sample.t_range] if isinstance(sample, hetero.Interpolation)
              else [sample.size_range, sample.truncation_range])
    k = config["sample"]["reference_states"]
    axes = [lo + (np.arange(k) + 0.5) * (hi - lo) / k for lo, hi in ranges]
    states = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(ranges))
    return np.array([(lo + hi) / 2 for lo, hi in ranges]), states


def volumes(atoms: Atoms, grid: Grid, eps: float, F: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(|F|² (n, n, n) electrons², density (n, n, n) e/Å³ float32) of ``atoms`` on ``grid``;
    ``F`` (n, n, n) complex, electrons: the molecular transform on ``grid`` when already
    computed (:attr:`SliceTransform.recon_F`), else :func:`structure_factor_grid` here."""
    F = torch.as_tensor(structure_factor_grid(atoms, grid, eps=eps) if F is None else F).to(torch.complex128)
    return np.abs(F.numpy()) ** 2, structure_factor_to_density(F, grid).real.numpy().astype(np.float32)


class SliceTransform:
    """``simulate.transform: slice``: the molecular transform F computed once on a fine cubic
    grid, then read at every frame's rotated pixels ``R_iᵀ q_p`` by interpolation on the
    device (torch ``grid_sample``, batched over frames; :mod:`spiflow.slicing`), as Dragonfly
    slices a precomputed intensity (Ayyer et al., J. Appl. Cryst. 49, 1320 (2016)).

    The fine grid: spacing ``dq / oversampling`` (dq: the reconstruction ``grid``'s), centred,
    covering every pixel's |q| (Å⁻¹) plus the interpolation's reach (1 voxel for linear,
    :data:`~spiflow.slicing.BSPLINE_MARGIN` for cubic), and containing the reconstruction
    grid's voxels at stride ``oversampling`` (so the truth volumes reuse it: :attr:`recon_F`).
    F on it: :func:`~spiflow.scattering.structure_factor_grid` (type-1 NUFFT, one per element,
    IT92 form factors exact at the voxels; single precision when ``eps ≥ 1e-6``, which adds
    ~2e-5 relative error to |F|², below the interpolation's).

    Interpolated: the complex F (real and imaginary parts as two channels), then |F|². Measured
    on the default job (40² px of 1.3 mm at 0.1 m, 6 keV, 2CEX: dq = 6.3e-3 Å⁻¹, particle
    radius 36 Å), 16 random orientations, relative error of the expected counts against the
    exact path (NUFFT at eps 1e-12) over the valid pixels with counts ≥ 1 % of the mean (87 %
    of them), median / 99th percentile:

    ==============================  =================  =================  ================
    interpolation                   oversampling 1     oversampling 2     oversampling 3
    ==============================  =================  =================  ================
    ``cubic`` (the default)         1.1e-3 / 7.1e-3    5.9e-5 / 3.5e-4    1.4e-5 / 7.4e-5
    ``linear``                      0.11 / 0.32        2.8e-2 / 8.9e-2    1.2e-2 / 4.0e-2
    linear on |F|² (not offered)    7.9e-2 / 2.3       2.1e-2 / 0.61      9.5e-3 / 0.27
    ==============================  =================  =================  ================

    (the exact path itself, single-precision NUFFT: 2e-6 / 1.6e-5). Time on 2 CPU cores for
    3,000 patterns, set-up included (benchmarks/README.md): the fine grid's NUFFT grows as
    oversampling³ (0.1 s at 1, ~1 s at 2), the slicing is ~8× dearer for cubic than linear.

    ``cubic``: tricubic B-spline of prefiltered coefficients (Unser 1999; O(h⁴)), 8 trilinear
    fetches a point (:func:`~spiflow.slicing.slice_bspline`); ``linear``: trilinear (O(h²),
    8× cheaper to read, what Dragonfly does on |F|²; |F|² trilinear is worst near the zeros of
    |F|, where the complex F is smooth). The error grows with the phase an atom at the
    particle's radius R winds per fine voxel, 2π R dq / oversampling (1.4 rad here), as its
    4th power for cubic and square for linear. Heterogeneous samples (``sample.kind`` other
    than structure) have no single F: ValueError naming ``simulate.transform``.

    atoms: the structure; q (ny, nx, 3) Å⁻¹; grid: the reconstruction grid; oversampling:
    integer >= 1; interpolation: ``cubic`` or ``linear``; eps: NUFFT tolerance. Raises
    ValueError naming ``simulate.slice_oversampling`` / ``simulate.slice_interpolation`` for a
    bad value.
    """

    def __init__(self, atoms: Atoms, q: np.ndarray, grid: Grid, oversampling: int = 1,
                 interpolation: str = "cubic", device: torch.device | str = "cpu", eps: float = 1e-6):
        if isinstance(oversampling, bool) or int(oversampling) != oversampling or oversampling < 1:
            raise ValueError(f"simulate.slice_oversampling must be an integer >= 1, got {oversampling!r}")
        if interpolation not in ("cubic", "linear"):
            raise ValueError(f"simulate.slice_interpolation must be 'cubic' or 'linear', got {interpolation!r}")
        k = int(oversampling)
        self.interpolation, self.device = interpolation, torch.device(device)
        margin = BSPLINE_MARGIN if interpolation == "cubic" else 1
        q_all = float(np.linalg.norm(q, axis=-1).max())
        half = max(k * grid.center, math.ceil(q_all / (grid.dq / k))) + margin
        self.fine = Grid(2 * half + 1, grid.dq / k)
        F = structure_factor_grid(atoms, self.fine, eps=eps, single=eps >= 1e-6)
        o = half - k * grid.center
        #: F (n, n, n) complex on the reconstruction grid's voxels, electrons (the truth's).
        self.recon_F = F[o:o + k * (grid.n - 1) + 1:k, o:o + k * (grid.n - 1) + 1:k, o:o + k * (grid.n - 1) + 1:k]
        channels = np.stack([F.real, F.imag])
        if interpolation == "cubic":
            channels = bspline_coefficients(channels)
        self.volume = torch.as_tensor(channels, dtype=torch.float32).to(self.device)
        self.q = torch.as_tensor(q.reshape(-1, 3), dtype=torch.float32, device=self.device)

    def intensity(self, quats: np.ndarray, points: int = 1 << 19) -> np.ndarray:
        """|F(R_iᵀ q_p)|² (B, ny·nx) float64, electrons², for quaternions (B, 4), in batches
        of at most ``points`` (frame, pixel) pairs."""
        rot = quaternion_to_matrix(torch.as_tensor(quats, dtype=torch.float64)).to(self.device, torch.float32)
        step = max(1, points // len(self.q))
        out = np.empty((len(quats), len(self.q)))
        for b0 in range(0, len(quats), step):
            F = slice_channels_rotated(self.volume, self.q, rot[b0:b0 + step], self.fine, self.interpolation == "cubic")
            out[b0:b0 + step] = (F[0] ** 2 + F[1] ** 2).double().cpu().numpy()
        return out

    def expected_counts(self, pixel_factor: np.ndarray, quats: np.ndarray, scale: float) -> np.ndarray:
        """``scale · Ω P · |F(R_iᵀ q)|²`` (B, ny, nx) float64, photons at gain 1, as
        :func:`spiflow.scattering.expected_counts` (pixel_factor (ny, nx) sr, scale = J r_e² Å² photons/Å²)."""
        return scale * pixel_factor * self.intensity(quats).reshape((len(quats),) + pixel_factor.shape)


def expected_counts_per_frame(atoms: list[Atoms], q: np.ndarray, pixel_factor: np.ndarray, quats: np.ndarray,
                              scale: float, device: torch.device, budget: int = 1 << 23) -> np.ndarray:
    """:func:`spiflow.scattering.expected_counts` of frames with their own atoms (``atoms[b]``
    for frame b): the exact sum ``F_b(q) = Σ_e f_e(|q|) Σ_j occ_bj [el_bj = e] exp(2πi (R_bᵀ q)·r_bj)``, batched
    over frames as real matrix products in float64 (atom lists padded with occupancy 0), at
    most ``budget`` (pixel, atom) pairs per batch. For heterogeneous samples this is several
    times faster than one NUFFT per frame. Returns (B, ny, nx) float64 photons at gain 1.
    """
    valid_q = q.reshape(-1, 3)
    elements = sorted({e for a in atoms for e in a.elements.tolist()})
    ff = torch.as_tensor(np.stack([form_factor(e, np.linalg.norm(valid_q, axis=1)) for e in elements], 1),
                         device=device)  # (P, E)
    rot = quaternion_to_matrix(torch.as_tensor(quats, dtype=torch.float64)).to(device)
    qt = torch.as_tensor(valid_q, dtype=torch.float64, device=device)
    m = max(len(a) for a in atoms)
    step = max(1, budget // (len(valid_q) * m))
    out = np.empty((len(atoms), len(valid_q)))
    for b0 in range(0, len(atoms), step):
        batch = atoms[b0:b0 + step]
        pos = torch.zeros((len(batch), m, 3), dtype=torch.float64)
        w = torch.zeros((len(batch), m, len(elements)), dtype=torch.float64)  # occupancy per element
        for i, a in enumerate(batch):
            pos[i, :len(a)] = torch.as_tensor(a.positions)
            for e, name in enumerate(elements):
                w[i, :len(a), e] = torch.as_tensor(a.occupancy * (a.elements == name))
        phase = 2 * math.pi * (qt @ rot[b0:b0 + step]) @ pos.to(device).transpose(1, 2)  # (B, P, M)
        w = w.to(device)
        re, im = (torch.cos(phase) @ w * ff).sum(-1), (torch.sin(phase) @ w * ff).sum(-1)
        out[b0:b0 + len(batch)] = (re ** 2 + im ** 2).cpu().numpy()
    return scale * pixel_factor * out.reshape((len(atoms),) + pixel_factor.shape)


@dataclass
class _Setup:
    """Everything the frames and the truth depend on, derived from the config alone (so
    every shard of a sharded run derives the same): sample, detector, grid, per-frame draws,
    fluence, the patterns store's static arrays and attributes."""

    config: dict
    sample: object
    atoms: Atoms
    radius: float
    det: Detector
    q: np.ndarray
    pixel_factor: np.ndarray
    valid: np.ndarray
    grid: Grid
    quats: np.ndarray
    gains: np.ndarray
    params: np.ndarray | None
    fluence: float
    expected: object
    attrs: dict
    slicer: SliceTransform | None = None

    @property
    def n(self) -> int:
        return len(self.quats)


def _setup(config: dict) -> _Setup:
    cfg_s, cfg_d, cfg_b, cfg_sim = config["sample"], config["dataset"], config["beam"], config["simulate"]
    device = resolve_device(config["device"])
    sample, atoms = build_sample(config)
    radius = atoms.radius if sample is None else sample.radius
    det = detector_from_config(config)
    seed = cfg_d["seed"]
    s_orient, s_gain, s_dead, s_pilot, s_conf, s_pilot_conf = np.random.SeedSequence(seed).spawn(6)
    q, pixel_factor = det.q(), det.pixel_factor()
    valid = det.valid(config["detector"]["dead_pixel_fraction"], np.random.default_rng(s_dead))
    grid = reconstruction_grid(q, valid, config["reconstruction"]["grid_oversampling"])
    if 1.0 / grid.dq < 4 * radius:
        log.warning("real-space box %.1f Å is less than twice the particle diameter %.1f Å: phasing is "
                    "under-determined; increase detector.distance_m or decrease detector.pixel_size_m",
                    1.0 / grid.dq, 2 * radius)

    n = cfg_d["n_patterns"]
    quats = random_quaternions(n, np.random.default_rng(s_orient))
    gains = draw_gains(n, cfg_b["gain_distribution"], cfg_b["gain_spread"], np.random.default_rng(s_gain))
    kw = dict(method=cfg_sim["transform"], device=device, eps=cfg_sim["nufft_eps"])
    params = None if sample is None else sample.draw(n, np.random.default_rng(s_conf))
    slicer = None
    if cfg_sim["transform"] == "slice":
        if sample is not None:
            raise ValueError(f"simulate.transform: slice needs one structure (sample.kind structure), not "
                             f"sample.kind {cfg_s['kind']!r}, whose frames each have their own atoms; "
                             "use auto, nufft or direct")
        slicer = SliceTransform(atoms, q, grid, cfg_sim["slice_oversampling"], cfg_sim["slice_interpolation"], device,
                                cfg_sim["nufft_eps"])

    def expected(quats_, params_, scale):  # (B, ny, nx) expected photons at gain 1
        if slicer is not None:
            return slicer.expected_counts(pixel_factor, quats_, scale)
        if sample is None:
            return expected_counts(atoms, q, pixel_factor, quats_, scale, **kw)
        if cfg_sim["transform"] == "nufft":  # one NUFFT per distinct conformation
            return hetero.expected_counts(sample, params_, q, pixel_factor, quats_, scale, **kw)
        return expected_counts_per_frame([sample.atoms(c) for c in params_], q, pixel_factor, quats_, scale,
                                         device)

    r_e2 = CLASSICAL_ELECTRON_RADIUS_ANGSTROM ** 2
    if cfg_b["mean_photons_per_pattern"] is not None:
        m = cfg_sim["pilot_orientations"]
        pilot = random_quaternions(m, np.random.default_rng(s_pilot))
        pilot_params = None if sample is None else sample.draw(m, np.random.default_rng(s_pilot_conf))
        per_unit = expected(pilot, pilot_params, 1.0)[:, valid].sum(1).mean()
        fluence = cfg_b["mean_photons_per_pattern"] / (r_e2 * per_unit)
    else:
        fluence = cfg_b["photons_per_pulse"] / (math.pi * (cfg_b["focus_radius_m"] * 1e10) ** 2)

    attrs = {
        "photon_energy_ev": det.photon_energy_ev, "wavelength_angstrom": det.wavelength,
        "distance_m": det.distance_m, "pixel_size_m": det.pixel_size_m, "n_pixels": det.n_pixels,
        "polarization": det.polarization, "beam_stop_radius_m": det.beam_stop_radius_m,
        "readout_noise_photons": config["detector"]["readout_noise"],
        "nominal_fluence_photons_per_angstrom2": fluence,
        "classical_electron_radius_angstrom": CLASSICAL_ELECTRON_RADIUS_ANGSTROM,
        "recon_grid_n": grid.n, "recon_grid_dq": grid.dq,
        "sample_path": ", ".join(sample_files(config)), "sample_kind": cfg_s["kind"], "seed": seed,
        "spiflow_version": __version__,
        "config": yaml.safe_dump(config, sort_keys=False),
    }
    return _Setup(config, sample, atoms, radius, det, q, pixel_factor, valid, grid, quats, gains, params, fluence,
                  expected, attrs, slicer)


def _write_patterns(s: _Setup, path, frames: int, attrs: dict):
    """:func:`spiflow.stores.write_patterns` for ``frames`` frames of this set-up."""
    return stores.write_patterns(path, s.valid, s.q, s.pixel_factor, attrs, frames, s.config["dataset"]["chunk_frames"])


def _noise(mu: np.ndarray, valid: np.ndarray, seed: int, i0: int, sigma: float, out: np.ndarray) -> None:
    """Whole-photon counts ``out[b]`` (int32) of frames ``i0 + b`` with expected photons
    ``mu[b]``: Poisson, plus Gaussian read-out noise of ``sigma`` photons (rounded, clipped at
    0) when sigma > 0, 0 outside ``valid``; frame i draws from ``default_rng([seed, 7, i])``."""
    for b in range(len(mu)):
        rng = np.random.default_rng([seed, 7, i0 + b])
        c = rng.poisson(mu[b])
        if sigma > 0:
            c = np.clip(np.rint(c + rng.normal(0.0, sigma, c.shape)), 0, None)
        out[b] = np.where(valid, c, 0)


def _simulate_frames(s: _Setup, photons, i0: int, i1: int, progress: bool) -> np.ndarray:
    """Noisy patterns of frames ``i0 … i1 − 1`` into ``photons[i − i0]``, one chunk at a time;
    frame i draws from ``default_rng([seed, 7, i])``, so the data do not depend on chunks,
    shards or threads (the noise of a chunk's frames is drawn on ``torch.get_num_threads()``
    threads, contiguous blocks of frames each: NumPy's samplers release the GIL). Returns the
    photons per frame (i1 − i0,)."""
    chunk, seed = s.config["dataset"]["chunk_frames"], s.config["dataset"]["seed"]
    sigma = s.config["detector"]["readout_noise"]
    scale = CLASSICAL_ELECTRON_RADIUS_ANGSTROM ** 2 * s.fluence
    totals = np.zeros(i1 - i0)
    workers = max(1, min(torch.get_num_threads(), chunk))
    with ThreadPoolExecutor(workers) as pool:
        for c0 in tqdm(range(i0, i1, chunk), desc="simulate", unit="chunk", disable=not progress):
            c1 = min(c0 + chunk, i1)
            mu = s.expected(s.quats[c0:c1], None if s.params is None else s.params[c0:c1], scale)
            mu *= s.gains[c0:c1, None, None]
            counts = np.empty(mu.shape, dtype=np.int32)
            edges = np.linspace(0, c1 - c0, workers + 1).astype(int)
            list(pool.map(lambda ab: _noise(mu[ab[0]:ab[1]], s.valid, seed, c0 + ab[0], sigma, counts[ab[0]:ab[1]]),
                          zip(edges[:-1], edges[1:])))
            photons[c0 - i0:c1 - i0] = counts
            totals[c0 - i0:c1 - i0] = counts.sum((1, 2))
    return totals


def _write_truth(s: _Setup, truth_path, t0: float) -> int:
    """The truth store (:func:`spiflow.stores.write_truth`): orientations, gains,
    conformations, intensity and density volumes. Returns the number of atoms of the
    (reference) structure."""
    config, grid, atoms, sample = s.config, s.grid, s.atoms, s.sample
    eps = config["simulate"]["nufft_eps"]
    hetero_truth, extra = {}, {}
    if sample is not None:
        ref, states = reference_states(sample, config)
        atoms = sample.atoms(ref)
        names = list(sample.parameter_names)
        vols = [volumes(sample.atoms(c), grid, eps) for c in states]
        hetero_truth = {"conformation": s.params, "parameter_names": names, "state_conformation": states,
                        "state_intensity": np.stack([v[0] for v in vols]),
                        "state_density": np.stack([v[1] for v in vols])}
        extra = {"reference_conformation": ref.tolist(), "conformation_parameters": names}
    intensity, density = volumes(atoms, grid, eps, None if s.slicer is None else s.slicer.recon_F)
    attrs = {"n_atoms": len(atoms), "electrons": atoms.electrons(), "particle_radius_angstrom": s.radius,
             "sample_path": ", ".join(sample_files(config)), "sample_kind": config["sample"]["kind"],
             "wall_seconds": time.perf_counter() - t0, **extra}
    stores.write_truth(truth_path, s.quats, s.gains, intensity, density, grid, attrs, **hetero_truth)
    return len(atoms)


def _summary(s: _Setup, totals: np.ndarray, t0: float, n_atoms: int | None) -> dict:
    return {"mean_photons": float(totals.mean()), "fluence_photons_per_angstrom2": s.fluence,
            "grid_n": s.grid.n, "grid_dq": s.grid.dq, "n_atoms": n_atoms,
            "wall_seconds": time.perf_counter() - t0}


def simulate(config: dict, patterns_path: str | Path, truth_path: str | Path, progress: bool = True) -> dict:
    """Run the simulate stage for a validated ``config``; write both stores atomically.

    Returns a dict of summary numbers (mean photons, fluence, grid). Raises
    FileNotFoundError / ValueError naming the structure file or the config key at fault.
    """
    t0 = time.perf_counter()
    s = _setup(config)
    with _write_patterns(s, patterns_path, s.n, s.attrs) as photons:
        totals = _simulate_frames(s, photons, 0, s.n, progress)
    return _summary(s, totals, t0, _write_truth(s, truth_path, t0))


def simulate_shard(config: dict, shard: int, shard_path: str | Path, progress: bool = True) -> dict:
    """One shard of a sharded simulate (``simulate.shards`` > 1): the frames of
    :func:`shard_ranges` ``[shard]`` into their own store (same layout, ``frame_start``
    attribute), written atomically. The frames equal those of an unsharded run."""
    t0 = time.perf_counter()
    s = _setup(config)
    i0, i1 = shard_ranges(s.n, config["dataset"]["chunk_frames"], config["simulate"]["shards"])[shard]
    with _write_patterns(s, shard_path, i1 - i0, {**s.attrs, "frame_start": i0}) as photons:
        totals = _simulate_frames(s, photons, i0, i1, progress)
    return _summary(s, totals, t0, None)


def gather_shards(config: dict, shard_paths: list, patterns_path: str | Path, truth_path: str | Path) -> dict:
    """Gather the shard stores (in shard order) into ``patterns_path``, chunk by chunk (never
    the whole data in memory), and write the truth store; both atomically. Raises ValueError
    naming a shard store whose frame range or chunking does not match ``config``."""
    t0 = time.perf_counter()
    s = _setup(config)
    chunk = config["dataset"]["chunk_frames"]
    ranges = shard_ranges(s.n, chunk, config["simulate"]["shards"])
    if len(shard_paths) != len(ranges):
        raise ValueError(f"{len(shard_paths)} shard stores for simulate.shards = {len(ranges)}")
    totals = np.zeros(s.n)
    with _write_patterns(s, patterns_path, s.n, s.attrs) as photons:
        for path, (i0, i1) in zip(shard_paths, ranges):
            part, part_photons = stores.open_patterns(path)
            if part.attrs.get("frame_start") != i0 or len(part_photons) != i1 - i0:
                raise ValueError(f"shard store {path} does not hold frames {i0}…{i1 - 1} of this config")
            for c0 in range(0, i1 - i0, chunk):
                block = part_photons[c0:c0 + chunk]
                photons[i0 + c0:i0 + c0 + len(block)] = block
                totals[i0 + c0:i0 + c0 + len(block)] = block.sum((1, 2))
    return _summary(s, totals, t0, _write_truth(s, truth_path, t0))
