"""The simulate stage: noisy single-particle diffraction patterns of a real structure.

Expected photon count of pixel p in frame i (Als-Nielsen & McMorrow, eq. 4.5, for
scattering by bound electrons in the kinematic approximation):

    μ_ip = g_i · J · r_e² · Ω_p · P_p · |F(R_iᵀ q_p)|²

with J the nominal fluence (photons/Å²), r_e the classical electron radius, Ω_p P_p the
pixel factor (solid angle × polarisation), g_i the per-shot gain (fluence jitter, mean 1
over the data set), F the molecular transform (electrons) and R_i the frame's rotation.
Counts are Poisson(μ) plus optional Gaussian read-out noise, converted back to whole
photons (rounded, clipped at 0), as integrating detectors report them.

Patterns are written chunk by chunk into ``patterns.zarr``; ground truth (quaternions,
gains, intensity volume on the reconstruction grid, electron density) into ``truth.zarr``.
Every random stream derives from ``dataset.seed``; frame i's noise from (seed, i) alone,
so results do not depend on chunking.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import yaml
import zarr
from tqdm import tqdm

from . import __version__
from .detector import CLASSICAL_ELECTRON_RADIUS_ANGSTROM, Detector, reconstruction_grid
from .grid import Grid, structure_factor_to_density
from .io import atomic_path, intensity_dataset, orientations_dataset, resolve_device, write_dataset
from .rotation import quaternion_to_matrix, random_quaternions
from .scattering import structure_factor, structure_factor_grid
from .structure import Atoms, read_structure

log = logging.getLogger(__name__)
MEASURED_DISTRIBUTION = Path(__file__).with_name("data") / "image_distribution_by_photon_count.npy"


def detector_from_config(config: dict) -> Detector:
    """The :class:`Detector` described by the ``detector`` and ``beam`` config sections."""
    d = config["detector"]
    return Detector(n_pixels=d["n_pixels"], pixel_size_m=d["pixel_size_m"], distance_m=d["distance_m"],
                    photon_energy_ev=config["beam"]["photon_energy_ev"],
                    beam_stop_radius_m=d["beam_stop_radius_m"], polarization=d["polarization"],
                    invalid_rectangles=[list(r) for r in d["invalid_rectangles"]])


def draw_gains(n: int, distribution: str, spread: float, rng: np.random.Generator) -> np.ndarray:
    """Per-shot gains (n,), normalised to mean exactly 1 over the data set.

    ``none``: all 1. ``gamma``: shape 1/spread² (coefficient of variation = spread).
    ``lognormal``: σ with exp(σ²) − 1 = spread². ``measured``: photons per pattern drawn
    from the LCLS AMO86615 histogram (bin centres, uniform jitter within a bin).
    Raises ValueError for an unknown distribution.
    """
    if distribution == "none" or (spread == 0 and distribution in ("gamma", "lognormal")):
        g = np.ones(n)
    elif distribution == "gamma":
        k = 1.0 / spread ** 2
        g = rng.gamma(k, 1.0 / k, n)
    elif distribution == "lognormal":
        sigma = math.sqrt(math.log1p(spread ** 2))
        g = rng.lognormal(-sigma ** 2 / 2, sigma, n)
    elif distribution == "measured":
        centres, frac = np.load(MEASURED_DISTRIBUTION)
        width = centres[1] - centres[0]
        g = rng.choice(centres, size=n, p=frac / frac.sum()) + (rng.random(n) - 0.5) * width
    else:
        raise ValueError(f"beam.gain_distribution must be none, gamma, lognormal or measured, got {distribution!r}")
    return g / g.mean()


def expected_counts(atoms: Atoms, q: np.ndarray, pixel_factor: np.ndarray, quats: np.ndarray,
                    scale: float, method: str, device: torch.device, eps: float) -> np.ndarray:
    """Noise-free ``scale · Ω P · |F(R_iᵀ q)|²`` for frames with quaternions (B, 4).

    q: (ny, nx, 3) Å⁻¹; pixel_factor (ny, nx) sr; scale = J r_e² (Å² × photons/Å²).
    Returns (B, ny, nx) float64 expected photons at gain 1.
    """
    rot = quaternion_to_matrix(torch.as_tensor(quats, dtype=torch.float64)).numpy()
    q_rot = np.einsum("yxj,bjk->byxk", q, rot)  # (Rᵀ q)ᵀ = qᵀ R
    F = structure_factor(atoms, q_rot, method=method, device=device, eps=eps)
    return scale * pixel_factor * np.abs(F) ** 2


def simulate(config: dict, patterns_path: str | Path, truth_path: str | Path, progress: bool = True) -> dict:
    """Run the simulate stage for a validated ``config``; write both stores atomically.

    Returns a dict of summary numbers (mean photons, fluence, grid). Raises
    FileNotFoundError / ValueError naming the structure file or the config key at fault.
    """
    t0 = time.perf_counter()
    cfg_s, cfg_d, cfg_b, cfg_sim = config["sample"], config["dataset"], config["beam"], config["simulate"]
    device = resolve_device(config["device"])
    atoms = read_structure(cfg_s["path"], hydrogens=cfg_s["hydrogens"], hetatm=cfg_s["hetatm"], waters=cfg_s["waters"])
    det = detector_from_config(config)
    seed = cfg_d["seed"]
    s_orient, s_gain, s_dead, s_pilot = np.random.SeedSequence(seed).spawn(4)
    q, pixel_factor = det.q(), det.pixel_factor()
    valid = det.valid(config["detector"]["dead_pixel_fraction"], np.random.default_rng(s_dead))
    grid = reconstruction_grid(q, valid, config["reconstruction"]["grid_oversampling"])
    if 1.0 / grid.dq < 4 * atoms.radius:
        log.warning("real-space box %.1f Å is less than twice the particle diameter %.1f Å: phasing is "
                    "under-determined; increase detector.distance_m or decrease detector.pixel_size_m",
                    1.0 / grid.dq, 2 * atoms.radius)

    n = cfg_d["n_patterns"]
    quats = random_quaternions(n, np.random.default_rng(s_orient))
    gains = draw_gains(n, cfg_b["gain_distribution"], cfg_b["gain_spread"], np.random.default_rng(s_gain))
    kw = dict(method=cfg_sim["transform"], device=device, eps=cfg_sim["nufft_eps"])
    r_e2 = CLASSICAL_ELECTRON_RADIUS_ANGSTROM ** 2
    if cfg_b["mean_photons_per_pattern"] is not None:
        pilot = random_quaternions(cfg_sim["pilot_orientations"], np.random.default_rng(s_pilot))
        per_unit = expected_counts(atoms, q, pixel_factor, pilot, 1.0, **kw)[:, valid].sum(1).mean()
        fluence = cfg_b["mean_photons_per_pattern"] / (r_e2 * per_unit)
    else:
        fluence = cfg_b["photons_per_pulse"] / (math.pi * (cfg_b["focus_radius_m"] * 1e10) ** 2)

    attrs = {
        "photon_energy_ev": det.photon_energy_ev, "wavelength_angstrom": det.wavelength,
        "distance_m": det.distance_m, "pixel_size_m": det.pixel_size_m, "n_pixels": det.n_pixels,
        "polarization": det.polarization, "beam_stop_radius_m": det.beam_stop_radius_m,
        "readout_noise_photons": config["detector"]["readout_noise"],
        "nominal_fluence_photons_per_angstrom2": fluence,
        "classical_electron_radius_angstrom": CLASSICAL_ELECTRON_RADIUS_ANGSTROM,
        "recon_grid_n": grid.n, "recon_grid_dq": grid.dq,
        "sample_path": str(cfg_s["path"]), "seed": seed, "spiflow_version": __version__,
        "config": yaml.safe_dump(config, sort_keys=False),
    }
    chunk = cfg_d["chunk_frames"]
    totals = np.zeros(n)
    with atomic_path(patterns_path) as tmp:
        static = xr.Dataset(
            {"valid": (("y", "x"), valid), "q": (("y", "x", "axis"), q.astype(np.float32)),
             "pixel_factor": (("y", "x"), pixel_factor.astype(np.float32))},
            coords={"y": np.arange(det.n_pixels), "x": np.arange(det.n_pixels), "axis": ["qx", "qy", "qz"]},
            attrs=attrs)
        static["q"].attrs["units"] = "1/angstrom"
        static["pixel_factor"].attrs["units"] = "steradian (solid angle x polarisation factor)"
        static.to_zarr(tmp, mode="w", consolidated=False)
        root = zarr.open_group(tmp, mode="a")
        root.create_array("frame", data=np.arange(n), dimension_names=["frame"])
        photons = root.create_array("photons", shape=(n, det.n_pixels, det.n_pixels), dtype="int32",
                                    chunks=(min(chunk, n), det.n_pixels, det.n_pixels),
                                    dimension_names=["frame", "y", "x"], fill_value=0,
                                    attributes={"units": "photons"})
        sigma = config["detector"]["readout_noise"]
        for i0 in tqdm(range(0, n, chunk), desc="simulate", unit="chunk", disable=not progress):
            i1 = min(i0 + chunk, n)
            mu = expected_counts(atoms, q, pixel_factor, quats[i0:i1], r_e2 * fluence, **kw) * gains[i0:i1, None, None]
            counts = np.empty(mu.shape, dtype=np.int32)
            for b, i in enumerate(range(i0, i1)):
                rng = np.random.default_rng([seed, 7, i])
                c = rng.poisson(mu[b]).astype(np.float64)
                if sigma > 0:
                    c = np.clip(np.rint(c + rng.normal(0.0, sigma, c.shape)), 0, None)
                counts[b] = np.where(valid, c, 0)
            photons[i0:i1] = counts
            totals[i0:i1] = counts.sum((1, 2))
        zarr.consolidate_metadata(tmp)

    F = torch.as_tensor(structure_factor_grid(atoms, grid, eps=cfg_sim["nufft_eps"]))
    density = structure_factor_to_density(F, grid).real.numpy()
    truth = xr.merge([
        orientations_dataset(quats, gains),
        intensity_dataset(np.abs(F.numpy()) ** 2, grid.q_axis),
        xr.Dataset({"density": (("x", "y", "z"), density.astype(np.float32))},
                   coords={"x": grid.r_axis, "y": grid.r_axis, "z": grid.r_axis}),
    ])
    truth["intensity"].attrs["units"] = "electrons^2"
    truth["density"].attrs["units"] = "electrons/angstrom^3"
    for ax in ("x", "y", "z"):
        truth[ax].attrs["units"] = "angstrom"
    truth.attrs.update({"recon_grid_n": grid.n, "recon_grid_dq": grid.dq, "n_atoms": len(atoms),
                        "electrons": atoms.electrons(), "particle_radius_angstrom": atoms.radius,
                        "sample_path": str(cfg_s["path"]), "wall_seconds": time.perf_counter() - t0})
    write_dataset(truth, truth_path)
    return {"mean_photons": float(totals.mean()), "fluence_photons_per_angstrom2": fluence,
            "grid_n": grid.n, "grid_dq": grid.dq, "n_atoms": len(atoms),
            "wall_seconds": time.perf_counter() - t0}


def grid_of(patterns: xr.Dataset) -> Grid:
    """The reconstruction grid recorded in a patterns store's attributes."""
    return Grid(int(patterns.attrs["recon_grid_n"]), float(patterns.attrs["recon_grid_dq"]))
