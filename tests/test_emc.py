"""Tests of the EMC orientation stage on small, high-signal synthetic data built here."""
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from spiflow import emc, slicing_cpu
from spiflow.emc import LOG_COLUMNS, choose_photon_format, compress, expectation_step, run_emc
from spiflow.refine import refine_steps_deg
from spiflow.grid import Grid, merge_into, rotated_points, slice_volume
from spiflow.rotation import angle_between, matrix_to_quaternion, mean_rotation, quaternion_to_matrix, random_quaternions
from spiflow.sampling import angular_step_deg, local_rotations, n_orientations
from spiflow.settings import EMCSettings
from spiflow.slicing import grid_coordinates, merge_model, merge_rotated, slice_model, slice_rotated
from synthetic import curved_detector, point_intensity, three_dimensional_points

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    grid = Grid(23, 0.01)
    atoms = three_dimensional_points(rng)
    q, pf, valid = curved_detector(grid)
    frames = 200
    quat = random_quaternions(frames, rng)
    R = quaternion_to_matrix(torch.as_tensor(quat)).numpy()
    intensity = point_intensity(atoms, np.einsum("pk,fkl->fpl", q.reshape(-1, 3), R)).reshape(frames, *pf.shape)
    gain = rng.gamma(4.0, 1.0, frames)
    gain /= gain.mean()
    scale = 3000.0 / (pf * point_intensity(atoms, q)).sum()  # ≈ 3000 photons per frame
    photons = rng.poisson(gain[:, None, None] * pf * intensity * scale).astype(np.int32)
    return dict(photons=photons, valid=valid, q=q, pf=pf, grid=grid, quat=quat, gain=gain,
                atoms=atoms, scale=scale)


#: the settings these tests were written for (cheaper than the workflow's defaults)
SMALL = dict(num_div=2, iterations=3, dtype="float64", n_starts=1, beta_every=5, refine_iterations=0,
             orientation_chunk=1024, photon_format="dense", resolution_iterations=0)


def _run(d, photons=None, **kw):
    cfg = dict(SMALL, **kw.pop("config", {}))
    return run_emc(d["photons"] if photons is None else photons, d["valid"], d["q"], d["pf"], d["grid"],
                   EMCSettings(**cfg), device="cpu", progress=False, **kw)


def test_recovers_orientations_gains_and_model(data):
    num_div = 3
    cfg = EMCSettings(**dict(SMALL, num_div=num_div, iterations=15, beta_start=0.05, beta_factor=1.5, beta_every=3,
                             n_starts=3, start_iterations=9, start_frames=120, start_num_div=2, dtype="float32"))
    res = run_emc(data["photons"], data["valid"], data["q"], data["pf"], data["grid"], cfg, device="cpu",
                  progress=False)
    # W(q) = I(A q) for a global rotation A; frame i then has R_est = R_true A, R_true = R_est Aᵀ.
    r_true = quaternion_to_matrix(torch.as_tensor(data["quat"]))
    r_est = quaternion_to_matrix(torch.as_tensor(res.quaternion))
    A = mean_rotation(r_true.transpose(1, 2) @ r_est)
    err = angle_between(torch.as_tensor(data["quat"]), matrix_to_quaternion(r_est @ A.T)).numpy()
    assert np.median(err) < 1.5 * angular_step_deg(num_div)
    assert np.corrcoef(res.gain, data["gain"])[0, 1] > 0.9
    assert res.gain.mean() == pytest.approx(1, abs=1e-5)
    # three random starts of 9 iterations on 120 frames, then the most likely one on all frames
    log = res.log
    assert list(log.columns) == LOG_COLUMNS and len(log) == 3 * 9 + 6
    trials = log[log.iteration <= 9]
    assert sorted(trials.groupby("start").size().to_dict().items()) == [(0, 9), (1, 9), (2, 9)]
    last = trials[trials.iteration == 9].set_index("start").log_likelihood
    main = log[log.iteration > 9]
    assert list(main.iteration) == list(range(10, 16)) and (main.start == last.idxmax()).all()
    for _, rows in trials.groupby("start"):  # each start: likelihood rising with β
        ll = rows.log_likelihood.to_numpy()
        assert ll[-1] > ll[0] and (np.diff(ll) > -1e-3 * abs(ll[0])).all()
    # The model is the truth rotated by A (blurred by the coarse 24.5° sampling: r ≈ 0.87).
    grid = data["grid"]
    inside = (grid.q_norm() < 0.9 * grid.q_max) & (res.weight > 0)
    truth = point_intensity(data["atoms"], grid.q_points() @ A.numpy().T)  # I(A q)
    assert np.corrcoef(res.intensity[inside], truth[inside])[0, 1] > 0.8
    assert res.probability_max.shape == (200,) and (res.probability_max <= 1 + 1e-6).all()


