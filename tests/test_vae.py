"""The heterogeneity VAE (spiflow.vae) on tiny data: losses, shapes, resume, separation."""
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from scipy.stats import spearmanr

from spiflow import hetero, vae
from spiflow.latent import latent_spearman
from spiflow.slicing import grid_coordinates
from spiflow.grid import Grid, slice_volume
from spiflow.rotation import quaternion_to_matrix, random_quaternions
from spiflow.scattering import structure_factor
from spiflow.symmetry import apply_operation, point_group
from spiflow.settings import VAESettings
from spiflow.vae import kl_divergence, poisson_nll, run_vae

TINY = dict(latent_dim=2, batch_size=32, encoder_channels=8, encoder_layers=2, hidden=32, decoder_channels=8,
            decoder_layers=2, volume_n=None, beta_warmup_epochs=2, chunk_frames=48)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: small flips/permutes are far slower with two threads on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    """256 frames of 16 × 16 pixels of two gold octahedra (R = 9 and 13 Å, 85 and 231 atoms)
    at known random orientations, ≈ 2000 photons each, gains ~ Gamma(8)."""
    rng = np.random.default_rng(0)
    grid = Grid(15, 0.0125)
    k, npix = 0.15, 16
    ax = np.linspace(-1, 1, npix) * np.tan(2 * np.arcsin(0.95 * grid.q_max / (2 * k))) / np.sqrt(2)
    d = np.stack([*np.meshgrid(ax, ax, indexing="ij"), np.ones((npix, npix))], -1)
    r = np.linalg.norm(d, axis=-1)
    q = k * (d / r[..., None] - np.array([0.0, 0.0, 1.0]))  # Ewald sphere, Å⁻¹
    pf = r ** -3.0
    valid = np.ones((npix, npix), bool)
    valid[7:9, 7:9] = False
    states = (hetero.truncated_octahedron(9.0, 0.0), hetero.truncated_octahedron(13.0, 0.0))
    mix = hetero.Mixture(states, (0.5, 0.5))
    n = 256
    params = mix.draw(n, rng)
    quats = random_quaternions(n, rng)
    mu = hetero.expected_counts(mix, params, q, pf, quats, 1.0, method="direct")
    for s in (0, 1):  # the same mean photons for both states: only the shape tells them apart
        sel = params[:, 0] == s
        mu[sel] *= 2000 / mu[sel][:, valid].sum(1).mean()
    gains = rng.gamma(8.0, 1 / 8.0, n)
    gains /= gains.mean()
    photons = rng.poisson(mu * gains[:, None, None]).astype(np.int32)
    return dict(photons=photons, valid=valid, q=q, pf=pf, grid=grid, quats=quats, gains=gains,
                state=params[:, 0].astype(int), states=states)


def _run(d, n=None, photons=None, **kw):
    cfg = VAESettings(**{**TINY, **kw.pop("config", {})})
    sl = slice(None, n)
    ph = d["photons"][sl] if photons is None else photons
    return run_vae(ph, d["valid"], d["q"], d["pf"], d["grid"], d["quats"][sl], d["gains"][sl], cfg,
                   device="cpu", progress=False, **kw)


def test_kl_and_poisson_terms_on_known_cases():
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).abs().max() == 0
    torch.testing.assert_close(kl_divergence(torch.ones(1, 2), torch.zeros(1, 2)), torch.tensor([1.0]))  # ½ μ² per dim
    lv = torch.tensor([[np.log(2.0)]])  # σ² = 2: ½ (σ² − 1 − log σ²)
    torch.testing.assert_close(kl_divergence(torch.zeros(1, 1), lv), torch.tensor([0.5 * (1 - np.log(2.0))]),
                               check_dtype=False)
    counts = torch.tensor([0.0, 1.0, 5.0, 20.0], dtype=torch.float64)
    mu = counts.clamp_min(1e-12).clone().requires_grad_(True)
    best = poisson_nll(mu, counts)
    best.sum().backward()
    torch.testing.assert_close(mu.grad[1:], torch.zeros(3, dtype=torch.float64))  # stationary at μ = K
    for f in (0.8, 1.25):
        assert (poisson_nll(counts[1:] * f, counts[1:]) > best[1:]).all()
    torch.testing.assert_close(poisson_nll(torch.tensor([2.0]), torch.tensor([3.0])),  # −log Poisson(3; 2)
                               torch.tensor([2.0 - 3 * np.log(2.0) + np.log(6.0)]), check_dtype=False)
    loss, recon, kl = vae.vae_loss(counts[None].clamp_min(0.5), counts[None], torch.ones(1, 2), torch.zeros(1, 2), 3.0)
    torch.testing.assert_close(loss, recon + 3.0 * kl / 4)


