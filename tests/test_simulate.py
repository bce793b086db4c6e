"""Physics of the simulate stage against analytic cases, and its store contract."""
import math
from pathlib import Path

import gemmi
import numpy as np
import pytest
import torch
import xarray as xr

from spiflow import config as cfg
from spiflow.detector import Detector, reconstruction_grid
from spiflow.grid import Grid, structure_factor_to_density
from spiflow.io import atomic_path
from spiflow.rotation import quaternion_to_matrix as quaternion_to_matrix_t
from spiflow.scattering import expected_counts, form_factor, structure_factor, structure_factor_grid
from spiflow.simulate import SliceTransform, draw_gains, gather_shards, shard_ranges, simulate, simulate_shard
from spiflow.slicing import (bspline_coefficients, grid_coordinates, slice_bspline, slice_channels, slice_channels_rotated,
                             slice_model)
from spiflow.structure import Atoms, read_structure

ROOT = Path(__file__).resolve().parents[1]
PDB = ROOT / "data" / "2cex.pdb"


def make_atoms(pos, elem):
    pos = np.asarray(pos, float)
    return Atoms(pos, np.asarray(elem), np.ones(len(pos)), "test", np.zeros(3))


def random_q(n, scale=0.2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3)) * scale


@pytest.mark.parametrize("element,z", [("H", 1), ("C", 6), ("N", 7), ("O", 8), ("S", 16), ("Zn", 30)])
def test_form_factor_forward_scattering_is_atomic_number(element, z):
    assert form_factor(element, np.array(0.0)) == pytest.approx(z, rel=1e-3)  # IT92 fit accuracy
    f = form_factor(element, np.linspace(0, 2, 50))
    assert np.all(np.diff(f) < 0)


@pytest.mark.parametrize("method", ["nufft", "direct"])
def test_one_atom_intensity_is_form_factor_squared(method):
    atoms = make_atoms([[3.0, -7.0, 11.0]], ["O"])
    q = random_q(500)
    F = structure_factor(atoms, q, method=method)
    np.testing.assert_allclose(np.abs(F) ** 2, form_factor("O", np.linalg.norm(q, axis=1)) ** 2, rtol=1e-7)
    # the phase is exp(2πi q·r): the sign convention of docs/conventions.md
    np.testing.assert_allclose(np.angle(F), np.angle(np.exp(2j * np.pi * q @ atoms.positions[0])), atol=1e-6)


@pytest.mark.parametrize("method", ["nufft", "direct"])
def test_two_atoms_interference(method):
    d = np.array([4.0, 1.0, -2.5])
    atoms = make_atoms([d / 2, -d / 2], ["C", "S"])
    q = random_q(800)
    qn = np.linalg.norm(q, axis=1)
    fc, fs = form_factor("C", qn), form_factor("S", qn)
    expected = fc ** 2 + fs ** 2 + 2 * fc * fs * np.cos(2 * np.pi * q @ d)
    np.testing.assert_allclose(np.abs(structure_factor(atoms, q, method=method)) ** 2, expected, rtol=1e-6, atol=1e-9)


def test_uniform_sphere_transform():
    """A dense lattice of atoms filling a sphere of radius a scatters as N f(q) 3(sin x − x cos x)/x³."""
    a, h = 20.0, 1.0
    ax = np.arange(-a, a + h, h)
    pts = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    pts = pts[np.linalg.norm(pts, axis=1) <= a]
    atoms = make_atoms(pts, ["C"] * len(pts))
    qn = np.linspace(0.002, 0.06, 40)
    direction = np.array([0.36, 0.48, 0.8])
    F = structure_factor(atoms, qn[:, None] * direction, method="nufft")
    x = 2 * np.pi * qn * a
    shape = 3 * (np.sin(x) - x * np.cos(x)) / x ** 3
    expected = len(pts) * form_factor("C", qn) * shape
    # first zero of the sphere transform at x = 4.4934
    assert np.abs(F.real - expected).max() < 0.02 * len(pts) * 6
    i = np.argmin(np.abs(F))
    assert qn[i] == pytest.approx(4.4934 / (2 * np.pi * a), rel=0.05)


