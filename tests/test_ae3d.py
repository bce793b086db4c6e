"""Method ae3d (spiflow.ae3d): loss invariances, training lowers the error against the truth
on a tiny seeded case, checkpoint/resume, label-free fine-tuning, bad input."""
import numpy as np
import pytest
import torch

from spiflow import ae3d, bragg
from spiflow.settings import AE3DSettings, CrystalsSettings

CRYSTALS = CrystalsSettings(n=17, size_range_voxels=[2.2, 2.8], photons=1e6)


def _truth(cs):
    return torch.polar(torch.as_tensor(cs.amplitude, dtype=torch.float64),
                       torch.as_tensor(cs.phase, dtype=torch.float64))


def test_losses_are_invariant_to_the_ambiguities():
    cs = bragg.simulate_crystals(CRYSTALS, 2, seed=0)
    t = _truth(cs)
    twin = torch.as_tensor(bragg.twin(t.numpy()))
    assert ae3d.supervised_loss(t * np.exp(0.8j), t).abs().max() < 1e-12
    assert ae3d.supervised_loss(twin * np.exp(-2j), t).abs().max() < 1e-12
    assert (ae3d.supervised_loss(t.flip(0), t) > 0.1).all()  # the other object
    sqrt_I = torch.as_tensor(np.sqrt(np.stack([bragg.expected_intensity(x, cs.grid, 1e6) for x in t.numpy()])))
    m = torch.ones((17,) * 3, dtype=torch.bool)
    assert ae3d.physics_loss(3.0 * t, sqrt_I, m).max() < 1e-12  # any scale, same for the twin
    assert ae3d.physics_loss(twin, sqrt_I, m).max() < 1e-12
    assert (ae3d.physics_loss(t.flip(0), sqrt_I, m) > 0.05).all()


def _cfg(**kw):
    base = dict(crystals=CRYSTALS, n_train=32, channels=4, latent_dim=8, epochs=5, batch_size=8, lr=0.003)
    return AE3DSettings(**{**base, **kw})


def _mean_error(model, cs):
    pred = ae3d.predict(model, cs.intensity, cs.measured)
    t = _truth(cs).numpy()
    return np.mean([bragg.complex_errors(p, x, cs.grid)["complex_error"] for p, x in zip(pred, t)])


@pytest.mark.slow
def test_training_lowers_the_error_against_the_truth(tmp_path):
    cfg = _cfg(channels=8, batch_size=4)
    train = bragg.simulate_crystals(CRYSTALS, cfg.n_train, seed=0)
    test = bragg.simulate_crystals(CRYSTALS, 6, seed=1)
    torch.manual_seed(123)
    before = _mean_error(ae3d.AE3D(17, cfg.channels, cfg.latent_dim), test)
    model, log = ae3d.train_ae3d(cfg, train, seed=0, log_path=tmp_path / "log.csv")
    after = _mean_error(model, test)
    assert log["supervised"].iloc[-1] < 0.7 * log["supervised"].iloc[0]
    assert after < 0.8 * before, (before, after)  # measured 0.99 → 0.73 after 4 epochs
    # label-free fine-tuning on the held-out intensities lowers their physics loss
    losses = ae3d.finetune(model, test.intensity, test.measured, epochs=3, lr=1e-3)
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path):
    train = bragg.simulate_crystals(CRYSTALS, 8, seed=0)
    full, _ = ae3d.train_ae3d(_cfg(n_train=8, epochs=2), train, seed=0)
    ckpt = tmp_path / "ae3d.pt"
    ae3d.train_ae3d(_cfg(n_train=8, epochs=2), train, seed=0, checkpoint_path=ckpt, log_path=tmp_path / "l.csv",
                    max_epochs=1)  # interrupted after one epoch
    resumed, log = ae3d.train_ae3d(_cfg(n_train=8, epochs=2), train, seed=0, checkpoint_path=ckpt,
                                   log_path=tmp_path / "l.csv")
    assert list(log["epoch"]) == [1, 2]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    loaded = ae3d.load_model(ckpt)
    x = ae3d.predict(loaded, train.intensity[:2], train.measured)
    np.testing.assert_allclose(x, ae3d.predict(resumed, train.intensity[:2], train.measured), atol=1e-6)
    assert x.shape == (2, 17, 17, 17) and x.dtype == np.complex64


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="halves"):
        ae3d.AE3D(15, 4, 8)
    with pytest.raises(ValueError, match="zero"):
        ae3d.network_input(np.zeros((17, 17, 17)), np.ones((17, 17, 17), bool))
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="x.pt"):
        ae3d.load_model(bad)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ae3d.load_model(tmp_path / "missing.pt")