def test_beta_warm_up():
    cfg = VAESettings(beta=2.0, beta_warmup_epochs=2)
    assert [vae.beta_at(s, 5, cfg) for s in (0, 4, 9, 30)] == [0.2, 1.0, 2.0, 2.0]
    assert vae.beta_at(0, 5, VAESettings(beta=0.5, beta_warmup_epochs=0)) == 0.5


@pytest.mark.parametrize("encoder, conditional, orientation", [("cnn", True, "6d"), ("cnn", False, "6d"),
                                                               ("cnn", True, "quaternion"), ("lstm", True, "6d")])
def test_encoder_conditioning_shapes(encoder, conditional, orientation):
    cfg = VAESettings(**{**TINY, "encoder": encoder, "conditional": conditional, "orientation_encoding": orientation,
                       "sequence_length": 3, "latent_dim": 3})
    model = vae.VAEModel(cfg, 11)
    quats = random_quaternions(5, np.random.default_rng(0))
    cond = vae.orientation_features(quats, np.full(5, 2.0), cfg)
    width = {"6d": 6, "quaternion": 4}[orientation] + 1 if conditional else 0
    assert cond.shape == (5, width) == (5, model.cond_dim)
    if conditional:
        torch.testing.assert_close(cond[:, -1], torch.full((5,), float(np.log(2.0))))
    image = torch.rand(5, 2, 16, 16)
    if encoder == "lstm":
        image, cond = image[:, None].expand(5, 3, 2, 16, 16), cond[:, None].expand(5, 3, width)
    mu, logvar = model.encoder(image, cond)
    assert mu.shape == logvar.shape == (5, 3)
    vol = model.decoder(mu)
    assert vol.shape == (5, 11, 11, 11) and (vol > 0).all()


@pytest.mark.parametrize("symmetry", ["C1", "Oh"])
def test_decoded_volume_is_exactly_symmetric(symmetry):
    cfg = VAESettings(**{**TINY, "symmetry": symmetry, "positivity": "softplus"})
    vol = vae.VAEModel(cfg, 9).decoder(torch.randn(2, 2)).detach()
    for g in point_group(symmetry, friedel=True):
        torch.testing.assert_close(apply_operation(vol, g), vol, rtol=1e-6, atol=0)
    if symmetry == "C1":  # Friedel only: not cubic
        assert not torch.allclose(vol.permute(0, 2, 1, 3), vol, rtol=1e-3)


def test_slicing_reads_the_volume_at_r_transpose_q():
    grid = Grid(9, 0.1)
    g = torch.Generator().manual_seed(0)
    vols = torch.rand(3, 9, 9, 9, generator=g, dtype=torch.float64)
    q = (torch.rand(20, 3, generator=g, dtype=torch.float64) - 0.5) * 0.6
    rot = quaternion_to_matrix(torch.as_tensor(random_quaternions(3, np.random.default_rng(1))))
    out = vae.slice_volumes(vols, grid_coordinates(q, rot, grid))
    for b in range(3):
        torch.testing.assert_close(out[b], slice_volume(vols[b], q @ rot[b], grid))  # (Rᵀ q)ᵀ = qᵀ R


