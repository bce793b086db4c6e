"""Interoperable file formats: CXI (HDF5) in and out, Dragonfly photons and detector files.

**CXI** (Maia, Nature Methods 9, 854 (2012); "The CXI File Format for Coherent X-ray
Imaging" v1.6, github.com/cxidb/CXI ``cxi_file_format.tex``). SI units throughout: lengths
in m, photon energy in J. Frames in ``/entry_1/data_1/data`` (here a soft link to
``/entry_1/instrument_1/detector_1/data``), (frames, ny, nx), row-major. The 32-bit
``mask`` beside the data: a set bit marks a pixel property (0x1 invalid, 0x2 saturated,
0x4 hot, 0x8 dead, 0x10 shadowed, 0x80 bad, 0x200 missing, 0x400 noisy); 0x1000
(``CXI_PIXEL_HAS_SIGNAL``) and 0x10000 (``CXI_PIXEL_INSIDE_SUPPORT``) are informative,
so by default every *other* set bit makes a pixel invalid. Pixel geometry: the centre of
pixel (i, j) is ``corner_position + (i + ½) b₀ + (j + ½) b₁`` with ``basis_vectors``
``[b₀, b₁]`` (the last two rows when there are more); without ``basis_vectors`` the CXI
default ``b₀ = (0, −y_pixel_size, 0)``, ``b₁ = (−x_pixel_size, 0, 0)`` applies, without
``corner_position`` the detector is taken as centred on the beam at ``z = distance``.
CXI axes (x horizontal, y up, z along the beam) are spiflow's. spiflow's own square
detector (:mod:`spiflow.detector`) is ``b₀ = (0, p, 0)``, ``b₁ = (p, 0, 0)``,
``corner = (−n p/2, −n p/2, D)``; that is what :func:`export_cxi` writes for a simulated
store, and :func:`import_cxi` recognises it and builds the same :class:`Detector`.

**Dragonfly** (Ayyer et al., J. Appl. Cryst. 49, 1320 (2016); github.com/duaneloh/Dragonfly,
``utils/py_src/writeemc.py``, ``dragonfly/emcfile.py``, ``src/dataset.c``,
``src/detector.c``, ``utils/py_src/detector.py``). Photons ("emc") file, little-endian
int32: a 1024-byte header ``num_data, num_pix, ftype`` (0 = sparse) then zeros, then
``ones[num_data]``, ``multi[num_data]``, ``place_ones[Σ ones]``, ``place_multi[Σ multi]``,
``count_multi[Σ multi]``: per frame the pixels with exactly one photon and those with more,
with their counts. Pixel index ``t = iy · nx + ix`` (spiflow's (y, x) flattened row-major).
ASCII detector file: a line ``num_pix detd ewald_rad``, then per pixel ``qx qy qz corr mask``.
``detd`` is the detector distance in pixels; q is in voxels of Dragonfly's 3D model with
``|k| = ewald_rad`` voxels (``calc_from_coords``: ``q = ewald_rad (cx/r, cy/r, detd/r − 1)``),
same sign convention as spiflow (``qz ≤ 0``, no 2π). Hence

    q_voxel = q[Å⁻¹] · λ[Å] · ewald_rad,   one voxel = 1 / (λ · ewald_rad) Å⁻¹.

The default ``ewald_rad = 1 / (λ · recon_grid_dq)`` makes one Dragonfly voxel exactly one
spiflow reconstruction-grid step. ``corr`` is solid angle × polarisation (sr; Dragonfly
divides it by its mean on reading). ``mask``: 0 = used for orientation and merging,
1 = merged only, 2 = ignored (``src/detector.c``: ``mask < 1`` counts as relevant,
``mask < 2`` sets q_max); spiflow writes 0 for valid pixels and 2 for the others, and
:func:`import_dragonfly` reads both files back into a patterns store (valid = mask < 2).

MRC maps: :func:`spiflow.stores.write_mrc`, :func:`spiflow.stores.read_mrc`.

Every writer streams frames chunk by chunk and writes into a temporary sibling that is
renamed into place only when complete (:func:`spiflow.io.atomic_path`); patterns stores
are written and read by :mod:`spiflow.stores`.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .detector import CLASSICAL_ELECTRON_RADIUS_ANGSTROM, Detector, reconstruction_grid, wavelength_angstrom
from .io import atomic_path
from .stores import open_patterns, write_patterns

ELEMENTARY_CHARGE = 1.602176634e-19  # J per eV, exact (SI 2019)
DETECTOR = "/entry_1/instrument_1/detector_1"
SOURCE = "/entry_1/instrument_1/source_1"
DATA_PATHS = ("/entry_1/data_1/data", f"{DETECTOR}/data")
CXI_INVALID = 0x1
CXI_INFORMATIVE_BITS = 0x1000 | 0x10000
EMC_HEADER_BYTES = 1024
_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------------------- geometry

def pixel_q_and_factor(positions: np.ndarray, basis: np.ndarray, wavelength: float,
                       polarization: str = "x") -> tuple[np.ndarray, np.ndarray]:
    """q (ny, nx, 3) Å⁻¹ and pixel factor (ny, nx) sr of flat pixels at arbitrary positions.

    positions: (ny, nx, 3) pixel centres in m (interaction point at the origin, beam +z);
    basis: (2, 3) m, the pixel's edge vectors; wavelength in Å. The physics of
    :class:`spiflow.detector.Detector`, generalised: ``q = (r̂ − ẑ)/λ``,
    ``Ω = A |n̂·r| / r³`` (A = |b₀ × b₁|), polarisation ``1 − (x/r)²`` (``"x"``),
    ``1 − (y/r)²`` (``"y"``) or ``1 − (x² + y²)/(2 r²)`` (``"unpolarized"``).
    """
    pos = np.asarray(positions, dtype=np.float64)
    r2 = (pos ** 2).sum(-1)
    r = np.sqrt(r2)
    q = (pos / r[..., None] - np.array([0.0, 0.0, 1.0])) / wavelength
    normal = np.cross(basis[0], basis[1])
    area = np.linalg.norm(normal)
    omega = area * np.abs(pos @ (normal / area)) / r ** 3
    x2, y2 = pos[..., 0] ** 2, pos[..., 1] ** 2
    pol = {"x": 1 - x2 / r2, "y": 1 - y2 / r2, "unpolarized": 1 - (x2 + y2) / (2 * r2)}[polarization]
    return q, omega * pol


def _plain_detector(basis, corner, shape) -> tuple[float, float] | None:
    """(pixel size, distance) when the geometry is spiflow's square centred detector."""
    ny, nx = shape
    p = basis[1][0]
    if ny != nx or not p > 0 or not corner[2] > 0:
        return None
    ok = (np.allclose(basis, [[0, p, 0], [p, 0, 0]], rtol=0, atol=1e-9 * p)
          and np.allclose(corner[:2], [-nx * p / 2] * 2, rtol=0, atol=1e-9 * p))
    return (float(p), float(corner[2])) if ok else None