@pytest.mark.parametrize("kernel", ["numba", "grid_sample"])
def test_fused_kernels_equal_grid_slice_and_merge(kernel, monkeypatch):
    monkeypatch.setattr(slicing_cpu, "ENABLED", kernel == "numba" and slicing_cpu.numba is not None)
    grid = Grid(9, 0.1)
    g = torch.Generator().manual_seed(0)
    vol = torch.rand((9, 9, 9), generator=g, dtype=torch.float64)
    q = (torch.rand(30, 3, generator=g, dtype=torch.float64) - 0.5) * 1.2  # some beyond the grid
    rot = quaternion_to_matrix(torch.as_tensor(random_quaternions(5, np.random.default_rng(1))))
    points, coords = rotated_points(q, rot), grid_coordinates(q, rot, grid)
    torch.testing.assert_close(slice_model(vol, coords), slice_volume(vol, points, grid))
    for ch in (1, 2, 3):  # 2 has its own unrolled branch in the numba merge
        values = torch.rand((ch, 5, 30), generator=g, dtype=torch.float64)
        accum = torch.zeros((ch, 9, 9, 9), dtype=torch.float64)
        merge_model(accum, coords, values)
        for c in range(ch):
            ref = torch.zeros((9, 9, 9), dtype=torch.float64)
            merge_into(ref, points, values[c], grid)
            torch.testing.assert_close(accum[c], ref)