@pytest.mark.parametrize("eps,worst", [(1e-8, 1e-4), (1e-6, 1e-2)])  # double; single precision (the default)
def test_expected_counts_match_direct_atom_sum_within_one_percent(eps, worst):
    """Median relative error < 1 % (measured: 1e-9 in double, 2e-6 in single precision); the
    worst pixel sits near a zero of |F|, where a relative error is largest."""
    atoms = read_structure(PDB)
    det = Detector(32, 1.3e-3, 0.1, 6000.0, beam_stop_radius_m=2e-3)
    quats = np.random.default_rng(1).normal(size=(3, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    args = (atoms, det.q(), det.pixel_factor(), quats, 1.0)
    fast = expected_counts(*args, method="nufft", device=torch.device("cpu"), eps=eps)
    exact = expected_counts(*args, method="direct", device=torch.device("cpu"), eps=1e-8)
    rel = np.abs(fast - exact) / exact
    assert np.median(rel) < 0.01 and np.median(rel) < 100 * eps
    assert rel.max() < worst


def test_grid_transform_and_density_integrate_to_electron_count():
    atoms = make_atoms([[2.0, 0, 0], [-3.0, 1.0, 4.0], [0, -5.0, 0]], ["C", "O", "N"])
    grid = Grid(25, 1 / 40)
    F = structure_factor_grid(atoms, grid)
    F_direct = structure_factor(atoms, grid.q_points(), method="direct")
    np.testing.assert_allclose(F, F_direct, atol=1e-6 * np.abs(F_direct).max())
    rho = structure_factor_to_density(torch.as_tensor(F), grid).real.numpy()
    # Σ ρ v = F(0) = Σ f_j(0) ≈ Z_C + Z_O + Z_N (to the IT92 fit's accuracy)
    assert rho.sum() * grid.voxel_size ** 3 == pytest.approx(F[12, 12, 12].real, rel=1e-9)
    assert F[12, 12, 12].real == pytest.approx(6 + 8 + 7, rel=1e-3)


def test_detector_geometry_ewald_sphere_solid_angle_polarisation():
    det = Detector(64, 1e-3, 0.08, 8000.0)
    q = det.q()
    lam = det.wavelength
    assert lam == pytest.approx(12398.4198 / 8000.0)
    assert np.all(q[..., 2] <= 0)
    # on the Ewald sphere: |q + k_in| = 1/λ
    k_in = np.array([0, 0, 1 / lam])
    np.testing.assert_allclose(np.linalg.norm(q + k_in, axis=-1), 1 / lam, rtol=1e-12)
    # |q| = 2 sin θ / λ
    x, y = det.positions()
    two_theta = np.arctan2(np.hypot(x, y), det.distance_m)
    np.testing.assert_allclose(np.linalg.norm(q, axis=-1), 2 * np.sin(two_theta / 2) / lam, rtol=1e-10)
    # total solid angle of a centred square of side L at distance D: 4 arcsin(u² / (1 + u²)), u = L/2D
    u = 64e-3 / 2 / 0.08
    unpol = Detector(64, 1e-3, 0.08, 8000.0, polarization="unpolarized")
    omega = unpol.pixel_factor() / (1 - (x ** 2 + y ** 2) / (2 * (x ** 2 + y ** 2 + 0.08 ** 2)))
    assert omega.sum() == pytest.approx(4 * np.arcsin(u ** 2 / (1 + u ** 2)), rel=1e-3)
    # polarisation along x suppresses scattering along x, not along y
    pf = det.pixel_factor()
    assert pf[32, 63] < pf[63, 32]


def test_reconstruction_grid_contains_every_pixel():
    det = Detector(40, 1.3e-3, 0.1, 6000.0, beam_stop_radius_m=2e-3)
    q, valid = det.q(), det.valid()
    grid = reconstruction_grid(q, valid)
    assert grid.n % 2 == 1
    assert np.abs(q[valid]).max() / grid.dq < grid.center - 1
    assert not valid[19:21, 19:21].any()


def test_gain_distributions_have_mean_one():
    rng = np.random.default_rng(3)
    for dist in ("none", "gamma", "lognormal", "measured"):
        g = draw_gains(4000, dist, 0.3, rng)
        assert g.mean() == pytest.approx(1.0)
        assert np.all(g > 0)
    assert draw_gains(20000, "gamma", 0.3, rng).std() == pytest.approx(0.3, rel=0.05)
    assert draw_gains(20000, "lognormal", 0.3, rng).std() == pytest.approx(0.3, rel=0.05)
    with pytest.raises(ValueError, match="gain_distribution"):
        draw_gains(3, "weibull", 0.3, rng)


def small_config(tmp_path, **over):
    base = {"sample": {"path": str(PDB)}, "dataset": {"n_patterns": 24, "seed": 5, "chunk_frames": 10},
            "detector": {"n_pixels": 16, "pixel_size_m": 2.6e-3, "beam_stop_radius_m": 3e-3},
            "beam": {"mean_photons_per_pattern": 500.0}, "simulate": {"pilot_orientations": 64}}
    return cfg.validate(cfg.merge(base, over))


def test_simulate_stores_seeding_and_photon_budget(tmp_path):
    c = small_config(tmp_path)
    out = simulate(c, tmp_path / "a" / "patterns.zarr", tmp_path / "a" / "truth.zarr", progress=False)
    pat = xr.open_zarr(tmp_path / "a" / "patterns.zarr")
    truth = xr.open_zarr(tmp_path / "a" / "truth.zarr")
    assert pat.photons.dims == ("frame", "y", "x") and pat.photons.shape == (24, 16, 16)
    assert pat.q.dims == ("y", "x", "axis") and list(pat.axis.values) == ["qx", "qy", "qz"]
    assert set(truth.data_vars) >= {"quaternion", "gain", "intensity", "density"}
    assert truth.intensity.dims == ("qx", "qy", "qz") and truth.density.dims == ("x", "y", "z")
    assert "quaternion" not in pat and "gain" not in pat  # truth kept apart
    photons = pat.photons.values
    assert photons.min() >= 0 and np.all(photons[:, ~pat.valid.values] == 0)
    assert truth.gain.values.mean() == pytest.approx(1.0)
    assert np.all(truth.quaternion.values[:, 0] >= 0)
    assert out["mean_photons"] == pytest.approx(500, rel=0.2)
    # same seed, other chunking: identical data
    c2 = small_config(tmp_path, dataset={"chunk_frames": 7})
    simulate(c2, tmp_path / "b" / "patterns.zarr", tmp_path / "b" / "truth.zarr", progress=False)
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "b" / "patterns.zarr").photons.values, photons)
    c3 = small_config(tmp_path, dataset={"seed": 6})
    simulate(c3, tmp_path / "c" / "patterns.zarr", tmp_path / "c" / "truth.zarr", progress=False)
    assert not np.array_equal(xr.open_zarr(tmp_path / "c" / "patterns.zarr").photons.values, photons)


