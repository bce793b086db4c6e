#!/usr/bin/env python
"""spiflow speed benchmarks, side by side with Dragonfly where it is installed.

    python benchmarks/run.py [--quick | --tiny] [--device cpu|cuda|auto] [--threads N]
                             [--out benchmarks/results] [--no-dragonfly] [--only simulate,emc,...]

Measures, in one run (see benchmarks/README.md for the sizes and the measured tables):

* simulate: spiflow's simulate stage (NUFFT of the structure per pattern, Poisson noise,
  Zarr output) in patterns/s, again with ``simulate.transform: slice`` (cubic and linear
  interpolation of F computed once, :data:`SLICE_VARIANTS`, with the expected counts'
  relative error against the exact path); Dragonfly's ``make_data`` (slices of a
  precomputed 3D intensity) on a problem of the same size (patterns, pixels, mean photons),
  and its set-up (density, intensity, detector) separately.
* emc: seconds per iteration of :func:`spiflow.emc.run_emc` (dense and sparse photons) and
  of Dragonfly's ``dragonfly.emc`` on *identical* data: the patterns simulated by spiflow,
  exported with :func:`spiflow.formats.export_dragonfly`, the same num_div, pixels
  (orientation pixels: Dragonfly's detector mask 1 marks spiflow's central merge-only
  pixels), constant β, gains fitted, the same number of iterations; M orientations,
  N patterns, P valid pixels (P_o for orientations) and the GFLOP/s of the E-step matmul.
* photon formats: spiflow EMC dense vs sparse at several mean photon counts (the data
  thinned binomially), the measurement behind ``photon_format="auto"``.
* phase: phasing iterations/s (all restarts batched) at the simulated N³ grid.
* selfsup: training patterns/s of :mod:`spiflow.selfsup` when it is present.

Writes ``results.csv`` (one row per measurement) and ``results.md`` (machine, tables,
ratios spiflow ÷ Dragonfly) into ``--out``. Timings are wall-clock; run on an otherwise idle
machine (the 1-minute load average at start and end is recorded).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from spiflow.sampling import n_orientations
from spiflow.settings import EMCSettings, PhasingSettings

REPO = Path(__file__).resolve().parents[1]

# Problem sizes per mode. simulate/emc problems: patterns, detector side in pixels, mean
# photons per pattern (in valid pixels). The detector geometry is that of the default job
# (config/config.yaml: 1.3 mm pixels at 0.1 m, 6 keV), so 40 px is the default job's detector.
SIZES = {
    "default": {
        "simulate": dict(patterns=3000, pixels=40, photons=3000),
        "emc": [  # dragonfly: (β, iterations) runs of the peer; its time per iteration grows as β falls
            dict(name="default job", patterns=3000, pixels=40, photons=3000, num_div=6, iterations=2,
                 dragonfly=[(1.0, 2), (0.05, 1)], search_num_div=10),
            dict(name="low signal", patterns=3000, pixels=40, photons=300, num_div=6, iterations=2,
                 dragonfly=[(1.0, 2), (0.05, 2)]),
            dict(name="large detector, few photons", patterns=1000, pixels=100, photons=300, num_div=4,
                 iterations=2, dragonfly=[(1.0, 2), (0.05, 2)]),
        ],
        "formats": dict(patterns=1000, pixels=40, photons=3000, num_div=4, levels=[3000, 1000, 300, 100, 30]),
        "phase": dict(restarts=8, iterations=140),
        "selfsup": dict(patterns=160, epochs=1, batch_size=80),
    },
    "quick": {
        "simulate": dict(patterns=300, pixels=40, photons=3000),
        "emc": [dict(name="small", patterns=300, pixels=40, photons=300, num_div=3, iterations=2,
                     dragonfly=[(1.0, 2), (0.05, 2)])],
        "formats": dict(patterns=300, pixels=40, photons=3000, num_div=2, levels=[3000, 100]),
        "phase": dict(restarts=2, iterations=40),
        "selfsup": dict(patterns=64, epochs=2, batch_size=32, small=True),
    },
    "tiny": {  # the test suite's smoke run (tests/test_benchmarks.py)
        "simulate": dict(patterns=40, pixels=16, photons=500),
        "emc": [dict(name="tiny", patterns=40, pixels=16, photons=100, num_div=1, iterations=2,
                     dragonfly=[(1.0, 2), (0.05, 2)], search_num_div=2)],
        "formats": dict(patterns=40, pixels=16, photons=500, num_div=1, levels=[500, 50]),
        "phase": dict(restarts=2, iterations=10),
        "selfsup": dict(patterns=16, epochs=1, batch_size=8, small=True),
    },
}
SECTIONS = ("simulate", "emc", "formats", "phase", "selfsup")
CSV_COLUMNS = ["section", "problem", "tool", "variant", "device", "threads", "M", "N", "P", "P_orient",
               "photons", "nonzero_fraction", "value", "unit", "seconds", "iterations", "load_start", "load_end",
               "notes"]
BETA = 0.05  # spiflow's constant β (its cost does not depend on β; Dragonfly's does: run at several)
MIN_RADIUS = EMCSettings().orientation_min_radius_voxels  # the default


# ----------------------------------------------------------------------------- helpers

def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def machine_info(device: str, threads: int) -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else cpu}
    try:
        from importlib.metadata import version
        info["dragonfly"] = version("dragonfly-spi")
    except Exception:
        info["dragonfly"] = None
    info["spiflow"] = __import__("spiflow").__version__
    return info


def dragonfly_available() -> bool:
    return (importlib.util.find_spec("dragonfly") is not None and shutil.which("dragonfly.emc") is not None
            and importlib.util.find_spec("mpi4py") is not None)


def dragonfly_env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def run_logged(cmd: list[str], cwd: Path, log: Path, env: dict, timeout: float) -> float:
    """Run cmd with stdout+stderr to log; return wall seconds; raise on failure."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}), see {log}:\n{tail}")
    return seconds


