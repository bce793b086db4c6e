"""Synthetic particles and detectors shared by the reconstruction tests (test_emc, test_mtip,
test_euxfel): point sets that are clearly three-dimensional, their exact intensity, and a flat
detector on a strongly curved Ewald sphere."""
import numpy as np


def three_dimensional_points(rng, count=6, radius=18.0):
    """``count`` random points (Å) uniform in a ball of ``radius``, redrawn until clearly
    three-dimensional (smallest singular value of the centred set > half the largest): a
    nearly planar set is nearly mirror symmetric, and then a 180° rotation fits the data too."""
    while True:
        xyz = rng.uniform(-1, 1, (4 * count, 3))
        xyz = xyz[np.linalg.norm(xyz, axis=1) < 1][:count] * radius
        sv = np.linalg.svd(xyz - xyz.mean(0), compute_uv=False)
        if sv[-1] > 0.5 * sv[0]:
            return xyz


def point_intensity(atoms, q):
    """|Σ_j exp(2πi q·r_j)|² of unit point scatterers at q (..., 3) Å⁻¹ (Friedel symmetric by construction)."""
    return np.abs(np.exp(2j * np.pi * q @ atoms.T).sum(-1)) ** 2


def curved_detector(grid, npix=15, k=0.15):
    """Flat detector on the Ewald sphere |k_in| = k Å⁻¹ (strong curvature), corners at
    0.98 q_max of ``grid``; returns q (npix, npix, 3) Å⁻¹, pixel factor cos³2θ, valid (centre masked)."""
    two_theta = 2 * np.arcsin(0.98 * grid.q_max / (2 * k))
    ax = np.linspace(-1, 1, npix) * np.tan(two_theta) / np.sqrt(2)
    x, y = np.meshgrid(ax, ax, indexing="ij")
    d = np.stack([x, y, np.ones_like(x)], -1)
    r = np.linalg.norm(d, axis=-1)
    q = k * (d / r[..., None] - np.array([0.0, 0.0, 1.0]))
    valid = np.ones((npix, npix), bool)
    valid[npix // 2, npix // 2] = False
    return q, r ** -3.0, valid
