"""Bragg-CDI objects (spiflow.bragg): the intensity of known objects, the phase field's units,
the seeded set and its stores, and the removal of the ambiguities of complex phasing."""
import math

import numpy as np
import pytest

from spiflow import bragg
from spiflow.grid import Grid
from spiflow.io import open_dataset
from spiflow.settings import CrystalsSettings


def test_intensity_of_a_box_is_the_dirichlet_kernel():
    n, w, a = 15, 5, 2.0
    grid = Grid(n, 1 / (n * a))
    box = np.zeros((n, n, n))
    c = n // 2
    box[c - 2:c + 3, c - 2:c + 3, c - 2:c + 3] = 1.0
    phase = 0.7  # a constant displacement only adds a global phase: same intensity
    F = bragg.far_field(box * np.exp(1j * phase), grid).numpy()
    k = np.arange(n) - c
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(k == 0, w, np.sin(np.pi * k * w / n) / np.sin(np.pi * k / n))
    expect = a ** 3 * d[:, None, None] * d[None, :, None] * d[None, None, :]
    np.testing.assert_allclose(F, expect * np.exp(1j * phase), atol=1e-9 * np.abs(expect).max())
    I = bragg.expected_intensity(box, grid, photons=1e6)
    assert I.sum() == pytest.approx(1e6)
    np.testing.assert_allclose(I, expect ** 2 * 1e6 / (expect ** 2).sum(), rtol=1e-9, atol=1e-9)


def test_phase_field_units_strain_and_dislocation():
    rng = np.random.default_rng(1)
    n, R = 33, 6.0
    rho, _ = bragg.crystal_shape(n, R, rng)
    g = bragg.bragg_vector([1, 1, 1], 4.078)
    assert np.linalg.norm(g) == pytest.approx(math.sqrt(3) / 4.078)  # 1/d_111, no 2π
    phi = bragg.displacement_phase(rho, g, R, max_displacement=0.5, dislocations=0, rng=rng)
    # φ = 2π g·u: the largest |u_g| over the particle is max_displacement Å
    assert np.abs(phi[rho > 0.5]).max() == pytest.approx(2 * math.pi * np.linalg.norm(g) * 0.5)
    # one screw dislocation with g·b = 1 winds φ by 2π on a loop around its line
    one = bragg.displacement_phase(rho, g, R, max_displacement=0.0, dislocations=1, rng=np.random.default_rng(3))
    grad = [np.angle(np.exp(1j * np.diff(one, axis=ax))) for ax in range(3)]
    winding = [np.abs(np.angle(np.exp(1j * np.diff(one, axis=ax))) - np.diff(one, axis=ax)).max() for ax in range(3)]
    assert max(winding) > 6.0  # the branch cut: a jump of 2π
    assert max(np.abs(gr).max() for gr in grad) < math.pi  # the wrapped field is smooth elsewhere


def test_shape_is_faceted_and_oversampled():
    rng = np.random.default_rng(0)
    for R in (4.0, 6.0):
        rho, trunc = bragg.crystal_shape(33, R, rng)
        assert 0.55 <= trunc <= 0.85 and rho.min() >= 0 and rho.max() == 1.0
        r = np.linalg.norm(np.argwhere(rho > 0) - 16, axis=1)
        assert r.max() <= bragg.CIRCUMRADIUS_FACTOR * R + 1.0
        assert (rho > 0.5).sum() > (4 / 3) * math.pi * (0.6 * R) ** 3  # at least the inscribed ball
    with pytest.raises(ValueError, match="oversampling"):
        bragg.crystal_shape(33, 7.0, rng)


def test_seeded_set_masks_and_stores(tmp_path):
    cfg = CrystalsSettings(n=17, size_range_voxels=[2.0, 2.5], beam_stop_radius_voxels=1.5, gap_width_voxels=1.0,
                           gap_offset_voxels=3, photons=1e5, dislocations=1)
    a = bragg.simulate_crystals(cfg, 3, seed=5)
    b = bragg.simulate_crystals(cfg, 1, seed=5, start=2)
    np.testing.assert_array_equal(a.intensity[2], b.intensity[0])  # independent of chunking
    np.testing.assert_array_equal(a.phase[2], b.phase[0])
    c = 8
    assert not a.measured[c, c, c] and not a.measured[c + 3, 0, 0] and a.measured[c + 1, c + 1, c + 1]
    assert (a.intensity[:, ~a.measured] == 0).all()
    assert np.all(a.intensity == np.rint(a.intensity)) and abs(a.intensity.sum() / 3 / 1e5 - 1) < 0.3
    bragg.write_crystal_set(a, tmp_path / "c.zarr", tmp_path / "t.zarr", 2, {"seed": 5})
    ds, truth = open_dataset(tmp_path / "c.zarr"), open_dataset(tmp_path / "t.zarr")
    assert "amplitude" not in ds and ds["intensity"].attrs["units"] == "photons"
    np.testing.assert_array_equal(ds["measured"].values, a.measured)
    np.testing.assert_array_equal(truth["phase"].values, a.phase)
    assert list(truth["parameter"].values) == list(bragg.PARAMETER_NAMES)


def _object(seed=0, n=17):
    cfg = CrystalsSettings(n=n, size_range_voxels=[2.5, 3.0], dislocations=1)
    amp, phi, _, _ = bragg.simulate_crystal(cfg, seed, 0)
    return amp.astype(np.float64) * np.exp(1j * phi.astype(np.float64)), bragg.crystal_grid(cfg)


@pytest.mark.parametrize("use_twin", [False, True])
def test_ambiguities_are_removed_exactly(use_twin):
    t, grid = _object()
    est = bragg.twin(t) if use_twin else t
    est = 2.5 * np.roll(est, (3, -2, 5), axis=(0, 1, 2)) * np.exp(1j * 1.9)
    np.testing.assert_allclose(np.abs(bragg.far_field(bragg.twin(t), grid).numpy()),
                               np.abs(bragg.far_field(t, grid).numpy()), rtol=1e-9, atol=1e-12)
    e = bragg.complex_errors(est, t, grid)
    assert e["twin"] is use_twin
    assert e["complex_error"] < 1e-9 and e["phase_rmse_rad"] < 1e-9 and e["fourier_error"] < 1e-9
    assert e["amplitude_fsc_mean"] == pytest.approx(1.0)
    aligned, info = bragg.align_complex(est, t)
    np.testing.assert_allclose(aligned, 2.5 * t, atol=1e-9)


def test_errors_of_an_unrelated_object_are_large():
    t, grid = _object(0)
    other, _ = _object(7)
    e = bragg.complex_errors(other, t, grid)
    assert e["complex_error"] > 0.5 and e["phase_rmse_rad"] > 0.3 and e["fourier_error"] > 0.2
    with pytest.raises(ValueError, match="same 3D shape"):
        bragg.align_complex(t[:-1], t)