@pytest.mark.skipif(slicing_cpu.numba is None, reason="numba not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numba_kernels_equal_grid_sample_at_faces_and_beyond(dtype, monkeypatch):
    """Points on and across the faces (cells partly outside), far outside, NaN; the transposed
    (P, R) layout of the sparse path; several threads' copies of the merge summed."""
    g = torch.Generator().manual_seed(4)
    n = 11
    vol = torch.rand((n, n, n), generator=g, dtype=torch.float64).to(dtype)
    coords = ((torch.rand((7, 300, 3), generator=g, dtype=torch.float64) - 0.5) * 2.4).to(dtype)
    coords[0, :3] = torch.tensor([[1.0, 0.3, -1.0], [-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], dtype=dtype)
    coords[1, :2, 0] = torch.tensor([float("nan"), 5.0], dtype=dtype)
    values = torch.rand((2, 7, 300), generator=g, dtype=torch.float64).to(dtype)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(slicing_cpu, "ENABLED", on)
        accum = torch.zeros((2, n, n, n), dtype=dtype)
        merge_model(accum, coords, values)
        out[on] = slice_model(vol, coords), slice_model(vol, coords.transpose(0, 1)), accum
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, **tol)
    # the rotating kernels (no coordinates in memory) against the same with coordinates
    grid = Grid(n, 0.1)
    q = ((torch.rand((300, 3), generator=g, dtype=torch.float64) - 0.5) * 2.4 * grid.q_max).to(dtype)  # some beyond
    rot = quaternion_to_matrix(torch.as_tensor(random_quaternions(7, np.random.default_rng(2)))).to(dtype)
    coords = grid_coordinates(q, rot, grid)
    acc_rot, acc = torch.zeros((2, n, n, n), dtype=dtype), torch.zeros((2, n, n, n), dtype=dtype)
    merge_rotated(acc_rot, q, rot, grid, values)
    merge_model(acc, coords, values)
    torch.testing.assert_close(slice_rotated(vol, q, rot, grid), slice_model(vol, coords), **tol)
    torch.testing.assert_close(acc_rot, acc, **tol)
    assert (coords.abs() > 1).any() and acc.sum() > 0
    assert out[True][0][1, 0] == 0 and out[True][0][1, 1] == 0  # NaN and far outside read 0
    assert out[True][2].sum() < values.sum()  # what falls outside merges nothing


def test_one_hot_probabilities_merge_back_the_model(data):
    grid, d = data["grid"], data
    qv = torch.as_tensor(d["q"][d["valid"]])
    sv = torch.as_tensor(d["pf"][d["valid"]])
    rot = quaternion_to_matrix(torch.as_tensor(random_quaternions(400, np.random.default_rng(5))))
    gain = torch.as_tensor(np.random.default_rng(6).gamma(4.0, 1.0, 400))
    one_hot = torch.eye(400, dtype=torch.float64)
    # Constant model: merged back exactly wherever measured.
    counts = gain[:, None] * sv[None, :] * 7.0
    W, weight = compress(counts, one_hot, gain, qv, sv, rot, grid)
    measured = weight > 0
    assert measured.sum() > 0.3 * grid.n ** 3
    torch.testing.assert_close(W[measured], torch.full_like(W[measured], 7.0))
    # Smooth model: noiseless slices at the true orientations merge back to it.
    truth = torch.as_tensor(point_intensity(d["atoms"] * 0.5, grid.q_points()))
    counts = gain[:, None] * sv[None, :] * slice_volume(truth, rotated_points(qv, rot), grid)
    W, weight = compress(counts, one_hot, gain, qv, sv, rot, grid)
    good = weight > 0.2 * weight.max()
    rel = (W[good] - truth[good]).norm() / truth[good].norm()
    assert rel < 0.05


def test_memory_bounded_streaming_path_matches_single_block(data, tmp_path):
    zarr = pytest.importorskip("zarr")
    ref = _run(data)
    store = zarr.create_array(tmp_path / "photons.zarr", shape=data["photons"].shape, chunks=(16, 15, 15),
                              dtype="int32")
    store[:] = data["photons"]
    # 200 kB budget → 23-frame blocks (9 of them) × 420 orientations in chunks of 100;
    # photons not cached (200 × 224 × 8 B > budget) so every pass streams from the Zarr store.
    small = _run(data, photons=store, config=dict(memory_budget_gb=2e-4, orientation_chunk=100))
    np.testing.assert_allclose(small.intensity, ref.intensity, rtol=1e-5, atol=1e-6 * ref.intensity.max())
    np.testing.assert_allclose(small.gain, ref.gain, rtol=1e-8)
    np.testing.assert_array_equal(small.quaternion, ref.quaternion)
    np.testing.assert_allclose(small.log["log_likelihood"], ref.log["log_likelihood"], rtol=1e-10)


def test_checkpoint_resume_equals_uninterrupted_run(data, tmp_path):
    full = _run(data, config=dict(iterations=4), log_path=tmp_path / "a.csv", checkpoint_path=tmp_path / "a.pt")
    log, ckpt = tmp_path / "b.csv", tmp_path / "b.pt"
    _run(data, config=dict(iterations=2), log_path=log, checkpoint_path=ckpt)  # "interrupted" after 2
    log.unlink()  # as Snakemake removes an interrupted job's outputs: the rows come from the checkpoint
    resumed = _run(data, config=dict(iterations=4), log_path=log, checkpoint_path=ckpt)
    np.testing.assert_array_equal(resumed.intensity, full.intensity)
    np.testing.assert_array_equal(resumed.gain, full.gain)
    np.testing.assert_array_equal(resumed.quaternion, full.quaternion)
    assert list(pd.read_csv(log)["iteration"]) == [1, 2, 3, 4]
    cols = ["iteration", "beta", "log_likelihood", "rms_change", "mutual_info", "mean_max_probability"]
    pd.testing.assert_frame_equal(resumed.log[cols], full.log[cols])
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 4 and set(state) == {"iteration", "start", "model", "gain", "beta", "fingerprint",
                                                 "log_rows"}
    # A finished run re-invoked: same result, nothing appended.
    again = _run(data, config=dict(iterations=4), log_path=log, checkpoint_path=ckpt)
    np.testing.assert_array_equal(again.intensity, full.intensity)
    assert len(pd.read_csv(log)) == 4
    # Other data of the same shape (another seed or sample): the checkpoint is not used.
    other_data = {**data, "photons": data["photons"][::-1].copy()}
    with pytest.warns(UserWarning, match="different settings"):
        _run(other_data, config=dict(iterations=1), checkpoint_path=tmp_path / "a.pt")
    # Different settings: the checkpoint is not used.
    with pytest.warns(UserWarning, match="different settings"):
        other = _run(data, config=dict(iterations=1), seed=1, log_path=log, checkpoint_path=ckpt)
    assert list(other.log["iteration"]) == [1]
    with pytest.warns(UserWarning, match="different settings"):  # the local step schedule depends on it
        _run(data, config=dict(iterations=1, refine_iterations=1), seed=1, checkpoint_path=ckpt)


def test_bad_inputs_raise(data):
    d = data
    good = dict(photons=d["photons"], valid=d["valid"], q=d["q"], pixel_factor=d["pf"], grid=d["grid"])
    cfg = EMCSettings(**dict(SMALL, num_div=1, iterations=1))

    def call(settings=cfg, **kw):
        run_emc(**{**good, **kw}, settings=settings, device="cpu", progress=False)

    neg = d["photons"].copy()
    neg[150, 3, 3] = -1
    nan = d["photons"].astype(float)
    nan[7, 2, 2] = np.nan
    bad = [
        dict(photons=d["photons"][:, :14]),
        dict(photons=d["photons"][0]),
        dict(valid=np.zeros_like(d["valid"])),
        dict(valid=d["valid"].astype(int)),
        dict(q=d["q"][..., :2]),
        dict(pixel_factor=d["pf"][:14]),
        dict(pixel_factor=np.zeros_like(d["pf"])),
        dict(photons=neg),
        dict(photons=nan),
        dict(photons=np.zeros_like(d["photons"])),
        dict(settings=cfg.model_copy(update=dict(orientation_min_radius_voxels=100))),  # no pixel left
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            call(**kw)
    for name, value in [("num_div", 0), ("iterations", 0), ("dtype", "float16"), ("orientation_min_radius_voxels", -1),
                        ("n_starts", 0), ("start_frames", 0), ("num_div", 3.0)]:
        with pytest.raises(ValueError, match=name):
            EMCSettings(**{name: value})
    # Pixels that rotations could carry outside the grid are dropped with a warning.
    with pytest.warns(UserWarning, match="q_max"):
        call(q=d["q"] * 1.05)


def test_beta_schedule():
    cfg = EMCSettings(beta_start=0.1, beta_factor=2.0, beta_every=2, beta_max=0.5)
    assert [cfg.beta(t) for t in range(1, 8)] == [0.1, 0.1, 0.2, 0.2, 0.4, 0.4, 0.5]


def test_central_pixels_are_merged_but_do_not_vote(data):
    """Pixels inside orientation_min_radius_voxels still fill the model's centre."""
    grid = data["grid"]
    r = np.linalg.norm(data["q"], axis=-1) / grid.dq
    central = data["valid"] & (r < 5)
    assert central.any()
    res = _run(data, config=dict(orientation_min_radius_voxels=5, iterations=2))
    near = grid.q_norm() < 5 * grid.dq
    assert (res.weight[near] > 0).sum() > 0.5 * near.sum()


def test_random_starts_resume_from_the_chosen_start(data, tmp_path):
    cfg = dict(n_starts=2, start_iterations=2, start_frames=100, start_num_div=1)
    full = _run(data, config=dict(cfg, iterations=4), log_path=tmp_path / "a.csv", checkpoint_path=tmp_path / "a.pt")
    log, ckpt = tmp_path / "b.csv", tmp_path / "b.pt"
    _run(data, config=dict(cfg, iterations=3), log_path=log, checkpoint_path=ckpt)  # "interrupted" after 3
    resumed = _run(data, config=dict(cfg, iterations=4), log_path=log, checkpoint_path=ckpt)
    np.testing.assert_array_equal(resumed.intensity, full.intensity)
    np.testing.assert_array_equal(resumed.quaternion, full.quaternion)
    pd.testing.assert_frame_equal(resumed.log.drop(columns="seconds"), full.log.drop(columns="seconds"))
    assert list(full.log.iteration) == [1, 2, 1, 2, 3, 4]
    assert EMCSettings(n_starts=4, start_iterations=15, iterations=5).trial_iterations == 4
    assert EMCSettings(n_starts=1).trial_iterations == 0


@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 2e-4)])
def test_sparse_photons_equal_dense(data, dtype, rtol):
    """photon_format "sparse" (per-frame lists of pixels with counts, as Dragonfly stores
    them) computes the same E-step, gains and merge as the dense matmuls, also with several
    frame blocks, random starts and central (merge-only) pixels."""
    photons = data["photons"][:120] // 20  # ≈ 150 photons per frame: mostly zeros, some multi-photon pixels
    assert 0 < (photons > 0).mean() < 0.5 and (photons > 1).any()
    # 200 kB budget: 23-frame blocks, 100 orientations per chunk
    cfg = dict(dtype=dtype, iterations=2, orientation_min_radius_voxels=2, memory_budget_gb=2e-4,
               orientation_chunk=100, n_starts=2, start_iterations=1, start_frames=50)
    dense = _run(data, photons=photons, config=dict(cfg, photon_format="dense"))
    sparse = _run(data, photons=photons, config=dict(cfg, photon_format="sparse"))
    for name in ("intensity", "weight", "gain", "probability_max"):
        np.testing.assert_allclose(getattr(sparse, name), getattr(dense, name), rtol=rtol,
                                   atol=rtol * np.abs(getattr(dense, name)).max(), err_msg=name)
    same = (sparse.quaternion == dense.quaternion).all(1)
    assert same.all() if dtype == "float64" else same.mean() > 0.97  # float32: near-ties may flip
    for col in ("log_likelihood", "mutual_info", "rms_change"):
        # mutual_info (≈ 1e-4 here) is Σ P log P − Σ P log w, terms ≈ log M ≈ 6: in float32
        # the two formats' summation orders leave ~1e-7 of it absolute (measured 2.3e-7)
        atol = 1e-6 if dtype == "float32" and col == "mutual_info" else 0
        np.testing.assert_allclose(sparse.log[col], dense.log[col], rtol=rtol * 10, atol=atol, err_msg=col)
    pixels = np.flatnonzero(data["valid"])
    few = np.zeros_like(photons)
    few[:, 3, 4] = 2  # one pixel of 224 lit: 0.4 % non-zero
    assert choose_photon_format(few, pixels) == "sparse"
    assert choose_photon_format(data["photons"], pixels) == "dense"
    with pytest.raises(ValueError, match="photon_format"):
        _run(data, config=dict(photon_format="csr"))


