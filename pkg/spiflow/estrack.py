"""Adaptive latent tracking of a changing crystal by bounded extremum seeking (ES).

A trained :class:`spiflow.ae3d.AE3D` maps an intensity to a latent vector z and decodes z
to a complex density. For a time series of intensities ``I_t`` of a slowly changing object
(:func:`spiflow.bragg.simulate_series`), Scheinker & Pokharel (npj Comput. Mater. 10, 2024,
doi 10.1038/s41524-024-01482-5) keep the decoder fixed and tune z frame by frame, without
labels and without retraining, against the label-free cost

    C_t(z) = physics loss of decode(z) against √I_t (:func:`spiflow.ae3d.physics_loss`:
    ``‖k |F| − √I‖² / ‖√I‖²`` over measured voxels, k the least-squares scale; the decoded
    density is :meth:`spiflow.ae3d.AE3D.complex_density`, so the strain head's sign is chosen
    by the same intensity and C may jump where the choice changes),

by bounded extremum seeking (Scheinker & Krstić, IEEE Trans. Autom. Control 58, 1107
(2013), "Minimum-seeking for CLFs: universal semiglobally stabilizing feedback under unknown
control directions"; Scheinker & Krstić, "Extremum seeking with bounded update rates",
Syst. Control Lett. 63, 25 (2014); book: Scheinker & Krstić, *Model-Free Stabilization by
Extremum Seeking*, Springer 2017):

    dz_i/dt = √(α ω_i) cos(ω_i t + k C(z(t)))      (one distinct ω_i per latent component)

which on average (for large ω) is the gradient descent dz/dt ≈ −(k α / 2) ∇C, with the rate
of every component bounded by √(α ω_i) whatever C does (hence "bounded"; C need not be
differentiable or even known in closed form: only its values are used). Discretised here with
the forward-Euler step ``dt`` (z_i ← z_i + dt √(α ω_i) cos(ω_i t + k C)), with
``ω_i = ω_max (0.55 + 0.45 i / (D − 1))`` (distinct, i = 0 … D − 1) and ``ω_max dt = 2π /
steps_per_period`` (dt = 1). The ES time t runs on across frames, so the dither continues from one
frame to the next (tracking), and each frame starts from the previous frame's tuned z. The
dither amplitude in z is ``√(α / ω_i)``.

α, k, steps_per_period, the steps per frame and the series are settings
(:class:`spiflow.settings.AE3DTrackingSettings`, ``ae3d.tracking``); the functions here take
them as arguments with those settings' defaults. Workflow (target rule ``ae3d``):
:func:`stage_series` (rule ``ae3d_series``) simulates the series, :func:`stage_track` (rule
``ae3d_track``) tracks it (:func:`track_series`) and writes the per-frame table, a summary
and the figure (:func:`plot_tracking`).

Measured (README "Direct ML phasing", n = 17): ES keeps C below the untuned encoder's on
every frame of a 20-frame series, but the error against the truth improves only where the
decoder can represent the object; a lower C in the latent space of a weak decoder is not a
better density.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import ae3d, bragg
from .settings import AE3DTrackingSettings

_DEFAULTS = AE3DTrackingSettings()  # the defaults of ae3d.tracking (the one place they are set)
METHODS = ("untuned encoder", "ES-tracked latent", "iterative phasing", "untuned encoder + refinement",
           "ES-tracked latent + refinement")
TABLE_COLUMNS = ["frame", "method", "u_max_angstrom", "radius_voxels", "seconds", "cost", "cost_start", "cost_truth",
                 "complex_error", "phase_rmse_rad", "amplitude_fsc_mean", "amplitude_resolution_05",
                 "fourier_error", "twin", "shift"]
SERIES_SEED_OFFSET = 2  # the series draws from dataset.seed + 2 (training: + 0, held-out: + 1)


def es_frequencies(dim: int, omega_max: float) -> np.ndarray:
    """Distinct dithering frequencies (dim,) rad per unit ES time:
    ``ω_max (0.55 + 0.45 i / (dim − 1))``. Raises ValueError for dim < 1 or ω_max <= 0."""
    if dim < 1 or not omega_max > 0:
        raise ValueError(f"need dim >= 1 and omega_max > 0, got {dim}, {omega_max}")
    return omega_max * (0.55 + 0.45 * np.arange(dim) / max(dim - 1, 1))


@torch.no_grad()
def latent_cost(model: ae3d.AE3D, z: torch.Tensor, sqrt_intensity: torch.Tensor, measured: torch.Tensor):
    """Physics loss (B,) of the decoded densities of latents z (B, D) against √I (B, n, n, n)."""
    sqrt_I = sqrt_intensity.expand(len(z), *sqrt_intensity.shape[1:])
    return ae3d.physics_loss(model.complex_density(z, sqrt_I, measured), sqrt_I, measured)


@torch.no_grad()
def extremum_seek(model: ae3d.AE3D, z0, intensity, measured, steps: int = _DEFAULTS.steps,
                  alpha: float = _DEFAULTS.alpha, gain: float = _DEFAULTS.gain,
                  steps_per_period: int = _DEFAULTS.steps_per_period, t0: float = 0.0):
    """Bounded ES (module docstring) on the latent of one frame: ``steps`` Euler steps (dt = 1)
    from z0 (D,) against ``intensity`` (n, n, n) photons with ``measured`` (n, n, n) bool.
    alpha (α), gain (k, applied to the cost divided by its value at z0, so k does not depend
    on the photon count) and steps_per_period (``ω_max = 2π / steps_per_period``) as in the
    module docstring, defaults those of ``ae3d.tracking``; t0 the ES time at the start (the
    dither's phase runs on across frames). Returns ``(z (D,) tensor, costs (steps + 1,)
    ndarray: C before each step and at the end, t_end)``; the returned z is the final
    iterate, not the best visited one (ES has no access to anything but C's values, as on a
    running experiment). Raises ValueError for steps < 0, alpha <= 0 or steps_per_period < 2."""
    if steps < 0 or not alpha > 0 or steps_per_period < 2:
        raise ValueError(f"need steps >= 0, alpha > 0, steps_per_period >= 2; got {steps}, {alpha}, {steps_per_period}")
    dev = next(model.parameters()).device
    z = torch.as_tensor(z0, dtype=torch.float32, device=dev).clone().reshape(1, -1)
    sqrt_I = torch.as_tensor(np.sqrt(np.clip(np.asarray(intensity, dtype=np.float32), 0, None)), device=dev)[None]
    m = torch.as_tensor(np.asarray(measured), dtype=torch.bool, device=dev)
    w = torch.as_tensor(es_frequencies(z.shape[1], 2 * math.pi / steps_per_period), dtype=torch.float32, device=dev)
    amp = torch.sqrt(alpha * w)
    costs = []
    c0 = float(latent_cost(model, z, sqrt_I, m)[0])
    scale = 1.0 / max(c0, 1e-12)
    t = t0
    for _ in range(steps):
        c = float(latent_cost(model, z, sqrt_I, m)[0])
        costs.append(c)
        z = z + amp * torch.cos(w * t + gain * c * scale)
        t += 1.0
    costs.append(float(latent_cost(model, z, sqrt_I, m)[0]))
    return z[0], np.array(costs), t


def iterative_settings(cfg: AE3DTrackingSettings = _DEFAULTS):
    """The iterative phasing of every frame: ``spiflow.ae3d.ITERATIVE_BASELINES[cfg.iterative_algorithm]``
    with ``cfg.iterative_cycles`` cycles and ``cfg.iterative_restarts`` restarts."""
    return ae3d.ITERATIVE_BASELINES[cfg.iterative_algorithm].model_copy(
        update={"n_cycles": cfg.iterative_cycles, "n_restarts": cfg.iterative_restarts})


def track_series(model: ae3d.AE3D, series, cfg: AE3DTrackingSettings = _DEFAULTS, progress: bool = False,
                 slice_frames=(), slices: dict | None = None):
    """Track a time series (:class:`spiflow.bragg.CrystalSet` of frames, truth included) and
    compare, per frame, three phasings of the same intensity against the truth
    (:func:`spiflow.bragg.complex_errors`, ambiguities removed: global phase, translation,
    twin):

    * ``untuned encoder``: the network applied to each frame alone (encode, decode);
    * ``ES-tracked latent``: z of frame 0 from the encoder, then :func:`extremum_seek` with
      ``cfg.steps`` steps per frame (α ``cfg.alpha``, k ``cfg.gain``,
      ``cfg.steps_per_period``), each frame starting from the previous frame's final z and
      ES time; no truth, no retraining;
    * ``iterative phasing``: :func:`spiflow.phasing.phase_complex` from random phases
      (:func:`iterative_settings`, seed = frame);
    * with ``cfg.refine_algorithm`` set, ``untuned encoder + refinement`` and ``ES-tracked
      latent + refinement``: each of the first two followed by one cycle of that iterative
      phasing (:func:`spiflow.ae3d.refine_cycle`); their seconds include the network's or
      ES's (the refinement does not feed back into the tracked latent).

    Returns a DataFrame with :data:`TABLE_COLUMNS`, one row per (frame, method): ``seconds``
    wall time of that phasing of that frame (the encoder of frame 0 that starts ES is not
    counted), ``cost`` C of its result against the frame's √I (:func:`spiflow.ae3d.physics_loss`,
    the ES cost), ``cost_start`` C of the latent ES starts the frame from (ES rows; NaN
    otherwise), ``cost_truth`` C of the true density (the noise floor), then the error columns.
    slice_frames: frames whose densities (aligned onto the truth by
    :func:`spiflow.bragg.align_complex`) go into ``slices[frame][label]`` (labels ``truth``
    and :data:`METHODS`), e.g. for :func:`plot_tracking`."""
    import pandas as pd

    from .phasing import phase_complex
    dev = next(model.parameters()).device
    it_cfg = iterative_settings(cfg)
    rows = []
    x = ae3d.network_input(series.intensity, series.measured).to(dev)
    m = torch.as_tensor(np.asarray(series.measured), dtype=torch.bool, device=dev)
    with torch.no_grad():
        z = model.encode(x[:1])[0]
    t_es = 0.0
    for f in range(len(series.intensity)):
        I = series.intensity[f]
        truth = series.amplitude[f].astype(np.float64) * np.exp(1j * series.phase[f].astype(np.float64))
        sqrt_I = torch.as_tensor(np.sqrt(np.clip(I, 0, None)), dtype=torch.float32, device=dev)[None]

        def cost_of(density) -> float:
            d = torch.as_tensor(np.asarray(density), dtype=torch.complex64, device=dev)[None]
            return float(ae3d.physics_loss(d, sqrt_I, m)[0])

        c_truth = cost_of(truth)

        def record(method, seconds, density, cost, cost_start=float("nan")):
            rows.append({"frame": f, "method": method, "u_max_angstrom": float(series.params[f, 2]),
                         "radius_voxels": float(series.params[f, 0]), "seconds": seconds, "cost": cost,
                         "cost_start": cost_start, "cost_truth": c_truth,
                         **bragg.complex_errors(density, truth, series.grid, I, series.measured)})
            if slices is not None and f in slice_frames:
                slices.setdefault(f, {"truth": truth})[method] = bragg.align_complex(density, truth)[0]

        t0 = time.perf_counter()
        with torch.no_grad():
            d = model.complex_density(model.encode(x[f:f + 1]), sqrt_I, m)
        t_enc = time.perf_counter() - t0
        d_enc = d[0].cpu().numpy()
        record(METHODS[0], t_enc, d_enc, float(ae3d.physics_loss(d, sqrt_I, m)[0]))
        first = len(rows) - 1
        t0 = time.perf_counter()
        z, costs, t_es = extremum_seek(model, z, I, series.measured, cfg.steps, cfg.alpha, cfg.gain,
                                       cfg.steps_per_period, t0=t_es)
        with torch.no_grad():
            d = model.complex_density(z[None], sqrt_I, m)
        t_track = time.perf_counter() - t0
        d_es = d[0].cpu().numpy()
        record(METHODS[1], t_track, d_es, float(costs[-1]), float(costs[0]))
        t0 = time.perf_counter()
        res = phase_complex(I, it_cfg, measured=series.measured, seed=f)
        seconds = time.perf_counter() - t0
        record(METHODS[2], seconds, res.density, cost_of(res.density))
        if cfg.refine_algorithm is not None:
            for label, start, t_start in ((METHODS[3], d_enc, t_enc), (METHODS[4], d_es, t_track)):
                t0 = time.perf_counter()
                ref = ae3d.refine_cycle(start, I, series.measured, ae3d.ITERATIVE_BASELINES[cfg.refine_algorithm])
                record(label, t_start + time.perf_counter() - t0, ref.density, cost_of(ref.density))
        if progress:
            print(pd.DataFrame(rows[first:])[["frame", "method", "seconds", "cost", "complex_error"]]
                  .to_string(header=f == 0), flush=True)
    return bragg.errors_table(rows)[TABLE_COLUMNS]


def summarize_tracking(table) -> str:
    """Markdown summary of :func:`track_series`' table: medians over frames per method
    (complex error, phase RMSE, amplitude FSC, Fourier error, C, seconds) and the counts of
    frames where the ES-tracked latent's C is below its start and below the untuned
    encoder's, where its complex error is below the untuned encoder's and below
    iterative phasing's, and where each refined method's error is below iterative phasing's."""
    cols = ["complex_error", "phase_rmse_rad", "amplitude_fsc_mean", "fourier_error", "cost", "seconds"]
    med = table.groupby("method", sort=False)[cols].median().reset_index()
    piv = {c: table.pivot(index="frame", columns="method", values=c) for c in ("cost", "complex_error")}
    es, enc, it = METHODS[1], METHODS[0], METHODS[2]
    es_rows = table[table["method"] == es]
    n = len(es_rows)
    lines = [f"frames where the ES-tracked latent's C is below its start: {int((es_rows['cost'] < es_rows['cost_start']).sum())}/{n}; "
             f"below the untuned encoder's C: {int((piv['cost'][es] < piv['cost'][enc]).sum())}/{n}",
             f"frames where its complex error is below the untuned encoder's: "
             f"{int((piv['complex_error'][es] < piv['complex_error'][enc]).sum())}/{n}; "
             f"below iterative phasing's: {int((piv['complex_error'][es] < piv['complex_error'][it]).sum())}/{n}",
             *[f"frames where {m}'s complex error is below iterative phasing's: "
               f"{int((piv['complex_error'][m] < piv['complex_error'][it]).sum())}/{n}"
               for m in METHODS[3:] if m in piv["complex_error"]],
             f"C of the true densities (noise floor), median: {table['cost_truth'].median():.3g}", "",
             "medians over frames:", "", med.to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines) + "\n"


