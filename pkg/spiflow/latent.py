"""Method ``vae`` in the workflow: the trained decoder on disk, and evaluate's latent analysis.

:func:`save_decoder` / :func:`load_decoder` keep the trained
:class:`~spiflow.vae.IntensityDecoder` with its :class:`~spiflow.settings.VAESettings` and grid
(``recon/vae/decoder.pt``), so ``evaluate`` can decode any latent point.
:func:`representative_frame` picks the frame decoded into ``recon/vae/intensity.zarr``.

:func:`evaluate_latent` (``evaluate/vae/``):

* PCA of the latent means ``z_mu`` (:func:`spiflow.vae.pca`); ``latent_pca.png`` shows PC1
  against PC2 coloured by the true conformation, and PC1 against each true parameter;
* ``latent_spearman`` = |Spearman ρ| between PC1 and the first conformation parameter (the
  sign of PC1 is arbitrary; :func:`latent_spearman`), ``latent_spearman_<name>`` for every
  parameter;
* when umap-learn is installed, a 2D UMAP of ``z_mu`` (:func:`umap_embedding`):
  ``latent_umap.png``, coloured by the true conformation (no ρ: UMAP's axes are arbitrary);
* ``vae.clusters`` k-means centres snapped to real frames
  (:func:`spiflow.vae.kmeans_representatives`), each decoded onto the reconstruction grid,
  phased with the ``phase`` settings, rotated into the truth's frame by the rotation that
  ``evaluate`` found for the representative intensity (all decoded volumes share the frame
  of the orientations), registered (translation, inversion) and compared by FSC with the
  *matching true state*: the reference state of ``truth.zarr`` (``state_conformation``)
  nearest the snapped frame's true conformation, parameters scaled by their range over
  the frames (a homogeneous truth has one state: its ``density``). Written to
  ``states/state_K.mrc`` (aligned to the truth, e/Å³), ``states/fsc_state_K.csv`` and
  ``states.csv``;
* ``latent_traversal.png``: central sections of the volumes decoded along PC1
  (:func:`spiflow.vae.traversal`, ±2 σ).

:func:`evaluate_models` evaluates multi-model EMC's models (``emc.models`` > 1) the same way
(:func:`compare_with_state`, shared with the VAE's states): ``evaluate/emc/models/`` and
``models.csv``, with each model's orientation error modulo the point group.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from matplotlib.colors import LogNorm

from . import metrics
from .align import align_density, rotate_volume
from .grid import Grid
from .io import atomic_path
from .phasing import phase
from .plots import new_figure, save_figure
from .settings import PhasingSettings, VAESettings
from .vae import IntensityDecoder, decode, kmeans_representatives, pca, traversal


def save_decoder(path, decoder: IntensityDecoder, grid: Grid, settings: VAESettings) -> None:
    """Write ``{config, grid_n, grid_dq, decoder}`` (readable with ``weights_only=True``):
    config is ``settings.model_dump()`` (plain values), decoder the state dict."""
    with atomic_path(path) as tmp:
        torch.save({"config": settings.model_dump(), "grid_n": grid.n, "grid_dq": grid.dq,
                    "decoder": decoder.state_dict()}, tmp)


def load_decoder(path) -> tuple[IntensityDecoder, Grid]:
    """The decoder written by :func:`save_decoder` (CPU, eval mode) and its grid.

    Raises FileNotFoundError naming ``path`` when it is missing."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"VAE decoder not found: {path}")
    d = torch.load(path, map_location="cpu", weights_only=True)
    dec = IntensityDecoder(VAESettings(**d["config"]), int(d["grid_n"]))
    dec.load_state_dict(d["decoder"])
    return dec.eval(), Grid(int(d["grid_n"]), float(d["grid_dq"]))


def representative_frame(z_mu: np.ndarray, how: str, clusters: int, seed: int) -> int:
    """Frame whose latent is decoded as the method's single intensity.

    ``mean``: nearest (Euclidean) to the mean of z_mu; ``largest_cluster``: the snapped
    centre of the most populated k-means cluster. Raises ValueError for another ``how``."""
    z = np.asarray(z_mu, dtype=np.float64)
    if how == "mean":
        return int(np.argmin(((z - z.mean(0)) ** 2).sum(1)))
    if how == "largest_cluster":
        frames, _, labels = kmeans_representatives(z, min(clusters, len(z)), seed)
        return int(frames[np.argmax(np.bincount(labels, minlength=len(frames)))])
    raise ValueError(f"vae.representative must be mean or largest_cluster, got {how!r}")