def _median_error(quat_est, quat_true):
    """Median angle (degrees) between estimated and true orientations after the best global
    rotation A (W(q) = I(A q), so R_est = R_true A)."""
    r_true = quaternion_to_matrix(torch.as_tensor(quat_true))
    r_est = quaternion_to_matrix(torch.as_tensor(quat_est))
    A = mean_rotation(r_true.transpose(1, 2) @ r_est)
    return float(np.median(angle_between(torch.as_tensor(quat_true), matrix_to_quaternion(r_est @ A.T)).numpy()))


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ["hard", "soft"])
def test_local_refinement_beats_the_sampling_limit(data, assignment):
    """Local iterations after a coarse global search (num_div 3: 24.5° spacing, covering
    radius 17.7°) place frames far closer than the sampling can, and the log records them."""
    cfg = dict(num_div=3, iterations=15, beta_every=3, n_starts=3, start_iterations=9, start_frames=120,
               start_num_div=2, dtype="float32")
    coarse = _run(data, config=cfg)
    fine = _run(data, config=dict(cfg, refine_iterations=4, refine_assignment=assignment))
    e_coarse, e_fine = _median_error(coarse.quaternion, data["quat"]), _median_error(fine.quaternion, data["quat"])
    assert e_coarse > 4.0 and e_fine < 2.0 and e_fine < e_coarse / 4
    assert np.corrcoef(fine.gain, data["gain"])[0, 1] > 0.99 > np.corrcoef(coarse.gain, data["gain"])[0, 1]
    np.testing.assert_allclose(np.linalg.norm(fine.quaternion, axis=1), 1, atol=1e-6)
    local = fine.log[fine.log.iteration > 15]
    assert list(local.iteration) == [16, 17, 18, 19]
    np.testing.assert_allclose(local.step_deg, refine_steps_deg(EMCSettings(num_div=3, refine_iterations=4)))
    assert local.step_deg.iloc[0] == pytest.approx(53.0 / 3 / 2) and local.step_deg.iloc[-1] == pytest.approx(0.5)
    assert local.log_likelihood.is_monotonic_increasing
    assert fine.log[fine.log.iteration <= 15].step_deg.isna().all()
    assert (local.beta.isna() if assignment == "hard" else local.beta == 1.0).all()


