"""Support-only phasing of complex (Bragg-CDI) densities: spiflow.phasing.phase_complex."""
import numpy as np
import pytest
import torch

from spiflow import bragg
from spiflow.phasing import phase_complex, phasing_step, support_projection
from spiflow.settings import CrystalsSettings, PhasingSettings

SETTINGS = PhasingSettings(positivity=False, schedule="HIO:40,ER:10", n_cycles=4, final_er=30, n_restarts=2,
                           n_average=1, shrinkwrap_every=10, sigma_start=1.5, sigma_end=1.0, shrinkwrap_threshold=0.2)


def _case(**kw):
    cfg = CrystalsSettings(n=17, size_range_voxels=[2.6, 2.8], max_displacement_angstrom=0.8, **kw)
    amp, phi, _, _ = bragg.simulate_crystal(cfg, 2, 0)
    truth = amp.astype(np.float64) * np.exp(1j * phi.astype(np.float64))
    grid = bragg.crystal_grid(cfg)
    measured = bragg.missing_data_mask(17, cfg.beam_stop_radius_voxels, cfg.gap_width_voxels, cfg.gap_offset_voxels)
    return truth, grid, bragg.expected_intensity(truth, grid, 1e8), measured


def test_recovers_a_complex_object_from_noiseless_data():
    truth, grid, I, _ = _case()
    assert np.ptp(np.angle(truth[np.abs(truth) > 0.5])) > 1.0  # a real phase field to find
    r = phase_complex(I, SETTINGS, seed=1)
    e = bragg.complex_errors(r.density, truth, grid)
    assert r.errors.min() < 0.02 and e["fourier_error"] < 0.02
    assert e["complex_error"] < 0.12 and e["phase_rmse_rad"] < 0.1
    assert r.density.dtype == np.complex64 and r.support.shape == (17,) * 3


def test_missing_voxels_are_left_free():
    truth, grid, I, measured = _case(beam_stop_radius_voxels=1.5, gap_width_voxels=1.0)
    assert (~measured).sum() > 20
    r = phase_complex(np.where(measured, I, 0.0), SETTINGS.model_copy(update={"n_restarts": 4}), measured=measured,
                      seed=0)  # missing data: restarts stagnate more often (0.06 Fourier error)
    e = bragg.complex_errors(r.density, truth, grid)
    assert e["complex_error"] < 0.15
    # the missing voxels were not forced to the stored zeros: their modulus is the truth's
    F = np.abs(bragg.far_field(bragg.align_complex(r.density, truth)[0], grid).numpy())
    Ft = np.sqrt(I)
    k = (F[measured] * Ft[measured]).sum() / (F[measured] ** 2).sum()
    miss = ~measured
    assert np.linalg.norm(k * F[miss] - Ft[miss]) / np.linalg.norm(Ft[miss]) < 0.2


def test_start_from_the_truth_stays_there():
    truth, grid, I, _ = _case()
    cfg = PhasingSettings(positivity=False, schedule="ER:20", n_cycles=1, final_er=0, shrinkwrap_every=0,
                          n_restarts=1, n_average=1)
    r = phase_complex(I, cfg, start=3.0 * np.roll(truth, 2, axis=0), support=np.roll(np.abs(truth) > 0, 2, axis=0))
    assert r.errors[0] < 1e-4
    assert bragg.complex_errors(r.density, truth, grid)["complex_error"] < 1e-3


def test_bad_input():
    truth, grid, I, _ = _case()
    with pytest.raises(ValueError, match="positivity"):
        phase_complex(I, PhasingSettings(positivity=True))
    with pytest.raises(ValueError, match="cubic"):
        phase_complex(I[:-1], SETTINGS)
    with pytest.raises(ValueError, match="start"):
        phase_complex(I, SETTINGS, start=truth[:-1])
    y = torch.ones(3, 3, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="positivity"):
        support_projection(y, y.real > 0, positivity=True)
    with pytest.raises(ValueError, match="positivity"):
        phasing_step("HIO", y, y, y.real > 0, 0.9, positivity=True)
