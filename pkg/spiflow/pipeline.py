"""The workflow's stages as functions: one per Snakemake rule and ``spiflow`` subcommand.

Each stage reads the stores of earlier stages, calls the numerical kernels of this
package and writes its outputs atomically. Its ``config`` is the part of the configuration
the stage reads (:func:`spiflow.rules.stage_config`); the paths of a run are those of
:func:`spiflow.rules.layout`, which the Snakefile and the command line both use.
"""
from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
import yaml

from . import halfsets, metrics, plots, stores
from .align import align_density, align_intensity_rotation, rotate_volume
from .emc import run_emc
from .mtip import run_mtip
from .distributed import setup as setup_ranks
from .grid import Grid
from .io import atomic_path, open_dataset, resolve_device, write_dataset
from .phasing import phase
from .selfsup import run_selfsup
from .settings import EMCSettings, EuXFELSettings, MTIPSettings, PhasingSettings, SelfSupSettings, VAESettings
from .simulate import gather_shards, simulate, simulate_shard
from .symmetry import point_group
from .vae import decode, latent_dataset, run_vae
from . import latent as latent_eval

log = logging.getLogger(__name__)
RECON_METHODS = ("truth", "emc", "mtip", "mtip_selfsup", "selfsup", "vae")


def stage_simulate(config: dict, patterns: str, truth: str, progress: bool = True,
                   shards: list[str] | None = None) -> dict:
    """simulate: the patterns store and the ground-truth store (see :mod:`spiflow.simulate`);
    with ``shards`` (the stores of :func:`stage_simulate_shard`) gathers them instead."""
    if shards:
        return gather_shards(config, shards, patterns, truth)
    return simulate(config, patterns, truth, progress=progress)


def stage_simulate_shard(config: dict, shard: int, path: str, progress: bool = True) -> dict:
    """simulate one shard of frames (``simulate.shards`` > 1) into its own store."""
    return simulate_shard(config, shard, path, progress=progress)


def stage_import_cxi(config: dict, patterns: str) -> dict:
    """import_cxi: the CXI file ``cxi.path`` as the run's ``patterns.zarr`` (no truth store);
    see :func:`spiflow.formats.import_cxi`. Errors name the file (ValueError, FileNotFoundError)."""
    from .formats import import_cxi

    c = config["cxi"]
    out = import_cxi(c["path"], patterns, photon_energy_ev=c["photon_energy_ev"], polarization=c["polarization"],
                     fluence_photons_per_angstrom2=c["fluence_photons_per_angstrom2"],
                     grid_oversampling=config["reconstruction"]["grid_oversampling"],
                     round_counts=c["round_counts"], chunk_frames=config["dataset"]["chunk_frames"])
    log.info("imported %s: %d frames %s", c["path"], out["frames"], out["shape"])
    return out


def stage_split_halves(config: dict, patterns: str, halves: list[str]) -> list[int]:
    """split_halves: the even and odd frames as two stores (:func:`spiflow.halfsets.split_halves`)."""
    return halfsets.split_halves(patterns, halves, config["dataset"]["chunk_frames"])


def stage_recon_truth(config: dict, truth: str, patterns: str, intensity: str, orientations: str) -> None:
    """The ``truth`` oracle: the true intensity and orientations as a reconstruction.

    Its ``measured`` voxels are those the detector can reach, ``q_min ≤ |q| ≤ q_max`` of
    the valid pixels, so the oracle sees the same q range as every other method.
    """
    t0 = time.perf_counter()
    tr = open_dataset(truth, "truth store")
    pat, _ = stores.open_patterns(patterns)
    grid = stores.grid_of(pat)
    qn = np.linalg.norm(pat.q.values[pat.valid.values], axis=-1)
    measured = (grid.q_norm() >= qn.min()) & (grid.q_norm() <= qn.max())
    attrs = {"method": "truth", "wall_seconds": time.perf_counter() - t0}
    stores.write_intensity(intensity, tr.intensity.values, grid, measured, attrs)
    stores.write_orientations(orientations, tr.quaternion.values, tr.gain.values, attrs)


def _patterns(patterns: str):
    """(static dataset with the attrs, grid, lazily read photons, valid, q, pixel_factor,
    scale J r_e²) of a patterns store (:func:`spiflow.stores.open_patterns`)."""
    pat, photons = stores.open_patterns(patterns)
    scale = stores.photon_scale(pat)
    return (pat, stores.grid_of(pat), photons, pat.valid.values, pat.q.values.astype(np.float64),
            pat.pixel_factor.values.astype(np.float64), scale)


