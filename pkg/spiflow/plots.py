"""Figures for the evaluation report: each function writes one PNG to ``path``.

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas directly (no
pyplot, so no global backend or figure state); each is released after saving. The pixel
size of every PNG is fixed: ``FIGSIZE[name]`` inches × ``DPI`` (no tight bounding box).
Units follow docs/conventions.md: q in Å⁻¹ (no 2π), resolution 1/q in Å, real-space lengths in Å.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from spiflow.grid import Grid
from spiflow.io import atomic_path

DPI = 100
FIGSIZE = {  # inches (width, height)
    "fsc": (7.0, 4.5),
    "intensity_sections": (11.0, 7.0),
    "density_slices": (11.0, 7.0),
    "orientation_errors": (6.0, 4.0),
    "pattern_montage": (8.0, 8.0),
    "emc_log": (10.0, 7.0),
}
SECTION_AXES = ("qx", "qy", "qz")


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def new_figure(size, nrows: int = 1, ncols: int = 1, **kw):
    """A fresh Agg figure with a grid of axes: ``(fig, axes)``, axes (nrows, ncols).

    size: a name of :data:`FIGSIZE` (the fixed size of a standard figure) or (width,
    height) in inches; the figure has :data:`DPI` dots per inch and a constrained layout.
    ``kw`` goes to ``Figure.subplots`` (e.g. ``sharex``). Raises KeyError for an unknown name.
    """
    fig = Figure(figsize=FIGSIZE[size] if isinstance(size, str) else size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
    return fig, axes


def save_figure(fig: Figure, path) -> None:
    """Write ``fig`` as a PNG at :data:`DPI` to ``path`` (its folder created; atomically, by
    :func:`spiflow.io.atomic_path`: an old file stays whole if writing fails), then clear it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    fig.clear()


def _check_volume(v: np.ndarray, grid: Grid, name: str) -> None:
    if v.shape != (grid.n,) * 3:
        raise ValueError(f"{name} has shape {v.shape}, expected {(grid.n,) * 3}")


def _central_sections(v: np.ndarray, grid: Grid, project: bool = False) -> list[np.ndarray]:
    """The three planes through the centre (or sums along each axis), axis 0 → 2."""
    c = grid.center
    if project:
        return [v.sum(axis=k) for k in range(3)]
    return [v[c], v[:, c], v[:, :, c]]