# ---------------------------------------------------------------------------- CXI import

def _fail(path, what: str) -> ValueError:
    return ValueError(f"CXI file {path}: {what}")


def _read(f: h5py.File, key: str, path, required: bool = True):
    """Dataset ``key`` as a float64 array, or None when absent and not required."""
    if key not in f:
        if required:
            raise _fail(path, f"missing dataset {key}")
        return None
    obj = f[key]
    if not isinstance(obj, h5py.Dataset) or obj.dtype.kind not in "iuf":
        raise _fail(path, f"{key} is not a numeric dataset")
    val = np.asarray(obj[()], dtype=np.float64)
    if not np.all(np.isfinite(val)):
        raise _fail(path, f"{key} holds NaN or infinite values")
    return val


def _one_value(val: np.ndarray, key: str, path) -> float:
    """A scalar, or a per-frame array whose entries all agree."""
    flat = val.ravel()
    if flat.size == 0 or not np.allclose(flat, flat[0], rtol=1e-9, atol=0):
        raise _fail(path, f"{key} varies between frames or is empty; one value is required")
    return float(flat[0])


def _photon_energy_ev(f: h5py.File, path, override: float | None) -> float:
    key = f"{SOURCE}/energy"
    if override is not None:
        return float(override)
    if key not in f:
        raise _fail(path, f"missing dataset {key} (photon energy); pass photon_energy_ev")
    value = _one_value(_read(f, key, path), key, path)
    units = f[key].attrs.get("units", "J")
    units = (units.decode() if isinstance(units, bytes) else str(units)).strip()
    scale = {"j": 1 / ELEMENTARY_CHARGE, "joule": 1 / ELEMENTARY_CHARGE, "joules": 1 / ELEMENTARY_CHARGE,
             "ev": 1.0, "kev": 1e3}.get(units.lower())
    if scale is None:
        raise _fail(path, f"{key} has units {units!r}; expected J, eV or keV")
    energy = value * scale
    if not 1.0 < energy < 1e7:
        raise _fail(path, f"{key} = {value} {units} is {energy:.4g} eV, not an X-ray photon energy "
                          f"(CXI stores J; set its 'units' attribute to 'eV' or pass photon_energy_ev)")
    return energy