def test_sharded_simulate_equals_one_job(tmp_path):
    """Three shard stores of whole chunks (7 frames each: 7 | 7+7 | 3), gathered, give the
    same patterns, attributes and truth as one job; bad shard counts name the config key."""
    c = small_config(tmp_path, dataset={"chunk_frames": 7}, simulate={"shards": 3})
    simulate(c, tmp_path / "one" / "patterns.zarr", tmp_path / "one" / "truth.zarr", progress=False)
    assert shard_ranges(24, 7, 3) == [(0, 7), (7, 21), (21, 24)]  # chunks of 7, 7, 7, 3 frames
    parts = [tmp_path / "shards" / f"{k}.zarr" for k in range(3)]
    for k, path in enumerate(parts):
        simulate_shard(c, k, path, progress=False)
    gather_shards(c, parts, tmp_path / "g" / "patterns.zarr", tmp_path / "g" / "truth.zarr")
    one, g = (xr.open_zarr(tmp_path / d / "patterns.zarr") for d in ("one", "g"))
    np.testing.assert_array_equal(g.photons.values, one.photons.values)
    assert g.photons.encoding["chunks"] == one.photons.encoding["chunks"] == (7, 16, 16)
    assert g.attrs == one.attrs
    for name in ("quaternion", "gain", "intensity"):
        np.testing.assert_array_equal(xr.open_zarr(tmp_path / "g" / "truth.zarr")[name].values,
                                      xr.open_zarr(tmp_path / "one" / "truth.zarr")[name].values)
    with pytest.raises(ValueError, match="does not hold frames"):
        gather_shards(c, parts[::-1], tmp_path / "bad" / "patterns.zarr", tmp_path / "bad" / "truth.zarr")
    assert not (tmp_path / "bad" / "patterns.zarr").exists()
    with pytest.raises(ValueError, match="simulate.shards"):
        shard_ranges(24, 7, 5)