def test_local_refinement_resumes_from_its_checkpoint(data, tmp_path):
    cfg = dict(num_div=2, iterations=3, refine_iterations=3)
    full = _run(data, config=cfg, log_path=tmp_path / "a.csv", checkpoint_path=tmp_path / "a.pt")
    log, ckpt = tmp_path / "b.csv", tmp_path / "b.pt"
    save = emc.save_checkpoint
    calls = []

    def stop_after_first_local(path, state):
        save(path, state)
        calls.append(state["iteration"])
        if "local_done" in state:
            raise KeyboardInterrupt

    with mock.patch.object(emc, "save_checkpoint", stop_after_first_local), pytest.raises(KeyboardInterrupt):
        _run(data, config=cfg, log_path=log, checkpoint_path=ckpt)
    assert calls == [1, 2, 3, 4]
    resumed = _run(data, config=cfg, log_path=log, checkpoint_path=ckpt)
    for name in ("intensity", "weight", "quaternion", "gain", "probability_max"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)
    pd.testing.assert_frame_equal(resumed.log.drop(columns="seconds"), full.log.drop(columns="seconds"))
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 6 and state["local_done"] == 3 and state["quaternion"].shape == (200, 4)


def test_local_rotations():
    quats = local_rotations(2.0, 3)
    assert quats.shape == (123, 4)  # lattice points of |ω| ≤ 3 steps
    np.testing.assert_array_equal(quats[0], [1, 0, 0, 0])
    angles = angle_between(torch.as_tensor(quats[:1]), torch.as_tensor(quats)).numpy()
    assert angles.max() == pytest.approx(6.0) and np.sort(angles)[1] == pytest.approx(2.0)
    np.testing.assert_allclose(np.linalg.norm(quats, axis=1), 1)
    assert len(np.unique(np.round(quats, 12), axis=0)) == 123
    for bad in [(0.0, 3), (1.0, 0), (1.0, 1.5)]:
        with pytest.raises(ValueError):
            local_rotations(*bad)


