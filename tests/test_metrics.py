"""Tests of spiflow.metrics against analytic expectations."""
import numpy as np
import pandas as pd
import pytest
import torch

from spiflow.grid import Grid, density_to_structure_factor, structure_factor_to_density
from spiflow.align import rotate_volume
from spiflow.metrics import (fsc, gain_pearson, intensity_cc, orientation_errors,
                             resolution_at, shell_correlation)
from spiflow.rotation import angle_between, matrix_to_quaternion, quaternion_to_matrix, random_quaternions

GRID = Grid(31, 0.01)


def white(rng, grid=GRID):
    return rng.standard_normal((grid.n,) * 3)


def filtered(w, envelope):
    """Real volume whose DFT is ``envelope(|k|) * DFT(w)``, |k| in voxels⁻¹ units of dq."""
    n = w.shape[0]
    k = np.fft.fftfreq(n) * n
    kk = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return np.fft.ifftn(np.fft.fftn(w) * envelope(kk)).real


# ---------------------------------------------------------------- FSC

def test_fsc_columns_and_shells():
    t = fsc(white(np.random.default_rng(0)), white(np.random.default_rng(1)), GRID)
    assert list(t.columns[:3]) == ["q_inv_angstrom", "resolution_angstrom", "fsc"]
    assert len(t) == GRID.center + 1
    assert t["q_inv_angstrom"].iloc[-1] == pytest.approx(GRID.q_max)
    assert np.isinf(t["resolution_angstrom"].iloc[0])
    assert t["resolution_angstrom"].iloc[1] == pytest.approx(1 / GRID.dq)
    # corners of the cube are excluded
    assert t["n_voxels"].sum() < GRID.n ** 3
    t2 = fsc(white(np.random.default_rng(0)), white(np.random.default_rng(1)), GRID, shell_width=2)
    assert len(t2) == GRID.center // 2 + 1
    assert t2["q_inv_angstrom"].iloc[1] == pytest.approx(2 * GRID.dq)


def test_fsc_identical_scaled_and_flipped():
    v = white(np.random.default_rng(2))
    np.testing.assert_allclose(fsc(v, v, GRID)["fsc"], 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(v, 3.5 * v, GRID)["fsc"], 1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(v, -v, GRID)["fsc"], -1.0, atol=1e-12)
    np.testing.assert_allclose(fsc(torch.from_numpy(v), torch.from_numpy(v), GRID)["fsc"], 1.0, atol=1e-12)


def test_fsc_independent_volumes_near_zero():
    rng = np.random.default_rng(3)
    t = fsc(white(rng), white(rng), GRID).iloc[1:]
    z = t["fsc"] * np.sqrt(t["n_voxels"])  # FSC of independent noise has std 1/sqrt(N_shell)
    assert np.all(np.abs(z) < 4)
    assert abs(z.mean()) < 4 / np.sqrt(len(z))
    assert 0.6 < z.std() < 1.5


def test_fsc_signal_plus_white_noise():
    """s white with variance s², n white with variance σ²: FSC(s, s+n) = 1/sqrt(1 + σ²/s²)."""
    rng = np.random.default_rng(4)
    s, sigma = 1.0, 1.5
    sig = s * white(rng)
    t = fsc(sig, sig + sigma * white(rng), GRID).iloc[1:]
    expected = 1 / np.sqrt(1 + sigma ** 2 / s ** 2)
    # per-shell scatter is ~ 1/sqrt(N_shell) (measured std of sqrt(N) (FSC − expected) < 1.2)
    assert np.all(np.abs(t["fsc"] - expected) < 5 / np.sqrt(t["n_voxels"]))
    assert abs(np.average(t["fsc"] - expected, weights=t["n_voxels"])) < 0.03


