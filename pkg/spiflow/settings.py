"""Every setting of spiflow, typed: one pydantic model per configuration section.

These classes are the single source of every key, its type, range, default and meaning.
``config.schema.yaml`` (validated by the Snakefile) is generated from them
(``python -m spiflow.settings``; ``tests/test_settings.py`` fails when it is stale) and
``config/config.yaml`` writes the same defaults out for users (tested). The numerical
code takes its section as a typed object: :func:`spiflow.emc.run_emc` an
:class:`EMCSettings`, :func:`spiflow.phasing.phase` a :class:`PhasingSettings`, and so on;
run-time choices that are not settings of the method (the random seed, from
``dataset.seed``, and the torch ``device``) are arguments of those functions.

Units: detector lengths in metres, photon energy in eV, lengths of the sample in Å, angles
in degrees (docs/conventions.md). This module imports pydantic and yaml only.
"""
from __future__ import annotations

import sys
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, model_validator

from .rules import SCHEMA_PATH

Method = Literal["truth", "emc", "mtip", "mtip_selfsup", "selfsup", "vae"]
RECON_METHODS: tuple[str, ...] = Method.__args__


class Section(BaseModel):
    """A configuration section: unknown keys are errors, types are strict (a YAML string is
    not an integer), values are checked on assignment too. Raises
    :class:`pydantic.ValidationError` (a ValueError) naming the offending field."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


def _unique(items: list) -> list:
    if len(set(items)) != len(items):
        raise ValueError(f"items must be unique, got {items}")
    return items


def _odd(n: int) -> int:
    if n % 2 == 0:
        raise ValueError(f"must be odd, got {n}")
    return n


class InterpolationSettings(Section):
    """kind interpolation: r(t) = (1 - t) r(path) + t r(end_path), atoms matched by residue and atom name, end state superposed on the start (spiflow.hetero.matched_interpolation)"""
    end_path: str | None = Field(None, description='PDB or mmCIF file of the end state (t = 1); required')
    chain: str = Field('A', min_length=1, description='the chain matched between the two files')
    t_range: list[float] = Field([0.0, 1.0], min_length=2, max_length=2, description='[low, high]: t ~ U[low, high] per frame')


class MixtureSettings(Section):
    """kind mixture: each frame is one of the structures, drawn with the given fractions"""
    paths: list[Annotated[str, Field(min_length=1)]] = Field([], description='PDB, mmCIF or XYZ files, one per state (at least 2)')
    fractions: list[Annotated[float, Field(ge=0)]] = Field([], description='one weight per state (normalised); empty = equal fractions')


class NanoparticlesSettings(Section):
    """kind nanoparticles: fcc octahedra cut by cube faces (Oh symmetric), R ~ U[size range] and truncation ~ U[truncation range] per frame (spiflow.hetero.GoldNanoparticles)"""
    size_range_angstrom: list[Annotated[float, Field(gt=0)]] = Field([20.0, 30.0], min_length=2, max_length=2, description='[low, high] of R, centre to octahedron vertex, Å')
    truncation_range: list[Annotated[float, Field(ge=0, lt=1)]] = Field([0.0, 0.5], min_length=2, max_length=2, description='[low, high] of the truncation: 0 octahedron, 1/3 truncated octahedron, 1/2 cuboctahedron')
    lattice_angstrom: float = Field(4.078, gt=0, description='fcc lattice constant (gold)')
    element: str = Field('Au', min_length=1)


class SampleSettings(Section):
    """What is simulated: one structure, or a heterogeneous sample (a conformation per frame)."""
    kind: Literal['structure', 'interpolation', 'mixture', 'nanoparticles'] = Field('structure', description='structure: one particle, sample.path. Heterogeneous (each frame draws its own conformation, stored in truth.zarr as conformation (frame, parameter)): interpolation (sample.path at t = 0 to sample.interpolation.end_path at t = 1, parameter t), mixture (discrete states sample.mixture.paths, parameter state), nanoparticles (truncated fcc octahedra, parameters size_angstrom and truncation)')
    path: str = Field('data/2cex.pdb', min_length=1, description='PDB or mmCIF file (kind structure); the start state, t = 0 (kind interpolation)')
    hydrogens: bool = Field(False)
    hetatm: bool = Field(True, description='keep non-water HETATM residues')
    waters: bool = Field(False)
    interpolation: InterpolationSettings = Field(default_factory=InterpolationSettings)
    mixture: MixtureSettings = Field(default_factory=MixtureSettings)
    nanoparticles: NanoparticlesSettings = Field(default_factory=NanoparticlesSettings)
    reference_states: int = Field(5, ge=1, description='continuous heterogeneous samples: truth.zarr keeps state_intensity / state_density of this many conformations per parameter (bin centres of its range; their grid for several parameters); mixtures keep every state')


class DatasetSettings(Section):
    """Size, seed and chunking of the simulated data set."""
    n_patterns: int = Field(3000, ge=1)
    seed: int = Field(2024, ge=0)
    chunk_frames: int = Field(250, ge=1, description='frames per Zarr chunk')


class CXISettings(Section):
    """measured data in: with path set, rule import_cxi (spiflow.formats.import_cxi) writes simulate/patterns.zarr from this CXI file instead of simulating, there is no truth store, and evaluate reports what needs none (PRTF; half-set FSC for the methods in evaluate.half_sets). The sample, dataset.n_patterns, beam and detector keys are then unused"""
    path: str | None = Field(None, min_length=1, description='CXI (HDF5) file: /entry_1/data_1/data, its mask, distance, pixel size, photon energy')
    photon_energy_ev: float | None = Field(None, gt=0, description="override the file's /entry_1/instrument_1/source_1/energy")
    polarization: Literal['x', 'y', 'unpolarized'] | None = Field(None, description="beam polarisation; null: the file's spiflow attribute, else x")
    fluence_photons_per_angstrom2: float | None = Field(None, gt=0, description='nominal fluence if known; null: 1, and intensities are in arbitrary units')
    round_counts: bool = Field(False, description='round non-integer (photon-converted) counts instead of refusing them')


class EuXFELSettings(Section):
    """measured data from European XFEL: with path set, rule import_euxfel (spiflow.euxfel.import_euxfel) writes simulate/patterns.zarr from a run's corrected AGIPD-1M data (photons from keV, lit-pixel hit finding, only the hits stored; every frame's score and hit flag in simulate/hits.csv, their histogram in simulate/hits.png). There is no truth store, as with cxi.path; the sample, dataset.n_patterns, beam and detector keys are then unused"""
    path: str | None = Field(None, min_length=1, description='run directory with the corrected (CORR) AGIPD data, opened with extra_data.RunDirectory')
    detector_name: str = Field('SPB_DET_AGIPD1M-1', min_length=1, description='the detector part of the source names DETECTOR/CORR/<module>CH0:xtdf (SPB/SFX: SPB_DET_AGIPD1M-1)')
    modules: Annotated[list[Annotated[int, Field(ge=0, le=15)]], AfterValidator(_unique)] | None = Field(None, min_length=1, json_schema_extra={'uniqueItems': True}, description='AGIPD module numbers (0-15) to read; null = every module in the run. Trains lacking one of them are skipped')
    geometry_path: str | None = Field(None, min_length=1, description='CrystFEL .geom file of the AGIPD-1M (extra_geom.AGIPD_1MGeometry.from_crystfel_geom); null = extra_geom AGIPD_1MGeometry.example() (the quadrant positions extra-geom documents; use the measured geometry for real data)')
    distance_m: float | None = Field(None, gt=0, description='sample-detector distance, m, added to the z of the geometry (required: a run holds no standard record of it)')
    photon_energy_ev: float | None = Field(None, gt=0, description='photon energy, eV (required): converts the calibrated keV into photons and sets the wavelength')
    photon_threshold: float = Field(0.5, ge=0.5, le=1.0, description='photons = round(E / E_photon), and 0 where E < photon_threshold * E_photon (0.5: plain rounding); units of the photon energy')
    binning: Literal[1, 2, 4, 8, 16, 32, 64] = Field(1, description='stored pixel = the sum of a binning x binning block of AGIPD pixels (200 um) within one ASIC; q at the mean position of its valid pixels, pixel factor their sum')
    mask_asic_edges: bool = Field(True, description='invalidate the outermost pixel rows and columns of every 64 x 64 ASIC (the larger pixels at ASIC borders)')
    beam_stop_radius_m: float = Field(0.0, ge=0, description='invalidate pixels closer than this to the beam axis (x, y of the geometry), m')
    hit_mode: Literal['mad', 'fixed'] = Field('mad', description='a frame is a hit when its lit pixels exceed median + hit_k * MAD of the run (mad) or hit_threshold (fixed)')
    hit_k: float = Field(5.0, gt=0, description='k of hit_mode mad; MAD = median absolute deviation, unscaled')
    hit_threshold: int | None = Field(None, ge=0, description='lit-pixel threshold of hit_mode fixed (required there)')
    lit_q_range_inv_angstrom: list[Annotated[float, Field(ge=0)]] | None = Field(None, min_length=2, max_length=2, description='[low, high], 1/angstrom: count lit pixels (>= 1 photon) with low <= |q| <= high only; null = every valid pixel')
    chunk_trains: int = Field(1, ge=1, description='trains read at once; data are read module by module (a train of 352 memory cells is about 0.2 GB per module)')


class BeamSettings(Section):
    """The X-ray pulse: photon energy (eV), fluence and its per-shot jitter (the gain)."""
    photon_energy_ev: float = Field(6000.0, gt=0)
    mean_photons_per_pattern: float | None = Field(3000.0, gt=0, description='expected photons per pattern on valid pixels (orientation average); null = use the physical fluence below')
    photons_per_pulse: float = Field(10000000000000.0, gt=0)
    focus_radius_m: float = Field(5e-07, gt=0, description='radius of a uniform (top-hat) focal spot')
    gain_distribution: Literal['none', 'gamma', 'lognormal', 'measured'] = Field('gamma', description='per-shot fluence jitter; measured = LCLS AMO86615 photons-per-pattern histogram')
    gain_spread: float = Field(0.25, ge=0, description='coefficient of variation for gamma / lognormal')


class DetectorSettings(Section):
    """A flat square detector normal to the beam (lengths in metres), its beam stop and masks
    (:class:`spiflow.detector.Detector`)."""
    n_pixels: int = Field(40, ge=2)
    pixel_size_m: float = Field(0.0013, gt=0)
    distance_m: float = Field(0.1, gt=0)
    beam_stop_radius_m: float = Field(0.002, ge=0)
    polarization: Literal['x', 'y', 'unpolarized'] = Field('x')
    readout_noise: float = Field(0.0, ge=0, description='Gaussian read-out noise sigma in photons')
    dead_pixel_fraction: float = Field(0.0, ge=0, lt=1)
    invalid_rectangles: list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=4, max_length=4)]] = Field([], description='[y0, y1, x0, x1] half-open pixel ranges that do not measure')


class SimulateSettings(Section):
    """How the molecular transform is evaluated at the pixels, and how the stage is split."""
    transform: Literal['auto', 'nufft', 'direct', 'slice'] = Field('auto', description="molecular transform at the pixels: auto = NUFFT when finufft is installed, else direct sums; heterogeneous samples: nufft = one NUFFT per distinct conformation, auto or direct = exact sums batched over frames (faster); slice = F computed once on a fine grid and interpolated at each frame's rotated pixels (spiflow.simulate.SliceTransform; sample.kind structure only), see slice_oversampling and slice_interpolation")
    slice_oversampling: int = Field(1, ge=1, description="transform slice: fine-grid voxels per reconstruction-grid step (the fine grid's spacing is reconstruction dq / this). Relative error of the expected counts against the exact path on the default job (valid pixels with counts >= 1 % of the mean), median / 99th percentile: cubic 1.1e-3 / 7.1e-3 at 1, 5.9e-5 / 3.5e-4 at 2, 1.4e-5 / 7.4e-5 at 3; linear 0.11 / 0.32 at 1, 2.8e-2 / 8.9e-2 at 2, 1.2e-2 / 4.0e-2 at 3. The fine grid's NUFFT costs oversampling cubed (0.1 s at 1 on the default job, ~1 s at 2)")
    slice_interpolation: Literal['cubic', 'linear'] = Field('cubic', description='transform slice: interpolation of the complex F at the rotated pixels: cubic = tricubic B-spline (8 trilinear fetches a pixel; the accurate one), linear = trilinear (what Dragonfly does, on the intensity; faster, errors as slice_oversampling lists)')
    nufft_eps: float = Field(1e-06, le=0.01, gt=0, description='finufft relative tolerance; >= 1e-6 runs in single precision (about 3x faster; intensities within 1e-5 of the exact sum)')
    pilot_orientations: int = Field(256, ge=1, description='orientations averaged to set the photon scale')
    shards: int = Field(1, ge=1, description='simulate as this many jobs (rule simulate_shard, each whole Zarr chunks of frames), gathered into one store; at most n_patterns / chunk_frames')


class ReconstructionSettings(Section):
    """Which reconstructions run, and the reconstruction grid's sampling."""
    methods: Annotated[list[Method], AfterValidator(_unique)] = Field(['truth', 'emc'], min_length=1, json_schema_extra={'uniqueItems': True}, description='truth (oracle), emc, mtip (M-TIP from random orientations), selfsup (learned encoders + implicit decoder), mtip_selfsup (M-TIP seeded with the selfsup orientations), vae (latent space of conformations at the orientations of vae.orientations)')
    grid_oversampling: float = Field(1.0, gt=0, description='voxels per detector pixel step near the beam')


