"""European XFEL AGIPD-1M runs in (spiflow.euxfel) and Dragonfly files in (spiflow.formats).

The runs are built with extra-data's own mock-data writer (``extra_data.tests.mockdata``,
as extra-data's tests build SPB AGIPD runs): corrected data of the 16 AGIPD modules in
which known patterns of a small particle are written as energies (photons × photon energy
+ noise), with empty pulses between them. Binned 64 × 64, the detector is 16 × 8 × 2
stored pixels. (With fewer modules, a band or one quadrant of the detector, EMC did not
orient such tiny data sets reliably; the whole detector does.)
"""
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

pytest.importorskip("extra_data")
pytest.importorskip("extra_geom")
from extra_data.tests.mockdata import write_file  # noqa: E402
from extra_data.tests.mockdata.detectors import AGIPDModule  # noqa: E402
from extra_geom import AGIPD_1MGeometry, AGIPD_500K2GGeometry  # noqa: E402

from spiflow import euxfel, formats as F  # noqa: E402
from spiflow.detector import wavelength_angstrom  # noqa: E402
from spiflow.emc import run_emc  # noqa: E402
from spiflow.settings import EMCSettings  # noqa: E402
from spiflow.rotation import angle_between, matrix_to_quaternion, mean_rotation, quaternion_to_matrix  # noqa: E402
from spiflow.rotation import random_quaternions  # noqa: E402
from spiflow.sampling import angular_step_deg  # noqa: E402
from spiflow.settings import EuXFELSettings  # noqa: E402
from spiflow.stores import grid_of, open_patterns, write_patterns  # noqa: E402
from synthetic import point_intensity, three_dimensional_points  # noqa: E402

torch.set_num_threads(2)
DET = "SPB_DET_AGIPD1M-1"
MODULES = list(range(16))
TRAINS, PULSES, FIRST_TRAIN = 6, 32, 10000
E_EV, DIST, BIN = 6000.0, 0.12, 64  # 12.8 mm stored pixels: one grid step ≈ 0.05 / Å, q up to 0.45 / Å
KEV = np.float32(E_EV / 1e3)


def hit_pulse(pulse):
    """Three pulses of eight carry a particle (hits are a minority, as in SPI runs)."""
    return np.isin(pulse % 8, (1, 3, 6))


def pixel_truth():
    """Independent of spiflow.euxfel: positions (4, 512, 128, 3) m, q Å⁻¹, pixel factor
    (Ω · polarisation along x) and the ASIC-edge mask of the test modules."""
    pos = AGIPD_1MGeometry.example().get_pixel_positions()[MODULES] + [0, 0, DIST]
    r = np.linalg.norm(pos, axis=-1)
    q = (pos / r[..., None] - [0, 0, 1]) / wavelength_angstrom(E_EV)
    pf = 0.0002 ** 2 * DIST / r ** 3 * (1 - (pos[..., 0] / r) ** 2)
    edge = lambda n: (np.arange(n) % 64 == 0) | (np.arange(n) % 64 == 63)  # noqa: E731
    ok = ~edge(512)[:, None] & ~edge(128)[None, :]
    return pos, q, pf, np.broadcast_to(ok, pos.shape[:3])