def test_factorized_model_is_smaller_and_runs():
    counts = vae.parameter_counts(VAESettings(**{**TINY, "cp_rank": 4}), 15)
    assert counts["factorized"]["total"] < counts["full"]["total"] and 0 < counts["ratio"] < 1
    big = vae.parameter_counts(VAESettings(encoder_channels=32, decoder_channels=32, cp_rank=8), 31)
    assert big["ratio"] < 0.3
    model = vae.VAEModel(VAESettings(**{**TINY, "factorized": True, "cp_rank": 4}), 15)
    assert any(isinstance(m, vae.CPConvTranspose3d) for m in model.modules())
    mu, _ = model.encoder(torch.rand(2, 2, 16, 16), torch.rand(2, 7))
    assert model.decoder(mu).shape == (2, 15, 15, 15)


@pytest.mark.parametrize("field, value", [("latent_dim", 0), ("symmetry", "C3"), ("symmetry", "Q"),
                                          ("volume_n", 10), ("encoder", "rnn"), ("beta", -1.0),
                                          ("orientation_encoding", "euler"), ("positivity", "relu")])
def test_settings_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        VAESettings(**{field: value})


def test_bad_inputs_raise(data):
    with pytest.raises(ValueError, match="quaternions"):
        run_vae(data["photons"][:8], data["valid"], data["q"], data["pf"], data["grid"], data["quats"][:7],
                data["gains"][:8], VAESettings(**TINY), device="cpu",
                progress=False)
    with pytest.raises(ValueError, match="gains"):
        run_vae(data["photons"][:8], data["valid"], data["q"], data["pf"], data["grid"], data["quats"][:8],
                -data["gains"][:8], VAESettings(**TINY), device="cpu",
                progress=False)
    bad = data["photons"][:8].copy()
    bad[3, 0, 0] = -1
    with pytest.raises(ValueError, match="negative"):
        _run(data, photons=bad, n=8)


def test_resume_equals_uninterrupted_run_streaming_from_zarr(data, tmp_path):
    """Two epochs straight vs one epoch, a crash, and a resume; photons streamed from a
    Zarr array in chunks of 48 frames (memory budget too small to cache them)."""
    store = zarr.open_array(tmp_path / "photons.zarr", mode="w", shape=(96, 16, 16), chunks=(48, 16, 16),
                            dtype="int32")
    store[:] = data["photons"][:96]
    cfg = dict(epochs=2, memory_budget_gb=1e-6, encoder="lstm", sequence_length=2)
    full = _run(data, n=96, photons=store, config=cfg, checkpoint_path=tmp_path / "full.pt",
                log_path=tmp_path / "full.csv")
    save = vae.save_checkpoint

    def stop_after_first(path, state):
        save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    with mock.patch.object(vae, "save_checkpoint", stop_after_first), pytest.raises(KeyboardInterrupt):
        _run(data, n=96, photons=store, config=cfg, checkpoint_path=tmp_path / "cut.pt", log_path=tmp_path / "cut.csv")
    assert torch.load(tmp_path / "cut.pt", weights_only=True)["epoch"] == 1
    saved = []
    with mock.patch.object(vae, "save_checkpoint", lambda p, s: saved.append(s["epoch"]) or save(p, s)):
        resumed = _run(data, n=96, photons=store, config=cfg, checkpoint_path=tmp_path / "cut.pt",
                       log_path=tmp_path / "cut.csv")
    assert saved == [2]
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("full.pt", "cut.pt"))
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
    np.testing.assert_array_equal(resumed.z_mu, full.z_mu)
    np.testing.assert_array_equal(resumed.z_logvar, full.z_logvar)
    assert list(full.log.columns) == vae.LOG_COLUMNS and len(full.log) == 2
    pd.testing.assert_frame_equal(resumed.log.drop(columns=["patterns_per_second", "seconds"]),
                                  full.log.drop(columns=["patterns_per_second", "seconds"]))


@pytest.mark.parametrize("options", [dict(factorized=True, cp_rank=4), dict(conditional=False),
                                     dict(orientation_encoding="quaternion", positivity="softplus",
                                          radial_baseline=False, symmetry="D2")])