def test_fsc_known_snr_per_shell_two_noisy_halves():
    """Two independent noisy copies of a coloured signal: FSC = SNR / (1 + SNR) per shell."""
    rng = np.random.default_rng(5)
    envelope = lambda k: 4.0 * np.exp(-(k / 8.0) ** 2)  # noqa: E731 (|k| in units of dq)
    sigma = 1.0
    sig = filtered(white(rng), envelope)
    t = fsc(sig + sigma * white(rng), sig + sigma * white(rng), GRID)
    # expected per shell: mean signal power over the shell's voxels vs white noise power
    kk = GRID.q_norm() / GRID.dq
    shell = np.rint(kk).astype(int)
    snr = np.array([np.mean(envelope(kk[shell == i]) ** 2) for i in range(len(t))]) / sigma ** 2
    expected = snr / (1 + snr)
    dev, nv = (t["fsc"].to_numpy() - expected)[1:], t["n_voxels"].to_numpy()[1:]
    assert np.all(np.abs(dev) < 5 / np.sqrt(nv))
    assert abs(np.average(dev, weights=nv)) < 0.03
    # resolution at FSC 0.5 ⇔ SNR = 1 ⇔ envelope(k) = sigma: k = 8 sqrt(ln 4)
    k_half = 8.0 * np.sqrt(np.log(4.0))
    assert resolution_at(t, 0.5) == pytest.approx(1 / (k_half * GRID.dq), rel=0.08)


def test_fsc_pure_subvoxel_shift_is_shellwise_cosine():
    """ρ2(r) = ρ1(r − t) ⇒ F2 = F1 exp(2πi q·t) ⇒ FSC = Σ|F1|² cos(2π q·t) / Σ|F1|²."""
    rng = np.random.default_rng(6)
    rho1 = white(rng)
    F1 = density_to_structure_factor(torch.from_numpy(rho1), GRID).numpy()
    t_vec = np.array([2.3, -1.1, 0.7]) * GRID.voxel_size  # Å, not a whole number of voxels
    phase = 2 * np.pi * GRID.q_points() @ t_vec
    rho2 = structure_factor_to_density(torch.from_numpy(F1 * np.exp(1j * phase)), GRID).numpy()
    assert np.abs(rho2.imag).max() < 1e-10  # the shifted copy is real (Friedel pairs kept)
    table = fsc(rho1, rho2.real, GRID)
    shell = np.rint(GRID.q_norm() / GRID.dq).astype(int)
    p = np.abs(F1) ** 2
    expected = [np.sum((p * np.cos(phase))[shell == i]) / np.sum(p[shell == i]) for i in range(len(table))]
    np.testing.assert_allclose(table["fsc"], expected, atol=1e-10)
    # and for a white signal the shell average of cos(2π q·t) is sinc(2 q |t|) (isotropy)
    tn = np.linalg.norm(t_vec)
    q = table["q_inv_angstrom"].to_numpy()
    big = (table["n_voxels"] >= 300).to_numpy()
    np.testing.assert_allclose(table["fsc"].to_numpy()[big], np.sinc(2 * q * tn)[big], atol=0.12)
    assert table["fsc"].iloc[-1] < 0.5  # the shift really decorrelates the high shells


def test_fsc_errors():
    v = white(np.random.default_rng(7))
    with pytest.raises(ValueError):
        fsc(v, v[:-1], GRID)
    with pytest.raises(ValueError):
        fsc(v, v, Grid(29, 0.01))
    bad = v.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        fsc(v, bad, GRID)
    with pytest.raises(ValueError):
        fsc(v.astype(complex), v, GRID)
    with pytest.raises(ValueError):
        fsc(v, v, GRID, shell_width=0)


def test_shell_correlation_on_structure_factors_matches_fsc():
    rng = np.random.default_rng(8)
    a, b = white(rng), white(rng)
    Fa = density_to_structure_factor(torch.from_numpy(a), GRID)
    Fb = density_to_structure_factor(torch.from_numpy(b), GRID)
    np.testing.assert_allclose(shell_correlation(Fa, Fb, GRID)["cc"], fsc(a, b, GRID)["fsc"], atol=1e-12)


# ---------------------------------------------------------------- resolution_at

def table(q, f):
    q = np.asarray(q, float)
    with np.errstate(divide="ignore"):
        return pd.DataFrame({"q_inv_angstrom": q, "resolution_angstrom": 1 / q, "fsc": f})


