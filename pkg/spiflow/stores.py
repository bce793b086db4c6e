"""The stores of a run: the one module that writes them and reads them back.

This is the layout contract of the README's Outputs table. Units follow its Conventions:
lengths in Å, ``q = k_out − k_in`` in Å⁻¹ (no 2π), quaternions ``[w, x, y, z]`` (active,
frame i records ``I(R_iᵀ q)``), gain a per-frame multiplicative scale of the expected
counts, intensity ``|F(q)|²`` in electrons² on the odd cubic grid of
:class:`spiflow.grid.Grid` (axis ``q_axis``), density in e/Å³ on its real-space grid
(axis ``r_axis``, voxel ``1 / (n Δq)`` Å).

* ``simulate/patterns.zarr``: :func:`write_patterns`; read with :func:`open_patterns`,
  :class:`PhotonFrames`, :func:`grid_of`;
* ``simulate/truth.zarr``: :func:`write_truth`;
* ``recon/METHOD/intensity.zarr``: :func:`write_intensity`;
* ``recon/METHOD/orientations.zarr``: :func:`write_orientations`;
* ``phase/METHOD/density.zarr``: :func:`write_density`;
* ``ae3d/{train,test}/crystals.zarr`` and ``…/crystals_truth.zarr`` (Bragg-CDI objects of
  :mod:`spiflow.bragg`), and ``ae3d/series/crystals.zarr``, ``…/crystals_truth.zarr`` (the
  drifting series of :func:`spiflow.bragg.simulate_series`, one object per frame, for
  :mod:`spiflow.estrack`): :func:`write_crystals`, read with :func:`spiflow.io.open_dataset`;
* ``spiflow ae3d-phase --out PREFIX``: ``PREFIX.zarr`` (:func:`write_complex_density`) and
  ``PREFIX_amplitude.mrc``, ``PREFIX_phase.mrc`` (:func:`write_mrc`);
* MRC maps (``phase/METHOD/density.mrc``, ``evaluate/vae/states/state_K.mrc``):
  :func:`write_mrc`; read with :func:`read_mrc`.

Zarr stores are Zarr v3 with consolidated metadata, written into a temporary sibling and
renamed into place when complete (:func:`spiflow.io.atomic_path`); read them with
:func:`spiflow.io.open_dataset` (or ``xr.open_zarr``). The latent store
(``recon/vae/latent.zarr``) is :func:`spiflow.vae.latent_dataset`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

import mrcfile
import numpy as np
import xarray as xr
import zarr

from .grid import Grid
from .io import atomic_path, write_dataset

PIXEL_FACTOR_UNITS = "steradian (solid angle x polarisation factor)"


# ---------------------------------------------------------------------------- patterns

@contextlib.contextmanager
def write_patterns(path, valid: np.ndarray, q: np.ndarray, pixel_factor: np.ndarray, attrs: dict,
                   n_frames: int, chunk_frames: int, frame_index: np.ndarray | None = None):
    """Write a patterns store at ``path``: a context manager that yields its empty photons
    array for the caller to fill (``photons[i0:i1] = counts``); on leaving it the metadata
    are consolidated and the store renamed into place (an exception leaves nothing).
    valid (ny, nx) bool, q (ny, nx, 3) Å⁻¹, pixel_factor (ny, nx) sr; ``n_frames`` frames
    in chunks of ``chunk_frames``.

    Variables (dims, dtype, units):

    * ``photons (frame, y, x)`` int32, whole photons, 0 at invalid pixels; Zarr chunks of
      ``min(chunk_frames, n_frames)`` frames × the whole detector; attribute ``units: photons``;
    * ``valid (y, x)`` bool: pixels that hold data;
    * ``q (y, x, axis)`` float32, Å⁻¹, on the Ewald sphere, ``axis`` = ``qx, qy, qz``;
    * ``pixel_factor (y, x)`` float32, sr: solid angle × polarisation;
    * coordinates ``frame`` int64 (``frame_index``, default ``0 … n_frames − 1``; a half set
      keeps its source's indices), ``y``, ``x`` (pixel indices), ``axis``.

    ``attrs``, stored as given; readers need ``photon_energy_ev``, ``wavelength_angstrom``,
    ``distance_m``, ``pixel_size_m``, ``polarization``,
    ``nominal_fluence_photons_per_angstrom2`` (J, photons/Å²) and
    ``classical_electron_radius_angstrom`` (r_e; the model's ``W / (J r_e²)`` is electrons²),
    ``recon_grid_n``, ``recon_grid_dq`` (Å⁻¹; :func:`grid_of`). Writers add their own:
    :func:`spiflow.simulate.simulate` the detector, sample, seed and config
    (``frame_start`` in a shard store), :func:`spiflow.formats.import_cxi` the CXI geometry
    and source file, :func:`spiflow.halfsets.split_halves` ``half_set`` and ``source_patterns``.
    """
    ny, nx = valid.shape
    static = xr.Dataset(
        {"valid": (("y", "x"), valid), "q": (("y", "x", "axis"), q.astype(np.float32)),
         "pixel_factor": (("y", "x"), pixel_factor.astype(np.float32))},
        coords={"y": np.arange(ny), "x": np.arange(nx), "axis": ["qx", "qy", "qz"]}, attrs=attrs)
    static["q"].attrs["units"] = "1/angstrom"
    static["pixel_factor"].attrs["units"] = PIXEL_FACTOR_UNITS
    with atomic_path(path) as tmp:
        static.to_zarr(tmp, mode="w", consolidated=False)
        root = zarr.open_group(tmp, mode="a")
        root.create_array("frame", data=np.arange(n_frames) if frame_index is None else np.asarray(frame_index),
                          dimension_names=["frame"])
        yield root.create_array("photons", shape=(n_frames, ny, nx), dtype="int32",
                                chunks=(min(chunk_frames, n_frames), ny, nx), dimension_names=["frame", "y", "x"],
                                fill_value=0, attributes={"units": "photons"})
        zarr.consolidate_metadata(tmp)


class PhotonFrames:
    """The ``photons (frame, y, x)`` array of a patterns store, read lazily (Zarr chunks) by
    slicing ``frames[i0:i1]``, with errors that name the store.

    Opening checks that every chunk exists: Zarr reads a missing chunk as zeros, so a
    truncated copy of a store would otherwise pass as frames without photons. A chunk that
    cannot be decoded (corrupt, cut short) raises ValueError naming the store and the
    frames when it is read. Attributes ``shape``, ``dtype``, ``chunks`` as the Zarr array's.
    Raises FileNotFoundError for a missing store, ValueError for one without photons or
    with missing chunks.
    """

    def __init__(self, patterns: str | os.PathLike):
        self.path = Path(patterns)
        if not self.path.exists():
            raise FileNotFoundError(f"patterns store not found: {self.path}")
        try:
            group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:
            raise ValueError(f"patterns store {self.path}: cannot open it: {exc}") from exc
        if "photons" not in group:
            raise ValueError(f"patterns store {self.path}: no 'photons' array")
        try:
            self.array = group["photons"]
            missing = self.array.nchunks - self.array.nchunks_initialized
        except Exception as exc:
            raise ValueError(f"patterns store {self.path}: cannot open its photons array: {exc}") from exc
        if missing:
            raise ValueError(f"patterns store {self.path}: {missing} of {self.array.nchunks} photon chunks are "
                             f"missing (an incomplete copy?)")
        self.shape, self.dtype, self.chunks = self.array.shape, self.array.dtype, self.array.chunks
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        try:
            return self.array[key]
        except Exception as exc:
            raise ValueError(f"patterns store {self.path}: cannot read photons[{key}]: "
                             f"{type(exc).__name__}: {exc}") from exc


def open_patterns(path) -> tuple[xr.Dataset, PhotonFrames]:
    """(static, photons) of a patterns store (:func:`write_patterns`): ``valid``, ``q``,
    ``pixel_factor`` and the attrs loaded, the photons read lazily (:class:`PhotonFrames`).

    Raises FileNotFoundError for a missing store, ValueError naming it when it cannot be
    read, lacks a variable, has missing photon chunks or arrays whose shapes disagree.
    """
    photons = PhotonFrames(path)
    try:
        static = xr.open_zarr(path, consolidated=None)[["valid", "q", "pixel_factor"]].load()
    except Exception as exc:  # zarr/xarray raise many types for damaged stores
        raise ValueError(f"cannot read patterns store {path}: {exc}") from exc
    ny, nx = static.valid.shape
    if photons.ndim != 3 or photons.shape[1:] != (ny, nx) or static.q.shape != (ny, nx, 3):
        raise ValueError(f"patterns store {path}: photons {photons.shape}, valid {(ny, nx)} and q "
                         f"{static.q.shape} do not match")
    return static, photons


def photon_scale(patterns: xr.Dataset) -> float:
    """``J r_e²`` of a patterns store, photons per electron² per unit pixel factor: its attrs
    ``nominal_fluence_photons_per_angstrom2`` J (photons/Å²) times
    ``classical_electron_radius_angstrom`` r_e (Å) squared. An intensity I in electrons²
    gives the EMC model ``W = I · J r_e²``, the expected photons per unit pixel factor (solid
    angle × polarization) at gain 1, by the Thomson cross-section ``dσ/dΩ = r_e² P``
    (Als-Nielsen & McMorrow, Elements of Modern X-ray Physics, 2nd ed., ch. 1). Raises
    KeyError for a store without those attrs."""
    return float(patterns.attrs["nominal_fluence_photons_per_angstrom2"]
                 * patterns.attrs["classical_electron_radius_angstrom"] ** 2)


def grid_of(patterns: xr.Dataset) -> Grid:
    """The reconstruction grid recorded in a patterns store's attrs ``recon_grid_n``, ``recon_grid_dq``."""
    return Grid(int(patterns.attrs["recon_grid_n"]), float(patterns.attrs["recon_grid_dq"]))


# ---------------------------------------------------------------------------- truth

def conformation_dataset(params: np.ndarray, names) -> xr.Dataset:
    """``conformation (frame, parameter)`` float64 of the truth store: params (n, P), names (P,)
    (the sample's ``parameter_names``, the ``parameter`` coordinate). Raises ValueError for
    a shape that does not match the names."""
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != len(names):
        raise ValueError(f"conformation parameters must be (frames, {len(names)}), got {params.shape}")
    return xr.Dataset({"conformation": (("frame", "parameter"), params)},
                      coords={"frame": np.arange(len(params)), "parameter": list(names)})


def write_truth(path, quaternion: np.ndarray, gain: np.ndarray, intensity: np.ndarray, density: np.ndarray,
                grid: Grid, attrs: dict, conformation: np.ndarray | None = None, parameter_names=(),
                state_conformation: np.ndarray | None = None, state_intensity: np.ndarray | None = None,
                state_density: np.ndarray | None = None) -> None:
    """Write the truth store (read by ``evaluate`` and the ``truth`` oracle only), atomically.

    * ``quaternion (frame, component)``, ``gain (frame)``: as :func:`orientations_dataset`;
    * ``intensity (qx, qy, qz)`` float32, electrons² (``units``), coordinates in Å⁻¹;
    * ``density (x, y, z)`` float32, e/Å³ (``units``), coordinates ``grid.r_axis`` in Å;
    * heterogeneous samples (``conformation`` given): ``conformation (frame, parameter)``
      (:func:`conformation_dataset`), and the reference states ``state_conformation (state,
      parameter)`` float64, ``state_intensity (state, qx, qy, qz)`` float32 electrons²,
      ``state_density (state, x, y, z)`` e/Å³; ``intensity`` and ``density`` are then those
      of the reference conformation.

    attrs: ``recon_grid_n``, ``recon_grid_dq`` (from ``grid``), then ``attrs`` as given
    (simulate: ``n_atoms``, ``electrons``, ``particle_radius_angstrom``, ``sample_path``,
    ``sample_kind``, ``wall_seconds``, for heterogeneous samples ``reference_conformation``
    and ``conformation_parameters``).
    """
    parts = [orientations_dataset(quaternion, gain)]
    if conformation is not None:
        names = list(parameter_names)
        parts.append(conformation_dataset(conformation, names))
        parts.append(xr.Dataset(
            {"state_conformation": (("state", "parameter"), state_conformation),
             "state_intensity": (("state", "qx", "qy", "qz"), np.asarray(state_intensity, dtype=np.float32)),
             "state_density": (("state", "x", "y", "z"), state_density)},
            coords={"state": np.arange(len(state_conformation)), "parameter": names}))
    truth = xr.merge([
        *parts,
        intensity_dataset(intensity, grid.q_axis),
        xr.Dataset({"density": (("x", "y", "z"), density)},
                   coords={"x": grid.r_axis, "y": grid.r_axis, "z": grid.r_axis}),
    ])
    truth["intensity"].attrs["units"] = "electrons^2"
    truth["density"].attrs["units"] = "electrons/angstrom^3"
    for ax in ("x", "y", "z"):
        truth[ax].attrs["units"] = "angstrom"
    truth.attrs.update({"recon_grid_n": grid.n, "recon_grid_dq": grid.dq, **attrs})
    write_dataset(truth, path)


# ---------------------------------------------------------------------------- reconstructions

def intensity_dataset(intensity: np.ndarray, q_axis: np.ndarray, measured: np.ndarray | None = None,
                      attrs: dict | None = None) -> xr.Dataset:
    """``intensity (qx, qy, qz)`` float32 on the centred grid (coordinates ``q_axis`` (n,),
    ``units: 1/angstrom``), with ``measured (qx, qy, qz)`` bool when given: True where the
    data determine the voxel (phasing leaves the others free)."""
    coords = {"qx": q_axis, "qy": q_axis, "qz": q_axis}
    data = {"intensity": (("qx", "qy", "qz"), np.asarray(intensity, dtype=np.float32))}
    if measured is not None:
        data["measured"] = (("qx", "qy", "qz"), np.asarray(measured, dtype=bool))
    ds = xr.Dataset(data, coords=coords, attrs=attrs or {})
    ds["qx"].attrs["units"] = ds["qy"].attrs["units"] = ds["qz"].attrs["units"] = "1/angstrom"
    return ds


def write_intensity(path, intensity: np.ndarray, grid: Grid, measured: np.ndarray | None = None,
                    attrs: dict | None = None, models: np.ndarray | None = None,
                    models_measured: np.ndarray | None = None) -> None:
    """Write a method's intensity store (:func:`intensity_dataset`; electrons² for every
    method, arbitrary units when the patterns' fluence is unknown) atomically. attrs:
    ``method``, ``wall_seconds`` and the method's settings (``num_div``, ``epochs``, …).
    models, models_measured: multi-model EMC (``emc.models`` > 1): ``models (model, qx, qy,
    qz)`` float32 and ``models_measured (model, qx, qy, qz)`` bool, every model in the units
    of ``intensity`` (which is one of them)."""
    ds = intensity_dataset(intensity, grid.q_axis, measured, attrs)
    if models is not None:
        dims = ("model", "qx", "qy", "qz")
        ds["models"] = (dims, np.asarray(models, dtype=np.float32))
        ds["models_measured"] = (dims, np.asarray(models_measured, dtype=bool))
        ds = ds.assign_coords(model=np.arange(len(models)))
    write_dataset(ds, path)


def orientations_dataset(quaternion: np.ndarray, gain: np.ndarray, attrs: dict | None = None) -> xr.Dataset:
    """``quaternion (frame, component)`` float64 ``[w, x, y, z]`` (coordinate ``component``)
    and ``gain (frame)`` float64, coordinate ``frame`` ``0 … n − 1``."""
    n = len(gain)
    return xr.Dataset(
        {"quaternion": (("frame", "component"), np.asarray(quaternion, dtype=np.float64)),
         "gain": (("frame",), np.asarray(gain, dtype=np.float64))},
        coords={"frame": np.arange(n), "component": ["w", "x", "y", "z"]},
        attrs=attrs or {},
    )


def write_orientations(path, quaternion: np.ndarray, gain: np.ndarray, attrs: dict | None = None,
                       **per_frame: np.ndarray) -> None:
    """Write a method's orientations store (:func:`orientations_dataset`) atomically, plus
    one ``(frame,)`` variable per keyword (e.g. EMC's ``probability_max``; a (frames, 4)
    array is a ``(frame, component)`` quaternion variable, e.g. selfsup's
    ``encoder_quaternion``). attrs as :func:`write_intensity`'s."""
    ds = orientations_dataset(quaternion, gain, attrs)
    for name, values in per_frame.items():
        ds[name] = ("frame", values) if np.ndim(values) == 1 else (("frame", "component"), values)
    write_dataset(ds, path)


def write_density(path, density: np.ndarray, support: np.ndarray, grid: Grid, attrs: dict) -> None:
    """Write a phased density store atomically: ``density (x, y, z)`` e/Å³ (``units``) and
    ``support (x, y, z)`` bool, coordinates ``grid.r_axis`` in Å. attrs (phase): ``method``,
    ``wall_seconds``, ``fourier_errors`` (per restart), ``chosen_restarts`` (averaged),
    ``prtf`` and ``prtf_q_inv_angstrom`` (Å⁻¹; :func:`spiflow.halfsets.prtf_table`)."""
    out = xr.Dataset({"density": (("x", "y", "z"), density), "support": (("x", "y", "z"), support)},
                     coords={"x": grid.r_axis, "y": grid.r_axis, "z": grid.r_axis}, attrs=attrs)
    out["density"].attrs["units"] = "electrons/angstrom^3"
    write_dataset(out, path)


# ---------------------------------------------------------------------------- Bragg-CDI objects

def write_crystals(path, volumes: dict, grid: Grid, attrs: dict, chunk_objects: int, space: str,
                   measured: np.ndarray | None = None, params: np.ndarray | None = None, parameter_names=()) -> None:
    """Write a store of per-object volumes (:mod:`spiflow.bragg`) atomically.

    volumes: name → (array (N, n, n, n), units), written as float32 ``name (object, D0, D1,
    D2)`` with the dims ``qx, qy, qz`` (coordinates ``grid.q_axis`` Å⁻¹ from the Bragg peak)
    for ``space="q"`` (``crystals.zarr``: ``intensity`` in photons) or ``x, y, z``
    (``grid.r_axis`` Å) for ``space="r"`` (``crystals_truth.zarr``: ``amplitude``
    dimensionless, ``phase`` radians), Zarr chunks of ``chunk_objects`` objects × the whole
    volume. measured: (n, n, n) bool (``space="q"``); params (N, P) float64 with
    ``parameter_names`` (P,) as ``params (object, parameter)``. attrs: stored as given
    (``recon_grid_n``, ``recon_grid_dq`` added). Raises ValueError for shapes that do not
    match the grid or each other, or another ``space``."""
    if space not in ("q", "r"):
        raise ValueError(f"space must be 'q' or 'r', got {space!r}")
    dims = ("qx", "qy", "qz") if space == "q" else ("x", "y", "z")
    axis = grid.q_axis if space == "q" else grid.r_axis
    shapes = {np.shape(v) for v, _ in volumes.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4 or next(iter(shapes))[1:] != (grid.n,) * 3:
        raise ValueError(f"volumes must share one shape (N, {grid.n}, {grid.n}, {grid.n}), got {shapes}")
    N = next(iter(shapes))[0]
    static = xr.Dataset(coords={"object": np.arange(N), **{d: axis for d in dims}},
                        attrs={"recon_grid_n": grid.n, "recon_grid_dq": grid.dq, **attrs})
    for d in dims:
        static[d].attrs["units"] = "1/angstrom" if space == "q" else "angstrom"
    if measured is not None:
        static["measured"] = (dims, np.asarray(measured, dtype=bool))
    if params is not None:
        static["params"] = (("object", "parameter"), np.asarray(params, dtype=np.float64))
        static = static.assign_coords(parameter=list(parameter_names))
    with atomic_path(path) as tmp:
        static.to_zarr(tmp, mode="w", consolidated=False)
        root = zarr.open_group(tmp, mode="a")
        for name, (vol, units) in volumes.items():
            root.create_array(name, data=np.asarray(vol, dtype=np.float32),
                              chunks=(min(chunk_objects, N), grid.n, grid.n, grid.n),
                              dimension_names=["object", *dims], attributes={"units": units})
        zarr.consolidate_metadata(tmp)


def write_complex_density(path, amplitude: np.ndarray, phase: np.ndarray, grid: Grid, attrs: dict) -> None:
    """Write a phased complex density (``spiflow ae3d-phase``) atomically: ``amplitude (x, y,
    z)`` float32 (``units: relative``, ρ) and ``phase (x, y, z)`` float32 radians, coordinates
    ``grid.r_axis`` in Å; attrs as given (``checkpoint``, ``intensity_path``, ...)."""
    out = xr.Dataset({"amplitude": (("x", "y", "z"), np.asarray(amplitude, dtype=np.float32)),
                      "phase": (("x", "y", "z"), np.asarray(phase, dtype=np.float32))},
                     coords={"x": grid.r_axis, "y": grid.r_axis, "z": grid.r_axis}, attrs=attrs)
    out["amplitude"].attrs["units"] = "relative"
    out["phase"].attrs["units"] = "radian"
    for ax in ("x", "y", "z"):
        out[ax].attrs["units"] = "angstrom"
    write_dataset(out, path)


# ---------------------------------------------------------------------------- MRC

class MRCVolume(NamedTuple):
    """volume (x, y, z) float32; voxel_size per axis (x, y, z); origin (x, y, z), header units."""

    volume: np.ndarray
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]


def write_mrc(path, volume: np.ndarray, voxel_size: float) -> None:
    """Write a 3D array indexed (x, y, z) as an MRC map (mrcfile; float32, x fastest), atomically.

    voxel_size: Å for densities (``grid.voxel_size`` = ``1 / (N Δq)``; opens in ChimeraX and
    PyMOL); for an intensity volume pass the grid step Δq (Å⁻¹), which the header then
    holds in place of Å. The origin is ``−(n//2) · voxel`` per axis, so index ``n//2``
    (q = 0 or r = 0) sits at the origin. Raises ValueError naming ``path`` for a non-3D or
    non-finite volume or a voxel size that is not > 0.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3 or vol.dtype.kind not in "iuf" or not np.all(np.isfinite(vol)):
        raise ValueError(f"MRC {path}: volume must be a finite real 3D array, got shape {vol.shape} dtype {vol.dtype}")
    v = float(voxel_size)
    if not v > 0:
        raise ValueError(f"MRC {path}: voxel size must be > 0, got {voxel_size}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(vol.astype(np.float32).transpose(2, 1, 0)))
            mrc.voxel_size = v
            mrc.header.origin = tuple(-(s // 2) * v for s in vol.shape)


def read_mrc(path) -> MRCVolume:
    """Read an MRC map into (volume (x, y, z) float32, voxel size, origin): the inverse of
    :func:`write_mrc`. Raises FileNotFoundError, or ValueError naming the file when it is
    not a valid 3D MRC map."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"MRC file not found: {p}")
    try:
        with mrcfile.open(p, mode="r", permissive=False) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
            vs, org = mrc.voxel_size, mrc.header.origin
            voxel = (float(vs.x), float(vs.y), float(vs.z))
            origin = (float(org.x), float(org.y), float(org.z))
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"MRC file {p}: {exc}") from exc
    if data.ndim != 3:
        raise ValueError(f"MRC file {p}: expected a 3D map, got shape {data.shape}")
    return MRCVolume(np.ascontiguousarray(data.transpose(2, 1, 0)), voxel, origin)