class EMCSettings(Section):
    """Settings of :func:`spiflow.emc.run_emc`.

    num_div: SO(3) refinement (10 (5n³+n) orientations, spacing ≈ 73.5° / n).
    iterations: total number of iterations (a resumed run continues up to it).
    beta_start, beta_factor, beta_every, beta_max: deterministic annealing; iteration t
    (1-based) uses ``β_t = min(beta_max, beta_start · beta_factor ** ((t − 1) // beta_every))``.
    n_starts, start_iterations, start_frames, start_num_div: random restarts. With
    ``n_starts > 1`` the first ``start_iterations`` iterations of the schedule are run
    ``n_starts`` times (at most ``iterations − 1``: :attr:`trial_iterations`) from initial
    models seeded ``seed, seed + 1, …``, on the first
    ``start_frames`` frames at the coarser ``min(start_num_div, num_div)``; the start with the highest
    log-likelihood (same frames, sampling and β for all, so comparable) seeds the run on
    all frames, which continues the schedule at iteration ``trial_iterations + 1``. From a
    featureless start EMC can settle in a self-consistent but wrong model (a symmetric
    mixture of orientations) whose likelihood is clearly lower; restarts make that rare.
    update_gain: fit per-frame gains φ (else φ ≡ 1); the run's seed (an argument of
    :func:`spiflow.emc.run_emc`) seeds the initial model's noise.
    orientation_min_radius_voxels: valid pixels with ``|q| < this · grid.dq`` are merged but
    left out of the E-step (0 uses every valid pixel; see the module docstring). The
    default 4 voxels covers the central speckle of a compact particle (its first minimum at
    |q| ≈ 1.43 / D, i.e. 1.43 σ voxels at a linear oversampling of σ = 1 / (D dq) voxels per
    speckle, σ ≈ 2.5–3 in a usual experiment).
    orientation_chunk: orientations sliced / merged at once (work arrays of chunk × valid
    pixels). memory_budget_gb: frame block size B is the largest with
    ``B (2 K M + min(chunk, M) + P) · itemsize <= budget`` (M orientations, K models, P valid
    pixels: the log-likelihood and probability matrices, one chunk's product and the photon block); the photons (frames × P) are kept in
    memory between passes when they fit in the budget too, else re-read every pass.
    dtype: "float32" (fast) or "float64".
    refine_iterations, refine_step_end_deg, refine_radius_steps, refine_assignment: local
    refinement (:mod:`spiflow.refine`) after the global iterations: ``refine_iterations``
    more iterations, each searching ``refine_radius_steps`` steps around every frame's
    orientation, the step shrinking geometrically from ``53° / (num_div · radius_steps)``
    (the sampling's covering radius, :data:`spiflow.sampling.COVERING_RADIUS_DEG`, spans
    the first search) to ``refine_step_end_deg``; assignment "hard" (most likely local
    rotation) or "soft" (posterior at ``beta_max``). 0 iterations: plain global EMC.
    photon_format: "dense", "sparse" or "auto" (module docstring: same result, different
    cost). "auto" picks sparse when at most :data:`AUTO_SPARSE_DENSITY` of the orientation
    pixels hold photons (measured over the first frames), where sparse was measured faster.
    Not part of the checkpoint fingerprint: a run may resume in the other format.
    processes: ranks of one EMC run across processes (:mod:`spiflow.distributed`): the
    workflow starts the stage under ``torchrun`` on one node, or ``srun`` inside a SLURM
    allocation of that many tasks (:mod:`spiflow.launch`); each rank owns a contiguous
    range of the frames. Same result up to floating-point summation order (with search
    coarse_to_fine also up to each rank's own choice of the exhaustive fallback per block); not part of
    the checkpoint fingerprint (a checkpoint resumes with any number of processes).
    resolution_start, resolution_iterations: resolution marching. Iteration t (1-based, the
    schedule of the random starts included) uses only the valid pixels with
    ``|q| <= f_t · q_top`` (q_top the largest valid |q|) in the E-step *and* the merge,
    ``f_t = min(1, resolution_start + (1 − resolution_start) (t − 1) / d)``,
    ``d = min(resolution_iterations, iterations − 1)`` (:meth:`resolution_fraction`): a linear
    growth of the radius from ``resolution_start`` to all pixels at iteration ``d + 1``, so
    the last iteration (and the final E-step) always use every pixel; d = 0 (or
    resolution_start 1) uses every pixel throughout. Voxels that no included pixel
    reaches keep their previous value. As RELION limits its expectation step to the
    current resolution (Scheres, J. Mol. Biol. 415, 406 (2012); J. Struct. Biol. 180, 519
    (2012)); Dragonfly has no schedule of its own (its users mask the outer detector pixels by
    hand for the first iterations, Ayyer et al. 2016's detector mask). The default (0.5 to
    all pixels at iteration 21) ends the marching with the random starts, so the run on
    all frames is at full resolution.
    search, search_mass: the orientations of the soft E-step. "exhaustive": every frame
    against all ``10 (5n³+n)`` orientations. "coarse_to_fine": first every frame against the
    coarse sampling at :attr:`coarse_num_div`; each frame keeps the most probable coarse
    orientations holding ``search_mass`` of its coarse posterior; then only the fine
    orientations in the nearest-neighbour cells of those
    (:func:`spiflow.sampling.coarse_to_fine`) are evaluated, and the posterior and merge
    use them alone (normalised over them); the coarse mass left out is logged
    (``neglected_mass``, the frame mean) as the estimate of the neglected posterior mass
    (RELION's adaptive oversampling, Scheres 2012; cryoSPARC's branch and bound, Punjani
    et al., Nat. Methods 14, 290 (2017)). Only the kept (rotation, frame) pairs are
    evaluated (a sampled matrix product) and only the pairs with a posterior of at least
    :data:`spiflow.emc.MERGE_MIN_PROBABILITY` are merged; frame blocks whose kept pairs
    exceed :data:`spiflow.emc.COARSE_TO_FINE_MAX_FRACTION` of all are searched exhaustively
    (broad posteriors at low β).
    models, model_init: multi-model EMC for a particle that varies from frame to frame, as
    Dragonfly's "modes" (Ayyer et al., J. Appl. Cryst. 49, 1320 (2016)): K = ``models``
    intensity models W_k; each frame's posterior runs over (model k, rotation r) jointly,
    ``P_kri = (w_r / K) exp(β L_kri) / Σ_k'r' (w_r' / K) exp(β L_k'r'i)`` (uniform model
    prior), the gains use ``Σ_kr P_kri Σ_p s_p W_krp``, and model k is merged with its own
    weights P_kri. 1 is plain EMC (the same code path and result). K > 1 needs
    ``search: exhaustive`` (the coarse-to-fine search is single-model; a settings error
    otherwise); the random starts, checkpoints and processes > 1 run all K models, local
    refinement refines each frame against its most probable model. Initial models, without
    the truth: "radial_split" sorts the frames by the photon-weighted mean |q| of their valid
    pixels (a larger particle concentrates its photons at lower q) into K equal groups and
    starts model k from the radial profile of group k (smallest mean |q| first), with the
    usual 10 % noise; "random" starts every model from the radial profile of all frames
    with its own noise (Dragonfly's random starts). The result's models are ordered by
    particle size and rotated into the frame of the most populated one, with their frames'
    orientations (:func:`spiflow.emc.common_frame`). Measured on config/nanoparticle.yaml
    (README): 5 models, radial_split: orientation error 9.7° modulo Oh against 31.8° with one.
    """
    num_div: int = Field(10, ge=1, le=40)
    iterations: int = Field(30, ge=1)
    beta_start: float = Field(0.05, gt=0)
    beta_factor: float = Field(1.5, ge=1)
    beta_every: int = Field(3, ge=1)
    beta_max: float = Field(1.0, gt=0)
    update_gain: bool = Field(True)
    orientation_min_radius_voxels: float = Field(4.0, ge=0, description='valid pixels with |q| below this many grid steps are merged but not used to find orientations (the central speckle)')
    n_starts: int = Field(4, ge=1, description='random starts for the first start_iterations; the most likely one continues on all frames')
    start_iterations: int = Field(21, ge=1, description='iterations of each random start (at most iterations - 1)')
    start_frames: int = Field(500, ge=1, description='frames (the first ones) used by the random starts')
    start_num_div: int = Field(6, ge=1, le=40, description='orientation sampling of the random starts (at most num_div)')
    refine_iterations: int = Field(8, ge=0, description='local refinement iterations after the global ones (spiflow.refine; 0: none)')
    refine_step_end_deg: float = Field(0.5, gt=0, description='local search step of the last refinement iteration, degrees (the first is 53 / (num_div * refine_radius_steps))')
    refine_radius_steps: int = Field(2, ge=1, le=8, description='local search radius in steps (2: 33 rotations per frame, 3: 123)')
    refine_assignment: Literal['hard', 'soft'] = Field('hard', description='hard: the most likely local rotation; soft: the posterior at beta_max (measured 2.6x slower, same FSC on the default data)')
    orientation_chunk: int = Field(2048, ge=1)
    memory_budget_gb: float = Field(2.0, gt=0)
    dtype: Literal["float32", "float64"] = Field("float32", description="floating-point type of the E-step and merge")
    photon_format: Literal["dense", "sparse", "auto"] = Field(
        "auto", description="photons in the E-step as a dense (frames, pixels) block or sparse CSR (same result, different "
        "cost); auto: sparse when at most spiflow.emc.AUTO_SPARSE_DENSITY of the orientation pixels hold photons "
        "(sparse measured faster up to about 10 %)")
    processes: int = Field(1, ge=1, description="ranks of one EMC run: torchrun on one node, or srun inside a SLURM "
                           "allocation of this many tasks (spiflow.launch); 1: one process")
    resolution_start: float = Field(0.5, gt=0, le=1, description="resolution marching: the first iteration's q radius "
                                    "as a fraction of the largest valid |q| (1: all pixels)")
    resolution_iterations: int = Field(20, ge=0, description="resolution marching: iterations over which the q radius grows "
                                       "linearly to all pixels (0: no marching)")
    search: Literal["exhaustive", "coarse_to_fine"] = Field(
        "coarse_to_fine", description="soft E-step orientations: all of them, or the fine cells of the coarse orientations "
        "that hold search_mass of each frame's coarse posterior (the default: on the default job 6x faster per global "
        "iteration, same FSC and orientation error within run-to-run noise; README)")
    search_mass: float = Field(0.999, gt=0, lt=1, description="coarse_to_fine: coarse posterior mass kept per frame "
                               "(the rest is neglected and logged)")
    models: int = Field(1, ge=1, le=64, description="intensity models (Dragonfly's modes): each frame's posterior runs "
                        "over (model, rotation) jointly; 1: single-model EMC; > 1 needs search: exhaustive")
    model_init: Literal["radial_split", "random"] = Field(
        "radial_split", description="models > 1: initial models from the radial profiles of K groups of frames split "
        "by their photon-weighted mean |q|, or all from the overall profile with independent noise")

    @model_validator(mode="after")
    def _models_need_exhaustive_search(self):
        if self.models > 1 and self.search != "exhaustive":
            raise ValueError(f"emc.models = {self.models} needs emc.search: exhaustive (the coarse-to-fine search is "
                             f"single-model), got emc.search: {self.search}")
        return self

    @property
    def coarse_num_div(self) -> int:
        """The coarse level of ``search = "coarse_to_fine"``: the largest divisor of num_div
        that is at most num_div / 2 (10 → 5, 6 → 3, 8 → 4, a prime → 1), so that every coarse
        orientation is a fine one too and its nearest-neighbour cell is never empty; 0 for
        num_div 1 (no coarser level: the search is exhaustive)."""
        n = self.num_div
        return max((d for d in range(1, n // 2 + 1) if n % d == 0), default=0)

    @property
    def resolution_span(self) -> int:
        """Iterations over which the marching radius grows: ``min(resolution_iterations,
        iterations − 1)`` (0: no marching). Part of the checkpoint fingerprint, as the
        schedule depends on it."""
        return max(0, min(self.resolution_iterations, self.iterations - 1))

    def resolution_fraction(self, iteration: int) -> float:
        """The q radius of 1-based ``iteration`` as a fraction of the largest valid |q|:
        ``min(1, resolution_start + (1 − resolution_start) (t − 1) / d)``, ``d =
        min(resolution_iterations, iterations − 1)``; 1 when d = 0."""
        d = self.resolution_span
        if d <= 0:
            return 1.0
        f = self.resolution_start + (1 - self.resolution_start) * (iteration - 1) / d
        return float(min(1.0, f))

    @property
    def trial_iterations(self) -> int:
        """Iterations run by each random start: ``min(start_iterations, iterations − 1)``, 0
        with ``n_starts = 1`` (then the run is plain EMC from one start)."""
        return 0 if self.n_starts == 1 else min(self.start_iterations, self.iterations - 1)

    def beta(self, iteration: int) -> float:
        """β of 1-based ``iteration``: ``min(beta_max, beta_start · beta_factor ** ((t − 1) // beta_every))``."""
        step = (iteration - 1) // self.beta_every
        return float(min(self.beta_max, self.beta_start * self.beta_factor ** step))


class MTIPSettings(Section):
    """Settings of :func:`spiflow.mtip.run_mtip` (module docstring for the steps they control).

    num_div: reference orientations, the 600-cell refinement (10 (5n³+n) rotations,
    spacing ≈ 73.5° / n). iterations: maximum number of M-TIP iterations (a resumed run
    continues up to it) of global matching. converge_fraction: end the global iterations
    once at most this fraction of the frames moved (by more than half the sampling step)
    in an iteration. distance: "poisson"
    or "euclidean". refine_iterations, refine_step_end_deg, refine_radius_steps: local
    refinement after the global iterations (after ``iterations`` or convergence):
    ``refine_iterations`` more iterations whose matching searches only the ball of
    ``refine_radius_steps`` steps around every frame's orientation (:mod:`spiflow.refine`,
    shared with EMC), the step shrinking geometrically from ``53° / (num_div ·
    refine_radius_steps)`` to ``refine_step_end_deg``; 0 iterations: global matching only.
    orientation_min_radius_voxels: valid pixels with ``|q| < this · grid.dq`` are merged
    but left out of the distance, as in EMC (:class:`EMCSettings`; measured effect in
    :mod:`spiflow.mtip`). use_phased_model: match against the phased
    ``|F[ρ]|²`` (M-TIP) rather than the merged W. update_gain: fit per-frame gains (else
    φ ≡ 1). phasing_hio, phasing_er (>= 1, so that the fed-back ρ obeys support and
    positivity): iterations per M-TIP iteration; beta_hio: HIO β. shrinkwrap_every (HIO
    iterations, 0: never), shrinkwrap_sigma (voxels), shrinkwrap_threshold (fraction of
    the blurred maximum): the support updates. autocorr_threshold: each iteration's first
    support, a fraction of the maximum of the autocorrelation blurred by 1 voxel.
    orientation_chunk: orientations sliced at once (chunk × valid pixels).
    memory_budget_gb: bounds the frame block B by ``B (40 P + chunk) · itemsize <= budget``
    (P valid pixels: photons, per-frame slicing coordinates, merge values, the chunk × B
    distances) and the local search's sub-blocks (:func:`spiflow.refine.local_search`);
    the photons stay in memory when frames × P fits in it too. dtype: "float32" or "float64". The run's seed (random initial orientations and ρ)
    and device are arguments of :func:`spiflow.mtip.run_mtip`.
    processes: ranks of one M-TIP run, as ``emc.processes`` (:mod:`spiflow.launch`); not
    part of the checkpoint fingerprint.
    """
    num_div: int = Field(4, ge=1, le=40)
    iterations: int = Field(20, ge=1)
    converge_fraction: float = Field(0.0, ge=0, le=1, description='stop when fewer frames than this change orientation')
    distance: Literal['poisson', 'euclidean'] = Field('poisson')
    refine_iterations: int = Field(10, ge=0, description='local refinement iterations after the global ones (spiflow.refine; 0: none)')
    refine_step_end_deg: float = Field(0.5, gt=0, description='local search step of the last refinement iteration, degrees (the first is 53 / (num_div * refine_radius_steps))')
    refine_radius_steps: int = Field(2, ge=1, le=8, description='local search radius in steps (2: 33 rotations per frame, 3: 123)')
    orientation_min_radius_voxels: float = Field(4.0, ge=0, description='valid pixels with |q| below this many grid steps are merged but not used to match orientations (the central speckle)')
    use_phased_model: bool = Field(True)
    update_gain: bool = Field(True)
    phasing_hio: int = Field(30, ge=0)
    phasing_er: int = Field(20, ge=1)
    beta_hio: float = Field(0.9, le=1, gt=0)
    shrinkwrap_every: int = Field(10, ge=0)
    shrinkwrap_sigma: float = Field(1.5, gt=0)
    shrinkwrap_threshold: float = Field(0.1, gt=0, lt=1)
    autocorr_threshold: float = Field(0.04, gt=0, lt=1)
    orientation_chunk: int = Field(1024, ge=1)
    memory_budget_gb: float = Field(2.0, gt=0)
    dtype: Literal['float32', 'float64'] = Field('float32')
    processes: int = Field(1, ge=1, description="ranks of one M-TIP run: torchrun on one node, or srun inside a SLURM "
                           "allocation of this many tasks (spiflow.launch); 1: one process")


class SelfSupSettings(Section):
    """Settings of :func:`spiflow.selfsup.run_selfsup` (reference values of Chen et al. in brackets).

    epochs: total epochs [1000]; a resumed run continues up to it (raising it stretches the
    cosine schedule of the remaining steps). batch_size: frames per
    step [80; 40 per GPU × 4 in their configs]. lr, weight_decay: AdamW [3e-4, 1e-4].
    warmup_epochs: linear warm-up [5], then cosine decay per step to min_lr [1e-7] at the end.
    loss: "poisson" or "mse" [mse]. decoder: "siren" or "voxel".
    siren_layers, siren_width, siren_omega0: sine layers, their width, ω₀ of the first [5, 256, 30].
    encoder_width, encoder_stages, encoder_blocks: ResNet channels of the first stage,
    stages, BasicBlocks per stage [64, 4, 2 = ResNet-18]. encoder_pool, encoder_hidden: the
    trunk's pooled cells per side [1] and the rotation head's hidden width [0: linear].
    amortize_steps, amortize_batch, amortize_lr, amortize_augment: the simulation-based amortization of the
    poses after the epochs (:func:`spiflow.selfsup.amortize`; not in the reference).
    fit_gain: learn per-frame gains (else 1). radial_baseline: add the data's radial
    log-profile to the decoder (else its mean).
    patch_count, patch_size_min, patch_size_max: zeroed rectangles per training input, side
    lengths as fractions of the detector side [100 of 4–8 px on 128 px]. fluence_jitter:
    coefficient of variation of the input scale factor (0: off).
    amp: bfloat16 autocast of the encoder on CUDA (ignored on CPU).
    chunk_frames: frames per ``photons[i0:i1]`` read. memory_budget_gb: keep all photons in
    memory when frames × valid pixels × 4 bytes fits.
    processes: ranks of one training run (DistributedDataParallel; :mod:`spiflow.launch`
    starts them as for ``emc.processes``). batch_size stays the frames per step: each rank
    takes ``batch_size / processes`` (a multiple is required). The number of ranks is part
    of the checkpoint fingerprint (a checkpoint resumes only with the same number).

    The defaults are sized for a CPU and were measured on the default data (README, "Why
    selfsup did not orient"): the pose-search warm start (search_*, refine_*), a voxel
    decoder at decoder_lr, the Poisson loss. The paper's values are in brackets; its method
    is ``search_epochs: 0, decoder: siren, loss: mse, lr: 3e-4, decoder_lr: null, final_refine: false``
    (with epochs 20, warmup_epochs 2 as measured before).
    """
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(80, ge=1)
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0001, ge=0)
    warmup_epochs: int = Field(1, ge=0)
    min_lr: float = Field(1e-07, ge=0)
    loss: Literal['mse', 'poisson'] = Field('poisson')
    decoder: Literal['siren', 'voxel'] = Field('voxel')
    siren_layers: int = Field(4, ge=2)
    siren_width: int = Field(128, ge=1)
    siren_omega0: float = Field(30.0, gt=0)
    encoder_width: int = Field(16, ge=1)
    encoder_stages: int = Field(3, ge=1)
    encoder_blocks: int = Field(1, ge=1)
    encoder_pool: int = Field(5, ge=1, description='the encoder trunk ends in average pooling to encoder_pool x encoder_pool cells, flattened (1: global average pooling, as ResNet); the cells keep where on the detector the speckles lie (measured in a scratch run on the default data, not with the committed benchmark: an encoder trained on 90,000 patterns simulated from the true intensity, 36 deg median error modulo the Friedel mate with 5 and a 256-wide rotation head, 60 deg with 1 and a linear head)')
    encoder_hidden: int = Field(256, ge=0, description='hidden width of the rotation head (one ReLU layer); 0: a linear head')
    fit_gain: bool = Field(True)
    radial_baseline: bool = Field(True)
    patch_count: int = Field(100, ge=0)
    patch_size_min: float = Field(0.03, le=1, gt=0)
    patch_size_max: float = Field(0.06, le=1, gt=0)
    fluence_jitter: float = Field(0.2, ge=0)
    amp: bool = Field(True, description='mixed precision on CUDA only')
    chunk_frames: int = Field(1024, ge=1)
    memory_budget_gb: float = Field(2.0, gt=0)
    decoder_lr: float | None = Field(0.05, gt=0, description='AdamW learning rate of the decoder (None: lr); the voxel decoder needs far more than the SIREN')
    voxel_init_noise: float = Field(0.1, ge=0, description='the voxel decoder starts at log-intensity noise U[0, voxel_init_noise) (the random start of EMC, W0 (1 + 0.1 u)), which breaks the tie between orientations in the first pose search')
    search_epochs: int = Field(3, ge=0, description='pose-search warm start: in epochs 1 … search_epochs every frame is posed by a global search over the SO(3) sampling against the decoder (slices at those poses train the decoder; the encoder is pulled towards them); 0: the encoder poses from the start')
    search_num_div: int = Field(4, ge=1, description='num_div of the 600-cell sampling of the global pose search')
    search_q_start: float = Field(0.5, gt=0, le=1, description='frequency marching: the search scores pixels up to this fraction of the largest pixel |q| in the first search epoch, rising linearly to all in the last')
    search_beta_start: float = Field(0.05, gt=0, description='inverse temperature of the marginal likelihood in the first search epoch (deterministic annealing, as EMC beta_start)')
    search_beta_end: float = Field(0.2, gt=0, description='inverse temperature in the last search epoch (geometric in between)')
    refine_iterations: int = Field(3, ge=0, description='local refinement iterations (spiflow.refine.local_search, hard assignment) at the start of every epoch after the search epochs and once more at the end (steps from the search sampling covering radius / radius_steps down to refine_step_end_deg in the first, 2 x refine_step_end_deg to it later)')
    refine_radius_steps: int = Field(2, ge=1, description='radius of the local search ball in steps')
    refine_step_end_deg: float = Field(0.5, gt=0, description='smallest local search step, degrees')
    pose_weight: float = Field(1.0, ge=0, description='weight of the chordal pose loss min(|R_encoder - R_pose|_F^2, |R_encoder - M R_pose|_F^2) (M: pi about the beam axis, the Friedel mate) against the photon loss while poses are searched')
    amortize_steps: int = Field(2000, ge=0, description='after the epochs, the encoder (trunk and heads; the decoder fixed) is trained for this many steps on patterns simulated from the learnt intensity at uniformly random rotations, gains drawn from the frames\' maximum-likelihood gains, Poisson noise (simulation-based amortization); its one-pass poses are returned as encoder_quaternion. 0: off')
    amortize_batch: int = Field(64, ge=1, description='simulated patterns per amortization step (split over the ranks)')
    amortize_lr: float = Field(0.002, gt=0, description='peak AdamW learning rate of the amortization (10 % linear warm-up, then cosine to 1 %)')
    amortize_augment: bool = Field(False, description='apply the training augmentation (patch_count zeroed patches, fluence_jitter) to the simulated patterns too; measured on the default data (102,400 patterns from the true intensity, scored on the real frames): 48.9 deg modulo the Friedel mate with it, 29.7 deg without')
    processes: int = Field(1, ge=1, description="ranks of one selfsup training (DistributedDataParallel): torchrun on "
                           "one node, or srun inside a SLURM allocation of this many tasks (spiflow.launch); 1: one process")
    final_refine: bool = Field(True, description='return per-frame refined poses and their maximum-likelihood gains: the searched poses refined once more (search_epochs > 0) or the encoder poses refined from the search scale (search_epochs 0); false: the encoder poses and gains. The encoder-only poses are always returned as encoder_quaternion')


class VAESettings(Section):
    """Settings of :func:`spiflow.vae.run_vae` (reference values of Zhuang et al. in brackets).

    latent_dim: dimension of z [z_dim, 1 unless configured]. epochs: total epochs (a resumed run continues up to
    it). batch_size: frames per step. lr, weight_decay: AdamW, constant lr [Adam 1e-3].
    beta: weight of the KL term (normalised per pixel); beta_warmup_epochs: linear warm-up
    of β from 0 over that many epochs (0: none).
    symmetry: point group of the intensity ("C1": Friedel only, for proteins; "Oh" for
    gold nanoparticles [Th]; also Ci, C2, C4, D2, D4, T, Th, O). conditional: the encoder sees the
    orientation and log gain. orientation_encoding: "6d" or "quaternion".
    encoder: "cnn" or "lstm"; sequence_length: frames per LSTM sequence; lstm_hidden.
    encoder_channels, encoder_layers: channels of the first stride-2 conv and number of
    convs (channels double per layer). hidden: MLP width. decoder_channels, decoder_layers:
    channels of the last transposed conv and their number (channels double towards z).
    volume_n: odd side of the decoded volume (None: the reconstruction grid's n), same
    q_max. positivity: "exp" or "softplus". radial_baseline: multiply the data's radial
    profile (else its mean). factorized, cp_rank: CP-decomposed layers.
    chunk_frames: frames per ``photons[i0:i1]`` read. memory_budget_gb: keep all
    photons in memory when frames × valid pixels × 4 bytes fits.

    orientations, representative, clusters and traversal_steps (:attr:`WORKFLOW_KEYS`) are
    read by the workflow (:func:`spiflow.pipeline.stage_vae`, :mod:`spiflow.latent`), the
    rest by :func:`spiflow.vae.run_vae`. Defaults sized for a CPU.
    """
    WORKFLOW_KEYS: ClassVar[tuple[str, ...]] = ("orientations", "representative", "clusters", "traversal_steps")
    orientations: Literal['emc', 'selfsup', 'truth'] = Field('emc', description="whose orientations and gains the VAE is conditioned on: recon/emc or recon/selfsup/orientations.zarr; truth reads simulate/truth.zarr, an ablation only (it breaks the rule that reconstructions never read the truth) to separate orientation errors from the VAE's")
    representative: Literal['mean', 'largest_cluster'] = Field('mean', description='the latent point decoded into recon/vae/intensity.zarr: mean = the frame whose z_mu is nearest the mean of z_mu (continuous conformations); largest_cluster = the frame nearest the centre of the largest of the vae.clusters k-means clusters (discrete states)')
    clusters: int = Field(3, ge=1, description='k-means clusters of z_mu: the recovered states that evaluate decodes, phases and compares with the matching true state')
    traversal_steps: int = Field(5, ge=2, description='volumes decoded along PC1 (from -2 to +2 standard deviations) for the traversal plot')
    latent_dim: int = Field(2, ge=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.001, gt=0)
    weight_decay: float = Field(0.0001, ge=0)
    beta: float = Field(1.0, ge=0, description='weight of the KL term')
    beta_warmup_epochs: int = Field(5, ge=0)
    symmetry: Literal['C1', 'Ci', 'C2', 'C4', 'D2', 'D4', 'T', 'Th', 'O', 'Oh'] = Field('C1', description='point group the decoded intensity is averaged over (plus Friedel): C1 for proteins, Oh for fcc nanoparticles')
    conditional: bool = Field(True, description='the encoder sees the orientation and log gain')
    orientation_encoding: Literal['6d', 'quaternion'] = Field('6d')
    encoder: Literal['cnn', 'lstm'] = Field('cnn', description='lstm: frames in sequence (time-ordered data)')
    sequence_length: int = Field(4, ge=1)
    lstm_hidden: int = Field(64, ge=1)
    encoder_channels: int = Field(16, ge=1)
    encoder_layers: int = Field(3, ge=1)
    hidden: int = Field(128, ge=1)
    decoder_channels: int = Field(8, ge=1)
    decoder_layers: int = Field(3, ge=1)
    volume_n: Annotated[int, Field(ge=3), AfterValidator(_odd), WithJsonSchema({'type': 'integer', 'minimum': 3, 'not': {'multipleOf': 2}})] | None = Field(31, description="odd side of the decoded volume (same q_max as the reconstruction grid, coarser q step); null = the reconstruction grid's n (costly on a CPU)")
    positivity: Literal['exp', 'softplus'] = Field('exp')
    radial_baseline: bool = Field(True)
    factorized: bool = Field(False, description='CP-decomposed layers')
    cp_rank: int = Field(8, ge=1)
    chunk_frames: int = Field(1024, ge=1)
    memory_budget_gb: float = Field(2.0, gt=0)


class PhasingSettings(Section):
    """Settings of :func:`spiflow.phasing.phase`. Iteration counts are per cycle of ``schedule``.

    schedule: ``"RAAR:200,ER:20"``, run ``n_cycles`` times,
    then ``final_er`` ER iterations with the support fixed. Shrinkwrap is active during the
    cycles only (``shrinkwrap_every = 0`` disables it). Its defaults (σ 3 → 1.5 voxels,
    threshold 0.1) are looser than Marchesini's (→ 1.5, 0.2) because low-resolution SPI
    densities have soft edges: for Gaussian-blob test objects a σ = 1, 0.15 support already
    truncates ~12 % of ‖F‖. Sizes are voxels; betas dimensionless.
    """
    schedule: str = Field('RAAR:200,ER:20', pattern='^(ER|HIO|RAAR):[0-9]+(,(ER|HIO|RAAR):[0-9]+)*$')
    n_cycles: int = Field(3, ge=1, description='repeats of the schedule')
    final_er: int = Field(50, ge=0, description='ER iterations with the support fixed at the end')
    n_restarts: int = Field(16, ge=1)
    n_average: int = Field(8, ge=1, description='best restarts (by Fourier error) aligned and averaged')
    shrinkwrap_every: int = Field(20, ge=0)
    shrinkwrap_threshold: float = Field(0.1, gt=0, lt=1)
    sigma_start: float = Field(3.0, gt=0, description='shrinkwrap blur in voxels, first')
    sigma_end: float = Field(1.5, gt=0, description='shrinkwrap blur in voxels, last')
    beta_hio: float = Field(0.9, gt=0, le=1, description="HIO feedback β (Fienup 1982)")
    beta_raar: float = Field(0.87, gt=0, le=1, description="RAAR relaxation β (Luke 2005)")
    positivity: bool = Field(True, description="real, non-negative density inside the support (else the support alone)")
    max_support_fraction: float | None = Field(None, gt=0, le=1, description="cap of the support's share of the volume (null: none)")
    autocorr_threshold: float = Field(0.04, gt=0, lt=1, description="first support: this fraction of the maximum of the blurred autocorrelation")
    n_shells: int = Field(20, ge=1, description="shells of the PRTF")
    log_every: int = Field(10, ge=1, description="iterations between rows of phase_log.csv")


class EvaluateSettings(Section):
    """Evaluation: rotation alignment, plots, the point group, the half-set FSC."""
    align_num_div: int = Field(4, ge=1, description='global rotation search fineness')
    montage_frames: int = Field(16, ge=1)
    symmetry: str = Field('C1', pattern='^(C[1-9][0-9]*|Ci|D2|D4|T|Th|O|Oh)$', description='point group of the particle (spiflow.symmetry.point_group): orientation errors take the minimum over its rotations')
    half_sets: Annotated[list[Literal['emc', 'mtip']], AfterValidator(_unique)] = Field([], json_schema_extra={'uniqueItems': True}, description='methods also reconstructed and phased from each half of the frames (even, odd; spiflow.halfsets) for the half-set FSC (resolution at 0.143, Rosenthal & Henderson 2003); needs no truth, costs about one more reconstruction per method')



class CrystalsSettings(Section):
    """Complex Bragg-CDI objects (spiflow.bragg): faceted fcc nanocrystals with a displacement field, phi = 2 pi g.u, on an odd n^3 grid oversampled at least twice per axis; their noisy 3D intensities around the Bragg peak"""
    n: Annotated[int, Field(ge=9), AfterValidator(_odd), WithJsonSchema({'type': 'integer', 'minimum': 9, 'not': {'multipleOf': 2}})] = Field(33, description='odd side of the real- and reciprocal-space grids, voxels (2^k + 1 suits the stride-2 network of ae3d)')
    voxel_angstrom: float = Field(10.0, gt=0, description='real-space voxel size, angstrom (dq = 1 / (n voxel), 1/angstrom)')
    size_range_voxels: list[Annotated[float, Field(gt=0)]] = Field([4.0, 6.0], min_length=2, max_length=2, description='[low, high] of the crystal size R (centre to {100} facet at most), voxels; the particle must fit n/2 (2 * 1.25 * high + 1 <= n / 2)')
    hkl: list[int] = Field([1, 1, 1], min_length=3, max_length=3, description='Miller indices of the Bragg reflection')
    lattice_angstrom: float = Field(4.078, gt=0, description='cubic lattice constant (gold); g = hkl / a, 1/angstrom')
    max_displacement_angstrom: float = Field(0.8, ge=0, description='strain gradient: the largest |u.g_hat| over a particle is drawn from U[0, this], angstrom (phase 2 pi |g| u)')
    dislocations: int = Field(0, ge=0, description='screw dislocations per particle (g.b = 1: a 2 pi phase vortex each)')
    photons: float = Field(1.0e7, gt=0, description='expected photons of one 3D intensity (sum over the grid) before Poisson noise')
    beam_stop_radius_voxels: float = Field(0.0, ge=0, description='missing data: ball of this radius around the Bragg peak (0: none)')
    gap_width_voxels: float = Field(0.0, ge=0, description='missing data: detector-gap slab |i_x - n//2 - gap_offset| < width / 2 (0: none)')
    gap_offset_voxels: int = Field(3, description='offset of the detector gap from the peak along x, voxels')


#: the iterative phasing baselines of ae3d, by name (spiflow.ae3d.ITERATIVE_BASELINES gives
#: each one's schedule): support-only HIO or RAAR cycles with shrinkwrap, then ER
ITERATIVE_ALGORITHMS = ("HIO/ER", "RAAR/ER")


class AE3DTrackingSettings(Section):
    """Latent tracking of a slowly changing crystal by bounded extremum seeking (spiflow.estrack; rules ae3d_series, ae3d_track): a series of frames of one crystal (spiflow.bragg.simulate_series, seed dataset.seed + 2: not a training object) whose strain grows; per frame the untuned encoder, the ES-tracked latent (decoder fixed, no labels, no retraining), each of them followed by one refinement cycle, and iterative phasing"""
    frames: int = Field(20, ge=1, description='frames T of the series')
    displacement_range_angstrom: list[Annotated[float, Field(ge=0)]] = Field([0.1, 0.8], min_length=2, max_length=2, description='[first, last] frame of the largest displacement u_max along g_hat, angstrom, ramped linearly over the frames (phase 2 pi |g| u)')
    radius_range_voxels: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] | None = Field(None, description='[first, last] frame of the crystal size R, voxels, ramped linearly (null: fixed at the middle of ae3d.crystals.size_range_voxels)')
    photons: float | None = Field(None, gt=0, description='expected photons of one frame before Poisson noise (null: ae3d.crystals.photons)')
    steps: int = Field(200, ge=1, description='ES steps per frame (each one decode of the network)')
    alpha: float = Field(0.05, gt=0, description='ES alpha: the rate of latent component i is bounded by sqrt(alpha omega_i), its dither amplitude is sqrt(alpha / omega_i) (about 0.3 at omega 0.5; the default network\'s latents spread about 0.9 across crystals; alpha 1, dither 1.4, suited the n = 17 convolutional network of config/ae3d.yaml and made the default network worse: README)')
    gain: float = Field(40.0, gt=0, description='ES gain k on the cost divided by its value at the frame\'s start (measured on one frame of the n = 17 network: alpha 1, k 40 lowered C 0.228 -> 0.163 in 300 steps; alpha 0.005, k 5 did not move it)')
    steps_per_period: int = Field(10, ge=2, description='ES steps (dt = 1) per dither period of the fastest component: omega_max = 2 pi / steps_per_period; the others down to 0.55 omega_max')
    iterative_algorithm: Literal[ITERATIVE_ALGORITHMS] = Field('RAAR/ER', description='iterative phasing per frame, a key of spiflow.ae3d.ITERATIVE_BASELINES: HIO:50,ER:10 or RAAR:50,ER:10 with shrinkwrap per cycle, then 30 ER (RAAR/ER: the stronger on these crystals; HIO/ER before 2026-12-04)')
    refine_algorithm: Literal[ITERATIVE_ALGORITHMS] | None = Field('RAAR/ER', description='also per frame: the untuned encoder and the ES-tracked latent each followed by one cycle of this iterative phasing (spiflow.ae3d.refine_cycle); null: no such rows')
    iterative_cycles: int = Field(2, ge=1, description='iterative phasing per frame (iterative_algorithm): cycles')
    iterative_restarts: int = Field(2, ge=1, description='iterative phasing per frame: restarts from random phases (the best by Fourier error is kept)')


class AE3DSettings(Section):
    """Method ae3d (spiflow.ae3d): a 3D convolutional autoencoder from a log-scaled intensity to the complex density (amplitude, phase), trained on simulated crystals (supervised, twin-invariant) and fine-tunable without truth through the Fourier-modulus loss"""
    crystals: CrystalsSettings = Field(default_factory=CrystalsSettings)
    n_train: int = Field(1500, ge=1, description='simulated training objects (seed dataset.seed)')
    n_test: int = Field(20, ge=1, description='held-out objects (seed dataset.seed + 1)')
    channels: int = Field(12, ge=1, description='channels of the first encoder level (doubled at each of the 3 stride-2 levels)')
    latent_dim: int = Field(64, ge=1, description='size of the latent vector')
    epochs: int = Field(20, ge=1, description='total epochs; a resumed run continues up to it (the learning-rate schedule spans it: change it and the run restarts its schedule from the checkpoint)')
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.001, gt=0, description='Adam learning rate, cosine decay to lr / 100')
    physics_weight: float = Field(0.1, ge=0, description='weight of the Fourier-modulus (label-free) loss added to the supervised loss')
    phase_head: Literal['convolutional', 'strain'] = Field('strain', description='convolutional: the phase from the decoder\'s convolutional head (pi tanh). strain: the phase of a strain gradient, r^T K r (K symmetric, rad per voxel^2), the network regressing the sign-free outer product of K\'s six entries and the twin sign chosen per object by the Fourier-modulus error (spiflow.ae3d)')
    strain_weight: float = Field(0.3, gt=0, description='strain head: weight of the strain loss (the sign-free M = k k^T against the fitted forms, k in units of its RMS entry) beside the amplitude loss (README: 0.3 kept the phase of weight 1 and improved the amplitude, FSC 0.61 -> 0.73)')
    augment: bool = Field(True, description='train on random images of each batch under the signed axis permutations of the cube that leave the measured mask unchanged (rotations and inversions: the crystals\' distribution is invariant under them)')
    finetune_epochs: int = Field(0, ge=0, description='label-free epochs on the test intensities after training (physics loss only)')
    refine_iterations: int = Field(50, ge=0, description='ER iterations of "network + refinement" (support from the network, shrinkwrap off)')
    tracking: AE3DTrackingSettings = Field(default_factory=AE3DTrackingSettings)