def sim_config(patterns: int, pixels: int, photons: float, device: str, seed: int = 2024) -> dict:
    from spiflow.config import load_config
    return load_config(REPO / "config" / "config.yaml", overrides={
        "device": device, "dataset": {"n_patterns": patterns, "seed": seed},
        "detector": {"n_pixels": pixels}, "beam": {"mean_photons_per_pattern": float(photons)},
        "sample": {"path": str(REPO / "data" / "2cex.pdb")}})


def sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- simulate

#: spiflow's slice transform, measured beside the exact path: (variant, simulate options)
SLICE_VARIANTS = [
    ("slice, cubic (the slice default)", {"transform": "slice", "slice_interpolation": "cubic", "slice_oversampling": 1}),
    ("slice, linear", {"transform": "slice", "slice_interpolation": "linear", "slice_oversampling": 1}),
]


def simulate_spiflow(patterns: int, pixels: int, photons: float, device: str, work: Path,
                     options: dict | None = None) -> dict:
    """Simulate into work/ (``options``: ``simulate`` config keys over the defaults); return
    timing and the paths."""
    from spiflow.simulate import simulate
    work.mkdir(parents=True, exist_ok=True)
    cfg = sim_config(patterns, pixels, photons, device)
    cfg["simulate"].update(options or {})
    t0 = time.perf_counter()
    out = simulate(cfg, work / "patterns.zarr", work / "truth.zarr", progress=False)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mean_photons": out["mean_photons"], "config": cfg,
            "patterns": work / "patterns.zarr", "truth": work / "truth.zarr"}


def slice_accuracy(cfg: dict, options: dict, device: str, frames: int = 32) -> tuple[float, float]:
    """(median, 99th percentile) relative error of the slice transform's expected counts
    against the exact NUFFT (eps 1e-9) at ``frames`` random orientations, over the valid
    pixels whose exact counts are >= 1 % of the mean (as in spiflow.simulate.SliceTransform)."""
    import torch
    from spiflow.detector import reconstruction_grid
    from spiflow.rotation import random_quaternions
    from spiflow.scattering import expected_counts
    from spiflow.simulate import SliceTransform, build_sample, detector_from_config
    atoms = build_sample(cfg)[1]
    det = detector_from_config(cfg)
    q, pf, valid = det.q(), det.pixel_factor(), det.valid()
    grid = reconstruction_grid(q, valid, cfg["reconstruction"]["grid_oversampling"])
    quats = random_quaternions(frames, np.random.default_rng(0))
    exact = expected_counts(atoms, q, pf, quats, 1.0, "nufft", torch.device("cpu"), 1e-9)[:, valid]
    mu = SliceTransform(atoms, q, grid, options["slice_oversampling"], options["slice_interpolation"],
                        device).expected_counts(pf, quats, 1.0)[:, valid]
    sel = exact >= 0.01 * exact.mean()
    rel = np.abs(mu - exact)[sel] / exact[sel]
    return float(np.median(rel)), float(np.percentile(rel, 99))


