"""Latent tracking by bounded extremum seeking (spiflow.estrack) and the time series of
spiflow.bragg.simulate_series."""
import numpy as np
import pytest
import torch

from spiflow import ae3d, bragg, estrack
from spiflow.settings import CrystalsSettings

CRYSTALS = CrystalsSettings(n=17, size_range_voxels=[2.2, 2.8], photons=1e6)


def test_series_is_one_crystal_whose_strain_ramps():
    s = bragg.simulate_series(CRYSTALS, 4, seed=3, displacement_range=(0.2, 0.8))
    assert s.intensity.shape == (4, 17, 17, 17)
    np.testing.assert_array_equal(s.amplitude[0], s.amplitude[-1])  # same shape every frame
    np.testing.assert_allclose(s.params[:, 2], [0.2, 0.4, 0.6, 0.8])
    inside = s.amplitude[0] > 0
    np.testing.assert_allclose(s.phase[-1][inside], 4.0 * s.phase[0][inside], rtol=1e-4, atol=1e-5)  # φ ∝ u_max
    assert not np.array_equal(s.intensity[0], s.intensity[1])
    with pytest.raises(ValueError, match="frames"):
        bragg.simulate_series(CRYSTALS, 0, seed=3)


def test_frequencies_are_distinct_and_bounded():
    w = estrack.es_frequencies(32, 1.0)
    assert len(np.unique(w)) == 32 and w.min() == pytest.approx(0.55) and w.max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        estrack.es_frequencies(0, 1.0)


@pytest.fixture
def one_thread():
    """Small decodes run fastest on one thread (and do not fight other jobs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_extremum_seeking_lowers_the_loss_from_the_initial_latent(one_thread):
    """A fixed decoder and an intensity it can produce exactly (from a latent z*): ES, using
    only the values of the Fourier-modulus loss, moves a perturbed latent to a lower loss."""
    torch.manual_seed(0)
    model = ae3d.AE3D(17, 4, 4).eval()
    g = torch.Generator().manual_seed(1)
    z_star = 3 * torch.randn(4, generator=g)
    with torch.no_grad():
        amp, phi = model.decode(z_star[None])
    intensity = bragg.expected_intensity(torch.polar(amp, phi)[0].numpy(), bragg.crystal_grid(CRYSTALS), 1e6)
    measured = np.ones((17,) * 3, bool)
    z0 = z_star + 3 * torch.randn(4, generator=g)
    z, costs, t_end = estrack.extremum_seek(model, z0, intensity, measured, steps=200, alpha=1.0, gain=40.0)
    assert len(costs) == 201 and t_end == pytest.approx(200.0)
    assert costs[-1] < 0.5 * costs[0], (costs[0], costs[-1])  # measured 0.0046 -> 0.0013
    # the update is bounded: no step moves a component by more than dt sqrt(alpha omega_i)
    z1, _, _ = estrack.extremum_seek(model, z0, intensity, measured, steps=1, alpha=1.0, gain=40.0)
    assert ((z1 - z0).abs() <= torch.sqrt(torch.as_tensor(estrack.es_frequencies(4, 2 * np.pi / 10))) + 1e-6).all()
