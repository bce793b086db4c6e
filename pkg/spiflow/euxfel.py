"""European XFEL runs in: corrected AGIPD-1M data of SPB/SFX → a patterns store of hits.

**Data** (read with ``extra_data``: ``RunDirectory``, ``components.AGIPD1M``): a run
directory of corrected (CORR) files, per module the source
``DETECTOR/CORR/<m>CH0:xtdf`` (older runs: ``/DET/``) with ``image.data`` (frames, 512,
128) float32, the deposited energy per pixel in **keV**, ``image.mask`` (frames, 512, 128)
uint32 (EuXFEL's bad-pixel flags: any set bit marks the pixel bad in that frame),
``image.trainId``, ``image.pulseId`` and ``image.cellId`` (the memory cell, 0–351).
Modules are read one at a time for ``chunk_trains`` trains at once, so memory holds one
module of a few trains, never the run. Trains in which a selected module has no data are
skipped (``AGIPD1M(min_modules=all)``).

**Geometry** (``extra_geom.AGIPD_1MGeometry``): every pixel centre in metres, beam along
+z through the origin of the detector plane, x horizontal (left looking downstream), y up:
spiflow's frame (docs/conventions.md). The sample sits at ``z = −distance``: positions are
the geometry's plus ``(0, 0, distance_m)``. q and pixel factor (solid angle × polarisation)
come from :func:`spiflow.formats.pixel_q_and_factor` tile by tile (each of the 8 tiles of
64 × 128 pixels per module with its own edge vectors ``ss_vec``, ``fs_vec``), so the
tiling, gaps and any tilt are exact. Polarisation: horizontal (``"x"``; EuXFEL's SASE1
planar undulators).

**Layout of the store.** The modules are stacked: pixel (y, x) of the store is module
slot ``k = y // (512 / b)`` (the k-th of the sorted module numbers, attrs
``module_numbers``), slow-scan rows ``(y mod 512/b) · b … + b − 1``, fast-scan columns
``x · b … + b − 1``, for the binning b (``binning``; 1 = one pixel each). A stored pixel
sums the photons of the valid AGIPD pixels of its b × b block (blocks never straddle an
ASIC); its q is that of their mean position, its pixel factor the sum of theirs. The
image is not a picture of the detector: q, valid and pixel_factor carry the geometry, which
is all that the reconstructions use.

**Mask** (``valid``): a stored pixel is valid when at least one of its AGIPD pixels is
good in every frame of the run: finite data and mask 0 in every frame (a static mask, as
the store needs), not on an ASIC's outer row or column (``mask_asic_edges``), not within
``beam_stop_radius_m`` of the beam axis.

**Photons** (:func:`photons_from_energy`): ``n = round(E / E_photon)`` and ``n = 0`` where
``E < threshold · E_photon`` (E in keV, E_photon = photon_energy_ev / 1000). Integrating
detectors count photons by thresholding the calibrated signal offline (Becker et al.,
"The single photon sensitivity of the Adaptive Gain Integrating Pixel Detector",
arXiv:1203.5954); threshold 0.5 is plain rounding, higher values trade missed single
photons for fewer noise counts. Negative and non-finite values give 0.

**Hits** (:func:`hit_threshold`): the score of a frame is its lit pixels, AGIPD pixels with
≥ 1 photon that are good in that frame (optionally with ``|q|`` in
``lit_q_range_inv_angstrom``). A frame is a hit when its score exceeds the threshold: fixed,
or ``median + k · MAD`` of all frames' scores (MAD the unscaled median absolute deviation),
the robust outlier rule of lit-pixel hit finding in EuXFEL SPI analyses (e.g. Ayyer et al.,
Optica 8, 15 (2021)). Pass 1 scores every frame; pass 2 reads the trains with hits again and
writes only the hits.

Per-frame variables of the store (dims ``frame``): ``train_id`` uint64, ``pulse_id``
uint64, ``cell_id`` uint16, ``lit_pixels`` int64, ``run_frame`` int64 (the frame's row in
the hits table).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from . import __version__
from .detector import CLASSICAL_ELECTRON_RADIUS_ANGSTROM, reconstruction_grid, wavelength_angstrom
from .formats import pixel_q_and_factor
from .io import atomic_path
from .plots import new_figure, save_figure
from .settings import EuXFELSettings
from .stores import write_patterns

N_MODULES, MODULE_SHAPE = 16, (512, 128)  # AGIPD-1M: 16 modules of slow scan × fast scan pixels
ASIC = 64  # AGIPD ASIC side, pixels (8 × 2 ASICs per module)
POLARIZATION = "x"
TABLE_COLUMNS = ["run_frame", "train_id", "pulse_id", "cell_id", "lit_pixels", "threshold", "hit", "patterns_frame"]


def photons_from_energy(energy_kev: np.ndarray, photon_energy_ev: float, threshold: float = 0.5) -> np.ndarray:
    """Photon counts (same shape, int32) of calibrated energies in keV (module docstring):
    ``round(E / E_photon)`` (halves up), 0 where ``E < threshold · E_photon`` or E is not
    finite, at most 10⁹; so for thresholds ≥ 0.5 a finite pixel holds ≥ 1 photon exactly
    when ``E ≥ threshold · E_photon``. Raises ValueError naming ``photon_energy_ev`` when
    it is not > 0."""
    if not photon_energy_ev > 0:
        raise ValueError(f"euxfel.photon_energy_ev must be > 0 eV, got {photon_energy_ev}")
    x = np.asarray(energy_kev, dtype=np.float32) * np.float32(1e3 / photon_energy_ev)
    keep = (x >= threshold) & np.isfinite(x)
    x += 0.5
    np.floor(x, out=x)
    np.minimum(x, 1e9, out=x)
    x[~keep] = 0
    return x.astype(np.int32)


def hit_threshold(scores: np.ndarray, mode: str = "mad", k: float = 5.0, fixed: int | None = None) -> float:
    """Lit-pixel threshold: ``fixed`` (mode ``"fixed"``) or ``median + k · MAD`` of the
    scores (mode ``"mad"``); a hit has a score above it. Raises ValueError for mode
    ``"fixed"`` without ``fixed``, an unknown mode or no scores."""
    if mode == "fixed":
        if fixed is None:
            raise ValueError("euxfel.hit_threshold must be set when euxfel.hit_mode is 'fixed'")
        return float(fixed)
    if mode != "mad":
        raise ValueError(f"euxfel.hit_mode must be 'mad' or 'fixed', got {mode!r}")
    if len(scores) == 0:
        raise ValueError("no frames to find hits in")
    med = float(np.median(scores))
    return med + k * float(np.median(np.abs(np.asarray(scores) - med)))


def _binned(a: np.ndarray, b: int) -> np.ndarray:
    """Sum b × b blocks of the two axes after the first: (M, 512, 128, …) → (M, 512/b, 128/b, …)."""
    m, ny, nx = a.shape[:3]
    return a.reshape(m, ny // b, b, nx // b, b, *a.shape[3:]).sum(axis=(2, 4))


def _geometry(s: EuXFELSettings, geometry):
    """(geometry object, its description) from the argument, ``geometry_path`` or the default."""
    from extra_geom import AGIPD_1MGeometry

    if geometry is not None:
        return geometry, type(geometry).__name__
    if s.geometry_path is None:
        return AGIPD_1MGeometry.example(), "extra_geom AGIPD_1MGeometry.example()"
    p = Path(s.geometry_path)
    if not p.is_file():
        raise FileNotFoundError(f"euxfel.geometry_path: geometry file not found: {p}")
    try:
        return AGIPD_1MGeometry.from_crystfel_geom(str(p)), str(p)
    except Exception as exc:  # extra_geom/cfelpyutils raise many types for a bad file
        raise ValueError(f"euxfel.geometry_path {p}: not an AGIPD-1M CrystFEL geometry: {exc}") from exc


def module_pixels(geom, modules: list[int], distance_m: float, wavelength: float, where: str = "geometry"):
    """Pixel positions (M, 512, 128, 3) m, q (M, 512, 128, 3) Å⁻¹ and pixel factor (M, 512,
    128) sr of the listed modules of an extra_geom AGIPD-1M geometry, the sample at
    distance_m before its z = 0 plane (tile by tile: module docstring). Raises ValueError
    naming ``where`` when the geometry is not of 16 modules of 512 × 128 pixels."""
    shape = tuple(getattr(geom, "expected_data_shape", ()))
    if shape != (N_MODULES, *MODULE_SHAPE):
        raise ValueError(f"{where}: data shape {shape}, but AGIPD-1M data are {(N_MODULES, *MODULE_SHAPE)}")
    pos = geom.get_pixel_positions()[modules] + np.array([0.0, 0.0, distance_m])
    q, pf = np.empty_like(pos), np.empty(pos.shape[:3])
    for k, m in enumerate(modules):
        tiles = geom.modules[m]
        rows = MODULE_SHAPE[0] // len(tiles)
        for t, tile in enumerate(tiles):
            sl = slice(t * rows, (t + 1) * rows)
            q[k, sl], pf[k, sl] = pixel_q_and_factor(pos[k, sl], np.array([tile.ss_vec, tile.fs_vec]), wavelength,
                                                     POLARIZATION)
    return pos, q, pf


def _open_detector(s: EuXFELSettings):
    """extra_data's AGIPD1M of the run, every selected module present (errors name the run)."""
    from extra_data import RunDirectory
    from extra_data.components import AGIPD1M

    run_path = Path(s.path)
    if not run_path.is_dir():
        raise FileNotFoundError(f"euxfel.path: run directory not found: {run_path}")
    try:
        run = RunDirectory(str(run_path))
    except Exception as exc:
        raise ValueError(f"euxfel.path {run_path}: not a readable EuXFEL run: {exc}") from exc
    try:
        probe = AGIPD1M(run, detector_name=s.detector_name, modules=s.modules, raw=False)
    except (KeyError, ValueError) as exc:  # extra_data.SourceNameError is a KeyError
        raise ValueError(f"euxfel.path {run_path}: no corrected AGIPD data of euxfel.detector_name "
                         f"{s.detector_name!r}: {exc} (sources: {sorted(run.instrument_sources)[:8]})") from exc
    missing = sorted(set(s.modules or ()) - set(probe.modno_to_source))
    if missing:
        raise ValueError(f"euxfel.modules: modules {missing} are not in the run {run_path}")
    return AGIPD1M(run, detector_name=s.detector_name, modules=s.modules, raw=False,
                   min_modules=len(probe.modno_to_source))