def test_readout_noise_adds_its_variance_to_the_poisson_counts(tmp_path):
    """Read-out noise σ adds rint(n), n ~ N(0, σ²), to each frame's Poisson counts (the same
    Poisson draws as without it: same seed), then clips at 0. Where the noise-free count is
    >= 6 (clipping needs n < -5.5 σ) the difference is rint(n), of mean 0 and variance
    E[rint(n)²] = Σ_k k² (Φ((k + ½)/σ) − Φ((k − ½)/σ)) (≈ σ² + 1/12, Sheppard's correction)."""
    sigma = 1.0
    photons = {}
    for s in (0.0, sigma):
        c = small_config(tmp_path, detector={"readout_noise": s}, beam={"mean_photons_per_pattern": 20000.0})
        simulate(c, tmp_path / str(s) / "p.zarr", tmp_path / str(s) / "t.zarr", progress=False)
        photons[s] = xr.open_zarr(tmp_path / str(s) / "p.zarr").photons.values
    noisy, plain = photons[sigma], photons[0.0]
    assert noisy.dtype == np.int32 and noisy.min() >= 0
    d = (noisy - plain)[plain >= 6].astype(np.float64)
    phi = [0.5 * (1 + math.erf((k + 0.5) / sigma / math.sqrt(2))) for k in range(-9, 9)]
    expected = sum(k * k * (b - a) for k, a, b in zip(range(-8, 9), phi[:-1], phi[1:]))
    assert expected == pytest.approx(sigma ** 2 + 1 / 12, rel=1e-3)
    assert d.size > 3000
    assert abs(d.mean()) < 4 * math.sqrt(expected / d.size)
    assert d.var() == pytest.approx(expected, rel=0.08)  # about 3 standard errors at this size


def test_structure_reading_options_and_formats(tmp_path):
    atoms = read_structure(PDB, waters=True)
    assert len(atoms) == 2452
    assert len(read_structure(PDB)) == 2363  # waters dropped, Zn kept
    assert len(read_structure(PDB, hetatm=False)) == 2362
    np.testing.assert_allclose(atoms.positions.mean(0), 0, atol=1e-9)
    # elements inferred from atom names when columns 77-78 are blank
    lines = [ln[:76] for ln in PDB.read_text().splitlines() if ln.startswith("ATOM")][:50]
    blank = tmp_path / "blank.pdb"
    blank.write_text("\n".join(lines) + "\nEND\n")
    ref = read_structure(PDB)
    assert list(read_structure(blank).elements) == list(ref.elements[:50])
    # mmCIF gives the same atoms
    st = gemmi.read_structure(str(PDB))
    st.setup_entities()
    cif = tmp_path / "2cex.cif"
    st.make_mmcif_document().write_file(str(cif))
    np.testing.assert_allclose(read_structure(cif).positions, ref.positions, atol=1e-3)