def _write_recon(W, measured, quaternion, gain, grid: Grid, scale: float, attrs: dict, intensity: str,
                 orientations: str, models=None, models_measured=None, **per_frame) -> None:
    """Write a method's intensity (``W / scale`` in electrons², and ``models / scale`` when
    given) and orientations stores."""
    stores.write_intensity(intensity, W / scale, grid, measured, attrs,
                           None if models is None else models / scale, models_measured)
    stores.write_orientations(orientations, quaternion, gain, attrs, **per_frame)


def stage_emc(config: dict, patterns: str, intensity: str, orientations: str, log_csv: str,
              checkpoint: str, progress: bool = True, seed_offset: int = 0) -> None:
    """orient with EMC: streams photons from the Zarr chunks; never reads the truth.
    With ``emc.models`` K > 1 the intensity store adds ``models``/``models_measured`` (model,
    qx, qy, qz) (smallest particle first) and its ``intensity`` is the most populated model;
    the orientations store adds each frame's ``model`` and ``model_probability``
    (:class:`spiflow.emc.EMCResult`).

    The model W (photons per unit pixel factor) becomes electrons² through the nominal
    fluence J of the patterns' metadata: ``I = W / (J r_e²)``. seed_offset: added to
    ``dataset.seed`` (half set h runs with offset h, so the halves share no random start).
    Under torchrun or srun (``emc.processes`` > 1, :mod:`spiflow.launch`) every rank runs
    this; rank 0 writes the outputs.
    """
    t0 = time.perf_counter()
    pat, grid, photons, valid, q, pf, scale = _patterns(patterns)
    cfg = EMCSettings(**config["emc"])
    ranks = setup_ranks(resolve_device(config["device"]))
    try:
        res = run_emc(photons, valid, q, pf, grid, cfg, seed=config["dataset"]["seed"] + seed_offset,
                      device=config["device"], log_path=log_csv, checkpoint_path=checkpoint, progress=progress)
    finally:
        ranks.close()
    if not ranks.is_root:
        return
    attrs = {"method": "emc", "wall_seconds": time.perf_counter() - t0, "num_div": cfg.num_div,
             "iterations": cfg.iterations, "refine_iterations": cfg.refine_iterations, "models": cfg.models}
    multi = {} if res.models is None else {"models": res.models, "models_measured": res.model_weight > 0,
                                           "model": res.model, "model_probability": res.model_probability}
    _write_recon(res.intensity, res.weight > 0, res.quaternion, res.gain, grid, scale, attrs, intensity,
                 orientations, probability_max=res.probability_max, **multi)


def stage_mtip(config: dict, patterns: str, intensity: str, orientations: str, log_csv: str, checkpoint: str,
               prior: str | None = None, progress: bool = True, seed_offset: int = 0) -> None:
    """orient with M-TIP (:mod:`spiflow.mtip`), from random orientations or, with ``prior``
    (an orientations store, e.g. ``recon/selfsup``), seeded with its quaternions: the
    method ``mtip_selfsup``. Never reads the truth. seed_offset: as for :func:`stage_emc`.
    Under torchrun or srun (``mtip.processes`` > 1) every rank runs this; rank 0 writes."""
    t0 = time.perf_counter()
    pat, grid, photons, valid, q, pf, scale = _patterns(patterns)
    cfg = MTIPSettings(**config["mtip"])
    init = open_dataset(prior, "prior orientations store").quaternion.values if prior else None
    ranks = setup_ranks(resolve_device(config["device"]))
    try:
        res = run_mtip(photons, valid, q, pf, grid, cfg, init_quaternions=init,
                       seed=config["dataset"]["seed"] + seed_offset, device=config["device"], log_path=log_csv,
                       checkpoint_path=checkpoint, progress=progress)
    finally:
        ranks.close()
    if not ranks.is_root:
        return
    method = "mtip_selfsup" if prior else "mtip"
    attrs = {"method": method, "wall_seconds": time.perf_counter() - t0, "num_div": cfg.num_div,
             "iterations": len(res.log), "seeded_from": str(prior or "")}
    _write_recon(res.intensity, res.weight > 0, res.quaternion, res.gain, grid, scale, attrs, intensity,
                 orientations)