def _blocks(det, chunk_trains: int, train_ids=None):
    """Yield (selection, modules) for every chunk of trains (all, or those in train_ids)."""
    from extra_data import by_id

    ids = np.asarray(det.train_ids if train_ids is None else train_ids)
    for i in range(0, len(ids), chunk_trains):
        sel = det.select_trains(by_id[ids[i:i + chunk_trains].tolist()])
        yield sel, sel["image.data"].modno_to_keydata, sel["image.mask"].modno_to_keydata


def plot_hit_scores(scores: np.ndarray, threshold: float, path) -> None:
    """Histogram of the frames' lit-pixel counts (log frequency) with the hit threshold marked, as PNG."""
    fig, axes = new_figure((6.0, 4.0))
    ax = axes[0, 0]
    top = max(float(np.max(scores)) if len(scores) else 1.0, threshold, 1.0)
    ax.hist(scores, bins=np.linspace(0, top * 1.02, 61), color="steelblue", log=True)
    ax.axvline(threshold, color="crimson", ls="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("lit pixels per frame")
    ax.set_ylabel("frames")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def import_euxfel(s: EuXFELSettings, patterns, table_csv, histogram_png=None, *, grid_oversampling: float = 1.0,
                  chunk_frames: int = 250, geometry=None) -> dict:
    """Convert the hits of a EuXFEL AGIPD-1M run into a patterns store (module docstring).

    s: the ``euxfel`` settings (``path``, ``distance_m`` and ``photon_energy_ev`` required).
    Writes ``patterns`` (:func:`spiflow.stores.write_patterns`, chunks of ``chunk_frames``
    frames, grid from :func:`spiflow.detector.reconstruction_grid` with
    ``grid_oversampling``; fluence unknown: 1, ``fluence_known`` False), the CSV
    ``table_csv`` (one row per frame of the run, :data:`TABLE_COLUMNS`; ``patterns_frame``
    −1 for non-hits) and, when given, the histogram ``histogram_png``
    (:func:`plot_hit_scores`). geometry: an extra_geom geometry object instead of
    ``geometry_path``. Returns a summary (frames, hits, threshold, shape, grid, seconds).

    Raises FileNotFoundError for a missing run directory or geometry file, ValueError naming
    the key or the path for a missing setting, a run without corrected data of the
    detector, modules absent from the run, a geometry that is not AGIPD-1M shaped, an
    all-masked detector or a run without hits (table and histogram are written first). The
    store appears only when complete.
    """
    t0 = time.perf_counter()
    for key in ("path", "distance_m", "photon_energy_ev"):
        if getattr(s, key) is None:
            raise ValueError(f"euxfel.{key} must be set to import a EuXFEL run")
    if s.hit_mode == "fixed" and s.hit_threshold is None:
        raise ValueError("euxfel.hit_threshold must be set when euxfel.hit_mode is 'fixed'")
    geom, geom_name = _geometry(s, geometry)
    det = _open_detector(s)
    modules = sorted(det.modno_to_source)
    lam = wavelength_angstrom(s.photon_energy_ev)
    pos, q, pf = module_pixels(geom, modules, s.distance_m, lam, f"geometry {geom_name}")
    static_ok = np.ones(pos.shape[:3], bool)
    if s.mask_asic_edges:
        iy, ix = np.arange(MODULE_SHAPE[0]) % ASIC, np.arange(MODULE_SHAPE[1]) % ASIC
        static_ok &= ~((iy == 0) | (iy == ASIC - 1))[:, None] & ~((ix == 0) | (ix == ASIC - 1))[None, :]
    static_ok &= np.hypot(pos[..., 0], pos[..., 1]) >= s.beam_stop_radius_m
    counted = static_ok.copy()
    if s.lit_q_range_inv_angstrom is not None:
        qn = np.linalg.norm(q, axis=-1)
        counted &= (qn >= s.lit_q_range_inv_angstrom[0]) & (qn <= s.lit_q_range_inv_angstrom[1])

    # pass 1: score every frame, collect the frames' ids and the pixels bad in any frame
    lit_kev = np.float32(s.photon_threshold * s.photon_energy_ev / 1e3)  # >= 1 photon (photons_from_energy)
    meta, scores, ever_bad = [], [], np.zeros(pos.shape[:3], bool)
    for sel, data, mask in _blocks(det, s.chunk_trains):
        kd = sel["image.data"]
        meta.append(np.stack([kd.train_id_coordinates(), kd.pulse_id_coordinates(), kd.cell_id_coordinates()], 1))
        lit = np.zeros(len(meta[-1]), np.int64)
        for k, m in enumerate(modules):
            e, bad = data[m].ndarray(), mask[m].ndarray() != 0
            bad |= ~np.isfinite(e)
            ever_bad[k] |= bad.any(axis=0)
            lit += ((e >= lit_kev) & ~bad & counted[k]).sum(axis=(1, 2))
        scores.append(lit)
    meta = np.concatenate(meta).astype(np.uint64)
    scores = np.concatenate(scores)
    threshold = hit_threshold(scores, s.hit_mode, s.hit_k, s.hit_threshold)
    hit = scores > threshold
    table = pd.DataFrame({"run_frame": np.arange(len(scores)), "train_id": meta[:, 0], "pulse_id": meta[:, 1],
                          "cell_id": meta[:, 2], "lit_pixels": scores, "threshold": threshold, "hit": hit,
                          "patterns_frame": np.where(hit, np.cumsum(hit) - 1, -1)})
    with atomic_path(table_csv) as tmp:
        table.to_csv(tmp, index=False)
    if histogram_png is not None:
        plot_hit_scores(scores, threshold, histogram_png)
    n_hits = int(hit.sum())
    if n_hits == 0:
        raise ValueError(f"euxfel.path {s.path}: no hits among {len(scores)} frames (lit-pixel threshold "
                         f"{threshold:g}; see {table_csv})")

    # the stored pixels: b × b blocks of the good pixels (module docstring)
    b = s.binning
    good = static_ok & ~ever_bad
    count = _binned(good.astype(np.int64), b)
    mean_pos = np.where(count[..., None] > 0, _binned(pos * good[..., None], b) / np.maximum(count, 1)[..., None],
                        _binned(pos, b) / b ** 2)
    ny, nx = len(modules) * MODULE_SHAPE[0] // b, MODULE_SHAPE[1] // b
    valid = (count > 0).reshape(ny, nx)
    q_store = pixel_q_and_factor(mean_pos, np.eye(3)[:2], lam)[0].reshape(ny, nx, 3)  # q: independent of the basis
    pf_store = _binned(pf * good, b).reshape(ny, nx)
    if not valid.any():
        raise ValueError(f"euxfel.path {s.path}: every pixel is masked (data mask, ASIC edges, beam stop)")
    grid = reconstruction_grid(q_store, valid, grid_oversampling)
    attrs = {
        "photon_energy_ev": float(s.photon_energy_ev), "wavelength_angstrom": lam, "distance_m": float(s.distance_m),
        "pixel_size_m": float(geom.pixel_size) * b, "polarization": POLARIZATION,
        "nominal_fluence_photons_per_angstrom2": 1.0, "fluence_known": False,
        "classical_electron_radius_angstrom": CLASSICAL_ELECTRON_RADIUS_ANGSTROM,
        "recon_grid_n": grid.n, "recon_grid_dq": grid.dq, "detector_shape": [ny, nx],
        "source_run": str(s.path), "detector_name": det.detector_name, "module_numbers": modules,
        "binning": b, "geometry": geom_name, "photon_threshold": s.photon_threshold,
        "hit_mode": s.hit_mode, "hit_threshold_lit_pixels": threshold, "frames_in_run": len(scores),
        "layout": "y = module slot * (512 / binning) + slow-scan row / binning, x = fast-scan column / binning",
        "spiflow_version": __version__,
    }

    # pass 2: the trains with hits again, their hits converted, binned and stored
    done, pending = 0, np.empty((0, ny, nx), np.int32)
    with write_patterns(patterns, valid, q_store, pf_store, attrs, n_hits, chunk_frames) as photons:
        root = zarr.open_group(photons.store, mode="a")
        for name, values in (("train_id", meta[hit, 0]), ("pulse_id", meta[hit, 1]),
                             ("cell_id", meta[hit, 2].astype(np.uint16)), ("lit_pixels", scores[hit]),
                             ("run_frame", np.flatnonzero(hit))):
            root.create_array(name, data=values, dimension_names=["frame"])
        for sel, data, _ in _blocks(det, s.chunk_trains, np.unique(meta[hit, 0])):
            h = hit[np.isin(meta[:, 0], sel.train_ids)]
            block = np.empty((int(h.sum()), len(modules), MODULE_SHAPE[0] // b, nx), np.int32)
            for k, m in enumerate(modules):
                e = data[m].ndarray()
                if len(e) != len(h):
                    raise ValueError(f"euxfel.path {s.path}: module {m} has {len(e)} frames in trains "
                                     f"{sel.train_ids[0]}..{sel.train_ids[-1]}, the first pass read {len(h)}")
                block[:, k] = _binned(photons_from_energy(e[h], s.photon_energy_ev, s.photon_threshold) * good[k], b)
            pending = np.concatenate([pending, block.reshape(len(block), ny, nx)])
            if len(pending) >= chunk_frames or done + len(pending) == n_hits:  # whole Zarr chunks, then the rest
                n = len(pending) if done + len(pending) == n_hits else len(pending) // chunk_frames * chunk_frames
                photons[done:done + n] = pending[:n]
                done, pending = done + n, pending[n:]
    seconds = time.perf_counter() - t0
    return {"frames": len(scores), "hits": n_hits, "threshold": threshold, "shape": (ny, nx), "grid_n": grid.n,
            "grid_dq": grid.dq, "modules": modules, "seconds": seconds, "frames_per_second": len(scores) / seconds}


__all__ = ["import_euxfel", "photons_from_energy", "hit_threshold", "module_pixels", "plot_hit_scores",
           "TABLE_COLUMNS"]