def simulate_dragonfly(patterns: int, pixels: int, photons: float, cfg: dict, threads: int, work: Path,
                       timeout: float) -> dict:
    """Dragonfly's simulation on a problem of the same size: the same detector geometry and
    structure (2CEX), ``num_data`` patterns, ``mean_count`` photons. Set-up (make_densities,
    make_intensities, make_detector) and make_data are timed separately."""
    import dragonfly
    work.mkdir(parents=True, exist_ok=True)
    aux = Path(dragonfly.__file__).parent / "aux"
    det, beam = cfg["detector"], cfg["beam"]
    wavelength = 12398.4198 / beam["photon_energy_ev"]
    (work / "data").mkdir(exist_ok=True)
    (work / "config.ini").write_text(f"""[parameters]
detd = {det['distance_m'] * 1e3:.6g}
lambda = {wavelength:.6g}
detsize = {pixels}
pixsize = {det['pixel_size_m'] * 1e3:.6g}
stoprad = {det['beam_stop_radius_m'] / det['pixel_size_m']:.6g}
polarization = x

[make_densities]
in_pdb_file = {REPO / 'data' / '2cex.pdb'}
scatt_dir = {aux}/
num_threads = {threads}
out_density_file = data/densityMap.bin

[make_intensities]
in_density_file = make_densities:::out_density_file
out_intensity_file = data/intensities.bin

[make_detector]
out_detector_file = data/det_sim.h5

[make_data]
num_data = {patterns}
mean_count = {photons:g}
in_detector_file = make_detector:::out_detector_file
in_intensity_file = make_intensities:::out_intensity_file
out_photons_file = data/photons.emc
""")
    env = dragonfly_env(threads)
    setup = run_logged([shutil.which("dragonfly.utils.sim_setup"), "-c", "config.ini", "-y", "--skip_data"],
                       work, work / "sim_setup.log", env, timeout)
    wall = run_logged([shutil.which("dragonfly.utils.make_data"), "-c", "config.ini", "-y"],
                      work, work / "make_data.log", env, timeout)
    text = (work / "make_data.log").read_text()
    m = re.search(r"Generated (\d+) frames with ([0-9.eE+-]+) photons/frame", text)
    t = re.search(r"Time taken = ([0-9.eE+-]+) s", text)
    return {"setup_seconds": setup, "seconds": float(t.group(1)) if t else wall, "wall": wall,
            "mean_photons": float(m.group(2)) if m else float("nan")}


# ----------------------------------------------------------------------------- EMC

def load_patterns(path: Path):
    import xarray as xr
    import zarr
    from spiflow.stores import grid_of
    pat = xr.open_zarr(path)
    photons = np.asarray(zarr.open_group(str(path), mode="r")["photons"])
    return (photons, pat.valid.values, pat.q.values.astype(np.float64), pat.pixel_factor.values.astype(np.float64),
            grid_of(pat))


def problem_shape(photons, valid, q, grid, num_div: int) -> dict:
    M = n_orientations(num_div)
    r = np.linalg.norm(q[valid], axis=1)
    orient = r >= MIN_RADIUS * grid.dq
    k = photons.reshape(len(photons), -1)[:, np.flatnonzero(valid)[orient]]
    return {"M": M, "N": len(photons), "P": int(valid.sum()), "P_orient": int(orient.sum()),
            "photons": float(photons.reshape(len(photons), -1)[:, valid.ravel()].sum(1).mean()),
            "nonzero_fraction": float(np.count_nonzero(k) / k.size)}


def emc_spiflow(photons, valid, q, pf, grid, num_div: int, iterations: int, device: str, fmt: str) -> dict:
    from spiflow.emc import run_emc
    # global iterations only, in the orientation chunks the measurements were made with, every
    # pixel in every iteration as Dragonfly does (no resolution marching: with it the first of
    # the 2 iterations used the pixels within half the q radius, 2026-12-03 and before)
    cfg = EMCSettings(num_div=num_div, iterations=iterations, n_starts=1, beta_start=BETA, beta_factor=1.0,
                      update_gain=True, orientation_min_radius_voxels=MIN_RADIUS, photon_format=fmt,
                      refine_iterations=0, orientation_chunk=1024, search="exhaustive", resolution_start=1.0)
    t0 = time.perf_counter()
    res = run_emc(photons, valid, q, pf, grid, cfg, device=device, progress=False)
    wall = time.perf_counter() - t0
    per_iter = res.log["seconds"].to_numpy()
    return {"seconds_per_iteration": float(np.median(per_iter)), "wall": wall, "iterations": len(per_iter)}


def emc_search(patterns: Path, truth: Path, num_div: int, device: str) -> list[dict]:
    """The global E-step searches side by side on the same data and the *true* model (so
    both reach the accuracy the sampling allows; no global rotation to fit): one pass of
    :func:`spiflow.emc.expectation_step` at β 1 per ``emc.search``, each after a warm-up pass.
    Returns per search: seconds per pass (wall and CPU of all threads), likelihoods evaluated per frame (coarse + fine),
    fine orientations kept per frame, the estimated neglected posterior mass (frame mean)
    and the median angle (°) from each frame's most probable orientation to the truth."""
    import torch
    import xarray as xr
    from spiflow.emc import expectation_step
    from spiflow.rotation import angle_between
    from spiflow.stores import photon_scale
    photons, valid, q, pf, grid = load_patterns(patterns)
    pat, tr = xr.open_zarr(patterns), xr.open_zarr(truth)
    scale = photon_scale(pat)
    W, gain, quat = tr.intensity.values.astype(np.float64) * scale, tr.gain.values, tr.quaternion.values
    rows = []
    for search in ("exhaustive", "coarse_to_fine"):
        cfg = EMCSettings(num_div=num_div, orientation_min_radius_voxels=MIN_RADIUS, orientation_chunk=1024,
                          search=search)
        expectation_step(photons, valid, q, pf, grid, W, gain, cfg, device=device)  # warm-up (numba, caches)
        t0, c0 = time.perf_counter(), time.process_time()
        res = expectation_step(photons, valid, q, pf, grid, W, gain, cfg, device=device)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        err = angle_between(torch.as_tensor(quat), torch.as_tensor(res["quaternion"])).numpy()
        rows.append({"search": search, "seconds": seconds, "cpu_seconds": cpu, **res["stats"],
                     "error_deg": float(np.median(err))})
    return rows