def _geometry(f: h5py.File, path, shape) -> tuple[np.ndarray, np.ndarray, float]:
    """(basis (2, 3), corner (3,), distance) in m from the detector group."""
    dist = _read(f, f"{DETECTOR}/distance", path, required=False)
    dist = None if dist is None else _one_value(dist, f"{DETECTOR}/distance", path)
    basis = _read(f, f"{DETECTOR}/basis_vectors", path, required=False)
    if basis is None:
        px = _one_value(_read(f, f"{DETECTOR}/x_pixel_size", path), f"{DETECTOR}/x_pixel_size", path)
        py = _one_value(_read(f, f"{DETECTOR}/y_pixel_size", path), f"{DETECTOR}/y_pixel_size", path)
        basis = np.array([[0.0, -py, 0.0], [-px, 0.0, 0.0]])
    elif basis.ndim != 2 or basis.shape[0] < 2 or basis.shape[1] != 3:
        raise _fail(path, f"{DETECTOR}/basis_vectors has shape {basis.shape}, expected (N >= 2, 3)")
    basis = basis[-2:]
    if not np.linalg.norm(np.cross(basis[0], basis[1])) > 0:
        raise _fail(path, f"{DETECTOR}: pixel size / basis vectors are zero or parallel")
    corner = _read(f, f"{DETECTOR}/corner_position", path, required=False)
    if corner is None:
        if dist is None:
            raise _fail(path, f"missing dataset {DETECTOR}/distance (and no corner_position)")
        corner = np.array([0.0, 0.0, dist]) - shape[0] / 2 * basis[0] - shape[1] / 2 * basis[1]
    else:
        if corner.size == 0 or corner.size % 3:
            raise _fail(path, f"{DETECTOR}/corner_position has shape {corner.shape}, expected (3,)")
        corner = corner.reshape(-1, 3)[-1]
        flat = abs(basis[0][2]) + abs(basis[1][2]) == 0
        if dist is not None and flat and not np.isclose(corner[2], dist, rtol=1e-6):
            raise _fail(path, f"{DETECTOR}/corner_position z = {corner[2]} m disagrees with "
                              f"{DETECTOR}/distance = {dist} m")
    normal = np.cross(basis[0], basis[1])
    distance = dist if dist is not None else float(abs(corner @ normal) / np.linalg.norm(normal))
    if not distance > 0:
        raise _fail(path, f"{DETECTOR}: detector distance must be > 0 m, got {distance}")
    return basis, corner, distance


def _frames_dataset(f: h5py.File, path) -> tuple[str, h5py.Dataset]:
    for key in DATA_PATHS:
        if key in f:
            d = f[key]
            if not isinstance(d, h5py.Dataset) or d.dtype.kind not in "iuf":
                raise _fail(path, f"{key} is not a numeric dataset")
            if d.ndim not in (2, 3) or min(d.shape[-2:]) < 2:
                raise _fail(path, f"{key} has shape {d.shape}; expected (frames, ny, nx) with ny, nx >= 2")
            if d.ndim == 3 and d.shape[0] == 0:
                raise _fail(path, f"{key} holds no frames")
            return key, d
    raise _fail(path, f"no frames: neither {' nor '.join(DATA_PATHS)} exists")


def _valid_mask(f: h5py.File, path, data_key: str, shape, bad_bits: int | None) -> np.ndarray:
    group = data_key.rsplit("/", 1)[0]
    key = next((k for k in (f"{group}/mask", f"{DETECTOR}/mask") if k in f), None)
    if key is None:
        valid = np.ones(shape, dtype=bool)
    else:
        d = f[key]
        if not isinstance(d, h5py.Dataset) or d.dtype.kind not in "iub":
            raise _fail(path, f"{key} is not an integer mask")
        if d.shape != tuple(shape):
            raise _fail(path, f"{key} has shape {d.shape} but frames are {tuple(shape)} (per-frame masks "
                              f"are not supported)")
        bits = np.asarray(d[()]).astype(np.int64)
        bad = ~CXI_INFORMATIVE_BITS if bad_bits is None else bad_bits
        valid = (bits & bad) == 0
    if not valid.any():
        raise _fail(path, f"{key} marks every pixel bad: no valid pixel")
    return valid


def _counts(block: np.ndarray, valid: np.ndarray, path, key: str, i0: int, round_counts: bool) -> np.ndarray:
    """Whole-photon int32 counts of a (B, ny, nx) block; invalid pixels set to 0."""
    v = block[:, valid].astype(np.float64)
    where = f"{key} frames {i0}..{i0 + len(block) - 1}"
    if not np.all(np.isfinite(v)):
        raise _fail(path, f"{where}: NaN or infinite photon counts in valid pixels")
    if v.size and v.min() < 0:
        raise _fail(path, f"{where}: negative photon counts in valid pixels (min {v.min():g})")
    if v.size and v.max() > _INT32_MAX:
        raise _fail(path, f"{where}: photon counts above {_INT32_MAX}")
    r = np.rint(v)
    if not round_counts and np.any(np.abs(v - r) > 1e-6):
        raise _fail(path, f"{where}: non-integer counts; spiflow needs photons (pass round_counts=True "
                          f"to round converted data)")
    out = np.zeros(block.shape, dtype=np.int32)
    out[:, valid] = r.astype(np.int32)
    return out