def test_options_train(data, options):
    res = _run(data, n=40, config=dict(epochs=1, **options))
    assert res.z_mu.shape == (40, 2) and np.isfinite(res.z_mu).all() and np.isfinite(res.log["loss"]).all()
    vol = vae.decode(res.decoder, res.z_mu[:2])
    assert vol.shape == (2, 15, 15, 15) and (vol > 0).all()
    with pytest.raises(ValueError, match="decoder_grid"):
        vae.decode(res.decoder, res.z_mu[:2], grid=res.grid)


def test_training_separates_two_states_in_latent_space(data):
    """Two octahedron sizes, equal mean photons, Oh symmetry, known orientations: after 12
    epochs a threshold on PC1 classifies > 90 % of the frames (100 % measured; ≈ 58 % with
    an untrained encoder), k-means finds the two states, and the decoded volumes differ like
    the true intensities."""
    res = _run(data, config=dict(epochs=12, lr=3e-3, symmetry="Oh", volume_n=11))
    state = data["state"]
    assert res.z_mu.shape == res.z_logvar.shape == (256, 2) and res.grid.n == 11
    assert res.log["recon"].iloc[-1] < res.log["recon"].iloc[0]
    pc1 = vae.pca(res.z_mu, 2).scores[:, 0]
    cuts = np.sort(pc1)[:-1] + np.diff(np.sort(pc1)) / 2
    accuracy = max(max(((pc1 > c) == state).mean(), ((pc1 > c) != state).mean()) for c in cuts)
    assert accuracy > 0.9
    assert latent_spearman(res.z_mu, state[:, None])[0] > 0.8  # 0.87 for a perfect split of two halves
    frames, z, labels = vae.kmeans_representatives(res.z_mu, 2)
    assert max((labels == state).mean(), (labels != state).mean()) > 0.9
    assert sorted(state[frames]) == [0, 1]
    np.testing.assert_array_equal(z, res.z_mu[frames])
    # decoded volumes: their log-ratio correlates with the true intensities' log-ratio
    g = res.grid
    inside = g.q_norm() <= g.q_max
    truth = [np.abs(structure_factor(s, g.q_points()[inside], method="direct")) ** 2 for s in data["states"]]
    vols = vae.decode(res.decoder, z)
    a, b = state[frames]
    rho = spearmanr(np.log(vols[0][inside] / vols[1][inside]), np.log(truth[a] / truth[b])).statistic
    assert rho > 0.5  # 0.81 measured
    zs, path = vae.traversal(res.decoder, res.z_mu, steps=3)
    assert zs.shape == (3, 2) and path.shape == (3, 11, 11, 11)
    full = vae.decode(res.decoder, z[:1], grid=data["grid"], decoder_grid=g)
    assert full.shape == (1, 15, 15, 15)
    ds = vae.latent_dataset(res.z_mu, res.z_logvar)
    assert ds["z_mu"].dims == ("frame", "latent") and ds["z_logvar"].shape == (256, 2)


def test_pca_and_latent_spearman_on_a_known_line():
    rng = np.random.default_rng(0)
    t = rng.random(500)
    z = np.stack([t, 2 * t, 0.01 * rng.normal(size=500)], 1)
    p = vae.pca(z, 2)
    np.testing.assert_allclose(np.abs(p.components[0]), np.array([1, 2, 0]) / np.sqrt(5), atol=1e-3)
    assert p.explained_variance_ratio[0] > 0.99
    assert p.components[0][1] > 0  # PC1's sign: largest loading positive
    assert latent_spearman(z, t[:, None])[0] > 0.999


def test_umap_embedding_separates_two_clusters():
    pytest.importorskip("umap")
    from spiflow.latent import umap_embedding

    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(0, 0.1, (40, 3)), rng.normal(5, 0.1, (40, 3))])
    emb = umap_embedding(z, seed=0)
    assert emb.shape == (80, 2)
    a, b = emb[:40].mean(0), emb[40:].mean(0)
    spread = max(emb[:40].std(0).max(), emb[40:].std(0).max())
    assert np.linalg.norm(a - b) > 3 * spread
    assert umap_embedding(z[:3], seed=0) is None