def stage_selfsup(config: dict, patterns: str, intensity: str, orientations: str, log_csv: str, checkpoint: str,
                  progress: bool = True) -> None:
    """train the self-supervised encoders + implicit decoder (:mod:`spiflow.selfsup`); its
    ``measured`` voxels are the detector's q range (the decoder is defined everywhere).
    Under torchrun or srun (``selfsup.processes`` > 1) every rank runs this; rank 0 writes."""
    t0 = time.perf_counter()
    pat, grid, photons, valid, q, pf, scale = _patterns(patterns)
    cfg = SelfSupSettings(**config["selfsup"])
    ranks = setup_ranks(resolve_device(config["device"]))
    try:
        res = run_selfsup(photons, valid, q, pf, grid, cfg, seed=config["dataset"]["seed"], device=config["device"],
                          log_path=log_csv, checkpoint_path=checkpoint, progress=progress)
    finally:
        ranks.close()
    if not ranks.is_root:
        return
    qn = np.linalg.norm(q[valid], axis=-1)
    measured = (grid.q_norm() >= qn.min()) & (grid.q_norm() <= qn.max())
    attrs = {"method": "selfsup", "wall_seconds": time.perf_counter() - t0, "epochs": cfg.epochs,
             "training_seconds": float(res.log["seconds"].sum()), "search_epochs": cfg.search_epochs,
             **res.amortize}
    _write_recon(res.intensity, measured, res.quaternion, res.gain, grid, scale, attrs, intensity, orientations,
                 encoder_quaternion=res.encoder_quaternion)




def stage_vae(config: dict, patterns: str, source: str, intensity: str, orientations: str, latent: str,
              log_csv: str, checkpoint: str, decoder: str, progress: bool = True) -> None:
    """train the heterogeneity VAE (:mod:`spiflow.vae`) at the orientations and gains of
    ``source`` (see :func:`spiflow.rules.vae_orientations_source`).

    Writes ``latent`` (``z_mu``, ``z_logvar`` (frame, latent)), ``decoder`` (the trained
    decoder, :func:`spiflow.latent.save_decoder`), ``orientations`` (the source's, copied so
    ``evaluate`` works alike for every method) and ``intensity``: the volume decoded at the
    latent of :func:`spiflow.latent.representative_frame` (``vae.representative``),
    resampled onto the reconstruction grid, ``W / (J r_e²)`` in electrons²; ``measured`` is
    the detector's q range. Reads the truth only for ``vae.orientations: truth`` (ablation).
    """
    t0 = time.perf_counter()
    pat, grid, photons, valid, q, pf, scale = _patterns(patterns)
    src = open_dataset(source, "orientations store (vae.orientations)")
    cfg, seed = VAESettings(**config["vae"]), config["dataset"]["seed"]
    res = run_vae(photons, valid, q, pf, grid, src.quaternion.values, src.gain.values, cfg, seed=seed,
                  device=config["device"], log_path=log_csv, checkpoint_path=checkpoint, progress=progress)
    rep = latent_eval.representative_frame(res.z_mu, cfg.representative, cfg.clusters, seed)
    W = decode(res.decoder, res.z_mu[rep], grid=grid, decoder_grid=res.grid)[0]
    qn = np.linalg.norm(q[valid], axis=-1)
    measured = (grid.q_norm() >= qn.min()) & (grid.q_norm() <= qn.max())
    attrs = {"method": "vae", "wall_seconds": time.perf_counter() - t0, "epochs": cfg.epochs,
             "orientations_from": cfg.orientations, "representative": cfg.representative,
             "representative_frame": rep, "decoder_grid_n": res.grid.n}
    latent_eval.save_decoder(decoder, res.decoder, res.grid, cfg)
    write_dataset(latent_dataset(res.z_mu, res.z_logvar, attrs), latent)
    _write_recon(W, measured, src.quaternion.values, src.gain.values, grid, scale, attrs, intensity, orientations)


def stage_phase(config: dict, intensity: str, density: str, density_mrc: str, log_csv: str,
                seed_offset: int = 0) -> None:
    """phase: iterative phasing of a reconstruction's intensity (never reads the truth);
    random initial phases from ``dataset.seed`` + ``seed_offset`` (the half set's number for
    half-set reconstructions, so that the halves share no starting phases)."""
    t0 = time.perf_counter()
    ds = open_dataset(intensity, "intensity store")
    n = ds.sizes["qx"]
    grid = Grid(n, float(ds.qx.values[1] - ds.qx.values[0]))
    measured = ds["measured"].values if "measured" in ds else None
    res = phase(ds.intensity.values, grid, PhasingSettings(**config["phase"]), measured=measured,
                seed=config["dataset"]["seed"] + seed_offset, device=config["device"])
    stores.write_density(density, res.density, res.support, grid,
                         {"method": ds.attrs.get("method", ""), "wall_seconds": time.perf_counter() - t0,
                          "fourier_errors": res.errors.tolist(), "chosen_restarts": res.chosen.tolist(),
                          "prtf": res.prtf.tolist(), "prtf_q_inv_angstrom": res.prtf_q.tolist()})
    stores.write_mrc(density_mrc, res.density, grid.voxel_size)
    with atomic_path(log_csv) as tmp:
        res.log.to_csv(tmp, index=False)