def matmul_gflops(shape: dict, device: str, chunk: int = 1024) -> float:
    """GFLOP/s of the dense E-step matmul ``log S (chunk × P_o) @ K_oᵀ (P_o × N)`` in float32."""
    import torch
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    N, Po = shape["N"], shape["P_orient"]
    C = min(chunk, shape["M"])
    A = torch.rand((C, Po), generator=g).to(dev)
    K = torch.rand((N, Po), generator=g).to(dev)
    out = torch.empty((C, N), device=dev)
    torch.mm(A, K.T, out=out)
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 0.5:
        torch.mm(A, K.T, out=out)
        reps += 1
    sync(device)
    return 2.0 * C * Po * N * reps / (time.perf_counter() - t0) / 1e9


def export_for_dragonfly(patterns: Path, work: Path) -> tuple[Path, Path]:
    """spiflow's export (sparse photons + ASCII detector), then the detector as the HDF5 file
    that dragonfly-spi reads (qx, qy, qz, corr, mask, detd, ewald_rad), with mask 1 (merge
    only) on the valid pixels spiflow leaves out of the E-step (|q| < MIN_RADIUS voxels)."""
    import h5py
    from spiflow.formats import export_dragonfly, read_dragonfly_detector
    work.mkdir(parents=True, exist_ok=True)
    export_dragonfly(patterns, work / "photons.emc", work / "detector.dat")
    det = read_dragonfly_detector(work / "detector.dat")  # q in voxels of the spiflow grid (default ewald_rad)
    mask = np.asarray(det.mask, np.uint8).copy()
    mask[(mask == 0) & (np.linalg.norm(det.q, axis=1) < MIN_RADIUS)] = 1
    with h5py.File(work / "detector.h5", "w") as f:
        f["qx"], f["qy"], f["qz"] = det.q[:, 0], det.q[:, 1], det.q[:, 2]
        f["corr"] = np.asarray(det.corr, np.float64)
        f["mask"] = mask
        f["detd"] = float(det.detd)
        f["ewald_rad"] = float(det.ewald_rad)
    return work / "photons.emc", work / "detector.h5"


def emc_dragonfly(photons_file: Path, detector_file: Path, num_div: int, iterations: int, threads: int,
                  work: Path, timeout: float, beta: float = BETA, beta_schedule: tuple[float, int] = (1.0, 1000),
                  extra: dict | None = None) -> dict:
    """``dragonfly.emc -t threads iterations`` on the exported data, β from ``beta``
    multiplied by ``beta_schedule[0]`` every ``beta_schedule[1]`` iterations (constant by
    default); seconds per iteration from its log file (column ``time`` of each iteration
    row). Its outputs (``output/output_NNN.h5``: orientations, quaternions, scale, intens)
    stay in ``work``. ``extra``: more ``[emc]`` keys (e.g. ``start_model_file``)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "output").mkdir(parents=True, exist_ok=True)
    (work / "emc.ini").write_text(f"""[emc]
