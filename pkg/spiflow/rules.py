"""What the Snakefile needs, with the standard library alone (no torch, numpy, xarray,
numba or pydantic), so that a lint, a dry run or a DAG picture starts in seconds.

:func:`layout` is the one place that names every file of a run (docs/conventions.md, Stores);
:func:`check_run` and :func:`check_sample` stop a run at start-up on settings that cannot
work, naming the config key; :func:`stage_config` is the part of the configuration each
stage reads: the rules declare it as ``params:`` (so Snakemake reruns a job when it
changes) and pass it, not the whole configuration, to the ``spiflow.pipeline.stage_*``
functions; the ``spiflow`` command builds it the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")  # generated from spiflow.settings

_SIMULATE = ("sample", "dataset", "beam", "detector", "simulate", "reconstruction.grid_oversampling", "device")
# Config keys each stage reads (a section, or "section.key"), by the rule that runs it;
# None: the whole configuration (summary writes it to evaluate/config.yaml).
STAGE_KEYS: dict[str, tuple[str, ...] | None] = {
    "simulate": _SIMULATE,
    "simulate_shard": _SIMULATE,
    "import_cxi": ("cxi", "reconstruction.grid_oversampling", "dataset.chunk_frames"),
    "import_euxfel": ("euxfel", "reconstruction.grid_oversampling", "dataset.chunk_frames"),
    "split_halves": ("dataset.chunk_frames",),
    "recon_truth": (),
    "orient_emc": ("emc", "dataset.seed", "device"),
    "orient_mtip": ("mtip", "dataset.seed", "device"),
    "train_selfsup": ("selfsup", "dataset.seed", "device"),
    "train_vae": ("vae", "dataset.seed", "device"),
    "phase": ("phase", "dataset.seed", "device"),
    "evaluate": ("evaluate.align_num_div", "evaluate.symmetry"),
    # method emc with emc.models > 1: + every model phased (spiflow.latent.evaluate_models)
    "evaluate_models": ("evaluate.align_num_div", "evaluate.symmetry", "phase", "dataset.seed", "device"),
    # + the latent analysis (spiflow.latent.evaluate_latent): k-means states phased, a traversal
    "evaluate_vae": ("evaluate.align_num_div", "evaluate.symmetry", "vae.clusters", "vae.traversal_steps",
                     "phase", "dataset.seed", "device"),
    "summary": None,
    "ae3d_simulate": ("ae3d.crystals", "ae3d.n_train", "ae3d.n_test", "dataset.seed", "dataset.chunk_frames"),
    # "!key": that key left out (ae3d.tracking changes neither the network nor its evaluation)
    "ae3d_train": ("ae3d", "!ae3d.tracking", "dataset.seed", "device"),
    "ae3d_evaluate": ("ae3d", "!ae3d.tracking"),
    "ae3d_series": ("ae3d.crystals", "ae3d.tracking.frames", "ae3d.tracking.displacement_range_angstrom",
                    "ae3d.tracking.radius_range_voxels", "ae3d.tracking.photons", "dataset.seed",
                    "dataset.chunk_frames"),
    "ae3d_track": ("ae3d.tracking", "device"),
}


def stage_config(config: dict, rule: str) -> dict:
    """The part of ``config`` that the stage of Snakemake rule ``rule`` reads
    (:data:`STAGE_KEYS`), nested as in ``config`` (e.g. ``{"emc": {...}, "dataset":
    {"seed": 3}, "device": "cpu"}``), a deep copy; a key written ``"!section.key"`` is
    removed from what the keys before it copied. ``orient_half`` runs ``orient_emc`` or
    ``orient_mtip``, ``phase_half`` ``phase``: pass those names. Raises ValueError for a rule
    not in :data:`STAGE_KEYS`, KeyError for a key missing from ``config``."""
    if rule not in STAGE_KEYS:
        raise ValueError(f"no stage configuration for rule {rule!r}; known: {sorted(STAGE_KEYS)}")
    keys = STAGE_KEYS[rule]
    if keys is None:
        return copy.deepcopy(config)
    out: dict = {}
    for key in keys:
        drop = key.startswith("!")
        *sections, name = key.lstrip("!").split(".")
        src, dst = config, out
        for s in sections:
            src, dst = src[s], dst.setdefault(s, {})
        if drop:
            if name not in src:  # a key missing from config, as for the others
                raise KeyError(key)
            dst.pop(name, None)
        else:
            dst[name] = copy.deepcopy(src[name])
    return out


def layout(results: str | Path, run: str) -> dict[str, str]:
    """Paths of a run's files (docs/conventions.md, Stores); ``{method}`` is left as a placeholder."""
    r = Path(results) / run
    return {k: str(r / v) for k, v in {
        "patterns": "simulate/patterns.zarr",
        "truth": "simulate/truth.zarr",
        "hits_csv": "simulate/hits.csv",  # euxfel.path: every frame's lit-pixel count and hit flag
        "hits_png": "simulate/hits.png",
        "shard": "simulate/shards/{shard}.zarr",  # simulate.shards > 1, removed once gathered
        "half_patterns": "simulate/half{half}/patterns.zarr",  # evaluate.half_sets, temporary
        "intensity": "recon/{method}/intensity.zarr",
        "orientations": "recon/{method}/orientations.zarr",
        "emc_log": "recon/emc/emc_log.csv",
        "emc_checkpoint": "recon/emc/checkpoint.pt",
        "recon_log": "recon/{method}/log.csv",  # mtip, mtip_selfsup, selfsup, vae
        "recon_checkpoint": "recon/{method}/checkpoint.pt",
        "latent": "recon/vae/latent.zarr",
        "vae_decoder": "recon/vae/decoder.pt",
        "half_intensity": "recon/{method}/half{half}/intensity.zarr",  # evaluate.half_sets
        "half_orientations": "recon/{method}/half{half}/orientations.zarr",
        "half_log": "recon/{method}/half{half}/log.csv",
        "half_checkpoint": "recon/{method}/half{half}/checkpoint.pt",
        "density": "phase/{method}/density.zarr",
        "half_density": "phase/{method}/half{half}/density.zarr",
        "half_density_mrc": "phase/{method}/half{half}/density.mrc",
        "half_phase_log": "phase/{method}/half{half}/phase_log.csv",
        "density_mrc": "phase/{method}/density.mrc",
        "phase_log": "phase/{method}/phase_log.csv",
        "fsc": "evaluate/{method}/fsc.csv",
        "metrics": "evaluate/{method}/metrics.json",
        "prtf": "evaluate/{method}/prtf.csv",
        "halfset_fsc": "evaluate/{method}/halfset_fsc.csv",
        "eval_dir": "evaluate/{method}",
        "eval_plot": "evaluate/{method}/{plot}.png",
        "vae_states": "evaluate/vae/states",
        "summary_plot": "evaluate/{plot}.png",
        "summary": "evaluate/summary.csv",
        "run_config": "evaluate/config.yaml",
        # method ae3d (spiflow.ae3d; target rule ae3d): Bragg-CDI crystals, network, comparison
        "ae3d_train_intensity": "ae3d/train/crystals.zarr",
        "ae3d_train_truth": "ae3d/train/crystals_truth.zarr",
        "ae3d_test_intensity": "ae3d/test/crystals.zarr",
        "ae3d_test_truth": "ae3d/test/crystals_truth.zarr",
        "ae3d_model": "ae3d/model.pt",
        "ae3d_checkpoint": "ae3d/checkpoint.pt",
        "ae3d_train_log": "ae3d/train_log.csv",
        "ae3d_results_csv": "ae3d/results.csv",
        "ae3d_results_md": "ae3d/results.md",
        "ae3d_slices": "ae3d/slices.png",
        # ae3d latent tracking (spiflow.estrack): the drifting series (intensity, truth apart), the tracking
        "ae3d_series_intensity": "ae3d/series/crystals.zarr",
        "ae3d_series_truth": "ae3d/series/crystals_truth.zarr",
        "ae3d_tracking_csv": "ae3d/tracking.csv",
        "ae3d_tracking_md": "ae3d/tracking.md",
        "ae3d_tracking_png": "ae3d/tracking.png",
    }.items()}