def test_alternate_locations_keep_one_conformer(tmp_path):
    pdb = tmp_path / "alt.pdb"
    pdb.write_text(
        "ATOM      1  N   ALA A   1       0.000   0.000   0.000  1.00 10.00           N\n"
        "ATOM      2  CA AALA A   1       1.000   0.000   0.000  0.40 10.00           C\n"
        "ATOM      3  CA BALA A   1       1.200   0.000   0.000  0.60 10.00           C\n"
        "ATOM      4  C   ALA A   1       2.000   1.000   0.000  0.50 10.00           C\n"
        "END\n")
    atoms = read_structure(pdb)
    assert len(atoms) == 3
    np.testing.assert_allclose(atoms.occupancy, [1.0, 1.0, 0.5])
    np.testing.assert_allclose((atoms.positions + atoms.centre)[1], [1.2, 0, 0])


def test_bad_inputs_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.pdb"):
        read_structure(tmp_path / "nothere.pdb")
    empty = tmp_path / "empty.pdb"
    empty.write_text("HEADER    NOTHING\nEND\n")
    with pytest.raises(ValueError, match="empty.pdb"):
        read_structure(empty)
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("data_x\nloop_\n_atom_site.id\n")
    with pytest.raises(ValueError, match="garbage.cif"):
        read_structure(garbage)
    with pytest.raises(ValueError, match="beam_stop_radius_m"):
        Detector(16, 1e-3, 0.1, 6000.0, beam_stop_radius_m=0.01)
    with pytest.raises(ValueError, match="detector.n_pixels"):
        cfg.validate({"detector": {"n_pixels": 0}})
    with pytest.raises(ValueError, match="dataset.n_patterns"):
        cfg.validate({"dataset": {"n_patterns": -5}})
    with pytest.raises(ValueError, match="reconstruction.methods"):
        cfg.validate({"reconstruction": {"methods": ["truth", "magic"]}})
    with pytest.raises(ValueError, match="photon_energy_ev"):
        cfg.validate({"beam": {"photon_energy_ev": 0}})