def mock_run(d, modules, trains, pulses):
    """Write an empty corrected AGIPD run with extra-data's mock writer; yields (slot, module, image group)."""
    for k, m in enumerate(modules):
        path = d / f"CORR-R0042-AGIPD{m:02d}-S00000.h5"
        write_file(str(path), [AGIPDModule(f"{DET}/CORR/{m}CH0", raw=False, frames_per_train=pulses)],
                   ntrains=trains, firsttrain=FIRST_TRAIN, chunksize=trains)
        with h5py.File(path, "r+") as f:
            yield k, m, f[f"INSTRUMENT/{DET}/CORR/{m}CH0:xtdf/image"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A mock run: 6 trains × 32 pulses, photons per AGIPD pixel known, written in keV with
    Gaussian noise of 0.05 photon energies. The particle's intensity is taken constant over
    each BIN × BIN block (at the block's mean position), which keeps the simulation fast;
    every pixel draws its own photons. Empty pulses hold a few stray photons in one module
    (their other modules are never written: zeros)."""
    d = tmp_path_factory.mktemp("r0042")
    rng = np.random.default_rng(7)
    pos, q, pf, ok = pixel_truth()
    atoms = three_dimensional_points(rng, radius=4.0)  # small: the 16 × 8 × 2 stored pixels resolve its speckles
    pulses = np.tile(np.arange(PULSES), TRAINS)
    hits = hit_pulse(pulses)
    quat = random_quaternions(int(hits.sum()), rng)
    R = quaternion_to_matrix(torch.as_tensor(quat)).numpy()
    q_block = binned(np.moveaxis(q, -1, 0)).transpose(1, 2, 0) / BIN ** 2
    spread = lambda a: np.repeat(np.repeat(a.reshape(len(MODULES), 512 // BIN, 128 // BIN), BIN, -2), BIN, -1)  # noqa
    scale = 3000.0 / (pf * ok * spread(point_intensity(atoms, q_block))).sum()  # ≈ 3000 photons per hit
    photons = np.zeros((len(pulses), *pf.shape), np.uint8)
    for i, f in enumerate(np.flatnonzero(hits)):  # frame i records I(Rᵢᵀ q)
        photons[f] = rng.poisson(scale * pf * spread(point_intensity(atoms, q_block @ R[i])))
    assert photons.max() < 255
    stray = np.flatnonzero(~hits)
    for f in stray:
        photons[f, f % 16].flat[rng.integers(0, 512 * 128, rng.poisson(3))] = 1
    for k, m, img in mock_run(d, MODULES, TRAINS, PULSES):
        for f in np.sort(np.concatenate([np.flatnonzero(hits), stray[stray % 16 == k]])):
            energy = photons[f, k] * KEV + rng.standard_normal((512, 128), dtype=np.float32) * (0.05 * KEV)
            if (f, k) == (6, 1):
                energy[200, 20] = np.nan  # a NaN in one frame
            img["data"][f] = energy
        img["cellId"][:] = (pulses * 2) % 352  # memory cells differ from pulse ids
        if k == 0:
            img["mask"][5, 100, 10] = 1 << 3  # flagged in one frame only: invalid in every frame
        if k == 6:
            img["mask"][:, 300, 40] = 1  # dead in every frame
    good = ok.copy()
    good[0, 100, 10] = good[6, 300, 40] = good[1, 200, 20] = False
    return dict(path=d, photons=photons, hits=hits, quat=quat, atoms=atoms, pos=pos, q=q, pf=pf, good=good,
                pulses=pulses, q_block=q_block)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One module (0), one train of 2 pulses: for the bad-input cases."""
    d = tmp_path_factory.mktemp("r0001")
    for _, _, img in mock_run(d, [0], 1, 2):
        img["data"][0, 10, 10:15] = KEV
    return d


def settings(path, **kw):
    return EuXFELSettings(**{"path": str(path), "distance_m": DIST, "photon_energy_ev": E_EV, "binning": BIN,
                             "chunk_trains": 4, **kw})


def binned(a, b=BIN):
    """(…, M, 512, 128) → (…, M · 512/b, 128/b): the store's layout, summed blocks."""
    *lead, m, ny, nx = a.shape
    acc = np.int64 if a.dtype.kind in "biu" else None
    out = a.reshape(*lead, m, ny // b, b, nx // b, b).sum(axis=(-3, -1), dtype=acc)
    return out.reshape(*lead, m * ny // b, nx // b)


@pytest.fixture(scope="module")
def imported(run, tmp_path_factory):
    d = tmp_path_factory.mktemp("imp")
    out = euxfel.import_euxfel(settings(run["path"]), d / "patterns.zarr", d / "hits.csv", d / "hits.png",
                               chunk_frames=40)
    return dict(out=out, dir=d, patterns=d / "patterns.zarr")


def test_finds_exactly_the_hits_and_recovers_the_photons(run, imported):
    out, d = imported["out"], imported["dir"]
    assert out["frames"] == TRAINS * PULSES and out["hits"] == run["hits"].sum() and out["modules"] == MODULES
    table = pd.read_csv(d / "hits.csv")
    assert list(table.columns) == euxfel.TABLE_COLUMNS and len(table) == TRAINS * PULSES
    np.testing.assert_array_equal(table.hit, run["hits"])
    np.testing.assert_array_equal(table.train_id, np.repeat(np.arange(TRAINS) + FIRST_TRAIN, PULSES))
    np.testing.assert_array_equal(table.pulse_id, run["pulses"])
    np.testing.assert_array_equal(table.cell_id, (run["pulses"] * 2) % 352)
    assert (table.threshold == out["threshold"]).all() and table.lit_pixels[~table.hit].max() < out["threshold"]
    assert list(table.patterns_frame[table.hit]) == list(range(out["hits"]))
    assert (d / "hits.png").stat().st_size > 1000

    static, photons = open_patterns(imported["patterns"])
    good = run["good"]
    np.testing.assert_array_equal(photons[:], binned(run["photons"][run["hits"]] * good))  # exact photons
    np.testing.assert_array_equal(static.valid.values, binned(good) > 0)
    pf = binned(run["pf"] * good)
    np.testing.assert_allclose(static.pixel_factor.values, pf, rtol=1e-5)
    count = binned(good)[..., None]
    mean_pos = binned(np.moveaxis(run["pos"] * good[..., None], -1, 0)).transpose(1, 2, 0) / np.maximum(count, 1)
    r = np.linalg.norm(mean_pos, axis=-1, keepdims=True)
    q = (mean_pos / np.maximum(r, 1e-12) - [0, 0, 1]) / wavelength_angstrom(E_EV)
    v = static.valid.values
    np.testing.assert_allclose(static.q.values[v], q[v], rtol=1e-5, atol=1e-7)
    ds = xr.open_zarr(imported["patterns"])
    hit_rows = table[table.hit]
    for name in ("train_id", "pulse_id", "cell_id", "lit_pixels", "run_frame"):
        np.testing.assert_array_equal(ds[name].values, hit_rows[name].values)
    assert ds.attrs["module_numbers"] == MODULES and ds.attrs["binning"] == BIN
    assert ds.attrs["fluence_known"] is False and ds.sizes["y"] == len(MODULES) * 512 // BIN


def test_emc_orients_imported_hits_as_well_as_the_simulated_ones(run, imported):
    static, photons = open_patterns(imported["patterns"])
    grid = grid_of(static)
    cfg = EMCSettings(num_div=3, iterations=15, beta_every=5, n_starts=3, start_iterations=9, start_frames=72,
                      start_num_div=2, refine_iterations=0, dtype="float64",
                      resolution_iterations=0)  # marching off: the import is under test (its tiny data are seed-fragile)

    def median_error(ph, q, pf, valid):
        res = run_emc(ph, valid, q, pf, grid, cfg, seed=0, device="cpu", progress=False)
        r_true = quaternion_to_matrix(torch.as_tensor(run["quat"]))
        r_est = quaternion_to_matrix(torch.as_tensor(res.quaternion))
        A = mean_rotation(r_true.transpose(1, 2) @ r_est)
        return float(np.median(angle_between(torch.as_tensor(run["quat"]), matrix_to_quaternion(r_est @ A.T))))

    err_import = median_error(photons[:], static.q.values.astype(np.float64),
                              static.pixel_factor.values.astype(np.float64), static.valid.values)
    ok = run["good"]  # the simulation's own pixels, binned here: photons, pixel factor, q of the block
    err_sim = median_error(binned(run["photons"][run["hits"]] * ok), run["q_block"], binned(run["pf"] * ok),
                           binned(ok) > 0)
    assert err_import < 1.5 * angular_step_deg(3)
    assert abs(err_import - err_sim) < 5.0, (err_import, err_sim)  # 13.1° and 14.9° when written


def test_fixed_threshold_q_range_and_beam_stop(run, tmp_path):
    s = settings(run["path"], hit_mode="fixed", hit_threshold=100, lit_q_range_inv_angstrom=[0.02, 0.2],
                 modules=[3, 4], beam_stop_radius_m=0.02)
    out = euxfel.import_euxfel(s, tmp_path / "p.zarr", tmp_path / "t.csv")
    table = pd.read_csv(tmp_path / "t.csv")
    assert out["threshold"] == 100 and out["modules"] == [3, 4] and out["shape"] == (16, 2)
    q = np.linalg.norm(run["q"][3:5], axis=-1)
    outside = np.hypot(run["pos"][3:5, ..., 0], run["pos"][3:5, ..., 1]) >= 0.02
    lit = ((run["photons"][:, 3:5] >= 1) & run["good"][3:5] & (q >= 0.02) & (q <= 0.2) & outside).sum(axis=(1, 2, 3))
    np.testing.assert_array_equal(table.lit_pixels, lit)
    np.testing.assert_array_equal(table.hit, lit > 100)
    assert 0 < table.hit.sum() < len(table)
    static, _ = open_patterns(tmp_path / "p.zarr")
    np.testing.assert_array_equal(static.valid.values, binned(run["good"][3:5] & outside) > 0)


def test_photon_conversion_rule():
    x = np.array([-1.0, 0.0, 0.49, 0.5, 1.49, 1.5, 2.9, 3.1, np.nan, np.inf])  # photon energies
    np.testing.assert_array_equal(euxfel.photons_from_energy(x * 6.0, 6000.0, 0.5), [0, 0, 0, 1, 1, 2, 3, 3, 0, 0])
    np.testing.assert_array_equal(euxfel.photons_from_energy(np.array([0.65, 0.75, 1.2]) * 6, 6000.0, 0.7), [0, 1, 1])
    with pytest.raises(ValueError, match="photon_energy_ev"):
        euxfel.photons_from_energy(x, 0.0)
    assert euxfel.hit_threshold(np.array([1, 2, 3, 4, 100]), "mad", 2.0) == 3 + 2 * 1
    assert euxfel.hit_threshold(np.array([1]), "fixed", fixed=7) == 7


def test_bad_input_fails_cleanly(small_run, tmp_path):
    out, csv = tmp_path / "p.zarr", tmp_path / "t.csv"
    with pytest.raises(FileNotFoundError, match="euxfel.path.*nowhere"):
        euxfel.import_euxfel(settings(tmp_path / "nowhere"), out, csv)
    with pytest.raises(ValueError, match="euxfel.detector_name.*MID_DET_AGIPD1M-1"):
        euxfel.import_euxfel(settings(small_run, detector_name="MID_DET_AGIPD1M-1"), out, csv)
    with pytest.raises(ValueError, match=r"euxfel.modules.*\[5\]"):
        euxfel.import_euxfel(settings(small_run, modules=[0, 5]), out, csv)
    with pytest.raises(ValueError, match=r"geometry.*\(8, 512, 128\)"):  # an AGIPD-500K geometry for AGIPD-1M data
        euxfel.import_euxfel(settings(small_run), out, csv, geometry=AGIPD_500K2GGeometry.from_origin())
    geom = tmp_path / "agipd.geom"
    geom.write_text("this is not a geometry\n")
    with pytest.raises(ValueError, match="euxfel.geometry_path.*agipd.geom"):
        euxfel.import_euxfel(settings(small_run, geometry_path=str(geom)), out, csv)
    with pytest.raises(ValueError, match="photon_energy_ev"):
        settings(small_run, photon_energy_ev=0.0)
    for key in ("photon_energy_ev", "distance_m"):
        with pytest.raises(ValueError, match=f"euxfel.{key}"):
            euxfel.import_euxfel(settings(small_run, **{key: None}), out, csv)
    with pytest.raises(ValueError, match="euxfel.hit_threshold"):
        euxfel.import_euxfel(settings(small_run, hit_mode="fixed"), out, csv)
    with pytest.raises(ValueError, match="no hits among 2 frames"):
        euxfel.import_euxfel(settings(small_run, hit_mode="fixed", hit_threshold=10), out, csv)
    assert csv.exists() and not out.exists() and not any(p.name.startswith(".p.zarr") for p in tmp_path.iterdir())
    good = euxfel.import_euxfel(settings(small_run, hit_mode="fixed", hit_threshold=4), out, csv)
    assert good["hits"] == 1 and open_patterns(out)[1][:].sum() == 5


def test_dragonfly_round_trip(tmp_path):
    """Dragonfly photons + detector files back into a patterns store, equal to the source."""
    rng = np.random.default_rng(3)
    ny, nx, p, dist = 6, 8, 1e-3, 0.05
    i, j = np.meshgrid(np.arange(ny) - ny / 2 + 0.5, np.arange(nx) - nx / 2 + 0.5, indexing="ij")
    pos = np.stack([j * p, i * p, np.full(i.shape, dist)], -1)
    q, pf = F.pixel_q_and_factor(pos, np.array([[0, p, 0], [p, 0, 0]]), wavelength_angstrom(E_EV))
    valid = rng.random((ny, nx)) > 0.2
    frames = rng.poisson(1.5, (7, ny, nx)).astype(np.int32) * valid
    attrs = {"photon_energy_ev": E_EV, "wavelength_angstrom": wavelength_angstrom(E_EV), "distance_m": dist,
             "pixel_size_m": p, "polarization": "x", "nominal_fluence_photons_per_angstrom2": 1.0,
             "classical_electron_radius_angstrom": 2.8179403262e-5, "recon_grid_n": 15, "recon_grid_dq": 0.002}
    with write_patterns(tmp_path / "a.zarr", valid, q, pf, attrs, 7, 3) as ph:
        ph[:] = frames
    F.export_dragonfly(tmp_path / "a.zarr", tmp_path / "a.emc", tmp_path / "a.dat")
    info = F.import_dragonfly(tmp_path / "a.emc", tmp_path / "a.dat", tmp_path / "b.zarr", photon_energy_ev=E_EV,
                              pixel_size_m=p, shape=(ny, nx), chunk_frames=2)
    static, photons = open_patterns(tmp_path / "b.zarr")
    np.testing.assert_array_equal(photons[:], frames)
    np.testing.assert_array_equal(static.valid.values, valid)
    np.testing.assert_allclose(static.q.values, q, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(static.pixel_factor.values, pf, rtol=1e-6)
    assert static.attrs["distance_m"] == pytest.approx(dist) and info["frames"] == 7
    with pytest.raises(ValueError, match=r"shape \(4, 8\) has 32 pixels.*a.dat has 48"):
        F.import_dragonfly(tmp_path / "a.emc", tmp_path / "a.dat", tmp_path / "c.zarr", photon_energy_ev=E_EV,
                           pixel_size_m=p, shape=(4, 8))
    with pytest.raises(ValueError, match="a.dat: 48 pixels are not a square; pass shape"):
        F.import_dragonfly(tmp_path / "a.emc", tmp_path / "a.dat", tmp_path / "c.zarr", photon_energy_ev=E_EV,
                           pixel_size_m=p)
    assert not (tmp_path / "c.zarr").exists()


@pytest.mark.slow
def test_run_directory_to_reconstruction_through_the_workflow(run, tmp_path):
    """One config file and `snakemake`: rule import_euxfel replaces simulate, EMC orients the
    hits, phasing and evaluation need no truth (PRTF); a bad run path stops at once by name."""
    from conftest import TINY, snakemake

    config = {k: TINY[k] for k in ("run", "phase", "evaluate")}
    config.update(euxfel={"path": str(run["path"]), "distance_m": DIST, "photon_energy_ev": E_EV, "binning": BIN,
                          "chunk_trains": 4},
                  reconstruction={"methods": ["emc"]},
                  emc={"num_div": 2, "iterations": 4, "n_starts": 1, "refine_iterations": 1})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path)
    r = tmp_path / "results" / "tiny"
    hits = pd.read_csv(r / "simulate" / "hits.csv")
    assert hits["hit"].sum() == run["hits"].sum() and len(hits) == TRAINS * PULSES
    assert (r / "simulate" / "hits.png").stat().st_size > 1000 and not (r / "simulate" / "truth.zarr").exists()
    assert xr.open_zarr(r / "simulate" / "patterns.zarr").sizes["frame"] == run["hits"].sum()
    row = pd.read_csv(r / "evaluate" / "summary.csv").set_index("method").loc["emc"]
    assert np.isnan(row.resolution_fsc05_angstrom) and np.isfinite(row.prtf_resolution_angstrom)

    bad = {**config, "euxfel": {**config["euxfel"], "path": str(tmp_path / "r9999")}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "-n", configfile="bad.yaml", check=False)
    assert res.returncode != 0 and "euxfel.path: run directory not found" in res.stdout + res.stderr


def test_cli_imports_a_run_where_the_workflow_would(run, tmp_path):
    from spiflow import cli

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"run": "cli", "euxfel": {"path": str(run["path"]), "distance_m": DIST,
                                                             "photon_energy_ev": E_EV, "binning": BIN}}))
    assert cli.main(["import-euxfel", "--configfile", str(cfg), "--results", str(tmp_path), "--quiet"]) == 0
    hits = pd.read_csv(tmp_path / "cli" / "simulate" / "hits.csv")
    assert hits["hit"].sum() == run["hits"].sum()
    assert xr.open_zarr(tmp_path / "cli" / "simulate" / "patterns.zarr").sizes["frame"] == run["hits"].sum()
    cfg.write_text(yaml.safe_dump({"run": "cli", "euxfel": {"path": str(run["path"]), "distance_m": DIST,
                                                             "photon_energy_ev": 0.0}}))
    assert cli.main(["import-euxfel", "--configfile", str(cfg), "--results", str(tmp_path)]) == 2  # names the key