in_photons_file = {photons_file}
in_detector_file = {detector_file}
num_div = {num_div}
output_folder = {work / 'output'}
log_file = {work / 'EMC.log'}
need_scaling = 1
beta = {beta}
beta_schedule = {beta_schedule[0]:g} {beta_schedule[1]:d}
verbosity = 1
""" + "".join(f"{k} = {v}\n" for k, v in (extra or {}).items()))
    wall = run_logged([shutil.which("dragonfly.emc"), "-c", str(work / "emc.ini"), "-t", str(threads),
                       str(iterations)], work, work / "emc_stdout.log", dragonfly_env(threads), timeout)
    times = parse_dragonfly_log(work / "EMC.log")
    if not times:
        raise RuntimeError(f"no iteration rows in {work / 'EMC.log'}")
    return {"seconds_per_iteration": float(np.median(times)), "wall": wall, "iterations": len(times)}


def parse_dragonfly_log(path: Path) -> list[float]:
    """Iteration times (s) from a Dragonfly EMC.log: rows ``iter  time  rms_change  …`` after
    the ``Iter\\ttime`` header."""
    times, started = [], False
    for line in Path(path).read_text().splitlines():
        if line.startswith("Iter\ttime"):
            started = True
        elif started and line.strip():
            parts = line.split()
            if parts[0].isdigit():
                times.append(float(parts[1]))
    return times


# ----------------------------------------------------------------------------- phase, selfsup

def phase_bench(truth: Path, patterns: Path, restarts: int, iterations: int, device: str) -> dict:
    import xarray as xr
    from spiflow.phasing import phase
    from spiflow.stores import grid_of
    grid = grid_of(xr.open_zarr(patterns))
    intensity = xr.open_zarr(truth).intensity.values
    er = max(1, iterations // 14)  # 140 → RAAR:120, ER:10, then 10 final ER
    cfg = PhasingSettings(schedule=f"RAAR:{iterations - 2 * er},ER:{er}", n_cycles=1, final_er=er, n_restarts=restarts,
                          n_average=min(2, restarts), log_every=max(iterations, 10))
    t0 = time.perf_counter()
    phase(intensity, grid, cfg, seed=0, device=device)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"grid_n": grid.n, "seconds": seconds, "iterations_per_second": iterations / seconds,
            "restarts": restarts, "iterations": iterations}


def selfsup_bench(photons, valid, q, pf, grid, patterns: int, epochs: int, batch: int, small: bool,
                  device: str) -> dict | None:
    try:
        from spiflow.selfsup import run_selfsup
        from spiflow.settings import SelfSupSettings
    except ImportError:
        return None
    kw = (dict(encoder_width=16, encoder_stages=2, encoder_blocks=1, siren_width=64, siren_layers=3) if small else
          dict(encoder_width=64, encoder_stages=4, encoder_blocks=2, siren_width=256, siren_layers=5))
    cfg = SelfSupSettings(epochs=epochs, batch_size=batch, warmup_epochs=0, decoder="siren", search_epochs=0,
                          decoder_lr=None, loss="mse", encoder_pool=1, encoder_hidden=0, amortize_steps=0,
                          **kw)  # the encoder path of Chen et al. (SIREN): training throughput only
    res = run_selfsup(photons[:patterns], valid, q, pf, grid, cfg, seed=0, device=device, progress=False)
    row = res.log.iloc[-1]
    return {"patterns_per_second": float(row["patterns_per_second"]), "seconds": float(row["seconds"]),
            "epochs": epochs, "patterns": patterns, "batch": batch,
            "model": "small (width 16, 2 stages; SIREN 3×64)" if small else "default (ResNet-18, SIREN 5×256)"}


# ----------------------------------------------------------------------------- the run

class Recorder:
    """Rows of the CSV. :meth:`start` before each timed measurement waits, with ``max_load``,
    until the 1-minute load average is below it (at most ``max_wait`` s; a shared machine),
    and each row records the load at the start of its measurement and at its end."""

    def __init__(self, device: str, threads: int, max_load: float | None = None, max_wait: float = 1800):
        self.rows: list[dict] = []
        self.device, self.threads = device, threads
        self.max_load, self.max_wait = max_load, max_wait
        self.load0 = load_average()

    def start(self) -> None:
        if self.max_load:
            t0 = time.monotonic()
            while load_average() >= self.max_load and time.monotonic() - t0 < self.max_wait:
                time.sleep(5)
        self.load0 = load_average()

    def add(self, **row):
        full = {c: "" for c in CSV_COLUMNS}
        full.update(device=self.device, threads=self.threads, load_start=round(self.load0, 2),
                    load_end=round(load_average(), 2))
        full.update(row)
        self.rows.append(full)
        shown = {k: v for k, v in full.items() if v != "" and k not in ("device", "threads")}
        print("  " + ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()), flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run(args) -> dict:
    import torch
    mode = "tiny" if args.tiny else "quick" if args.quick else "default"
    sizes = SIZES[mode]
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    sections = SECTIONS if not args.only else tuple(s.strip() for s in args.only.split(","))
    bad = set(sections) - set(SECTIONS)
    if bad:
        raise SystemExit(f"--only: unknown sections {sorted(bad)}; choose from {SECTIONS}")
    use_df = not args.no_dragonfly and dragonfly_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="spiflow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info(device, threads)
    from spiflow.slicing_cpu import compile_kernels
    # numba compiles spiflow's CPU kernels once per source change (then loads them from its
    # cache, about 1 s a process): done here, so that no measurement includes it
    info.update(mode=mode, load_start=load_average(), dragonfly_used=use_df,
                numba_seconds=compile_kernels() if device == "cpu" else 0.0)
    print(f"spiflow benchmarks ({mode}) on {info['device_name']}, {threads} threads, torch {info['torch']}; "
          f"load {info['load_start']:.2f}; Dragonfly {'yes' if use_df else 'no'}; work in {work}", flush=True)
    rec = Recorder(device, threads, args.max_load, args.max_wait)
    t_start = time.perf_counter()
    sims: dict[tuple, dict] = {}

    def simulated(patterns, pixels, photons):
        key = (patterns, pixels, photons)
        if key not in sims:
            rec.start()
            sims[key] = simulate_spiflow(patterns, pixels, photons, device, work / f"sim_{patterns}_{pixels}_{photons:g}")
        return sims[key]

    if "simulate" in sections:
        s = sizes["simulate"]
        print(f"simulate: {s}", flush=True)
        sim = simulated(s["patterns"], s["pixels"], s["photons"])
        problem = f"{s['patterns']} × {s['pixels']}² px, {s['photons']:g} photons"
        rec.add(section="simulate", problem=problem, tool="spiflow", variant="simulate stage", N=s["patterns"],
                P=s["pixels"] ** 2, photons=sim["mean_photons"], value=s["patterns"] / sim["seconds"],
                unit="patterns/s", seconds=sim["seconds"],
                notes="NUFFT of 2CEX per pattern + noise + Zarr, incl. truth volume (transform auto, exact)")
        for variant, options in SLICE_VARIANTS:
            rec.start()
            sl = simulate_spiflow(s["patterns"], s["pixels"], s["photons"], device,
                                  work / f"sim_{variant.split(' (')[0].replace(', ', '_')}", options)
            med, p99 = slice_accuracy(sl["config"], options, device)
            rec.add(section="simulate", problem=problem, tool="spiflow", variant=variant, N=s["patterns"],
                    P=s["pixels"] ** 2, photons=sl["mean_photons"], value=s["patterns"] / sl["seconds"],
                    unit="patterns/s", seconds=sl["seconds"],
                    notes=f"simulate stage with simulate: {options}: F of 2CEX once on the fine grid, "
                          f"interpolated per pattern + noise + Zarr, incl. truth volume; expected counts' "
                          f"relative error against the exact path (32 orientations): median {med:.2g}, "
                          f"99th percentile {p99:.2g}")
            for stat, value in (("median", med), ("99th percentile", p99)):
                rec.add(section="simulate", problem=problem, tool="spiflow", variant=f"{variant}: accuracy",
                        N=32, P=s["pixels"] ** 2, value=value, unit=f"{stat} relative error",
                        notes="" if stat == "median" else "valid pixels with exact counts >= 1 % of the mean")
        if use_df:
            try:
                rec.start()
                df = simulate_dragonfly(s["patterns"], s["pixels"], s["photons"], sim["config"], threads,
                                        work / "dragonfly_sim", args.dragonfly_timeout)
                rec.add(section="simulate", problem=problem, tool="dragonfly", variant="make_data",
                        N=s["patterns"], P=s["pixels"] ** 2, photons=df["mean_photons"],
                        value=s["patterns"] / df["seconds"], unit="patterns/s", seconds=df["seconds"],
                        notes=f"slices of a precomputed intensity + Poisson + .emc file; its own 'Time taken' "
                              f"(command wall {df['wall']:.3g} s with start-up)")
                total = df["setup_seconds"] + df["seconds"]
                rec.add(section="simulate", problem=problem, tool="dragonfly", variant="set-up + make_data",
                        N=s["patterns"], P=s["pixels"] ** 2, photons=df["mean_photons"],
                        value=s["patterns"] / total, unit="patterns/s", seconds=total,
                        notes=f"set-up (make_densities + make_intensities + make_detector, commands' wall) "
                              f"{df['setup_seconds']:.3g} s")
            except Exception as exc:  # report and go on
                print(f"  Dragonfly simulation failed: {exc}", flush=True)

    if "emc" in sections:
        wanted = [w.strip() for w in args.problems.split(",") if w.strip()]
        for p in sizes["emc"]:
            if wanted and p["name"] not in wanted:
                continue
            print(f"emc: {p}", flush=True)
            sim = simulated(p["patterns"], p["pixels"], p["photons"])
            photons, valid, q, pf, grid = load_patterns(sim["patterns"])
            shape = problem_shape(photons, valid, q, grid, p["num_div"])
            problem = f"{p['name']}: num_div {p['num_div']}, {p['patterns']} × {p['pixels']}² px, {p['photons']:g} photons"
            common = dict(section="emc", problem=problem, M=shape["M"], N=shape["N"], P=shape["P"],
                          P_orient=shape["P_orient"], photons=shape["photons"],
                          nonzero_fraction=shape["nonzero_fraction"])
            rec.start()
            gf = matmul_gflops(shape, device)
            flops = 2.0 * shape["M"] * shape["N"] * (shape["P_orient"] + shape["P"])  # E-step + merge matmuls
            for fmt in ("dense", "sparse"):
                if fmt == "sparse":
                    rec.start()
                r = emc_spiflow(photons, valid, q, pf, grid, p["num_div"], p["iterations"], device, fmt)
                note = (f"dense matmuls {flops / 1e9:.3g} GFLOP/iteration, E-step GEMM alone {gf:.4g} GFLOP/s, "
                        f"effective {flops / r['seconds_per_iteration'] / 1e9:.4g} GFLOP/s") if fmt == "dense" else ""
                rec.add(**common, tool="spiflow", variant=f"EMC {fmt} β={BETA:g}", value=r["seconds_per_iteration"],
                        unit="s/iteration", seconds=r["wall"], iterations=r["iterations"], notes=note)
                if fmt == "dense":
                    rec.add(**common, tool="spiflow", variant="E-step GEMM", value=gf, unit="GFLOP/s",
                            notes=f"float32 ({min(1024, shape['M'])} × {shape['P_orient']}) @ ({shape['P_orient']} × {shape['N']})")
            if p.get("search_num_div"):  # the global searches at the default job's num_div, on the true model
                nd = p["search_num_div"]
                rec.start()
                for r in emc_search(sim["patterns"], sim["truth"], nd, device):
                    rec.add(**dict(common, M=n_orientations(nd),
                                   problem=problem.replace(f"num_div {p['num_div']}", f"num_div {nd}")),
                            tool="spiflow", variant=f"E-step search {r['search']} β=1 (true model)", value=r["seconds"],
                            unit="s/pass", seconds=r["seconds"], iterations=1,
                            notes=(f"CPU {r['cpu_seconds']:.3g} s, {r['orientations_per_frame']:.0f} likelihoods/frame, {r['support_per_frame']:.0f} "
                                   f"kept/frame, neglected mass {r['neglected_mass']:.2g}, median orientation error "
                                   f"{r['error_deg']:.3g}°"))
            if use_df:
                try:
                    dfw = work / f"dragonfly_emc_{p['patterns']}_{p['pixels']}_{p['photons']:g}_{p['num_div']}"
                    ph, det = export_for_dragonfly(sim["patterns"], dfw)
                    for beta, iterations in p.get("dragonfly", [(BETA, p["iterations"])]):
                        rec.start()
                        r = emc_dragonfly(ph, det, p["num_div"], iterations, threads, dfw / f"beta_{beta:g}",
                                          args.dragonfly_timeout, beta)
                        rec.add(**common, tool="dragonfly", variant=f"EMC β={beta:g}", value=r["seconds_per_iteration"],
                                unit="s/iteration", seconds=r["wall"], iterations=r["iterations"],
                                notes="time column of its EMC.log (includes writing output_NNN.h5)")
                except Exception as exc:
                    print(f"  Dragonfly EMC failed: {exc}", flush=True)

    if "formats" in sections:
        f = sizes["formats"]
        print(f"photon formats: {f}", flush=True)
        sim = simulated(f["patterns"], f["pixels"], f["photons"])
        photons, valid, q, pf, grid = load_patterns(sim["patterns"])
        rng = np.random.default_rng(0)
        base = photons.reshape(len(photons), -1)[:, valid.ravel()].sum(1).mean()
        for level in f["levels"]:
            k = photons if level >= base else rng.binomial(photons, level / base).astype(np.int32)
            shape = problem_shape(k, valid, q, grid, f["num_div"])
            problem = f"num_div {f['num_div']}, {f['patterns']} × {f['pixels']}² px, {shape['photons']:.0f} photons"
            for fmt in ("dense", "sparse"):
                rec.start()
                r = emc_spiflow(k, valid, q, pf, grid, f["num_div"], 2, device, fmt)
                rec.add(section="formats", problem=problem, tool="spiflow", variant=f"EMC {fmt}", M=shape["M"],
                        N=shape["N"], P=shape["P"], P_orient=shape["P_orient"], photons=shape["photons"],
                        nonzero_fraction=shape["nonzero_fraction"], value=r["seconds_per_iteration"],
                        unit="s/iteration", seconds=r["wall"], iterations=r["iterations"])

    first_sim = next(iter(sims.values()), None)
    if ("phase" in sections or "selfsup" in sections) and first_sim is None:
        s = sizes["simulate"]
        first_sim = simulated(s["patterns"], s["pixels"], s["photons"])

    if "phase" in sections:
        ph = sizes["phase"]
        print(f"phase: {ph}", flush=True)
        rec.start()
        r = phase_bench(first_sim["truth"], first_sim["patterns"], ph["restarts"], ph["iterations"], device)
        rec.add(section="phase", problem=f"{r['grid_n']}³ grid, {r['restarts']} restarts batched", tool="spiflow",
                variant="RAAR/ER + shrinkwrap", value=r["iterations_per_second"], unit="iterations/s",
                seconds=r["seconds"], iterations=r["iterations"],
                notes=f"{r['restarts'] * r['iterations_per_second']:.4g} restart-iterations/s; incl. set-up, "
                      "alignment and averaging")

    if "selfsup" in sections:
        ss = sizes["selfsup"]
        print(f"selfsup: {ss}", flush=True)
        photons, valid, q, pf, grid = load_patterns(first_sim["patterns"])
        rec.start()
        r = selfsup_bench(photons, valid, q, pf, grid, ss["patterns"], ss["epochs"], ss["batch_size"],
                          ss.get("small", False), device)
        if r is None:
            print("  spiflow.selfsup not present: skipped", flush=True)
        else:
            rec.add(section="selfsup", problem=f"{r['patterns']} patterns of {valid.shape[0]}² px, batch {r['batch']}",
                    tool="spiflow", variant=r["model"], N=r["patterns"], value=r["patterns_per_second"],
                    unit="patterns/s", seconds=r["seconds"], iterations=r["epochs"],
                    notes="training, last epoch (log patterns_per_second)")

    info.update(load_end=load_average(), total_seconds=time.perf_counter() - t_start)
    write_outputs(rec.rows, info, out)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"done in {info['total_seconds']:.0f} s; load {info['load_start']:.2f} → {info['load_end']:.2f}; "
          f"wrote {out / 'results.csv'} and {out / 'results.md'}", flush=True)
    return {"rows": rec.rows, "info": info}


# ----------------------------------------------------------------------------- output

def ratios(rows: list[dict]) -> list[dict]:
    """spiflow ÷ Dragonfly per problem: time ratios for EMC (s/iteration) and throughput
    ratios for simulation (patterns/s); > 1 means spiflow takes longer (EMC) or is faster
    (simulation) — the Markdown says which."""
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["section"], r["problem"]), []).append(r)
    for (section, problem), rs in by.items():
        for d in rs:
            if d["tool"] != "dragonfly" or d["unit"] not in ("s/iteration", "patterns/s"):
                continue
            for r in rs:
                if r["tool"] == "spiflow" and r["unit"] == d["unit"]:
                    out.append({"section": section, "problem": problem, "spiflow": r["variant"],
                                "dragonfly": d["variant"], "unit": d["unit"],
                                "ratio": float(r["value"]) / float(d["value"])})
    return out


def write_outputs(rows: list[dict], info: dict, out: Path) -> None:
    import csv
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    (out / "machine.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(rows, info))


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"# spiflow benchmarks ({info['mode']})", "",
             f"{info['date']}: {info['cpu']}, {info['cores']} cores, {info['threads']} threads; "
             f"device {info['device']} ({info['device_name']}); Python {info['python']}, torch {info['torch']}, "
             f"spiflow {info['spiflow']}, Dragonfly (dragonfly-spi) {info['dragonfly'] or 'not installed'}"
             f"{'' if info['dragonfly_used'] else ' (not run)'}; 1-minute load average {info['load_start']:.2f} "
             f"at start, {info['load_end']:.2f} at end; {info['total_seconds']:.0f} s in all "
             f"(of which {info['numba_seconds']:.1f} s compiling or loading the numba kernels before measuring). "
             f"Column load: the 1-minute load average when each measurement started → ended "
             f"(its own threads included at the end).", ""]
    lines += ["| section | problem | tool | variant | M | N | P (orient.) | photons | non-zero | value | unit | load |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pix = f"{r['P']} ({r['P_orient']})" if r["P_orient"] != "" else str(r["P"])
        nz = f"{float(r['nonzero_fraction']):.3f}" if r["nonzero_fraction"] != "" else ""
        ph = f"{float(r['photons']):.0f}" if r["photons"] != "" else ""
        lines.append(f"| {r['section']} | {r['problem']} | {r['tool']} | {r['variant']} | {r['M']} | {r['N']} | "
                     f"{pix} | {ph} | {nz} | {float(r['value']):.4g} | {r['unit']} | "
                     f"{float(r['load_start']):.2f} → {float(r['load_end']):.2f} |")
    notes = [r for r in rows if r["notes"]]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['section']}, {r['problem']}, {r['tool']} {r['variant']}: {r['notes']}" for r in notes]
    rat = ratios(rows)
    if rat:
        lines += ["", "Ratios spiflow ÷ Dragonfly (same problem, same data):", "",
                  "| section | problem | spiflow | Dragonfly | ratio | meaning |", "| --- | --- | --- | --- | --- | --- |"]
        for r in rat:
            meaning = ("spiflow time ÷ Dragonfly time (< 1: spiflow faster)" if r["unit"] == "s/iteration"
                       else "spiflow rate ÷ Dragonfly rate (> 1: spiflow faster)")
            lines.append(f"| {r['section']} | {r['problem']} | {r['spiflow']} | {r['dragonfly']} | "
                         f"{r['ratio']:.3g} | {meaning} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about a minute: small sizes")
    size.add_argument("--tiny", action="store_true", help="seconds: the test suite's smoke run")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads and Dragonfly -t (default: all cores)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--work", default=None, help="folder for the simulated data (default: a temporary one)")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    ap.add_argument("--no-dragonfly", action="store_true", help="do not run Dragonfly even where installed")
    ap.add_argument("--dragonfly-timeout", type=float, default=900, help="seconds per Dragonfly command")
    ap.add_argument("--max-load", type=float, default=None,
                    help="before each measurement wait until the 1-minute load average is below this (shared machines)")
    ap.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for --max-load at most")
    ap.add_argument("--only", default="", help=f"comma-separated sections of {','.join(SECTIONS)}")
    ap.add_argument("--problems", default="", help="comma-separated names of the emc problems to run (default: all "
                    "of the mode's, e.g. 'low signal')")
    args = ap.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