def match_states(conformations: np.ndarray, states: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Index of the nearest row of ``states`` (S, P) for each row of ``conformations`` (k, P),
    each parameter divided by ``scale`` (P,) (its range; 1 where the range is 0)."""
    s = np.where(np.asarray(scale) > 0, scale, 1.0)
    d = (((conformations[:, None, :] - states[None, :, :]) / s) ** 2).sum(-1)
    return d.argmin(1)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(abs(spearmanr(a, b).statistic))


def latent_spearman(z_mu: np.ndarray, conformation: np.ndarray) -> np.ndarray:
    """|Spearman ρ| (P,) between PC1 of the latent means z_mu (frames, D)
    (:func:`spiflow.vae.pca`) and each true parameter, conformation (frames, P): the
    absolute value because the sign of PC1 is arbitrary; NaN where either is constant."""
    pc1 = pca(z_mu, 1).scores[:, 0]
    return np.array([_spearman(pc1, c) for c in np.asarray(conformation, dtype=np.float64).T])


def umap_embedding(z: np.ndarray, seed: int, neighbors: int = 15) -> np.ndarray | None:
    """2D UMAP embedding (frames, 2) of the latent means z (frames, latent) with umap-learn
    (McInnes, Healy & Melville, arXiv 1802.03426; ``n_neighbors = min(neighbors, frames − 1)``,
    seeded), or None when umap-learn is not installed or there are fewer than 4 frames."""
    try:
        import umap
    except ImportError:
        return None
    if len(z) < 4:
        return None
    reducer = umap.UMAP(n_components=2, n_neighbors=min(neighbors, len(z) - 1), random_state=seed)
    return np.asarray(reducer.fit_transform(np.asarray(z, dtype=np.float32)), dtype=np.float64)


def plot_latent(scores: np.ndarray, conformation: np.ndarray | None, names: list[str], rep_frames, path,
                axes_names: tuple[str, str] = ("PC1", "PC2"), versus: bool = True) -> None:
    """Component 1 vs 2 of ``scores`` (frames, ≥ 1) coloured by the first true parameter and,
    with ``versus``, component 1 vs each true parameter (with |Spearman ρ|; meaningful for
    PCA, not for UMAP, whose axes are arbitrary); ``axes_names`` label the components."""
    k = 1 + (len(names) if conformation is not None and versus else 0)
    fig, axes = new_figure((4.0 * k, 3.6), 1, k)
    pc2 = scores[:, 1] if scores.shape[1] > 1 else np.zeros(len(scores))
    ax = axes[0, 0]
    c = conformation[:, 0] if conformation is not None else None
    sc = ax.scatter(scores[:, 0], pc2, c=c, s=4, cmap="viridis")
    ax.scatter(scores[rep_frames, 0], pc2[rep_frames], marker="x", c="red", s=40, label="k-means states")
    if c is not None:
        fig.colorbar(sc, ax=ax, label=f"true {names[0]}")
    ax.set_xlabel(axes_names[0])
    ax.set_ylabel(axes_names[1])
    ax.legend(fontsize=7)
    for j in range(k - 1):
        ax = axes[0, j + 1]
        ax.scatter(conformation[:, j], scores[:, 0], s=4, c="k", alpha=0.5)
        ax.set_xlabel(f"true {names[j]}")
        ax.set_ylabel(axes_names[0])
        ax.set_title(f"|Spearman ρ| = {_spearman(scores[:, 0], conformation[:, j]):.3f}", fontsize=9)
    save_figure(fig, path)


def plot_traversal(volumes: np.ndarray, grid: Grid, steps_sd: np.ndarray, path) -> None:
    """Central sections qz = 0 (top) and qx = 0 (bottom) of volumes (m, n, n, n) along PC1,
    log colour scale (five decades below the overall maximum), axes in Å⁻¹."""
    m, c = len(volumes), grid.center
    fig, axes = new_figure((2.2 * m, 4.6), 2, m)
    vmax = float(volumes.max())
    norm = LogNorm(vmin=vmax * 1e-5, vmax=vmax)
    q = grid.q_axis
    ext = [q[0] - grid.dq / 2, q[-1] + grid.dq / 2] * 2
    for i, v in enumerate(volumes):
        for row, (sec, lab) in enumerate(((v[:, :, c], "qz = 0"), (v[c], "qx = 0"))):
            ax = axes[row, i]
            ax.imshow(np.where(sec > 0, sec, np.nan).T, origin="lower", extent=ext, norm=norm, cmap="viridis",
                      interpolation="nearest")
            ax.set_title(f"PC1 {steps_sd[i]:+.1f} σ, {lab}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    save_figure(fig, path)


def evaluate_latent(config: dict, truth: xr.Dataset, latent: xr.Dataset, decoder_path, measured: np.ndarray,
                    rotation: np.ndarray, scale: float, out_dir) -> dict:
    """The latent analysis of the module docstring; returns the numbers for metrics.json.

    truth: the loaded truth store; latent: ``recon/vae/latent.zarr``; measured: (n, n, n)
    voxels of the reconstruction grid the data cover (phasing leaves the others free);
    rotation: A with ``I_rec(q) ≈ I_true(A q)``; scale: J r_e² that turns the decoder's
    photons per unit pixel factor into electrons². Files go to ``out_dir``.
    """
    out = Path(out_dir)
    (out / "states").mkdir(parents=True, exist_ok=True)
    v, seed = config["vae"], config["dataset"]["seed"]
    z = latent.z_mu.values
    grid = Grid(truth.sizes["qx"], float(truth.qx.values[1] - truth.qx.values[0]))
    decoder, dgrid = load_decoder(decoder_path)
    p = pca(z, 2)
    hetero = "conformation" in truth
    conf = truth.conformation.values if hetero else None
    names = [str(n) for n in truth.parameter.values] if hetero else []
    result = {"latent_pc1_variance_ratio": float(p.explained_variance_ratio[0])}
    for name, rho in zip(names, latent_spearman(z, conf) if hetero else []):
        result[f"latent_spearman_{name}"] = float(rho)
    result["latent_spearman"] = result[f"latent_spearman_{names[0]}"] if names else float("nan")

    frames, zk, _ = kmeans_representatives(z, min(v["clusters"], len(z)), seed)
    if hetero:
        states = truth.state_conformation.values
        matched = match_states(conf[frames], states, np.ptp(conf, axis=0))
        true_density = truth.state_density.values
    else:
        matched, true_density = np.zeros(len(frames), int), truth.density.values[None]
    vols = decode(decoder, zk, grid=grid, decoder_grid=dgrid) / scale
    rows = []
    for k, (f, s, vol) in enumerate(zip(frames, matched, vols)):
        numbers = compare_with_state(config, vol, measured, rotation, true_density[s], grid,
                                     out / "states" / f"fsc_state_{k}.csv", out / "states" / f"state_{k}.mrc")
        row = {"state": k, "frame": int(f), **{f"z{d}": float(x) for d, x in enumerate(zk[k])},
               **{f"true_{n}": float(conf[f, j]) for j, n in enumerate(names)}, "matched_state": int(s),
               **{f"matched_{n}": float(truth.state_conformation.values[s, j]) for j, n in enumerate(names)},
               **numbers}
        rows.append(row)
    df = pd.DataFrame(rows)
    with atomic_path(out / "states.csv") as tmp:
        df.to_csv(tmp, index=False)
    result["states"] = rows
    result["state_resolution_fsc05_angstrom_mean"] = float(df.resolution_fsc05_angstrom.mean())

    plot_latent(p.scores, conf, names, frames, out / "latent_pca.png")
    emb = umap_embedding(z, seed)
    if emb is not None:  # optional: umap-learn installed
        plot_latent(emb, conf, names, frames, out / "latent_umap.png", axes_names=("UMAP 1", "UMAP 2"),
                    versus=False)
    steps = v["traversal_steps"]
    _, path_vols = traversal(decoder, z, steps=steps, span=2.0)
    plot_traversal(path_vols, dgrid, np.linspace(-2, 2, steps), out / "latent_traversal.png")
    return result


def compare_with_state(config: dict, intensity: np.ndarray, measured: np.ndarray, rotation: np.ndarray,
                       true_density: np.ndarray, grid: Grid, fsc_csv, mrc) -> dict:
    """Phase one recovered state's intensity (n, n, n) electrons² (``phase`` settings,
    ``dataset.seed``, ``device``; voxels outside ``measured`` left free), rotate its density
    by ``rotation`` (A with ``I_rec(q) ≈ I_true(A q)``), register it to ``true_density``
    (n, n, n) e/Å³ (translation, inversion) and compare them by FSC. Writes the FSC table
    to ``fsc_csv`` and the aligned density to ``mrc``; returns ``resolution_fsc05_angstrom``,
    ``resolution_fsc0143_angstrom`` (Å) and ``density_cc``. Used for the VAE's k-means states
    (:func:`evaluate_latent`) and multi-model EMC's models (:func:`evaluate_models`)."""
    from .stores import write_mrc

    res = phase(intensity, grid, PhasingSettings(**config["phase"]), measured=measured, seed=config["dataset"]["seed"],
                device=config["device"])
    rho, reg = align_density(np.asarray(rotate_volume(res.density, rotation)), true_density)
    rho = np.asarray(rho)
    table = metrics.fsc(rho, true_density, grid)
    with atomic_path(fsc_csv) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(mrc) as tmp:
        write_mrc(tmp, rho, grid.voxel_size)
    return {"resolution_fsc05_angstrom": metrics.resolution_at(table, 0.5),
            "resolution_fsc0143_angstrom": metrics.resolution_at(table, 0.143), "density_cc": float(reg["cc"])}