def import_cxi(cxi_path, out_zarr, *, photon_energy_ev: float | None = None, polarization: str | None = None,
               fluence_photons_per_angstrom2: float | None = None, grid_oversampling: float = 1.0,
               bad_bits: int | None = None, round_counts: bool = False, chunk_frames: int = 64) -> dict:
    """Convert a CXI file into a spiflow ``patterns.zarr`` (:func:`spiflow.stores.write_patterns`).

    Reads frames (frames, ny, nx) or one frame (ny, nx) from ``/entry_1/data_1/data`` or
    ``/entry_1/instrument_1/detector_1/data`` (counts, whole photons), the ``mask`` beside
    them (module docstring; ``bad_bits`` overrides which bits mark a bad pixel), the
    geometry (``distance``, ``x_pixel_size``, ``y_pixel_size`` in m, optional
    ``corner_position``, ``basis_vectors``) and ``/entry_1/instrument_1/source_1/energy`` (J
    per CXI; its ``units`` attribute may say eV or keV; ``photon_energy_ev`` overrides).
    Writes the photons (0 at invalid pixels), q on the Ewald sphere and the pixel factor of
    that geometry, attrs with the geometry, the source file and ``recon_grid_n``/
    ``recon_grid_dq`` from :func:`spiflow.detector.reconstruction_grid`. Frames stream in
    chunks of ``chunk_frames``; the store appears only when complete. No truth store.

    polarization: ``"x"``, ``"y"`` or ``"unpolarized"``; default the file's spiflow attribute,
    else ``"x"``. The fluence is rarely known for measured data: without
    ``fluence_photons_per_angstrom2`` (or a spiflow attribute in the file) it is set to 1 and
    ``fluence_known`` to False, so reconstructed intensities are in arbitrary units.
    round_counts: round non-integer counts (photon-converted data) instead of refusing them.

    Returns a summary dict (frames, shape, grid, mean photons per frame). Raises
    FileNotFoundError for a missing file and ValueError naming the file and the dataset for
    a non-HDF5 file, missing frames or geometry, NaN, negative or non-integer counts in
    valid pixels, an all-bad mask, or mismatched shapes.
    """
    path = Path(cxi_path)
    if not path.is_file():
        raise FileNotFoundError(f"CXI file not found: {path}")
    if not h5py.is_hdf5(path):
        raise ValueError(f"CXI file {path}: not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return _import_open_cxi(f, path, Path(out_zarr), photon_energy_ev, polarization,
                                    fluence_photons_per_angstrom2, grid_oversampling, bad_bits, round_counts,
                                    chunk_frames)
    except (OSError, KeyError, TypeError, RuntimeError, ValueError) as exc:  # h5py's errors for damaged files
        if isinstance(exc, ValueError) and str(path) in str(exc):  # ours, naming the file already
            raise
        raise ValueError(f"cannot import CXI file {path}: {type(exc).__name__}: {exc}") from exc


def _spiflow_attrs(f: h5py.File, path) -> dict:
    """The store attrs that :func:`export_cxi` saved in ``/entry_1`` (empty for other files)."""
    raw = f["/entry_1"].attrs.get("spiflow_attrs") if "/entry_1" in f else None
    try:
        extra = json.loads(raw) if raw is not None else {}
    except (ValueError, TypeError) as exc:
        raise _fail(path, f"/entry_1 attribute spiflow_attrs is not JSON: {exc}") from exc
    if not isinstance(extra, dict):
        raise _fail(path, "/entry_1 attribute spiflow_attrs is not a JSON object")
    return extra


