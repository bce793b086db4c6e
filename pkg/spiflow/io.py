"""Small shared helpers: device choice, atomic writes of stores and files, JSON timing.

Every stage writes its outputs into a temporary sibling path and renames it into place
only when complete, so an interrupted or failed stage never leaves a half-written store.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr


# Consolidated metadata is a zarr-python extension to Zarr v3 that xarray reads fast; the
# warnings about it and about fixed-length strings concern other zarr implementations only.
warnings.filterwarnings("ignore", message=".*Consolidated metadata.*")
warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises ValueError naming the setting when CUDA is asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA device is available")
    return dev


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; on success move it to ``path`` (replacing it).

    On an exception the temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(path)
    os.replace(tmp, path)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def write_dataset(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Write an xarray Dataset to a Zarr store atomically (temporary path, then rename)."""
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w", consolidated=True)


def open_dataset(path: str | os.PathLike, role: str = "store") -> xr.Dataset:
    """Open a Zarr store written by spiflow and load it into memory.

    Raises FileNotFoundError / ValueError naming ``path`` when it is missing or unreadable.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{role} not found: {path}")
    try:
        return xr.open_zarr(path, consolidated=None).load()
    except Exception as exc:  # zarr raises many types for corrupt stores
        raise ValueError(f"cannot read {role} {path}: {exc}") from exc


def intensity_dataset(intensity: np.ndarray, q_axis: np.ndarray, measured: np.ndarray | None = None,
                      attrs: dict | None = None) -> xr.Dataset:
    """The ``intensity (qx, qy, qz)`` store of SPEC.md, with an optional ``measured`` mask.

    intensity: (n, n, n) on the centred grid; q_axis: (n,) Å⁻¹; measured: (n, n, n) bool,
    True where the data determine the voxel (phasing leaves the others free).
    """
    coords = {"qx": q_axis, "qy": q_axis, "qz": q_axis}
    data = {"intensity": (("qx", "qy", "qz"), np.asarray(intensity, dtype=np.float32))}
    if measured is not None:
        data["measured"] = (("qx", "qy", "qz"), np.asarray(measured, dtype=bool))
    ds = xr.Dataset(data, coords=coords, attrs=attrs or {})
    ds["qx"].attrs["units"] = ds["qy"].attrs["units"] = ds["qz"].attrs["units"] = "1/angstrom"
    return ds


def orientations_dataset(quaternion: np.ndarray, gain: np.ndarray, attrs: dict | None = None) -> xr.Dataset:
    """The ``quaternion (frame, component)``, ``gain (frame)`` store of SPEC.md."""
    n = len(gain)
    return xr.Dataset(
        {"quaternion": (("frame", "component"), np.asarray(quaternion, dtype=np.float64)),
         "gain": (("frame",), np.asarray(gain, dtype=np.float64))},
        coords={"frame": np.arange(n), "component": ["w", "x", "y", "z"]},
        attrs=attrs or {},
    )