def evaluate_models(config: dict, truth: xr.Dataset, intensity: xr.Dataset, orientations: xr.Dataset, grid: Grid,
                    out_dir) -> dict:
    """Multi-model EMC (``emc.models`` > 1) against a heterogeneous truth, as the VAE's states.

    intensity: the EMC intensity store with ``models``/``models_measured`` (model, qx, qy, qz)
    (smallest particle first, :func:`spiflow.emc.model_size_order`); orientations: its
    orientations store with each frame's ``model``. Model k's frames (those whose most
    probable model it is) give its *matching true state*: the reference state nearest the
    median of their true conformations (:func:`match_states`). Each model with frames is
    rotated into the truth's frame by :func:`spiflow.align.align_intensity_rotation` against
    that state's intensity (``evaluate.align_num_div``; every model has its own arbitrary
    frame), then phased and compared (:func:`compare_with_state`); its frames' orientation
    errors are taken modulo ``evaluate.symmetry`` (:func:`spiflow.metrics.orientation_errors`,
    a global rotation fitted per model). Files in ``out_dir/models/`` (``model_K.mrc``,
    ``fsc_model_K.csv``) and ``out_dir/models.csv``. Returns ``model_spearman``: Spearman ρ
    (signed) of the frames' model index against the first true conformation parameter (the
    size for nanoparticles: positive when the models are ordered like the truth);
    ``model_resolution_fsc05_angstrom_mean`` and ``models``, the rows of models.csv (the
    run's ``orientation_error_median_deg`` stays the one-rotation figure of
    :func:`spiflow.pipeline.stage_evaluate`: EMC rotates its models into one frame,
    :func:`spiflow.emc.common_frame`).
    Returns {} for a truth without ``conformation`` (a homogeneous sample)."""
    from scipy.stats import spearmanr

    from .align import align_intensity_rotation
    from .symmetry import point_group

    if "conformation" not in truth:
        return {}
    out = Path(out_dir)
    (out / "models").mkdir(parents=True, exist_ok=True)
    conf = truth.conformation.values
    names = [str(n) for n in truth.parameter.values]
    label = orientations.model.values.astype(int)
    sym = point_group(config["evaluate"]["symmetry"])
    rows = []
    for k in range(intensity.sizes["model"]):
        sel = label == k
        if not sel.any():
            continue
        median = np.median(conf[sel], axis=0)
        s = int(match_states(median[None], truth.state_conformation.values, np.ptp(conf, axis=0))[0])
        vol = intensity.models.values[k]
        meas = intensity.models_measured.values[k]
        A, rot_cc = align_intensity_rotation(vol, truth.state_intensity.values[s], grid, mask=meas,
                                             num_div=config["evaluate"]["align_num_div"])
        numbers = compare_with_state(config, vol, meas, np.asarray(A, dtype=np.float64), truth.state_density.values[s],
                                     grid, out / "models" / f"fsc_model_{k}.csv", out / "models" / f"model_{k}.mrc")
        err, _ = metrics.orientation_errors(orientations.quaternion.values[sel], truth.quaternion.values[sel],
                                            symmetry=sym)
        rows.append({"model": k, "frames": int(sel.sum()), **{f"median_true_{n}": float(median[j])
                                                                for j, n in enumerate(names)},
                     "matched_state": s,
                     **{f"matched_{n}": float(truth.state_conformation.values[s, j]) for j, n in enumerate(names)},
                     "orientation_error_median_deg": float(np.median(err)), "rotation_cc": float(rot_cc), **numbers})
    df = pd.DataFrame(rows)
    with atomic_path(out / "models.csv") as tmp:
        df.to_csv(tmp, index=False)
    rho = float(spearmanr(label, conf[:, 0]).statistic) if np.ptp(label) > 0 and np.ptp(conf[:, 0]) > 0 else np.nan
    return {"model_spearman": rho, "model_resolution_fsc05_angstrom_mean": float(df.resolution_fsc05_angstrom.mean()),
            "models": rows}
