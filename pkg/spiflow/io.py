"""Small shared helpers: device choice, atomic writes of stores and files, checkpoints and
the per-iteration logs kept in them, the check of a reconstruction's detector inputs. The
stores' layout (what each holds, who writes it) is :mod:`spiflow.stores`.

Every stage writes its outputs into a temporary sibling path and renames it into place
only when complete, so an interrupted or failed stage never leaves a half-written store.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
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


def validate_detector_inputs(photons, valid, q, pixel_factor, grid):
    """Check a reconstruction's inputs; return ``(frames, valid, q_valid (P, 3) Å⁻¹,
    pixel_factor_valid (P,))``.

    photons: (frames, ny, nx) array-like (not read here); valid: (ny, nx) bool; q: (ny, nx,
    3) Å⁻¹; pixel_factor: (ny, nx) > 0; grid: :class:`spiflow.grid.Grid`. Valid pixels beyond
    ``grid.q_max`` are dropped from the returned ``valid`` with a UserWarning. Raises
    ValueError naming the offending array: wrong shapes or dtype, no frames, an empty
    mask, non-finite q, pixel_factor <= 0, or every valid pixel beyond the grid.
    """
    if not hasattr(photons, "shape") or len(photons.shape) != 3:
        raise ValueError(f"photons must be an array (frames, ny, nx), got shape {getattr(photons, 'shape', None)}")
    frames, ny, nx = photons.shape
    valid = np.asarray(valid)
    q, pixel_factor = np.asarray(q, dtype=np.float64), np.asarray(pixel_factor, dtype=np.float64)
    if frames < 1:
        raise ValueError("photons: no frames")
    if valid.shape != (ny, nx) or valid.dtype != bool:
        raise ValueError(f"valid must be a bool array of shape {(ny, nx)}, got {valid.dtype} {valid.shape}")
    if q.shape != (ny, nx, 3):
        raise ValueError(f"q must have shape {(ny, nx, 3)}, got {q.shape}")
    if pixel_factor.shape != (ny, nx):
        raise ValueError(f"pixel_factor must have shape {(ny, nx)}, got {pixel_factor.shape}")
    if not valid.any():
        raise ValueError("valid: the pixel mask selects no pixels")
    qv, sv = q[valid], pixel_factor[valid]
    if not np.isfinite(qv).all():
        raise ValueError("q: non-finite values in valid pixels")
    if not (np.isfinite(sv).all() and (sv > 0).all()):
        raise ValueError("pixel_factor must be finite and > 0 in valid pixels")
    outside = np.linalg.norm(qv, axis=1) > grid.q_max
    if outside.all():
        raise ValueError(f"all valid pixels have |q| > grid.q_max = {grid.q_max:g} 1/Å")
    if outside.any():
        warnings.warn(f"{outside.sum()} valid pixels with |q| > grid.q_max = {grid.q_max:g} 1/Å are ignored")
        valid = valid.copy()
        valid[valid] = ~outside
        qv, sv = qv[~outside], sv[~outside]
    return frames, valid, qv, sv


def radial_log_profile(sum_counts: np.ndarray, q_valid: np.ndarray, s_valid: np.ndarray, exposure: float,
                       grid, radial: bool = True) -> np.ndarray:
    """The log radial profile of the patterns, the baseline of the learned methods' intensity
    (:mod:`spiflow.selfsup`, :mod:`spiflow.vae`): (n_r,) float64, ``n_r = ⌈c √3⌉ + 2`` with c =
    ``grid.center``, entry k the log of ``Σ_i K_ip / (exposure · s_p)`` summed over the valid
    pixels p with ``rint(|q_p| / grid.dq) = k`` (grid: :class:`spiflow.grid.Grid`).

    sum_counts: (P,) photons per valid pixel summed over the frames; q_valid: (P, 3) Å⁻¹;
    s_valid: (P,) pixel factors; exposure: the frames' total gain Σ_i g_i (the number of
    frames for unit gains). Bins without a pixel are filled by linear interpolation
    (constant beyond the measured ends); the profile is floored at 1e-6 × its maximum
    before the log. ``radial=False``: the constant ``log(Σ_p sum_counts / (exposure Σ_p s_p))``.
    """
    n_r = int(math.ceil(grid.center * math.sqrt(3))) + 2
    if not radial:
        return np.full(n_r, math.log(sum_counts.sum() / (exposure * s_valid.sum())))
    k = np.rint(np.linalg.norm(q_valid, axis=1) / grid.dq).astype(np.int64)
    top, bottom = np.bincount(k, sum_counts, n_r), np.bincount(k, s_valid * exposure, n_r)
    ok = bottom > 0
    prof = np.interp(np.arange(n_r), np.flatnonzero(ok), top[ok] / bottom[ok])
    return np.log(np.maximum(prof, 1e-6 * prof.max()))


def derived_seed(*keys: int) -> int:
    """A 32-bit seed derived from integers, e.g. ``(seed, epoch, rank)``: the first word of
    ``numpy.random.SeedSequence(keys)``'s state, so different keys give unrelated streams."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def load_checkpoint(path, fingerprint: str) -> dict | None:
    """The checkpoint dict at ``path`` if it exists and its ``fingerprint`` matches, else None
    (a different fingerprint: UserWarning, start afresh). Loaded with ``weights_only=True``,
    so a file can hold tensors and plain containers but never runs code."""
    if path is None or not Path(path).exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("fingerprint") != fingerprint:
        warnings.warn(f"checkpoint {path} is from different settings; starting afresh")
        return None
    return ckpt


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings) to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _plain(v):
    """A log value as a plain Python number or string (checkpoints load with weights_only)."""
    if isinstance(v, (np.generic, torch.Tensor)):
        v = v.item()
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    return float(v)