def test_resolution_at_interpolates_first_crossing():
    t = table([0, 0.1, 0.2, 0.3, 0.4], [1, 0.9, 0.6, 0.4, 0.1])
    assert resolution_at(t, 0.5) == pytest.approx(1 / 0.25)
    assert resolution_at(t, 0.143) == pytest.approx(1 / (0.3 + (0.4 - 0.143) / 0.3 * 0.1))
    dip = table([0, 0.1, 0.2, 0.3, 0.4], [1, 0.9, 0.4, 0.8, 0.1])  # first crossing counts
    assert resolution_at(dip, 0.5) == pytest.approx(1 / 0.18)
    shuffled = t.iloc[[3, 0, 4, 2, 1]]
    assert resolution_at(shuffled, 0.5) == pytest.approx(4.0)


def test_resolution_at_ignores_q0_and_nan_and_handles_no_crossing():
    t = table([0, 0.1, 0.2, 0.3], [-1.0, 0.9, np.nan, 0.8])
    assert resolution_at(t, 0.5) == pytest.approx(1 / 0.3)  # never below: finest shell, a bound
    first_below = table([0, 0.1, 0.2], [1.0, 0.3, 0.1])
    assert resolution_at(first_below, 0.5) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        resolution_at(pd.DataFrame({"q": [0.1], "fsc": [1.0]}), 0.5)
    with pytest.raises(ValueError):
        resolution_at(table([0.0], [1.0]), 0.5)


# ---------------------------------------------------------------- intensity_cc

def envelope_intensity(rng):
    q = GRID.q_norm()
    return (1 + (q / 0.03) ** 2) ** -2 * rng.exponential(size=q.shape)  # |F|² ~ q⁻⁴ times speckle


def test_intensity_cc_identical_scaled_independent():
    rng = np.random.default_rng(9)
    truth = envelope_intensity(rng)
    mask = GRID.q_norm() > 0.02
    assert intensity_cc(truth, truth, mask, GRID) == pytest.approx(1.0)
    assert intensity_cc(7.3 * truth, truth, mask, GRID) == pytest.approx(1.0)
    other = envelope_intensity(rng)
    cc = intensity_cc(other, truth, None, GRID)
    assert abs(cc) < 0.05
    # the voxel-wise Pearson of the same pair is dominated by the shared central peak
    assert np.corrcoef(other.ravel(), truth.ravel())[0, 1] > 0.2


def test_intensity_cc_mask_and_errors():
    rng = np.random.default_rng(10)
    truth = envelope_intensity(rng)
    recon = truth.copy()
    mask = np.ones(truth.shape, bool)
    mask[:, :, : GRID.center] = False
    recon[~mask] = rng.random(int((~mask).sum()))  # garbage where not measured
    assert intensity_cc(recon, truth, mask, GRID) == pytest.approx(1.0)
    assert intensity_cc(recon, truth, None, GRID) < 0.9
    with pytest.raises(ValueError):
        intensity_cc(truth[:-1], truth, None, GRID)
    with pytest.raises(ValueError):
        intensity_cc(truth, truth, np.zeros(truth.shape, bool), GRID)
    nan = truth.copy()
    nan[3, 3, 3] = np.nan
    with pytest.raises(ValueError):
        intensity_cc(nan, truth, None, GRID)


# ---------------------------------------------------------------- orientations