def plot_fsc(tables: dict[str, pd.DataFrame], path, ylabel: str = "FSC",
             levels=((0.5, "--"), (0.143, ":"))) -> None:
    """FSC of every method vs q (bottom axis, Å⁻¹; top axis labelled in Å), with threshold lines.

    tables: curve name → DataFrame with ``q_inv_angstrom`` and ``fsc`` (as from
    :func:`spiflow.metrics.fsc`; a PRTF renamed to ``fsc`` plots alike). levels: (value,
    line style) of the horizontal threshold lines, by default 0.5 and 0.143.
    Raises ValueError for no tables or missing columns.
    """
    if not tables:
        raise ValueError("plot_fsc: no FSC tables given")
    fig, axes = new_figure("fsc")
    ax = axes[0, 0]
    q_max, f_min = 0.0, -0.2
    for name, t in tables.items():
        if not {"q_inv_angstrom", "fsc"} <= set(t.columns):
            raise ValueError(f"plot_fsc: table {name!r} needs columns q_inv_angstrom and fsc")
        ax.plot(t["q_inv_angstrom"], t["fsc"], marker=".", label=name)
        q_max = max(q_max, float(t["q_inv_angstrom"].max()))
        f_min = min(f_min, float(np.nanmin(t["fsc"], initial=0.0)) - 0.05)
    for level, style in levels:
        ax.axhline(level, color="grey", ls=style, lw=1, label=f"{ylabel} = {level:.3g}")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlim(0, q_max if q_max > 0 else 1)
    ax.set_ylim(f_min, 1.05)
    ax.set_xlabel("q (Å⁻¹)")
    ax.set_ylabel(ylabel)
    top = ax.secondary_xaxis("top")
    ticks = [x for x in ax.get_xticks() if 0 < x <= ax.get_xlim()[1]]
    top.set_xticks(ticks, labels=[f"{1 / x:.3g}" for x in ticks])
    top.set_xlabel("resolution (Å)")
    top.tick_params(labelsize=8)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_intensity_sections(truth, recon, grid: Grid, path, title: str = "") -> None:
    """Central sections qx = 0, qy = 0, qz = 0 of truth (top row) and reconstruction (bottom).

    truth, recon: (n, n, n) intensities on ``grid``; truth None (measured data): the
    reconstruction's row alone. Log colour scale, each row spanning five decades below its
    own maximum (EMC's overall scale is arbitrary); values ≤ 0 are left blank. Axes in Å⁻¹.
    Raises ValueError for shape mismatch.
    """
    vols = {"truth": truth, "reconstruction": recon}
    vols = {k: _np(v).astype(float) for k, v in vols.items() if v is not None}
    fig, axes = new_figure("intensity_sections", len(vols), 3)
    q = grid.q_axis
    ext = [q[0] - grid.dq / 2, q[-1] + grid.dq / 2] * 2
    for row, (label, v) in enumerate(vols.items()):
        _check_volume(v, grid, label)
        vmax = float(np.nanmax(v)) if np.nanmax(v) > 0 else 1.0
        norm = LogNorm(vmin=vmax * 1e-5, vmax=vmax)
        for k, sec in enumerate(_central_sections(v, grid)):
            ax = axes[row, k]
            im = ax.imshow(np.where(sec > 0, sec, np.nan).T, origin="lower", extent=ext, norm=norm,
                           cmap="viridis", interpolation="nearest")
            a, b = [s for j, s in enumerate(SECTION_AXES) if j != k]
            ax.set_xlabel(f"{a} (Å⁻¹)", fontsize=8)
            ax.set_ylabel(f"{b} (Å⁻¹)", fontsize=8)
            ax.set_title(f"{label}, {SECTION_AXES[k]} = 0", fontsize=9)
        fig.colorbar(im, ax=axes[row, :].tolist(), shrink=0.8, label="intensity")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def plot_density_slices(truth, recon, grid: Grid, path, project: bool = False) -> None:
    """Central slices x = 0, y = 0, z = 0 (or projections with ``project``) of true and
    reconstructed density (rows), axes in Å, one linear colour scale per row.

    truth, recon: (n, n, n) real densities in e/Å³ on the real grid of ``grid``; truth None
    (measured data): the reconstruction's row alone. Raises ValueError for shape mismatch.
    """
    vols = {"truth": truth, "reconstruction": recon}
    vols = {k: np.real(_np(v)).astype(float) for k, v in vols.items() if v is not None}
    fig, axes = new_figure("density_slices", len(vols), 3)
    r = grid.r_axis
    h = grid.voxel_size / 2
    ext = [r[0] - h, r[-1] + h] * 2
    names = ("x", "y", "z")
    for row, (label, v) in enumerate(vols.items()):
        _check_volume(v, grid, label)
        secs = _central_sections(v, grid, project)
        lo, hi = min(s.min() for s in secs), max(s.max() for s in secs)
        for k, sec in enumerate(secs):
            ax = axes[row, k]
            im = ax.imshow(sec.T, origin="lower", extent=ext, vmin=lo, vmax=hi, cmap="gray_r",
                           interpolation="nearest")
            a, b = [s for j, s in enumerate(names) if j != k]
            ax.set_xlabel(f"{a} (Å)", fontsize=8)
            ax.set_ylabel(f"{b} (Å)", fontsize=8)
            what = f"sum over {names[k]}" if project else f"{names[k]} = 0"
            ax.set_title(f"{label}, {what}", fontsize=9)
        fig.colorbar(im, ax=axes[row, :].tolist(), shrink=0.8,
                     label="projected density (e/Å²)" if project else "density (e/Å³)")
    save_figure(fig, path)


