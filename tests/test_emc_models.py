"""Tests of multi-model EMC (``emc.models`` > 1, Dragonfly's modes) on a small, high-signal
mixture of two clearly different synthetic particles built here."""
from unittest import mock

import numpy as np
import pytest
import pandas as pd
import torch

from spiflow import emc

from spiflow.emc import expectation_step, model_size_order, run_emc
from spiflow.grid import Grid
from spiflow.rotation import quaternion_to_matrix, random_quaternions
from spiflow.metrics import orientation_errors
from spiflow.settings import EMCSettings
from synthetic import curved_detector, point_intensity, three_dimensional_points

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def mixture():
    """200 frames: 100 of a compact 6-point particle (radius 9 Å, label 0) and 100 of a
    wide one (radius 18 Å, label 1), random orientations and gains, ≈ 3000 photons per frame."""
    rng = np.random.default_rng(1)
    grid = Grid(23, 0.01)
    atoms = [three_dimensional_points(rng, 6, 9.0), three_dimensional_points(rng, 6, 18.0)]
    q, pf, valid = curved_detector(grid)
    frames = 200
    label = rng.permutation(np.arange(frames) % 2)
    quat = random_quaternions(frames, rng)
    R = quaternion_to_matrix(torch.as_tensor(quat)).numpy()
    qr = np.einsum("pk,fkl->fpl", q.reshape(-1, 3), R)
    intensity = np.stack([point_intensity(atoms[c], qr[i]) for i, c in enumerate(label)]).reshape(frames, *pf.shape)
    gain = rng.gamma(8.0, 1.0, frames)
    gain /= gain.mean()
    scale = np.array([3000.0 / (pf * point_intensity(a, q)).sum() for a in atoms])[label]
    photons = rng.poisson(gain[:, None, None] * pf * intensity * scale[:, None, None]).astype(np.int32)
    return dict(photons=photons, valid=valid, q=q, pf=pf, grid=grid, quat=quat, label=label, atoms=atoms)


BASE = dict(num_div=3, iterations=15, dtype="float32", n_starts=1, beta_start=0.05, beta_factor=1.5, beta_every=3,
            refine_iterations=0, photon_format="dense", resolution_iterations=0, search="exhaustive")


def _run(d, photons=None, **kw):
    return run_emc(d["photons"] if photons is None else photons, d["valid"], d["q"], d["pf"], d["grid"],
                   EMCSettings(**dict(BASE, **kw.pop("config", {}))), device="cpu", progress=False, **kw)


def test_two_particles_are_classified_ordered_by_size_and_oriented(mixture):
    d = mixture
    # two random starts of 9 iterations (each with both models) on all frames, then 9 more
    res = _run(d, config=dict(models=2, iterations=18, n_starts=2, start_iterations=9, start_frames=200))
    # model 0 is the smaller particle (model_size_order): no label permutation needed
    assert (res.model == d["label"]).mean() >= 0.9
    assert res.models.shape == (2, 23, 23, 23) and res.model_weight.shape == (2, 23, 23, 23)
    assert ((res.model_probability > 0.5 - 1e-4) & (res.model_probability <= 1 + 1e-4)).all()  # float32 sums
    assert np.median(res.model_probability) > 0.99  # high signal: classes are clear-cut
    assert (res.probability_max <= res.model_probability + 1e-4).all()
    # each class oriented well below the num_div 3 step (24.5°): measured 11–12°
    for c in (0, 1):
        sel = res.model == c
        err, _ = orientation_errors(res.quaternion[sel], d["quat"][sel])
        assert np.median(err) < 18.0, (c, np.median(err))
    main = np.bincount(res.model).argmax()
    np.testing.assert_array_equal(res.intensity, res.models[main])
    np.testing.assert_array_equal(res.weight, res.model_weight[main])
    # the trial starts and the main run are logged as for one model
    assert sorted(res.log[res.log.iteration <= 9].groupby("start").size().to_dict().items()) == [(0, 9), (1, 9)]
    assert (res.log.orientations_per_frame == 2 * 1380).all()


