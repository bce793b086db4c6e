"""Tests of spiflow.align: density registration, volume rotation, intensity rotation search."""

import numpy as np
import pytest
import torch

from spiflow import align
from spiflow.align import align_density, align_intensity_rotation, fourier_shift, pearson, rotate_volume
from spiflow.grid import Grid
from spiflow.rotation import angle_between, matrix_to_quaternion, quaternion_to_matrix, random_quaternions
from spiflow.sampling import so3_sampling

N = 33
GRID = Grid(N, 1.0 / (N * 2.0))  # 2 Å voxels


def blob_model(seed, nb=6):
    rng = np.random.default_rng(seed)
    return rng.uniform(-10, 10, (nb, 3)), rng.uniform(0.5, 1.5, nb), rng.uniform(2.5, 4.0, nb)


def density(pos, amp, width, grid=GRID):
    """Sum of normalised 3D Gaussians (e/Å³) on the real-space grid; pos (K, 3) Å."""
    r = grid.r_axis
    X = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1)
    return sum(a * np.exp(-((X - p) ** 2).sum(-1) / (2 * s * s)) / (2 * np.pi * s * s) ** 1.5
               for p, a, s in zip(pos, amp, width))


def intensity(pos, amp, width, grid=GRID):
    """Exact |F(q)|² of :func:`density` on the q grid, F = Σ a exp(−2π² s² q²) exp(+2πi q·p)."""
    q = grid.q_points()
    F = sum(a * np.exp(-2 * np.pi ** 2 * s * s * (q ** 2).sum(-1)) * np.exp(2j * np.pi * q @ p)
            for p, a, s in zip(pos, amp, width))
    return np.abs(F) ** 2


def random_rotation(seed):
    return quaternion_to_matrix(torch.as_tensor(random_quaternions(1, np.random.default_rng(seed))[0])).numpy()


def angle_deg(a, b):
    qa, qb = (matrix_to_quaternion(torch.as_tensor(m)) for m in (a, b))
    return float(angle_between(qa, qb))


def test_align_density_recovers_shift_and_inversion():
    ref = density(*blob_model(0))
    shift = np.array([3.4, -5.0, 1.7])
    moving = fourier_shift(torch.as_tensor(np.flip(ref).copy()), shift).numpy()  # inverted, shifted
    aligned, info = align_density(moving, ref)
    assert info["inverted"] is True
    # undoing: flip(moving)(i) = ref(i + shift) ⇒ the recovered shift is +shift
    assert np.allclose(info["shift_voxels"], shift, atol=0.15)
    assert info["cc"] > 0.999 and pearson(aligned, ref) > 0.999
    assert isinstance(aligned, np.ndarray) and aligned.shape == ref.shape

    aligned_t, info_t = align_density(torch.as_tensor(np.roll(ref, (2, -3, 4), (0, 1, 2))), torch.as_tensor(ref))
    assert isinstance(aligned_t, torch.Tensor)
    assert info_t["inverted"] is False and np.allclose(info_t["shift_voxels"], [-2, 3, -4], atol=1e-6)
    assert info_t["cc"] > 0.999999


def test_inversion_is_exact_point_reflection():
    pos, amp, width = blob_model(1)
    assert np.allclose(np.flip(density(pos, amp, width)), density(-pos, amp, width))


def test_align_density_errors():
    with pytest.raises(ValueError, match="shape"):
        align_density(np.zeros((5, 5, 5)), np.zeros((7, 7, 7)))
    with pytest.raises(ValueError, match="NaN"):
        align_density(np.full((5, 5, 5), np.nan), np.ones((5, 5, 5)))
    with pytest.raises(ValueError, match="constant"):
        align_density(np.ones((5, 5, 5)), np.random.default_rng(0).random((5, 5, 5)))


def test_rotate_volume_convention_and_round_trip():
    R = random_rotation(3)
    y = np.array([0.0, 10.0, 4.0])  # Å: one blob off centre
    vol = density(y[None], [1.0], [3.0])
    out = rotate_volume(vol, R)
    X = np.stack(np.meshgrid(*[GRID.r_axis] * 3, indexing="ij"), -1)
    centroid = (out[..., None] * X).sum((0, 1, 2)) / out.sum()
    assert np.allclose(centroid, R @ y, atol=0.2)  # out(x) = vol(Rᵀ x): the blob moves to R y

    ref = density(*blob_model(2))
    back = rotate_volume(rotate_volume(torch.as_tensor(ref), torch.as_tensor(R)), torch.as_tensor(R.T)).numpy()
    r = np.linalg.norm(X, axis=-1) / GRID.voxel_size
    inside = r < N // 2 - 2
    assert pearson(back[inside], ref[inside]) > 0.99
    assert np.allclose(rotate_volume(ref, np.eye(3)), ref, atol=1e-6)
    with pytest.raises(ValueError):
        rotate_volume(ref, np.eye(2))


@pytest.mark.slow
@pytest.mark.parametrize("transform", ["log", "q2"])
def test_align_intensity_rotation_recovers_rotation(transform):
    pos, amp, width = blob_model(4)
    A = random_rotation(5)
    ref = intensity(pos, amp, width)
    mov = intensity(pos @ A, amp, width)  # moving object at Aᵀ r_j  ⇒  I_m(q) = I_r(A q)
    A_found, cc = align_intensity_rotation(mov, ref, GRID, transform=transform)
    assert angle_deg(A_found, A) < 2.0
    assert cc > 0.8


@pytest.mark.slow
def test_density_rotation_consistent_with_intensity_rotation():
    """A found from intensities maps the moving density into the reference frame by rotate_volume(ρ_m, A)."""
    pos, amp, width = blob_model(6)
    A = random_rotation(7)
    rho_ref = density(pos, amp, width)
    rho_mov = density(pos @ A, amp, width)  # ρ_m(r) = ρ_r(A r)
    assert pearson(rotate_volume(rho_ref, A.T), rho_mov) > 0.99
    A_found, _ = align_intensity_rotation(intensity(pos @ A, amp, width), intensity(pos, amp, width), GRID)
    assert angle_deg(A_found, A) < 2.0
    assert pearson(rotate_volume(rho_mov, A_found), rho_ref) > 0.98
    assert pearson(rotate_volume(rho_mov, A_found.T), rho_ref) < 0.9  # the wrong way round fails


def test_global_rotations_are_the_600_cell_sampling():
    quats = align.global_rotations(4)
    assert quats.shape == (3240, 4) and quats.dtype == np.float64
    assert np.allclose(np.linalg.norm(quats, axis=1), 1)
    assert np.allclose(quats, so3_sampling(4)[0])


def test_align_intensity_rotation_errors():
    vol = np.ones((N, N, N))
    with pytest.raises(ValueError, match="match the grid"):
        align_intensity_rotation(np.ones((5, 5, 5)), np.ones((5, 5, 5)), GRID)
    with pytest.raises(ValueError, match="transform"):
        align_intensity_rotation(vol, vol, GRID, transform="sqrt")
    with pytest.raises(ValueError, match="voxels"):
        align_intensity_rotation(vol, vol, GRID, mask=np.zeros((N, N, N), bool))
    with pytest.raises(ValueError, match="num_div"):
        align.global_rotations(0)