class Config(Section):
    """The whole configuration of a run: every section, each with its defaults."""

    run: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$", description="outputs go under results/RUN/")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
                        description="torch device for every numerical stage; auto = CUDA when available")
    sample: SampleSettings = Field(default_factory=SampleSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    cxi: CXISettings = Field(default_factory=CXISettings)
    euxfel: EuXFELSettings = Field(default_factory=EuXFELSettings)
    beam: BeamSettings = Field(default_factory=BeamSettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    simulate: SimulateSettings = Field(default_factory=SimulateSettings)
    reconstruction: ReconstructionSettings = Field(default_factory=ReconstructionSettings)
    emc: EMCSettings = Field(default_factory=EMCSettings)
    mtip: MTIPSettings = Field(default_factory=MTIPSettings)
    selfsup: SelfSupSettings = Field(default_factory=SelfSupSettings)
    vae: VAESettings = Field(default_factory=VAESettings)
    phase: PhasingSettings = Field(default_factory=PhasingSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)
    ae3d: AE3DSettings = Field(default_factory=AE3DSettings)


def settings(config: dict) -> Config:
    """The typed settings of a (partial) config dict, defaults filled in.

    Raises ValueError whose message names every offending key path (e.g. ``emc.num_div``).
    """
    from pydantic import ValidationError

    try:
        return Config.model_validate(config)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()]
        raise ValueError("invalid configuration:\n" + "\n".join(lines)) from None


def defaults() -> dict:
    """Every default, as a config dict (what ``config/config.yaml`` lists)."""
    return Config().model_dump()


def _inline(node: Any, defs: dict) -> Any:
    """The pydantic schema with every ``$ref`` replaced by its definition, titles dropped and
    ``anyOf [X, null]`` written as ``type: [X, "null"]`` where X is a plain type."""
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = _inline(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        return {**ref, **{k: _inline(v, defs) for k, v in node.items() if k != "$ref"}}
    out = {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    alts = out.get("anyOf")
    if alts and len(alts) == 2 and {"type": "null"} in alts:
        other = next(a for a in alts if a != {"type": "null"})
        if set(other) == {"type"} or (set(other) <= {"type", "exclusiveMinimum", "minimum", "maximum",
                                                    "exclusiveMaximum", "minLength"} and "type" in other):
            del out["anyOf"]
            out = {**other, **out, "type": [other["type"], "null"]}
        elif "enum" in other and set(other) <= {"enum", "type"}:
            del out["anyOf"]
            out = {**out, "enum": [*other["enum"], None]}
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False
        out.pop("required", None)
    return out


def json_schema() -> dict:
    """The JSON schema (draft 2020-12) of :class:`Config`, with every section inlined and
    defaulting to ``{}`` so that Snakemake's validator fills every default."""
    raw = Config.model_json_schema()
    schema = _inline(raw, raw.get("$defs", {}))
    for sub in schema["properties"].values():
        if sub.get("type") == "object":
            sub["default"] = {}
            for inner in sub["properties"].values():
                if inner.get("type") == "object":
                    inner["default"] = {}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "spiflow configuration",
            "description": "GENERATED from spiflow.settings by `python -m spiflow.settings`: do not edit. Every key "
                           "with its default; config/config.yaml lists the same defaults (tested).",
            **schema}


def schema_text() -> str:
    """:func:`json_schema` as the YAML text of ``config.schema.yaml``."""
    return yaml.safe_dump(json_schema(), sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":  # python -m spiflow.settings [--check]: write (or check) config.schema.yaml
    if sys.argv[1:] == ["--check"]:
        sys.exit(0 if SCHEMA_PATH.read_text() == schema_text() else "config.schema.yaml is stale: "
                 "run python -m spiflow.settings")
    SCHEMA_PATH.write_text(schema_text())