def plot_orientation_errors(errors_deg, path) -> None:
    """Histogram of per-frame orientation errors (degrees) with the median marked.

    Raises ValueError for an empty or non-finite input.
    """
    e = _np(errors_deg).astype(float).ravel()
    if e.size == 0 or not np.all(np.isfinite(e)):
        raise ValueError("plot_orientation_errors: need a non-empty array of finite errors")
    fig, axes = new_figure("orientation_errors")
    ax = axes[0, 0]
    ax.hist(e, bins=np.linspace(0, max(float(e.max()), 1e-3), 41), color="steelblue")
    med = float(np.median(e))
    ax.axvline(med, color="crimson", ls="--", label=f"median {med:.3g}°")
    ax.set_xlabel("orientation error (°)")
    ax.set_ylabel("frames")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_pattern_montage(photons, valid, path) -> None:
    """Montage of raw patterns ``photons`` (k, ny, nx) as log(1 + photons); pixels where
    ``valid`` (ny, nx) is False are grey. Raises ValueError for mismatched shapes.
    """
    p = _np(photons).astype(float)
    m = _np(valid).astype(bool)
    if p.ndim != 3 or p.shape[0] == 0 or m.shape != p.shape[1:]:
        raise ValueError(f"photons must be (k, ny, nx) and valid (ny, nx); got {p.shape}, {m.shape}")
    k = p.shape[0]
    ncols = math.ceil(math.sqrt(k))
    nrows = math.ceil(k / ncols)
    fig, axes = new_figure("pattern_montage", nrows, ncols)
    vmax = float(np.log1p(p[:, m].max())) if m.any() else 1.0
    cmap = colormaps["magma"].with_extremes(bad="0.6")
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= k:
            continue
        img = np.ma.masked_array(np.log1p(p[i]), mask=~m)
        ax.imshow(img, origin="lower", cmap=cmap, vmin=0, vmax=max(vmax, 1e-6), interpolation="nearest")
        ax.set_title(f"frame {i} ({int(p[i][m].sum())} ph)", fontsize=7)
    fig.suptitle("log(1 + photons); grey: masked pixels", fontsize=9)
    save_figure(fig, path)


EMC_COLUMNS = ("iteration", "beta", "log_likelihood", "rms_change", "mutual_info")


def plot_emc_log(log_df: pd.DataFrame, path) -> None:
    """EMC convergence: log-likelihood, rms model change (log scale), mutual information
    and β against iteration, one line per random start (column ``start``, optional); the
    local refinement iterations (column ``step_deg`` not NaN, optional) are shaded.
    ``log_df`` needs the columns iteration, beta, log_likelihood, rms_change, mutual_info
    (``seconds`` is optional); raises ValueError otherwise.
    """
    missing = [c for c in EMC_COLUMNS if c not in log_df.columns]
    if missing:
        raise ValueError(f"plot_emc_log: missing columns {missing}")
    fig, axes = new_figure("emc_log", 2, 2, sharex=True)
    starts = log_df["start"] if "start" in log_df.columns else pd.Series(0, index=log_df.index)
    panels = [("log_likelihood", "log-likelihood"), ("rms_change", "rms model change"),
              ("mutual_info", "mutual information"), ("beta", "β (deterministic annealing)")]
    for ax, (col, label) in zip(axes.flat, panels):
        for k, rows in log_df.groupby(starts):  # one line per random start
            y = rows[col].to_numpy(dtype=float)
            ax.plot(rows["iteration"].to_numpy(), y, marker=".", label=f"start {k}")
        ax.set_ylabel(label, fontsize=8)
        y = log_df[col].to_numpy(dtype=float)
        if col == "rms_change" and np.all(y[np.isfinite(y)] > 0) and np.isfinite(y).any():
            ax.set_yscale("log")
    has_local = "step_deg" in log_df.columns and log_df["step_deg"].notna().any()  # spiflow.refine
    if has_local:
        local = log_df.loc[log_df["step_deg"].notna(), "iteration"]
        for ax in axes.flat:
            ax.axvspan(local.min() - 0.5, local.max() + 0.5, color="0.9", zorder=0,
                       label="local refinement (β: hard, MI: log J)")
    if starts.nunique() > 1 or has_local:
        axes.flat[0].legend(fontsize=6)
    for ax in axes[1]:
        ax.set_xlabel("iteration")
    save_figure(fig, path)