def stage_evaluate(config: dict, method: str, truth: str | None, patterns: str, intensity: str,
                   orientations: str, density: str, out_dir: str, latent: str | None = None,
                   decoder: str | None = None, halves: dict | None = None) -> dict:
    """evaluate one method: PRTF and half-set FSC (need no truth), and against the truth
    FSC, intensity CC, orientation and gain errors.

    Rotation: EMC's frame is arbitrary; ``A`` with ``I_rec(q) ≈ I_true(A q)`` is found from
    the intensities and undone on intensity and density (``ρ_rec(r) = ρ_true(A r)``). The
    density is then registered by translation and inversion. The oracle needs no rotation.
    For a heterogeneous sample the truth's ``intensity``/``density`` are those of its
    reference conformation. Orientation errors are taken modulo the rotations of
    ``evaluate.symmetry`` (the particle's point group). With ``latent`` and ``decoder`` (method ``vae``) the latent
    analysis of :func:`spiflow.latent.evaluate_latent` is added (files in ``out_dir``, its
    numbers in metrics.json: ``latent_spearman``, per-state FSC resolutions, …).

    Without a truth (``truth`` None: measured data) the truth columns are NaN and the plots
    show the reconstruction alone. Always: ``prtf.csv`` (and ``prtf.png``, with the half-set FSC) and
    ``prtf_resolution_angstrom`` (:mod:`spiflow.halfsets`). With ``halves``
    (``{"intensity": [store 1, store 2], "density": [store 1, store 2]}``: the method run on
    each half of the frames) ``halfset_fsc.csv`` and the ``halfset_*`` numbers.
    """
    rec = open_dataset(intensity, "intensity store")
    ori = open_dataset(orientations, "orientations store")
    den = open_dataset(density, "density store")
    grid = Grid(rec.sizes["qx"], float(rec.qx.values[1] - rec.qx.values[0]))
    measured = rec["measured"].values if "measured" in rec else np.ones(rec.intensity.shape, bool)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"method": method, **{c: np.nan for c in SUMMARY_COLUMNS[1:]},
              "wall_seconds": float(rec.attrs.get("wall_seconds", np.nan) + den.attrs.get("wall_seconds", np.nan))}
    prtf = halfsets.prtf_table(den)
    result["prtf_resolution_angstrom"] = halfsets.prtf_resolution(prtf)
    with atomic_path(out / "prtf.csv") as tmp:
        prtf.to_csv(tmp, index=False)
    curves = {"PRTF": prtf.rename(columns={"prtf": "fsc"})}
    if halves:
        h_int = [open_dataset(f, "half-set intensity store") for f in halves["intensity"]]
        h_den = [open_dataset(f, "half-set density store") for f in halves["density"]]
        m2 = h_int[1]["measured"].values if "measured" in h_int[1] else None
        table, info = halfsets.halfset_fsc(h_den[0].density.values, h_den[1].density.values,
                                           h_int[0].intensity.values, h_int[1].intensity.values, grid, m2,
                                           config["evaluate"]["align_num_div"])
        result.update(info)
        with atomic_path(out / "halfset_fsc.csv") as tmp:
            table.to_csv(tmp, index=False)
        curves["half-set FSC"] = table
    plots.plot_fsc(curves, out / "prtf.png", ylabel="PRTF, half-set FSC",
                   levels=((0.5, "--"), (halfsets.HALFSET_THRESHOLD, ":"), (halfsets.PRTF_THRESHOLD, "-.")))
    if truth is not None:
        result.update(_evaluate_against_truth(config, method, open_dataset(truth, "truth store"), patterns, rec,
                                              ori, den, grid, measured, out, latent, decoder))
    else:  # the reconstruction alone
        plots.plot_intensity_sections(None, rec.intensity.values, grid, out / "intensity_sections.png",
                                      f"{method}: reconstructed intensity (no truth)")
        plots.plot_density_slices(None, den.density.values, grid, out / "density_slices.png")
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def _evaluate_against_truth(config, method, tr, patterns, rec, ori, den, grid, measured, out, latent, decoder):
    """The truth columns of :func:`stage_evaluate`, its fsc.csv and comparison plots."""
    if method == "truth":
        A, rot_cc = np.eye(3), 1.0
    else:
        A, rot_cc = align_intensity_rotation(rec.intensity.values, tr.intensity.values, grid, mask=measured,
                                             num_div=config["evaluate"]["align_num_div"])
        A = np.asarray(A, dtype=np.float64)
    I_al = np.asarray(rotate_volume(rec.intensity.values, A))
    meas_al = np.asarray(rotate_volume(measured.astype(np.float32), A)) > 0.5
    rho_al, reg = align_density(np.asarray(rotate_volume(den.density.values, A)), tr.density.values)
    rho_al = np.asarray(rho_al)
    table = metrics.fsc(rho_al, tr.density.values, grid)
    errors, _ = metrics.orientation_errors(ori.quaternion.values, tr.quaternion.values,
                                           symmetry=point_group(config["evaluate"]["symmetry"]))
    if "encoder_quaternion" in ori:  # selfsup: the encoder's one-pass poses, up to the Friedel mate
        enc_errors, _ = metrics.orientation_errors(ori.encoder_quaternion.values, tr.quaternion.values,
                                                   symmetry=point_group(config["evaluate"]["symmetry"]),
                                                   friedel_mate=True)
        extra = {"encoder_orientation_error_median_deg": float(np.median(enc_errors))}
    else:
        extra = {}
    result = {
        "resolution_fsc05_angstrom": metrics.resolution_at(table, 0.5),
        "resolution_fsc0143_angstrom": metrics.resolution_at(table, 0.143),
        "intensity_cc": metrics.intensity_cc(I_al, tr.intensity.values, meas_al, grid),
        "orientation_error_median_deg": float(np.median(errors)),
        "gain_pearson": metrics.gain_pearson(ori.gain.values, tr.gain.values),
        "rotation_cc": float(rot_cc), "density_cc": float(reg["cc"]), "inverted": bool(reg["inverted"]),
        **extra,
    }
    with atomic_path(out / "fsc.csv") as tmp:
        table.to_csv(tmp, index=False)
    plots.plot_intensity_sections(tr.intensity.values, I_al, grid, out / "intensity_sections.png",
                                  f"{method}: true (top) vs reconstructed (bottom) intensity")
    plots.plot_density_slices(tr.density.values, rho_al, grid, out / "density_slices.png")
    plots.plot_orientation_errors(errors, out / "orientation_errors.png")
    if "models" in rec and "model" in ori:  # multi-model EMC: every model against its matching true state
        result.update(latent_eval.evaluate_models(config, tr, rec, ori, grid, out))
    if latent is not None and decoder is not None:
        pat = xr.open_zarr(patterns)
        scale = stores.photon_scale(pat)
        result.update(latent_eval.evaluate_latent(config, tr, open_dataset(latent, "latent store"), decoder,
                                                  measured, A, scale, out))
    return result