def test_resolution_schedule_and_bad_start(data):
    cfg = EMCSettings()  # the default: from half the largest |q| to all pixels at iteration 21
    assert [cfg.resolution_fraction(t) for t in (1, 11, 21, 30)] == [0.5, 0.75, 1.0, 1.0]
    short = EMCSettings(iterations=3)  # a short run reaches every pixel at its last iteration
    assert [short.resolution_fraction(t) for t in (1, 2, 3)] == [0.5, 0.75, 1.0]
    assert EMCSettings(resolution_iterations=0).resolution_fraction(1) == 1.0
    with pytest.warns(UserWarning, match="emc.resolution_start"):  # 0.05 · |q|max is inside the central speckle
        res = _run(data, config=dict(resolution_start=0.05, resolution_iterations=2))
    q_top = np.linalg.norm(data["q"], axis=-1)[data["valid"]].max()
    np.testing.assert_allclose(res.log.q_radius.dropna(), q_top, rtol=1e-12)  # marching off: every pixel


def test_resolution_marching_excludes_pixels_beyond_the_radius(data):
    """Photons added beyond the second iteration's q radius change neither of the first two
    iterations (E-step, gains and merge all ignore them: the second sees the first's model)
    but do change the run once the radius reaches them."""
    cfg = dict(resolution_start=0.45, resolution_iterations=4, iterations=5, update_gain=False)
    qn = np.linalg.norm(data["q"], axis=-1)
    q_top = qn[data["valid"]].max()
    radius2 = (0.45 + 0.55 / 4) * q_top
    outer = data["valid"] & (qn > radius2 + 4 * data["grid"].dq)  # + 4 voxels: the initial radial profile's reach
    assert outer.sum() >= 4  # the corners
    base = data["photons"][:80]
    more = base + 5 * outer[None].astype(base.dtype)
    a, b = _run(data, photons=base, config=cfg), _run(data, photons=more, config=cfg)
    np.testing.assert_allclose(a.log.q_radius, [f * q_top for f in (0.45, 0.5875, 0.725, 0.8625, 1.0)], rtol=1e-12)
    cols = ["log_likelihood", "mutual_info", "mean_max_probability"]  # (rms_change sees the initial models differ)
    np.testing.assert_array_equal(a.log[cols].iloc[:2].to_numpy(), b.log[cols].iloc[:2].to_numpy())
    assert not np.allclose(a.log.log_likelihood.iloc[-1], b.log.log_likelihood.iloc[-1], rtol=1e-6)