def plot_tracking(table, slices: dict, path) -> None:
    """The tracked series as a PNG at ``path`` (:func:`spiflow.plots.save_figure`): for each
    frame of ``slices`` (frame → label → (n, n, n) complex, aligned; :func:`track_series`)
    the central half of the z = 0 slice of the amplitude (scaled to its maximum) and the phase (rad,
    shown where the amplitude exceeds 10 % of its maximum) of the truth and every method,
    then the complex error (ambiguities removed) and the cost C against the frame for every
    method (C of the truth dashed). Raises ValueError for empty ``slices``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import save_figure
    if not slices:
        raise ValueError("plot_tracking needs the densities of one or more frames")
    frames = sorted(slices)
    labels = ["truth", *METHODS]
    fig = Figure(figsize=(2.2 * 2 * len(frames) + 0.8, 2.0 * len(labels) + 3.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.0 * len(labels), 3.0])
    axes = top.subplots(len(labels), 2 * len(frames), squeeze=False)
    a = p = None
    for j, f in enumerate(frames):
        for i, label in enumerate(labels):
            ax_a, ax_p = axes[i, 2 * j], axes[i, 2 * j + 1]
            for ax in (ax_a, ax_p):
                ax.set_xticks([])
                ax.set_yticks([])
            if label not in slices[f]:
                continue
            v = np.asarray(slices[f][label])
            n = v.shape[0]
            lo, hi = n // 4, n - n // 4  # the central half: every crystal fits in n / 2 (spiflow.bragg)
            sec = v[lo:hi, lo:hi, n // 2]
            amp = np.abs(sec) / max(float(np.abs(v).max()), 1e-30)
            a = ax_a.imshow(amp.T, origin="lower", cmap="gray_r", vmin=0, vmax=1)
            p = ax_p.imshow(np.where(amp > 0.1, np.angle(sec), np.nan).T, origin="lower", cmap="twilight",
                            vmin=-np.pi, vmax=np.pi)
            ax_a.set_title(f"frame {f}: {label}\namplitude", fontsize=7)
            ax_p.set_title("phase (rad)", fontsize=7)
    if a is not None:
        top.colorbar(a, ax=axes[:, 0].tolist(), shrink=0.5, location="left")
        top.colorbar(p, ax=axes[:, -1].tolist(), shrink=0.5)
    ax1, ax2 = bottom.subplots(1, 2)
    for method, grp in table.groupby("method", sort=False):
        ax1.plot(grp["frame"], grp["complex_error"], marker="o", ms=3, label=method)
        ax2.plot(grp["frame"], grp["cost"], marker="o", ms=3, label=method)
    truth = table.groupby("frame")["cost_truth"].first()
    ax2.plot(truth.index, truth.values, "k--", lw=1, label="truth")
    ax1.set_xlabel("frame")
    ax1.set_ylabel("complex error (ambiguities removed)")
    ax2.set_xlabel("frame")
    ax2.set_ylabel("Fourier-modulus cost C")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    save_figure(fig, path)


def figure_frames(frames: int) -> list[int]:
    """The frames the figure of :func:`stage_track` shows: first, middle and last (distinct)."""
    return sorted({0, (frames - 1) // 2, frames - 1})


# ---------------------------------------------------------------------------- workflow stages

def stage_series(config: dict, intensity_path, truth_path) -> None:
    """rule ae3d_series: the drifting series of ``ae3d.tracking`` (:func:`spiflow.bragg.simulate_series`:
    ``frames`` frames of one crystal of ``ae3d.crystals``, u_max over
    ``displacement_range_angstrom``, R over ``radius_range_voxels``, ``photons`` per frame;
    seed ``dataset.seed`` + :data:`SERIES_SEED_OFFSET`) as an intensity store and a truth
    store (:func:`spiflow.bragg.write_crystal_set`, Zarr chunks of ``dataset.chunk_frames``
    frames; the object axis is the frame). Raises ValueError naming the keys for a size that
    does not fit the grid."""
    from .settings import settings
    cfg = settings(config).ae3d
    tr = cfg.tracking
    cr = cfg.crystals if tr.photons is None else cfg.crystals.model_copy(update={"photons": tr.photons})
    seed = config["dataset"]["seed"] + SERIES_SEED_OFFSET
    t0 = time.perf_counter()
    try:
        series = bragg.simulate_series(cr, tr.frames, seed, tuple(tr.displacement_range_angstrom),
                                       None if tr.radius_range_voxels is None else tuple(tr.radius_range_voxels))
    except ValueError as exc:
        raise ValueError(f"ae3d.tracking.radius_range_voxels / ae3d.crystals.size_range_voxels: {exc}") from exc
    bragg.write_crystal_set(series, intensity_path, truth_path, config["dataset"]["chunk_frames"],
                            {"seed": seed, "crystals": json.dumps(cr.model_dump()),
                             "tracking": json.dumps(tr.model_dump()), "wall_seconds": time.perf_counter() - t0})


def stage_track(config: dict, series_intensity, series_truth, model_path, table_csv, summary_md, figure_png,
                progress: bool = False) -> None:
    """rule ae3d_track: :func:`track_series` of the series stores (:func:`stage_series`) with
    the network at ``model_path`` (:func:`spiflow.ae3d.load_model`, on ``device``) and the
    ES and iterative settings of ``ae3d.tracking``; writes the per-frame table (CSV,
    :data:`TABLE_COLUMNS`), its :func:`summarize_tracking` (markdown, with the settings and
    the 1-minute load average at start and end) and :func:`plot_tracking` of the frames
    :func:`figure_frames`. Raises ValueError naming the files when the network's grid is not
    the series'."""
    import os

    from .io import atomic_path, resolve_device
    from .settings import settings
    tr = settings(config).ae3d.tracking
    load0 = os.getloadavg()[0]
    series = bragg.read_crystal_set(series_intensity, series_truth)
    model = ae3d.load_model(model_path, resolve_device(config.get("device", "cpu")))
    if model.n != series.grid.n:
        raise ValueError(f"the network of {model_path} takes {model.n}^3 voxels, the series {series_intensity} "
                         f"has {series.grid.n}^3")
    slices: dict = {}
    t0 = time.perf_counter()
    table = track_series(model, series, tr, progress=progress, slice_frames=figure_frames(len(series.intensity)),
                         slices=slices)
    wall = time.perf_counter() - t0
    with atomic_path(table_csv) as tmp:
        table.to_csv(tmp, index=False)
    p = series.params
    text = (f"# ae3d latent tracking by extremum seeking ({len(series.intensity)} frames, n = {series.grid.n}, "
            f"u_max {p[0, 2]:.3g} -> {p[-1, 2]:.3g} A, R {p[0, 0]:.3g} -> {p[-1, 0]:.3g} voxels)\n\n"
            f"network `{model_path}` on {next(model.parameters()).device}, {torch.get_num_threads()} threads; "
            f"ES: {tr.steps} steps/frame, alpha {tr.alpha}, gain {tr.gain}, {tr.steps_per_period} steps per "
            f"period; iterative: {tr.iterative_algorithm}, {tr.iterative_cycles} cycles x {tr.iterative_restarts} "
            f"restarts; refinement: {tr.refine_algorithm}\n\n"
            f"wall {wall:.0f} s; 1-minute load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end\n\n"
            + summarize_tracking(table))
    with atomic_path(summary_md) as tmp:
        Path(tmp).write_text(text)
    plot_tracking(table, slices, figure_png)