def test_fuzzed_structure_files_give_only_clean_named_errors(tmp_path):
    """Random bytes, truncations, byte mutations and shuffled lines of a real PDB and mmCIF
    file: read_structure either returns finite atoms or raises ValueError naming the file."""
    rng = np.random.default_rng(0)
    pdb = (ROOT / "data" / "2cex.pdb").read_bytes()
    st = gemmi.read_structure(str(ROOT / "data" / "2cex.pdb"))
    st.setup_entities()
    st.make_mmcif_document().write_file(str(tmp_path / "good.cif"))
    outcomes = []
    for ext, blob in ((".pdb", pdb), (".cif", (tmp_path / "good.cif").read_bytes())):
        cases = [rng.bytes(int(rng.integers(0, 4000))) for _ in range(8)]
        cases += [blob[:int(len(blob) * f)] for f in np.linspace(0.01, 0.99, 8)]
        for _ in range(10):
            b = bytearray(blob)
            for i in rng.integers(0, len(b), 20):
                b[i] = int(rng.integers(32, 127))
            cases.append(bytes(b))
        lines = blob.split(b"\n")
        for _ in range(4):
            head = lines[: len(lines) // 2]
            rng.shuffle(head)
            cases.append(b"\n".join(head + lines[len(lines) // 2:]))
        for k, data in enumerate(cases):
            path = tmp_path / f"case{k}{ext}"
            path.write_bytes(data)
            try:
                atoms = read_structure(path)
            except ValueError as exc:
                assert path.name in str(exc), str(exc)
                outcomes.append("error")
            else:
                assert len(atoms) > 0 and np.isfinite(atoms.positions).all()
                outcomes.append("atoms")
    assert outcomes.count("error") >= 16  # at least every random-bytes case


def test_failed_stage_leaves_no_half_written_store(tmp_path):
    target = tmp_path / "out.zarr"
    target.mkdir()
    (target / "old").write_text("kept")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "partial").write_text("x")
            raise RuntimeError("interrupted")
    assert (target / "old").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["out.zarr"]
    c = small_config(tmp_path, sample={"path": str(tmp_path / "missing.pdb")})
    with pytest.raises(FileNotFoundError, match="missing.pdb"):
        simulate(c, tmp_path / "s" / "patterns.zarr", tmp_path / "s" / "truth.zarr", progress=False)
    assert not (tmp_path / "s" / "patterns.zarr").exists()


def test_bspline_slicing_reproduces_samples_and_cubics():
    """slice_channels is slice_model per channel; slice_bspline of bspline_coefficients
    returns the samples at the voxels and any cubic polynomial exactly (inside the margin)."""
    grid = Grid(25, 0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.as_tensor(grid.q_points() / grid.q_max, dtype=torch.float32)  # (n, n, n, 3) in [-1, 1]
    cubic = 1 + x[..., 0] - 2 * x[..., 1] ** 2 + 0.5 * x[..., 0] * x[..., 1] * x[..., 2] + x[..., 2] ** 3
    vols = torch.stack([cubic, torch.rand((25,) * 3, generator=g)])
    rot = quaternion_to_matrix_t(torch.randn(3, 4, generator=g, dtype=torch.float64)).float()
    q = (torch.rand(50, 3, generator=g) - 0.5) * 0.05  # |q| < 0.044: 7.6+ voxels inside the faces (q_max 0.12)
    coords = grid_coordinates(q, rot, grid)
    np.testing.assert_allclose(slice_channels(vols, coords)[1].numpy(), slice_model(vols[1], coords).numpy(),
                               rtol=1e-5, atol=1e-6)  # grid_sample against the numba kernel, float32
    coef = torch.as_tensor(bspline_coefficients(vols.numpy()), dtype=torch.float32)
    # at voxel centres: the samples themselves
    idx = torch.tensor([[3, 7, 12], [12, 12, 12], [20, 5, 9]])
    at_voxels = torch.as_tensor(grid.q_axis, dtype=torch.float32)[idx] / grid.q_max
    got = slice_bspline(coef, at_voxels.flip(-1)[None])  # grid_sample order (z, y, x)
    np.testing.assert_allclose(got[1, 0].numpy(), vols[1][idx[:, 0], idx[:, 1], idx[:, 2]].numpy(), atol=1e-5)
    # off the voxels: cubic polynomials exactly, the trilinear slice not
    xs = (torch.as_tensor(q, dtype=torch.float64) @ rot.double()) / grid.q_max  # (R, P, 3) (x, y, z)
    want = 1 + xs[..., 0] - 2 * xs[..., 1] ** 2 + 0.5 * xs[..., 0] * xs[..., 1] * xs[..., 2] + xs[..., 2] ** 3
    np.testing.assert_allclose(slice_bspline(coef, coords)[0].numpy(), want.numpy(), atol=1e-4)  # float32
    assert np.abs(slice_channels(vols, coords)[0].numpy() - want.numpy()).max() > 1e-3
    # the one-kernel CPU path of the slice transform (64 taps read directly; rotations inside)
    for cubic, volume, ref in ((True, coef, slice_bspline), (False, vols, slice_channels)):
        np.testing.assert_allclose(slice_channels_rotated(volume, q, rot, grid, cubic).numpy(),
                                   ref(volume, coords).numpy(), rtol=1e-4, atol=1e-5)
    far = torch.tensor([[0.0, 0.0, 2 * grid.q_max], [grid.q_max, 0.0, 0.0]])  # beyond, and on a face
    rf = torch.eye(3)[None]
    for cubic, volume, ref in ((True, coef, slice_bspline), (False, vols, slice_channels)):
        np.testing.assert_allclose(slice_channels_rotated(volume, far, rf, grid, cubic).numpy(),
                                   ref(volume, grid_coordinates(far, rf, grid)).numpy(), rtol=1e-4, atol=1e-5)


def slice_detector():
    """The default job's geometry (1.3 mm pixels at 0.1 m, 6 keV), a 24² px centre: the
    accuracy of the slice transform depends on dq × particle radius, which this keeps."""
    det = Detector(24, 1.3e-3, 0.1, 6000.0, beam_stop_radius_m=2e-3)
    return det, det.q(), det.pixel_factor(), det.valid()


def test_slice_transform_matches_exact_path():
    """Median / 99th-percentile relative error of the expected counts against the exact NUFFT
    path (valid pixels with counts >= 1 % of the mean), within the documented figures."""
    atoms = read_structure(PDB)
    det, q, pf, valid = slice_detector()
    grid = reconstruction_grid(q, valid)
    quats = np.random.default_rng(4).normal(size=(6, 4))
    exact = expected_counts(atoms, q, pf, quats, 1.0, method="nufft", device=torch.device("cpu"), eps=1e-9)[:, valid]
    sel = exact >= 0.01 * exact.mean()

    def rel(k, interpolation):
        mu = SliceTransform(atoms, q, grid, k, interpolation).expected_counts(pf, quats, 1.0)[:, valid]
        r = np.abs(mu - exact)[sel] / exact[sel]
        return np.median(r), np.percentile(r, 99)

    med, p99 = rel(1, "cubic")  # documented 1.1e-3 / 7.2e-3 on the 40² px default
    assert med < 2.5e-3 and p99 < 1.5e-2
    med2, p992 = rel(2, "cubic")  # documented 6e-5 / 4e-4
    assert med2 < 2e-4 and p992 < 1.5e-3
    med_lin, _ = rel(2, "linear")  # documented 2.8e-2 median: O(h²) against O(h⁴)
    assert 5e-3 < med_lin < 6e-2


def test_slice_simulate_chunking_truth_and_bad_values(tmp_path):
    """transform slice: the same patterns for any chunking, the truth intensity is |F|² on the
    reconstruction grid (the fine grid's voxels), and bad settings name their config key."""
    base = {"detector": {"n_pixels": 24, "pixel_size_m": 1.3e-3},
            "simulate": {"transform": "slice", "slice_oversampling": 2, "slice_interpolation": "linear"}}
    c = small_config(tmp_path, **base)
    out = simulate(c, tmp_path / "a" / "patterns.zarr", tmp_path / "a" / "truth.zarr", progress=False)
    assert out["mean_photons"] == pytest.approx(500, rel=0.2)
    c2 = small_config(tmp_path, **base, dataset={"chunk_frames": 7})
    simulate(c2, tmp_path / "b" / "patterns.zarr", tmp_path / "b" / "truth.zarr", progress=False)
    a, b = (xr.open_zarr(tmp_path / d / "patterns.zarr") for d in ("a", "b"))
    np.testing.assert_array_equal(a.photons.values, b.photons.values)
    truth = xr.open_zarr(tmp_path / "a" / "truth.zarr")
    grid = Grid(int(a.attrs["recon_grid_n"]), float(a.attrs["recon_grid_dq"]))
    ref = np.abs(structure_factor_grid(read_structure(PDB), grid, eps=1e-9)) ** 2
    np.testing.assert_allclose(truth.intensity.values, ref, rtol=2e-4, atol=1e-5 * ref.max())
    det, q, _, valid = slice_detector()
    atoms = read_structure(PDB)
    with pytest.raises(ValueError, match="simulate.slice_oversampling"):
        SliceTransform(atoms, q, reconstruction_grid(q, valid), 0)
    with pytest.raises(ValueError, match="simulate.slice_interpolation"):
        SliceTransform(atoms, q, reconstruction_grid(q, valid), 1, "quintic")
    with pytest.raises(ValueError, match="simulate.slice_oversampling"):
        small_config(tmp_path, simulate={"transform": "slice", "slice_oversampling": 1.5})
    nano = small_config(tmp_path, sample={"kind": "nanoparticles"}, simulate={"transform": "slice"})
    with pytest.raises(ValueError, match="simulate.transform"):
        simulate(nano, tmp_path / "n" / "patterns.zarr", tmp_path / "n" / "truth.zarr", progress=False)
    assert not (tmp_path / "n" / "patterns.zarr").exists()


def test_config_defaults_file_matches_schema():
    import yaml
    with open(ROOT / "config" / "config.yaml") as fh:
        assert yaml.safe_load(fh) == cfg.defaults()


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    full = cfg.load_config(path)
    assert full["run"] and full["reconstruction"]["methods"]