def _import_open_cxi(f, path, out, photon_energy_ev, polarization, fluence, oversampling, bad_bits,
                     round_counts, chunk) -> dict:
    key, data = _frames_dataset(f, path)
    n = data.shape[0] if data.ndim == 3 else 1
    shape = data.shape[-2:]
    valid = _valid_mask(f, path, key, shape, bad_bits)
    energy = _photon_energy_ev(f, path, photon_energy_ev)
    basis, corner, distance = _geometry(f, path, shape)
    extra = _spiflow_attrs(f, path)
    pol = polarization or extra.get("polarization", "x")
    if pol not in ("x", "y", "unpolarized"):
        raise ValueError(f"polarization must be 'x', 'y' or 'unpolarized', got {pol!r}")
    if fluence is None:
        fluence = extra.get("nominal_fluence_photons_per_angstrom2")
    plain = _plain_detector(basis, corner, shape)
    if plain:
        det = Detector(shape[0], plain[0], plain[1], energy, polarization=pol)
        q, pixel_factor = det.q(), det.pixel_factor()
    else:
        i, j = np.meshgrid(np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5, indexing="ij")
        pos = corner + i[..., None] * basis[0] + j[..., None] * basis[1]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # absurd geometry: checked below
            q, pixel_factor = pixel_q_and_factor(pos, basis, wavelength_angstrom(energy), pol)
    if not (np.all(np.isfinite(q[valid])) and np.all(np.isfinite(pixel_factor[valid]))):
        raise _fail(path, f"{DETECTOR}: the geometry gives non-finite q or solid angle "
                          f"(distance {distance} m, basis vectors {basis.tolist()} m)")
    try:
        grid = reconstruction_grid(q, valid, oversampling)
    except ValueError as exc:
        raise _fail(path, f"{DETECTOR}: {exc}") from exc
    pixel_size = float(np.sqrt(np.linalg.norm(np.cross(basis[0], basis[1]))))
    attrs = {
        "photon_energy_ev": energy, "wavelength_angstrom": wavelength_angstrom(energy),
        "distance_m": distance, "pixel_size_m": pixel_size, "detector_shape": [int(s) for s in shape],
        "polarization": pol, "nominal_fluence_photons_per_angstrom2": float(fluence if fluence is not None else 1.0),
        "fluence_known": fluence is not None, "classical_electron_radius_angstrom": CLASSICAL_ELECTRON_RADIUS_ANGSTROM,
        "recon_grid_n": grid.n, "recon_grid_dq": grid.dq, "cxi_corner_position_m": corner.tolist(),
        "cxi_basis_vectors_m": basis.tolist(), "source_file": str(path), "source_dataset": key,
        "spiflow_version": __version__,
    }
    if shape[0] == shape[1]:
        attrs["n_pixels"] = int(shape[0])
    for k, v in extra.items():  # a spiflow export: keep its other metadata (seed, config, ...)
        attrs.setdefault(k, v)
    total = 0
    with write_patterns(out, valid, q, pixel_factor, attrs, n, chunk) as photons:
        for i0 in range(0, n, chunk):
            i1 = min(i0 + chunk, n)
            block = data[i0:i1] if data.ndim == 3 else data[()][None]
            counts = _counts(np.asarray(block), valid, path, key, i0, round_counts)
            photons[i0:i1] = counts
            total += int(counts.sum(dtype=np.int64))
    return {"frames": n, "shape": tuple(int(s) for s in shape), "grid_n": grid.n, "grid_dq": grid.dq,
            "mean_photons": total / n, "geometry": "square detector" if plain else "pixel positions"}


# ---------------------------------------------------------------------------- store reading

def _attr(attrs, key: str, where):
    if key not in attrs:
        raise ValueError(f"patterns store {where}: attribute {key!r} missing")
    return attrs[key]


def _chunks(photons, chunk: int, where):
    """Yield (i0, int64 block) of the photons array, checked for negative counts."""
    for i0 in range(0, photons.shape[0], chunk):
        block = np.asarray(photons[i0:i0 + chunk]).astype(np.int64)
        if block.size and block.min() < 0:
            raise ValueError(f"patterns store {where}: negative photon counts in frames from {i0}")
        yield i0, block


# ---------------------------------------------------------------------------- CXI export

def export_cxi(patterns_zarr, cxi_path, chunk_frames: int = 64) -> None:
    """Write a patterns store as a CXI file that :func:`import_cxi` reads back unchanged.

    Layout: ``/entry_1/instrument_1/detector_1/data`` (frames, ny, nx) int32 photons (gzip,
    one HDF5 chunk per ``chunk_frames`` frames) with ``/entry_1/data_1/data`` a soft link to
    it, ``mask`` uint32 (0 valid, 0x1 ``CXI_PIXEL_IS_INVALID``), ``distance``,
    ``x_pixel_size``, ``y_pixel_size``, ``corner_position``, ``basis_vectors`` (m), and
    ``/entry_1/instrument_1/source_1/energy`` in J (``units = "J"``). The store's scalar
    attrs go to the JSON attribute ``spiflow_attrs`` of ``/entry_1`` (polarisation and fluence
    are read back from it). q and pixel factor are not stored: import recomputes them from
    the geometry. Raises FileNotFoundError / ValueError naming the store when it is missing,
    unreadable, inconsistent or holds negative counts; the CXI file appears only when complete.
    """
    static, photons = open_patterns(patterns_zarr)
    a = static.attrs
    ny, nx = static.valid.shape
    if "cxi_basis_vectors_m" in a:
        basis, corner = np.array(a["cxi_basis_vectors_m"]), np.array(a["cxi_corner_position_m"])
    else:
        p, d = float(_attr(a, "pixel_size_m", patterns_zarr)), float(_attr(a, "distance_m", patterns_zarr))
        basis, corner = np.array([[0, p, 0], [p, 0, 0]], float), np.array([-nx * p / 2, -ny * p / 2, d])
    scalars = {k: v for k, v in a.items() if isinstance(v, (str, int, float, bool))}
    n = photons.shape[0]
    with atomic_path(cxi_path) as tmp, h5py.File(tmp, "w") as f:
        f["cxi_version"] = 160
        f.create_group("/entry_1").attrs["spiflow_attrs"] = json.dumps(scalars)
        det = f.create_group(DETECTOR)
        out = det.create_dataset("data", shape=(n, ny, nx), dtype="int32", compression="gzip",
                                 chunks=(max(1, min(chunk_frames, n)), ny, nx))
        det["mask"] = np.where(static.valid.values, 0, CXI_INVALID).astype(np.uint32)
        det["distance"] = float(a.get("distance_m", corner[2]))
        det["x_pixel_size"], det["y_pixel_size"] = float(np.linalg.norm(basis[1])), float(np.linalg.norm(basis[0]))
        det["corner_position"], det["basis_vectors"] = corner, basis
        src = f.create_group(SOURCE)
        src["energy"] = float(_attr(a, "photon_energy_ev", patterns_zarr)) * ELEMENTARY_CHARGE
        src["energy"].attrs["units"] = "J"
        data_1 = f.create_group("/entry_1/data_1")
        data_1["data"] = h5py.SoftLink(f"{DETECTOR}/data")
        data_1["mask"] = h5py.SoftLink(f"{DETECTOR}/mask")
        for i0, block in _chunks(photons, chunk_frames, patterns_zarr):
            out[i0:i0 + len(block)] = block.astype(np.int32)


