"""Resolution without a ground truth: half-set FSC and the PRTF.

Measured data (a CXI import) come without a truth to compare with, so ``evaluate`` reports
what the data themselves say:

* **Half-set FSC** ("gold standard", Henderson et al., Structure 20, 205 (2012); for SPI
  e.g. Ekeberg et al., PRL 114, 098102 (2015)). :func:`split_halves` divides the frames
  into two halves (even and odd frame index, so that drifts during a run fall into both),
  each half is reconstructed and phased on its own, and :func:`halfset_fsc` aligns half 2
  to half 1 (rotation from the intensities, as against the truth; then translation and
  inversion of the density) and correlates the two densities shell by shell. The
  resolution is read where it drops below 0.143 (Rosenthal & Henderson, JMB 333, 721
  (2003): the half-map FSC at which the full map's FSC against a perfect reference is
  0.5); the 0.5 crossing is reported too.
* **PRTF** across phasing restarts (Chapman et al., JOSA A 23, 1179 (2006); computed by
  :func:`spiflow.phasing.prtf` and stored with every density), resolution where it drops
  below 1/e.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from . import metrics
from .align import align_density, align_intensity_rotation, rotate_volume
from .grid import Grid
from .io import open_dataset
from .stores import open_patterns, write_patterns

PRTF_THRESHOLD = 1 / math.e
HALFSET_THRESHOLD = 0.143


def split_halves(patterns, halves: list, chunk_frames: int | None = None) -> list[int]:
    """Write the even frames of ``patterns`` to ``halves[0]`` and the odd ones to ``halves[1]``.

    patterns: a ``patterns.zarr`` store; halves: two output paths. Each half is a patterns
    store (:func:`spiflow.stores.write_patterns`) with the source's static arrays and attrs,
    plus the attrs ``half_set`` (1 or 2) and ``source_patterns``; its ``frame`` coordinate
    holds the source's frame indices. Photons are streamed chunk by chunk (``chunk_frames``
    per chunk, default the source's), each half written atomically. Returns the two frame
    counts. Raises ValueError naming the store for fewer than 2 frames, no ``photons``, or
    missing or corrupt chunks (:func:`spiflow.stores.open_patterns`).
    """
    src_path = Path(patterns)
    static, photons = open_patterns(src_path)
    n = photons.shape[0]
    if n < 2:
        raise ValueError(f"patterns store {src_path}: {n} frame(s), a half-set split needs at least 2")
    chunk = int(chunk_frames or photons.chunks[0])
    counts = []
    for h, out in enumerate(halves):
        frames = np.arange(h, n, 2)
        attrs = {**static.attrs, "half_set": h + 1, "source_patterns": str(src_path)}
        with write_patterns(out, static.valid.values, static.q.values, static.pixel_factor.values, attrs,
                            len(frames), chunk, frame_index=frames) as dst:
            step = 2 * chunk  # source frames per output chunk
            for j, i0 in enumerate(range(h, n, step)):
                block = np.asarray(photons[i0:min(n, i0 + step)])[::2]
                dst[j * chunk:j * chunk + len(block)] = block
        counts.append(len(frames))
    return counts


def halfset_fsc(density_1, density_2, intensity_1, intensity_2, grid: Grid, measured_2=None,
                align_num_div: int = 4) -> tuple[pd.DataFrame, dict]:
    """FSC between two independently reconstructed half-set densities.

    density_k: (n, n, n) e/Å³ on ``grid``'s real-space grid; intensity_k: (n, n, n) on the
    reciprocal grid (electrons² or arbitrary units: only the shape matters). Half 2 is
    rotated into half 1's frame by the rotation that best matches its intensity
    (:func:`spiflow.align.align_intensity_rotation` on ``measured_2``, global search at
    ``align_num_div`` then local refinement), then registered by translation and
    inversion (:func:`spiflow.align.align_density`).

    Returns (table, info): the table of :func:`spiflow.metrics.fsc`, and info with
    ``halfset_resolution_fsc0143_angstrom``, ``halfset_resolution_fsc05_angstrom``,
    ``halfset_rotation_cc`` (intensity correlation after rotation) and
    ``halfset_density_cc``. Raises ValueError for shape mismatches.
    """
    mask = None if measured_2 is None else np.asarray(measured_2, bool)
    A, rot_cc = align_intensity_rotation(np.asarray(intensity_2), np.asarray(intensity_1), grid, mask=mask,
                                         num_div=align_num_div)
    rho2 = np.asarray(rotate_volume(np.asarray(density_2), np.asarray(A, dtype=np.float64)))
    rho2, reg = align_density(rho2, np.asarray(density_1))
    table = metrics.fsc(np.asarray(density_1), np.asarray(rho2), grid)
    return table, {
        "halfset_resolution_fsc0143_angstrom": metrics.resolution_at(table, HALFSET_THRESHOLD),
        "halfset_resolution_fsc05_angstrom": metrics.resolution_at(table, 0.5),
        "halfset_rotation_cc": float(rot_cc), "halfset_density_cc": float(reg["cc"]),
    }


def prtf_table(density_store) -> pd.DataFrame:
    """The PRTF stored with a phased density (``phase/METHOD/density.zarr`` attrs ``prtf``,
    ``prtf_q_inv_angstrom``) as a table ``q_inv_angstrom, resolution_angstrom, prtf``.
    Raises ValueError naming the store when it holds no PRTF."""
    den = open_dataset(density_store, "density store") if not isinstance(density_store, xr.Dataset) else density_store
    if "prtf" not in den.attrs:
        raise ValueError(f"density store {density_store}: no PRTF in its attributes (phase it again)")
    q = np.asarray(den.attrs["prtf_q_inv_angstrom"], float)
    with np.errstate(divide="ignore"):
        return pd.DataFrame({"q_inv_angstrom": q, "resolution_angstrom": 1 / q,
                             "prtf": np.asarray(den.attrs["prtf"], float)})


def prtf_resolution(table: pd.DataFrame) -> float:
    """Resolution (Å) where the PRTF of :func:`prtf_table` first drops below 1/e
    (interpolated as :func:`spiflow.metrics.resolution_at`; NaN when every shell is NaN)."""
    t = table.rename(columns={"prtf": "fsc"})
    if not np.isfinite(t["fsc"]).any():
        return math.nan
    return metrics.resolution_at(t, PRTF_THRESHOLD)