def sample_files(config: dict) -> list[str]:
    """Structure files the configured sample reads (the simulate rule's inputs)."""
    s = config["sample"]
    if s["kind"] == "structure":
        return [s["path"]]
    if s["kind"] == "interpolation":
        return [s["path"]] + [p for p in [s["interpolation"]["end_path"]] if p]
    if s["kind"] == "mixture":
        return list(s["mixture"]["paths"])
    return []


def check_sample(config: dict) -> None:
    """Fail fast (at workflow start) on a sample that cannot be built, without reading it:
    its structure files exist, ranges are ordered (low <= high), a mixture has at least two
    files and one fraction per file. Reading and matching the files is left to
    :func:`spiflow.simulate.build_sample`, which calls this first.
    Raises FileNotFoundError or ValueError whose message starts with the config key."""
    s = config["sample"]
    kind = s["kind"]
    files = [("path", s["path"])]
    if kind == "interpolation":
        o = s["interpolation"]
        if not o["t_range"][0] <= o["t_range"][1]:
            raise ValueError(f"sample.interpolation.t_range: low must be <= high, got {o['t_range']}")
        files.append(("interpolation.end_path", o["end_path"]))
    elif kind == "mixture":
        o = s["mixture"]
        if len(o["paths"]) < 2:
            raise ValueError(f"sample.mixture.paths: a mixture needs at least 2 structure files, got {o['paths']}")
        if o["fractions"] and (len(o["fractions"]) != len(o["paths"]) or sum(o["fractions"]) <= 0):
            raise ValueError(f"sample.mixture.fractions: need one weight >= 0 per path ({len(o['paths'])}), "
                             f"not all 0, got {o['fractions']}")
        files = [("mixture.paths", p) for p in o["paths"]]
    elif kind == "nanoparticles":
        o = s["nanoparticles"]
        for key in ("size_range_angstrom", "truncation_range"):
            if not o[key][0] <= o[key][1]:
                raise ValueError(f"sample.nanoparticles.{key}: low must be <= high, got {o[key]}")
        files = []
    for key, path in files:
        if not path:
            raise ValueError(f"sample.{key}: required for sample.kind {kind}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"sample.{key}: structure file not found: {path}")


def measured_source(config: dict) -> str | None:
    """The config key of the measured data the run imports instead of simulating:
    ``"cxi"`` (``cxi.path``), ``"euxfel"`` (``euxfel.path``) or None (simulated data, with a
    truth store)."""
    return "cxi" if config["cxi"]["path"] else "euxfel" if config["euxfel"]["path"] else None


def check_run(config: dict) -> None:
    """Fail fast (at workflow start) on settings that cannot work together, naming the keys:
    ``evaluate.half_sets`` must be among ``reconstruction.methods``; measured data come from
    at most one of ``cxi.path`` (a CXI file that must exist) and ``euxfel.path`` (a run
    directory that must exist, with ``euxfel.distance_m`` and ``euxfel.photon_energy_ev``
    set); with measured data (no truth) neither the ``truth`` oracle nor ``vae`` (its latent
    analysis compares with true conformations) may be among the methods. Without measured
    data, the sample (:func:`check_sample`). Raises ValueError or FileNotFoundError."""
    methods = config["reconstruction"]["methods"]
    extra = sorted(set(config["evaluate"]["half_sets"]) - set(methods))
    if extra:
        raise ValueError(f"evaluate.half_sets: {extra} not in reconstruction.methods {methods}")
    source = measured_source(config)
    if source is None:
        check_sample(config)
        return
    if config["cxi"]["path"] and config["euxfel"]["path"]:
        raise ValueError("cxi.path and euxfel.path are both set: measured data come from one of them")
    path = Path(config[source]["path"])
    if source == "cxi" and not path.is_file():
        raise FileNotFoundError(f"cxi.path: CXI file not found: {path}")
    if source == "euxfel":
        if not path.is_dir():
            raise FileNotFoundError(f"euxfel.path: run directory not found: {path}")
        for key in ("distance_m", "photon_energy_ev"):
            if config["euxfel"][key] is None:
                raise ValueError(f"euxfel.{key}: required with euxfel.path (a run holds no standard record of it)")
    bad = [m for m in methods if m in ("truth", "vae")]
    if bad:
        raise ValueError(f"reconstruction.methods: {bad} need simulated data (a truth), but {source}.path is set; "
                         f"use emc, mtip, selfsup, mtip_selfsup")


def shard_ranges(n_patterns: int, chunk_frames: int, shards: int) -> list[tuple[int, int]]:
    """Frame ranges ``[(i0, i1), …]`` of ``shards`` shards: contiguous, each of whole Zarr
    chunks of ``chunk_frames`` frames (the last chunk may be short), as even as whole chunks
    allow (shard k starts at chunk round(k · chunks / shards), halves to even). Raises
    ValueError naming ``simulate.shards`` when there are more shards than chunks."""
    chunks = -(-n_patterns // chunk_frames)
    if not 1 <= shards <= chunks:
        raise ValueError(f"simulate.shards = {shards} must be between 1 and the number of chunks, "
                         f"{chunks} (dataset.n_patterns / dataset.chunk_frames)")
    edges = [round(k * (chunks / shards)) * chunk_frames for k in range(shards)] + [chunks * chunk_frames]
    return [(a, min(b, n_patterns)) for a, b in zip(edges[:-1], edges[1:])]


def halfset_inputs(config: dict, P: dict, method: str) -> dict[str, str]:
    """The half-set intensity and density stores that rule evaluate reads for ``method``
    (keys ``half_intensity_1``, ``half_intensity_2``, ``half_density_1``, ``half_density_2``),
    or none when it is not in ``evaluate.half_sets``."""
    if method not in config["evaluate"]["half_sets"]:
        return {}
    return {f"half_{kind}_{h}": P[f"half_{kind}"].format(method=method, half=h)
            for kind in ("intensity", "density") for h in (1, 2)}


def vae_orientations_source(config: dict, P: dict) -> str:
    """The store whose quaternions and gains condition the VAE (``vae.orientations``):
    ``recon/<method>/orientations.zarr``, or the truth store for the ``truth`` ablation."""
    src = config["vae"]["orientations"]
    return P["truth"] if src == "truth" else P["orientations"].format(method=src)