def rotation_about(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    h = np.deg2rad(deg) / 2
    return np.concatenate([[np.cos(h)], np.sin(h) * axis])


def small_rotations(rng, n, sigma_deg):
    """Quaternions of rotations by |N(0, σ)| degrees about random axes."""
    axes = rng.standard_normal((n, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    h = np.deg2rad(rng.normal(0, sigma_deg, n)) / 2
    return np.concatenate([np.cos(h)[:, None], np.sin(h)[:, None] * axes], axis=1)


def mats(q):
    return quaternion_to_matrix(torch.as_tensor(q, dtype=torch.float64))


def quats(m):
    return matrix_to_quaternion(m).numpy()


def test_orientation_errors_recovers_global_rotation_and_noise():
    rng = np.random.default_rng(11)
    n = 400
    q_true = random_quaternions(n, rng)
    A = mats(rotation_about([0.3, -1.0, 0.5], 73.0))
    noise = small_rotations(rng, n, 1.0)
    # R_est = R_true N A  ⇒  R_est Aᵀ = R_true N: error = angle(N), G = Aᵀ
    q_est = quats(mats(q_true) @ mats(noise) @ A)
    q_est[::3] *= -1  # q and −q are the same rotation
    err, G = orientation_errors(q_est, q_true)
    assert err.shape == (n,) and G.shape == (3, 3)
    g_err = angle_between(matrix_to_quaternion(torch.from_numpy(G)), matrix_to_quaternion(A.T))
    assert float(g_err) < 0.2
    noise_deg = angle_between(torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(err, noise_deg, atol=0.2)
    exact, G0 = orientation_errors(quats(mats(q_true) @ A), q_true)
    assert exact.max() < 1e-5
    np.testing.assert_allclose(G0, A.T.numpy(), atol=1e-8)


def test_orientation_errors_robust_to_outliers():
    rng = np.random.default_rng(12)
    n = 300
    q_true = random_quaternions(n, rng)
    A = mats(rotation_about([1.0, 0.2, -0.4], 140.0))
    q_est = quats(mats(q_true) @ mats(small_rotations(rng, n, 0.5)) @ A)
    bad = rng.random(n) < 0.3
    q_est[bad] = random_quaternions(int(bad.sum()), rng)
    err, G = orientation_errors(torch.from_numpy(q_est), torch.from_numpy(q_true))
    g_err = angle_between(matrix_to_quaternion(torch.from_numpy(G)), matrix_to_quaternion(A.T))
    assert float(g_err) < 0.3
    assert np.median(err[~bad]) < 1.0
    assert np.median(err[bad]) > 30.0


def test_orientation_errors_shape_checks():
    q = random_quaternions(5, np.random.default_rng(13))
    with pytest.raises(ValueError):
        orientation_errors(q, q[:4])
    with pytest.raises(ValueError):
        orientation_errors(q[:, :3], q[:, :3])
    with pytest.raises(ValueError):
        orientation_errors(np.zeros((0, 4)), np.zeros((0, 4)))
    nan = q.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError):
        orientation_errors(nan, q)


def test_align_intensity_undoes_model_frame():
    """Model W(q) = I(A q); orientation_errors gives G with I(q) = W(G q)."""
    rng = np.random.default_rng(14)

    def intensity(qp):
        q0, M = np.array([0.06, 0.02, -0.03]), np.diag([1 / 0.04 ** 2, 1 / 0.08 ** 2, 1 / 0.12 ** 2])
        U = mats(rotation_about([1, 2, 3], 35)).numpy()
        Mr = U @ M @ U.T
        bump = sum(np.exp(-np.sum((qp - s * q0) ** 2, -1) / 0.02 ** 2) for s in (1, -1))
        return np.exp(-np.einsum("...i,ij,...j->...", qp, Mr, qp)) + bump

    A = mats(rotation_about([-0.2, 0.9, 0.4], 70.0))
    qp = GRID.q_points()
    truth = intensity(qp)
    model = intensity(qp @ A.numpy().T)  # W(q) = I(A q)
    q_true = random_quaternions(50, rng)
    _, G = orientation_errors(quats(mats(q_true) @ A), q_true)  # R_est = R_true A
    mask = GRID.q_norm() < 0.1  # stay inside the cube after rotation
    # W(G q) = rotate_volume(W, Gᵀ), since rotate_volume(V, R)(q) = V(Rᵀ q)
    aligned = np.asarray(rotate_volume(model, G.T))
    assert intensity_cc(aligned, truth, mask, GRID) > 0.99
    assert intensity_cc(np.asarray(rotate_volume(model, G)), truth, mask, GRID) < 0.9


# ---------------------------------------------------------------- gains

def test_gain_pearson():
    rng = np.random.default_rng(15)
    g = rng.gamma(4.0, 0.25, 500)
    assert gain_pearson(g, g) == pytest.approx(1.0)
    assert gain_pearson(2 * g + 1, g) == pytest.approx(1.0)
    assert gain_pearson(-g, g) == pytest.approx(-1.0)
    assert abs(gain_pearson(rng.gamma(4.0, 0.25, 500), g)) < 4 / np.sqrt(500)
    assert np.isnan(gain_pearson(np.ones(500), g))
    with pytest.raises(ValueError):
        gain_pearson(g[:-1], g)
    with pytest.raises(ValueError):
        gain_pearson(np.array([np.nan, 1.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        gain_pearson(g[:1], g[:1])


def test_orientation_errors_modulo_the_particle_symmetry():
    """Frames of an Oh-symmetric particle, estimated as R_true g_i Aᵀ with a random proper
    g_i per frame (indistinguishable data) and a global A: zero error modulo the group,
    large without it; a 2° perturbation reads as 2°."""
    from spiflow.symmetry import point_group

    rng = np.random.default_rng(1)
    qt = random_quaternions(400, rng)
    r_true = quaternion_to_matrix(torch.as_tensor(qt))
    ops = point_group("Oh")
    proper = torch.as_tensor(ops[np.linalg.det(ops) > 0])
    A = quaternion_to_matrix(torch.as_tensor(random_quaternions(1, rng)))[0]
    r_est = r_true @ proper[rng.integers(0, 24, 400)] @ A.T
    qe = matrix_to_quaternion(r_est).numpy()
    assert np.median(orientation_errors(qe, qt)[0]) > 30
    err, G = orientation_errors(qe, qt, symmetry=ops)
    assert err.max() < 1e-6
    axis = rng.normal(size=(400, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    half = np.deg2rad(2.0) / 2
    tilt = torch.as_tensor(np.concatenate([np.full((400, 1), np.cos(half)), np.sin(half) * axis], 1))
    qe2 = matrix_to_quaternion(r_est @ quaternion_to_matrix(tilt)).numpy()
    err2 = orientation_errors(qe2, qt, symmetry=ops)[0]
    plain = orientation_errors(matrix_to_quaternion(r_true @ quaternion_to_matrix(tilt)).numpy(), qt)[0]
    assert abs(np.median(err2) - np.median(plain)) < 0.1 and err2.max() < 4
    np.testing.assert_array_equal(orientation_errors(qe2, qt, symmetry=point_group("C1"))[0],
                                  orientation_errors(qe2, qt)[0])  # C1: the plain fit
    with pytest.raises(ValueError, match="symmetry"):
        orientation_errors(qe, qt, symmetry=np.ones((2, 3, 3)))


def test_orientation_errors_modulo_the_friedel_mate():
    """Estimates M R_true Aᵀ for a random half of the frames (M: π about the beam axis, the
    mate one pattern cannot tell from R_true but by the Ewald curvature), R_true Aᵀ for the
    rest: zero error with friedel_mate, 180° for the mated half without it."""
    from spiflow.rotation import BEAM_FLIP

    rng = np.random.default_rng(2)
    qt = random_quaternions(300, rng)
    r_true = quaternion_to_matrix(torch.as_tensor(qt))
    A = quaternion_to_matrix(torch.as_tensor(random_quaternions(1, rng)))[0]
    mated = rng.random(300) < 0.5
    r_est = torch.where(torch.as_tensor(mated)[:, None, None], BEAM_FLIP @ r_true, r_true) @ A.T
    qe = matrix_to_quaternion(r_est).numpy()
    plain = orientation_errors(qe, qt)[0]
    assert np.all(plain[mated] > 179) and np.all(plain[~mated] < 1e-6)
    err, G = orientation_errors(qe, qt, friedel_mate=True)
    assert err.max() < 1e-6
    np.testing.assert_allclose(G, A.numpy(), atol=1e-9)  # R_true = R_est G