def test_identical_models_equal_one_model(mixture):
    """K copies of one model under the uniform model prior: P_kri = P_ri / K, each copy
    merges the same ratio, so every copy equals the one-model merge and the gains agree."""
    d = mixture
    W = emc._initial_model(d["photons"].reshape(200, -1)[:, d["valid"].ravel()].sum(0).astype(float),
                           d["q"][d["valid"]], d["pf"][d["valid"]], 200.0, d["grid"], 0)
    gain = np.ones(200)
    one = expectation_step(d["photons"], d["valid"], d["q"], d["pf"], d["grid"], W, gain,
                           EMCSettings(**dict(BASE, dtype="float64")), beta=0.3)
    two = expectation_step(d["photons"], d["valid"], d["q"], d["pf"], d["grid"], np.stack([W, W]), gain,
                           EMCSettings(**dict(BASE, dtype="float64", models=2)), beta=0.3)
    assert two["model"].shape == (2, 23, 23, 23)
    reached = one["model"] > 0  # voxels no pixel reaches: 0 for one model, kept (W) for K > 1
    assert 0.3 < reached.mean() < 0.9
    for k in (0, 1):
        np.testing.assert_allclose(two["model"][k][reached], one["model"][reached], rtol=1e-9)
        np.testing.assert_allclose(two["model"][k][~reached], W[~reached], rtol=1e-12)
    np.testing.assert_allclose(two["gain"], one["gain"], rtol=1e-9)
    np.testing.assert_allclose(two["probability_max"], one["probability_max"] / 2, rtol=1e-9)
    np.testing.assert_allclose(two["model_probability"], 0.5, rtol=1e-9)
    assert two["stats"]["log_likelihood"] == pytest.approx(one["stats"]["log_likelihood"], rel=1e-12)
    assert two["stats"]["mutual_info"] == pytest.approx(one["stats"]["mutual_info"], rel=1e-9)  # P/prior unchanged


def test_models_need_the_exhaustive_search():
    with pytest.raises(ValueError, match="emc.models = 2 needs emc.search: exhaustive"):
        EMCSettings(models=2)
    with pytest.raises(ValueError, match="models"):
        EMCSettings(models=0, search="exhaustive")
    assert EMCSettings(models=2, search="exhaustive").models == 2


def test_model_size_order():
    grid = Grid(23, 0.01)
    qn = grid.q_norm()
    vols = np.stack([np.exp(-(qn * r) ** 2) for r in (40.0, 10.0, 20.0)])  # speckle width ∝ 1 / size
    assert list(model_size_order(vols, np.ones_like(vols), grid)) == [1, 2, 0]
    assert list(model_size_order(5.0 * vols[::-1], np.ones_like(vols), grid)) == [1, 0, 2]  # scale-free


def test_refinement_and_checkpoint_resume_with_two_models(mixture, tmp_path):
    d = mixture
    cfg = dict(models=2, num_div=2, iterations=4, refine_iterations=2)
    full = _run(d, config=cfg, log_path=tmp_path / "a.csv", checkpoint_path=tmp_path / "a.pt")
    log, ckpt = tmp_path / "b.csv", tmp_path / "b.pt"
    save = emc.save_checkpoint

    def stop_after_first_local(path, state):
        save(path, state)
        if "local_done" in state:
            raise KeyboardInterrupt

    with mock.patch.object(emc, "save_checkpoint", stop_after_first_local), pytest.raises(KeyboardInterrupt):
        _run(d, config=cfg, log_path=log, checkpoint_path=ckpt)
    resumed = _run(d, config=cfg, log_path=log, checkpoint_path=ckpt)
    for name in ("models", "model_weight", "quaternion", "gain", "model", "model_probability", "probability_max"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)
    pd.testing.assert_frame_equal(resumed.log.drop(columns="seconds"), full.log.drop(columns="seconds"))
    state = torch.load(ckpt, weights_only=True)
    assert state["model"].shape == (2, 23, 23, 23) and state["model_best"].shape == (200,)
    assert full.gain.mean() == pytest.approx(1, abs=1e-5)
    assert list(full.log.iteration) == [1, 2, 3, 4, 5, 6] and full.log.moved_fraction.iloc[-2:].notna().all()




#: two models through every path that runs across ranks: random starts on the first frames,
#: the radial split of the initial models, sparse photons, local refinement
RANKS = dict(models=2, num_div=2, iterations=4, n_starts=2, start_iterations=2, start_frames=120, start_num_div=1,
             refine_iterations=2, photon_format="sparse", dtype="float64", beta_every=1, beta_factor=2.0)


def _worker(d, tmp):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    res = _run(d, config=RANKS)
    if dist.get_rank() == 0:
        np.savez(tmp / "rank0.npz", **{k: getattr(res, k) for k in ("models", "quaternion", "gain", "model",
                                                                      "model_probability")})
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: 30 s on 2 loaded cores
def test_two_ranks_equal_one_process_with_two_models(mixture, tmp_path):
    from spiflow.distributed import run_local

    one = _run(mixture, config=RANKS)
    run_local(_worker, 2, mixture, tmp_path)
    two = np.load(tmp_path / "rank0.npz")
    np.testing.assert_allclose(two["models"], one.models, rtol=1e-6, atol=1e-9 * one.models.max())
    np.testing.assert_allclose(two["gain"], one.gain, rtol=1e-8)
    np.testing.assert_array_equal(two["model"], one.model)
    np.testing.assert_allclose(two["model_probability"], one.model_probability, rtol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(two["quaternion"] * one.quaternion, 1)), 1.0, atol=1e-9)