# ---------------------------------------------------------------------------- Dragonfly

def export_dragonfly(patterns_zarr, photons_path, detector_path, ewald_rad: float | None = None,
                     chunk_frames: int = 256) -> dict:
    """Write a patterns store as Dragonfly's sparse photons file and ASCII detector file.

    Formats and units: module docstring (pixel ``t = iy · nx + ix``; q in voxels,
    ``q_voxel = q[Å⁻¹] · λ · ewald_rad``; mask 0 valid, 2 invalid; corr = pixel factor in sr).
    ewald_rad: Ewald-sphere radius in voxels, default ``1 / (λ · recon_grid_dq)`` (one voxel =
    one spiflow grid step). ``detd`` = distance / pixel size (pixels). Frames stream in chunks;
    the place arrays are spooled to anonymous temporary files and both outputs appear only
    when complete. Returns ``{"num_data", "num_pix", "ewald_rad", "detd"}``. Raises
    FileNotFoundError / ValueError naming the store (missing, unreadable, negative counts).
    """
    static, photons = open_patterns(patterns_zarr)
    a = static.attrs
    lam = wavelength_angstrom(float(_attr(a, "photon_energy_ev", patterns_zarr)))
    ewald = float(ewald_rad) if ewald_rad is not None else 1.0 / (lam * float(_attr(a, "recon_grid_dq", patterns_zarr)))
    if not ewald > 0:
        raise ValueError(f"ewald_rad must be > 0 voxels, got {ewald_rad}")
    detd = float(_attr(a, "distance_m", patterns_zarr)) / float(_attr(a, "pixel_size_m", patterns_zarr))
    num_pix = int(static.valid.size)
    n = photons.shape[0]
    ones, multi = np.zeros(n, np.int32), np.zeros(n, np.int32)
    with tempfile.TemporaryFile() as po, tempfile.TemporaryFile() as pm, tempfile.TemporaryFile() as cm:
        for i0, block in _chunks(photons, chunk_frames, patterns_zarr):
            flat = block.reshape(len(block), num_pix)
            is1, ism = flat == 1, flat > 1
            ones[i0:i0 + len(block)], multi[i0:i0 + len(block)] = is1.sum(1), ism.sum(1)
            np.nonzero(is1)[1].astype("<i4").tofile(po)
            rows, cols = np.nonzero(ism)
            cols.astype("<i4").tofile(pm)
            flat[rows, cols].astype("<i4").tofile(cm)
        with atomic_path(photons_path) as tmp, open(tmp, "wb") as out:
            header = np.zeros(EMC_HEADER_BYTES // 4, "<i4")
            header[:3] = n, num_pix, 0
            header.tofile(out)
            ones.astype("<i4").tofile(out)
            multi.astype("<i4").tofile(out)
            for spool in (po, pm, cm):
                spool.seek(0)
                shutil.copyfileobj(spool, out)
    q_vox = static.q.values.reshape(-1, 3).astype(np.float64) * lam * ewald
    table = np.column_stack([q_vox, static.pixel_factor.values.ravel().astype(np.float64),
                             np.where(static.valid.values.ravel(), 0, 2)])
    with atomic_path(detector_path) as tmp:
        np.savetxt(tmp, table, fmt="%21.15e %21.15e %21.15e %21.15e %d",
                   header=f"{num_pix} {detd:.17g} {ewald:.17g}", comments="")
    return {"num_data": n, "num_pix": num_pix, "ewald_rad": ewald, "detd": detd}


def read_dragonfly_photons(path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Dense photon counts (frames, num_pix) int32 of frames ``start:stop`` of a Dragonfly emc file.

    Supports ftype 0 (sparse), 1 (dense int32) and 2 (dense float64, returned as float64);
    the file is memory-mapped, so only the selected frames are materialised. Reshape with
    ``(frames, ny, nx)`` to get spiflow's layout. Raises FileNotFoundError, or ValueError
    naming the file for a short/garbled header, a size that does not match the header, an
    unknown ftype, or pixel indices outside ``[0, num_pix)``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Dragonfly photons file not found: {p}")
    size = p.stat().st_size
    if size < EMC_HEADER_BYTES or size % 4:
        raise ValueError(f"Dragonfly photons file {p}: {size} bytes is not a 1024-byte header plus int32 data")
    raw = np.memmap(p, dtype="<i4", mode="r")
    num_data, num_pix, ftype = (int(v) for v in raw[:3])
    body = raw[EMC_HEADER_BYTES // 4:]
    if num_data < 0 or num_pix <= 0 or ftype not in (0, 1, 2):
        raise ValueError(f"Dragonfly photons file {p}: bad header num_data={num_data}, num_pix={num_pix}, "
                         f"ftype={ftype}")
    stop = num_data if stop is None else min(stop, num_data)
    start = max(0, min(start, stop))
    if ftype in (1, 2):
        width = 1 if ftype == 1 else 2
        if body.size != num_data * num_pix * width:
            raise ValueError(f"Dragonfly photons file {p}: size does not match {num_data} dense frames")
        if ftype == 1:
            return np.array(body[start * num_pix:stop * num_pix]).reshape(-1, num_pix)
        return np.array(body.view("<f8")[start * num_pix:stop * num_pix]).reshape(-1, num_pix)
    if body.size < 2 * num_data:
        raise ValueError(f"Dragonfly photons file {p}: truncated (ones/multi arrays)")
    ones, multi = body[:num_data].astype(np.int64), body[num_data:2 * num_data].astype(np.int64)
    if (ones < 0).any() or (multi < 0).any() or body.size != 2 * num_data + ones.sum() + 2 * multi.sum():
        raise ValueError(f"Dragonfly photons file {p}: size does not match the ones/multi counts in its header")
    o_off = np.concatenate([[0], np.cumsum(ones)]) + 2 * num_data
    m_off = np.concatenate([[0], np.cumsum(multi)]) + o_off[-1]
    c_base = multi.sum()
    out = np.zeros((stop - start, num_pix), dtype=np.int32)
    for i in range(start, stop):
        po = body[o_off[i]:o_off[i + 1]]
        pm = body[m_off[i]:m_off[i + 1]]
        cm = body[m_off[i] + c_base:m_off[i + 1] + c_base]
        if (po.size and (po.min() < 0 or po.max() >= num_pix)) or (pm.size and (pm.min() < 0 or pm.max() >= num_pix)):
            raise ValueError(f"Dragonfly photons file {p}: frame {i} has pixel indices outside [0, {num_pix})")
        np.add.at(out[i - start], po, 1)
        np.add.at(out[i - start], pm, cm)
    return out


@dataclass(frozen=True)
class DragonflyDetector:
    """A Dragonfly detector file's content.

    q: (num_pix, 3) in voxels; corr: (num_pix,) solid angle × polarisation; mask:
    (num_pix,) uint8 (0 orientation + merging, 1 merging only, 2 ignored); detd: distance in
    pixels; ewald_rad: Ewald radius in voxels.
    """

    q: np.ndarray
    corr: np.ndarray
    mask: np.ndarray
    detd: float
    ewald_rad: float

    @property
    def valid(self) -> np.ndarray:
        """(num_pix,) bool: pixels Dragonfly uses for orientation and merging (mask 0)."""
        return self.mask == 0

    def q_inverse_angstrom(self, wavelength: float) -> np.ndarray:
        """q (num_pix, 3) in Å⁻¹ for the wavelength in Å: ``q_voxel / (λ · ewald_rad)``."""
        return self.q / (wavelength * self.ewald_rad)


def read_dragonfly_detector(path) -> DragonflyDetector:
    """Read Dragonfly's ASCII detector file (``num_pix detd ewald_rad`` line, then ``qx qy qz corr mask``).

    Raises FileNotFoundError, or ValueError naming the file for an old-style header without
    detd/ewald_rad, unparsable lines, a pixel count that disagrees with the header, or mask
    values outside {0, 1, 2}.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Dragonfly detector file not found: {p}")
    try:
        with open(p, encoding="ascii") as fh:
            head = fh.readline().split()
            if len(head) != 3:
                raise ValueError("first line must be 'num_pix detd ewald_rad' (old-style files are not supported)")
            num_pix, detd, ewald = int(head[0]), float(head[1]), float(head[2])
            table = np.loadtxt(fh, dtype=np.float64, ndmin=2)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"Dragonfly detector file {p}: {exc}") from exc
    if table.shape != (num_pix, 5):
        raise ValueError(f"Dragonfly detector file {p}: {table.shape[0]} rows of {table.shape[1]} columns, "
                         f"header says {num_pix} pixels of 5 columns")
    mask = table[:, 4]
    if not np.all(np.isin(mask, (0, 1, 2))) or not np.all(np.isfinite(table)) or not (detd > 0 and ewald > 0):
        raise ValueError(f"Dragonfly detector file {p}: non-finite values, mask outside {{0, 1, 2}}, or "
                         f"non-positive detd/ewald_rad")
    return DragonflyDetector(table[:, :3], table[:, 3], mask.astype(np.uint8), detd, ewald)


def import_dragonfly(photons_path, detector_path, out_zarr, *, photon_energy_ev: float, pixel_size_m: float,
                     shape: tuple[int, int] | None = None, polarization: str = "x",
                     fluence_photons_per_angstrom2: float | None = None, grid_oversampling: float = 1.0,
                     chunk_frames: int = 256) -> dict:
    """Convert a Dragonfly photons file and its detector file into a patterns store
    (:func:`spiflow.stores.write_patterns`): the inverse of :func:`export_dragonfly`.

    Formats: module docstring. Neither file records the wavelength, the pixel size or the
    detector's (ny, nx), so they are arguments: photon_energy_ev (eV) turns q in voxels into
    Å⁻¹ (``q = q_voxel / (λ · ewald_rad)``), pixel_size_m (m) gives ``distance_m = detd ·
    pixel_size_m``; shape (ny, nx) with ``ny · nx = num_pix`` (pixel ``t = iy · nx + ix``),
    default a square. valid = detector mask < 2 (Dragonfly's mask 1, merged but not used to
    orient, is valid here); pixel factor = ``corr``; photons at invalid pixels set to 0.
    polarization is recorded only (``corr`` already holds it). Without the fluence it is 1
    and ``fluence_known`` False. Frames stream in chunks of ``chunk_frames``; the store
    appears only when complete. Returns ``{"frames", "shape", "grid_n", "grid_dq"}``.

    Raises FileNotFoundError, or ValueError naming the files for unreadable files, pixel
    counts that disagree (files, shape), non-integer counts, or no valid pixel.
    """
    det = read_dragonfly_detector(detector_path)
    num_pix = len(det.mask)
    frame_pixels = read_dragonfly_photons(photons_path, 0, 0).shape[1]  # checks the file's header and size
    if frame_pixels != num_pix:
        raise ValueError(f"Dragonfly photons file {photons_path}: {frame_pixels} pixels per frame, detector file "
                         f"{detector_path}: {num_pix}")
    if shape is None:
        side = int(round(np.sqrt(num_pix)))
        if side * side != num_pix:
            raise ValueError(f"Dragonfly detector file {detector_path}: {num_pix} pixels are not a square; pass "
                             f"shape (ny, nx)")
        shape = (side, side)
    ny, nx = (int(v) for v in shape)
    if ny * nx != num_pix:
        raise ValueError(f"shape {tuple(shape)} has {ny * nx} pixels, Dragonfly detector file {detector_path} has "
                         f"{num_pix} (photons file {photons_path})")
    if not pixel_size_m > 0:
        raise ValueError(f"pixel_size_m must be > 0, got {pixel_size_m}")
    lam = wavelength_angstrom(photon_energy_ev)
    valid = (det.mask < 2).reshape(ny, nx)
    if not valid.any():
        raise ValueError(f"Dragonfly detector file {detector_path}: no valid pixel (every mask value is 2)")
    q = det.q_inverse_angstrom(lam).reshape(ny, nx, 3)
    grid = reconstruction_grid(q, valid, grid_oversampling)
    n = int(np.fromfile(photons_path, "<i4", count=1)[0])
    attrs = {
        "photon_energy_ev": float(photon_energy_ev), "wavelength_angstrom": lam,
        "distance_m": det.detd * pixel_size_m, "pixel_size_m": float(pixel_size_m), "detector_shape": [ny, nx],
        "polarization": polarization,
        "nominal_fluence_photons_per_angstrom2": float(fluence_photons_per_angstrom2 or 1.0),
        "fluence_known": fluence_photons_per_angstrom2 is not None,
        "classical_electron_radius_angstrom": CLASSICAL_ELECTRON_RADIUS_ANGSTROM,
        "recon_grid_n": grid.n, "recon_grid_dq": grid.dq, "dragonfly_ewald_rad": det.ewald_rad,
        "source_file": str(photons_path), "source_detector_file": str(detector_path), "spiflow_version": __version__,
    }
    with write_patterns(out_zarr, valid, q, det.corr.reshape(ny, nx), attrs, n, chunk_frames) as photons:
        for i0 in range(0, n, chunk_frames):
            block = read_dragonfly_photons(photons_path, i0, i0 + chunk_frames)
            if block.dtype.kind == "f" and not np.array_equal(block, np.rint(block)):
                raise ValueError(f"Dragonfly photons file {photons_path}: non-integer counts in frames from {i0}")
            photons[i0:i0 + len(block)] = block.reshape(-1, ny, nx).astype(np.int32) * valid
    return {"frames": n, "shape": (ny, nx), "grid_n": grid.n, "grid_dq": grid.dq}


__all__ = ["import_cxi", "export_cxi", "export_dragonfly", "import_dragonfly", "read_dragonfly_photons",
           "read_dragonfly_detector", "DragonflyDetector", "pixel_q_and_factor"]