class RunLog:
    """The per-iteration (or per-epoch) CSV log of a resumable stage: EMC, M-TIP, selfsup, VAE.

    ``path``: the CSV (or None: rows kept in memory only); ``columns``: its columns, in
    order (a row's missing ones are NaN, extra ones dropped). The rows live in memory
    and go into the stage's checkpoint (:meth:`state`, key ``log_rows``), so a run resumed
    from ``checkpoint`` rewrites the CSV from it even when the CSV was removed or
    half-written: Snakemake deletes the outputs of an interrupted job before it reruns it,
    and a kill can cut the CSV mid-line. For a checkpoint without ``log_rows`` (older
    spiflow) the existing CSV is cut back to ``key`` ≤ ``checkpoint[key]``. Without a
    checkpoint the CSV starts with the header only. Every rewrite is atomic; :meth:`append`
    adds one line.
    """

    def __init__(self, path, columns, checkpoint: dict | None = None, key: str = "iteration"):
        self.path, self.columns = (None if path is None else Path(path)), list(columns)
        rows = [] if checkpoint is None else checkpoint.get("log_rows")
        if rows is None:
            rows = []
            if self.path is not None and self.path.exists():
                old = pd.read_csv(self.path)
                rows = old[old[key] <= int(checkpoint[key])].to_dict("records")
        self.rows = [self._row(r) for r in rows]
        if self.path is not None:
            with atomic_path(self.path) as tmp:
                self.frame().to_csv(tmp, index=False)

    def _row(self, row: dict) -> dict:
        return {k: _plain(row.get(k, math.nan)) for k in self.columns}

    def append(self, row: dict) -> dict:
        """Add one row (to memory and as a line of the CSV); returns it as stored."""
        self.rows.append(self._row(row))
        if self.path is not None:
            pd.DataFrame([self.rows[-1]], columns=self.columns).to_csv(self.path, mode="a", header=False,
                                                                        index=False)
        return self.rows[-1]

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def state(self) -> list:
        """The rows for the checkpoint (``log_rows``): a list of dicts of plain values."""
        return [dict(r) for r in self.rows]

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame with :attr:`columns`."""
        return pd.DataFrame(self.rows, columns=self.columns)


def data_digest(frame_totals) -> str:
    """SHA-1 of the frames' photon totals (``frames``,) rounded to whole photons: a cheap
    identity of a data set for checkpoint fingerprints, so that a checkpoint of other data
    of the same shape (another sample, seed or import) is never resumed."""
    totals = np.rint(np.asarray(frame_totals, dtype=np.float64)).astype(np.int64)
    return hashlib.sha1(totals.tobytes()).hexdigest()