def test_coarse_to_fine_finds_the_exhaustive_orientations(data, monkeypatch):
    """With the true intensity at β 1, the hierarchical soft E-step (num_div 6 over the coarse
    3) picks the exhaustive search's orientation for nearly every frame, evaluates fewer
    orientations per frame than there are, reports a neglected mass within the bound and
    merges nearly the exhaustive search's model (its sparse merge of the kept pairs)."""
    # this small case keeps more pairs than the cost cut-off allows: the hierarchy is forced
    monkeypatch.setattr(emc, "COARSE_TO_FINE_MAX_FRACTION", 1.0)
    grid = data["grid"]
    W = point_intensity(data["atoms"], grid.q_points()) * data["scale"]
    args = (data["photons"], data["valid"], data["q"], data["pf"], grid, W, data["gain"])
    cfg = dict(num_div=6, dtype="float64")
    ex = expectation_step(*args, EMCSettings(**cfg, search="exhaustive"))
    c2f = expectation_step(*args, EMCSettings(**cfg, search="coarse_to_fine", search_mass=0.999))
    same = angle_between(torch.as_tensor(ex["quaternion"]), torch.as_tensor(c2f["quaternion"])).numpy() < 1e-6
    assert same.mean() >= 0.9
    assert ex["stats"]["neglected_mass"] < emc.MERGE_MIN_PROBABILITY
    assert ex["stats"]["orientations_per_frame"] == n_orientations(6)
    assert 0 < c2f["stats"]["neglected_mass"] <= 1 - 0.999
    assert c2f["stats"]["support_per_frame"] < c2f["stats"]["orientations_per_frame"] < n_orientations(6)
    # its merge against the truth, over the voxels it merged (the others keep the input W)
    merged = (ex["model"] > 1e-3 * ex["model"].max()) & (c2f["model"] != W)
    assert merged.mean() > 0.05
    cc = [np.corrcoef(r["model"][merged], W[merged])[0, 1] for r in (ex, c2f)]
    assert cc[1] > cc[0] - 0.02  # measured: 0.865 against 0.877



@pytest.mark.skipif(slicing_cpu.numba is None, reason="numba not installed")
@pytest.mark.parametrize("dtype,models", [("float64", 1), ("float64", 2), ("float32", 1)])
def test_numba_posterior_rows_equal_the_torch_path(data, dtype, models, monkeypatch):
    """The exhaustive E-step's posterior, its statistics, the gain update, the cut before the
    merge and (models > 1) the model probabilities: the CPU numba row kernel
    (slicing_cpu.posterior_rows) and the torch operations CUDA uses give the same pass."""
    grid, beta = data["grid"], 0.3
    W = point_intensity(data["atoms"], grid.q_points()) * data["scale"]
    if models > 1:  # a second, dilated model
        W = np.stack([W, point_intensity(0.9 * data["atoms"], grid.q_points()) * data["scale"]])
    cfg = EMCSettings(num_div=2, dtype=dtype, search="exhaustive", models=models, orientation_chunk=256)
    args = (data["photons"], data["valid"], data["q"], data["pf"], grid, W, data["gain"], cfg)
    out = {}
    for kernel in (True, False):
        monkeypatch.setattr(slicing_cpu, "ENABLED", kernel)
        out[kernel] = expectation_step(*args, beta=beta)
    a, b = out[True], out[False]
    rtol = 1e-9 if dtype == "float64" else 2e-4
    assert (angle_between(torch.as_tensor(a["quaternion"]), torch.as_tensor(b["quaternion"])).numpy() < 1e-6).mean() > 0.99
    for key in ("probability_max", "gain", "model"):
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=rtol * np.abs(b[key]).max())
    for key in ("log_likelihood", "mutual_info", "mean_max_probability"):
        assert a["stats"][key] == pytest.approx(b["stats"][key], rel=rtol, abs=rtol)
    assert 0 < a["stats"]["neglected_mass"] < models * 1e-6
    assert a["stats"]["neglected_mass"] == pytest.approx(b["stats"]["neglected_mass"], rel=1e-3 if dtype == "float64" else 0.05)
    if models > 1:
        assert (a["model_best"] == b["model_best"]).all()
        np.testing.assert_allclose(a["model_probability"], b["model_probability"], rtol=rtol)