SUMMARY_COLUMNS = ["method", "resolution_fsc05_angstrom", "resolution_fsc0143_angstrom", "intensity_cc",
                   "orientation_error_median_deg", "gain_pearson", "wall_seconds"]
# after the docs/conventions.md columns, when a method reports them (vae): |Spearman ρ| of latent PC1
# with the first true conformation parameter, PC1's share of the latent variance, and the
# mean FSC-0.5 resolution of the recovered states against their matching true states
SUMMARY_EXTRA = ["latent_spearman", "latent_pc1_variance_ratio", "state_resolution_fsc05_angstrom_mean",
                 "model_spearman", "model_resolution_fsc05_angstrom_mean", "encoder_orientation_error_median_deg",
                 "prtf_resolution_angstrom", "halfset_resolution_fsc0143_angstrom", "halfset_resolution_fsc05_angstrom"]


def stage_summary(config: dict, metric_files: list[str], fsc_files: list[str], patterns: str,
                  summary_csv: str, emc_log: str | None = None) -> pd.DataFrame:
    """One table comparing every method (docs/conventions.md columns, then those of :data:`SUMMARY_EXTRA`
    that some method reports), the run's overview plots (``fsc.png``, ``patterns_montage.png``,
    ``emc_log.png`` with ``emc_log``) and its complete validated configuration
    (``config.yaml``), all beside ``summary_csv``. ``fsc.png`` shows the FSC against the
    truth of every method in ``fsc_files``; without them (measured data) the half-set FSC
    curves beside the metrics files, and the PRTFs where no method has half sets."""
    rows = [json.loads(Path(f).read_text()) for f in metric_files]
    df = pd.DataFrame(rows)
    df = df[SUMMARY_COLUMNS + [c for c in SUMMARY_EXTRA if c in df and df[c].notna().any()]]
    out = Path(summary_csv).parent
    curves = {r["method"]: pd.read_csv(f) for r, f in zip(rows, fsc_files)}
    for r, f in zip(rows, metric_files) if not curves else ():
        if (Path(f).parent / "halfset_fsc.csv").exists():
            curves[f"{r['method']} (half sets)"] = pd.read_csv(Path(f).parent / "halfset_fsc.csv")
    for r, f in zip(rows, metric_files) if not curves else ():
        curves[f"{r['method']} PRTF"] = pd.read_csv(Path(f).parent / "prtf.csv").rename(columns={"prtf": "fsc"})
    plots.plot_fsc(curves, out / "fsc.png")
    pat = xr.open_zarr(patterns)
    k = min(config["evaluate"]["montage_frames"], pat.sizes["frame"])
    plots.plot_pattern_montage(pat.photons[:k].values, pat.valid.values, out / "patterns_montage.png")
    if emc_log and Path(emc_log).exists():
        plots.plot_emc_log(pd.read_csv(emc_log), out / "emc_log.png")
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    with atomic_path(summary_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def configure_threads(threads: int | None) -> None:
    """Use ``threads`` CPU threads in torch (intra-op) for this process."""
    if threads:
        torch.set_num_threads(int(threads))


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> None:
    """Make SIGTERM (``kill``, SLURM at a job's time limit, Snakemake cancelling a job) raise
    ``SystemExit(143)`` in the main thread instead of ending the process at once, so that
    half-written temporaries (:func:`spiflow.io.atomic_path`) are removed and the rule's log
    says why it stopped. Checkpoints are written atomically either way."""
    signal.signal(signal.SIGTERM, _terminate)


@contextlib.contextmanager
def snakemake_stage(smk):
    """Run a stage inside a Snakemake ``script:``: threads from the rule, log to ``log[0]``;
    yields the rule's ``params.config``, the part of the configuration its stage reads
    (:func:`spiflow.rules.stage_config`), to pass to the stage instead of the whole config.

    Standard error (progress bars, warnings, tracebacks) and Python logging go to the rule's
    log file; an exception is logged there and re-raised so Snakemake marks the job failed.
    SIGTERM ends the stage as an exception too (:func:`stop_on_sigterm`).
    """
    stop_on_sigterm()
    configure_threads(smk.threads)
    config = smk.params.config
    log_path = Path(smk.log[0]) if smk.log else None
    if log_path is None:
        yield config
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as fh, contextlib.redirect_stderr(fh), contextlib.redirect_stdout(fh):
        logging.basicConfig(stream=fh, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            force=True)
        try:
            yield config
        except BaseException:
            logging.getLogger("spiflow").exception("stage failed")
            raise


def stage_import_euxfel(config: dict, patterns: str, hits_csv: str, hits_png: str) -> dict:
    """import_euxfel: the hits of the EuXFEL run ``euxfel.path`` as the run's ``patterns.zarr``
    (no truth store), every frame's lit-pixel count and hit flag in ``hits_csv`` and their
    histogram in ``hits_png``; see :func:`spiflow.euxfel.import_euxfel`. Reads the ``euxfel``
    section, ``reconstruction.grid_oversampling`` and ``dataset.chunk_frames``. Errors name
    the key or the path (ValueError, FileNotFoundError)."""
    from .euxfel import import_euxfel  # extra-data and extra-geom: the optional extra euxfel

    out = import_euxfel(EuXFELSettings(**config["euxfel"]), patterns, hits_csv, hits_png,
                        grid_oversampling=config["reconstruction"]["grid_oversampling"],
                        chunk_frames=config["dataset"]["chunk_frames"])
    log.info("imported %s: %d hits of %d frames (lit-pixel threshold %g), %.1f frames/s", config["euxfel"]["path"],
             out["hits"], out["frames"], out["threshold"], out["frames_per_second"])
    return out