def test_exhaustive_posterior_equals_the_brute_force_softmax(data, monkeypatch):
    """The exhaustive E-step's posterior (row-wise, floored against subnormals) equals
    P_ri = w_r e^{β L_ri} / Σ_r' w_r' e^{β L_r'i} with L_ri = Σ_{p∈O} K_ip log(φ_i s_p W_rp)
    − φ_i s_p W_rp computed directly from the slices; leaving the pairs with P below
    MERGE_MIN_PROBABILITY / M out of the merge barely moves the voxels the others reach, and
    that mass is logged as neglected within its bound."""
    from spiflow.sampling import so3_sampling
    grid, beta, min_radius = data["grid"], 0.5, 2.0
    W = point_intensity(data["atoms"], grid.q_points()) * data["scale"]
    args = (data["photons"], data["valid"], data["q"], data["pf"], grid, W, data["gain"])
    cfg = EMCSettings(num_div=2, dtype="float64", search="exhaustive", orientation_min_radius_voxels=min_radius)
    res = expectation_step(*args, cfg, beta=beta)
    quats, w = so3_sampling(2)
    qv, sv = data["q"][data["valid"]], data["pf"][data["valid"]]
    o = np.linalg.norm(qv, axis=1) >= min_radius * grid.dq
    S = slice_rotated(torch.as_tensor(W), torch.as_tensor(qv[o]), quaternion_to_matrix(torch.as_tensor(quats)),
                      grid).numpy()  # (M, P_o)
    K = data["photons"][:, data["valid"]][:, o].astype(np.float64)  # (frames, P_o)
    mu = data["gain"][:, None, None] * sv[o] * S[None]  # (frames, M, P_o)
    L = (K[:, None, :] * np.log(np.maximum(mu, 1e-300)) - mu).sum(2)
    logp = beta * L + np.log(w)
    logp -= logp.max(1, keepdims=True)
    P = np.exp(logp) / np.exp(logp).sum(1, keepdims=True)
    np.testing.assert_allclose(res["probability_max"], P.max(1), rtol=1e-9, atol=1e-12)
    assert (angle_between(torch.as_tensor(res["quaternion"]), torch.as_tensor(quats[P.argmax(1)])).numpy() < 1e-6).all()
    mi = (P * np.log(np.maximum(P, 1e-300) / w)).sum(1).mean()
    assert res["stats"]["mutual_info"] == pytest.approx(mi, rel=1e-9)
    # the merge without skipping any rotation
    monkeypatch.setattr(emc, "MERGE_MIN_PROBABILITY", 0.0)
    full = expectation_step(*args, cfg, beta=beta)
    assert full["stats"]["neglected_mass"] == 0
    assert 0 < res["stats"]["neglected_mass"] < 1e-6
    # voxels that no merged rotation reaches keep the input W; the others barely move
    merged = res["model"] != W
    assert merged.mean() > 0.05
    rel = np.abs(res["model"] - full["model"])[merged] / (full["model"][merged] + 1e-6 * W.max())
    # measured: 99 % of the voxels within 4e-10, the largest 4e-3 (voxels of little weight)
    assert np.mean(rel < 1e-6) > 0.99 and rel.max() < 0.01


def test_chained_passes_equal_successive_calls(data):
    """expectation_step(passes=2) is two calls, the second from the first's model and gains."""
    grid = data["grid"]
    W = point_intensity(data["atoms"], grid.q_points()) * data["scale"]
    base = (data["photons"], data["valid"], data["q"], data["pf"], grid)
    cfg = EMCSettings(num_div=2, dtype="float64", search="exhaustive")
    one = expectation_step(*base, W, data["gain"], cfg)
    two = expectation_step(*base, one["model"], one["gain"], cfg)
    chained = expectation_step(*base, W, data["gain"], cfg, passes=2)
    assert len(chained["seconds"]) == 2 and (chained["seconds"] > 0).all()
    np.testing.assert_allclose(chained["model"], two["model"], rtol=1e-12, atol=1e-12 * W.max())
    np.testing.assert_allclose(chained["gain"], two["gain"], rtol=1e-12)
    with pytest.raises(ValueError, match="passes"):
        expectation_step(*base, W, data["gain"], cfg, passes=0)


def test_coarse_to_fine_cell_blocks_equal_with_and_without_numba(data, monkeypatch):
    """The coarse-to-fine likelihoods cell block by cell block: the numba kernel and the torch
    products (the path of CUDA) give the same pass."""
    monkeypatch.setattr(emc, "COARSE_TO_FINE_MAX_FRACTION", 1.0)
    grid = data["grid"]
    W = point_intensity(data["atoms"], grid.q_points()) * data["scale"]
    args = (data["photons"], data["valid"], data["q"], data["pf"], grid, W, data["gain"])
    cfg = EMCSettings(num_div=4, dtype="float64", search="coarse_to_fine")
    a = expectation_step(*args, cfg)
    monkeypatch.setattr(slicing_cpu, "ENABLED", False)
    b = expectation_step(*args, cfg)
    assert a["stats"]["support_per_frame"] < n_orientations(4)  # the hierarchy ran
    np.testing.assert_array_equal(a["quaternion"], b["quaternion"])
    np.testing.assert_allclose(a["model"], b["model"], rtol=1e-9, atol=1e-12 * W.max())
    assert a["stats"]["log_likelihood"] == pytest.approx(b["stats"]["log_likelihood"], rel=1e-12)
