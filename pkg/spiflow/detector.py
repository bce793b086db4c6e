"""Flat square detector: per-pixel q on the curved Ewald sphere, solid angle, polarisation.

Geometry (docs/conventions.md): beam along +z through the detector centre, interaction point at
the origin, detector plane at z = distance. Pixel (iy, ix) has its centre at
``x = (ix − (n−1)/2) p``, ``y = (iy − (n−1)/2) p``. With ``|k| = 1/λ``:
``q = k_out − k_in = (x, y, D)/(r λ) − (0, 0, 1/λ)``, so ``|q| = 2 sin θ / λ`` and
``qz ≤ 0``. Photon energy to wavelength: ``λ[Å] = 12398.4198 / E[eV]`` (CODATA 2018
hc = 12398.4198 eV Å).

Solid angle of a small flat pixel: ``Ω = p² D / r³`` sr (area × cos of the incidence
angle / r²). Polarisation factor of a beam linearly polarised along x:
``P = 1 − (x/r)²``; along y: ``1 − (y/r)²``; unpolarised: ``(1 + cos² 2θ) / 2``
(Als-Nielsen & McMorrow, Elements of Modern X-ray Physics, 2nd ed., §1.2 and §4.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HC_EV_ANGSTROM = 12398.4198
CLASSICAL_ELECTRON_RADIUS_ANGSTROM = 2.8179403262e-5  # CODATA 2018, r_e = 2.8179403262e-15 m


def wavelength_angstrom(photon_energy_ev: float) -> float:
    """λ in Å of a photon of the given energy in eV. Raises ValueError if not > 0."""
    if not photon_energy_ev > 0:
        raise ValueError(f"beam.photon_energy_ev must be > 0, got {photon_energy_ev}")
    return HC_EV_ANGSTROM / photon_energy_ev


@dataclass(frozen=True)
class Detector:
    """A square detector of ``n_pixels`` × ``n_pixels``.

    pixel_size_m, distance_m, beam_stop_radius_m in metres; photon_energy_ev in eV;
    polarization one of ``"x"``, ``"y"``, ``"unpolarized"``; invalid_rectangles lists
    ``[y0, y1, x0, x1]`` half-open pixel ranges that did not measure (gaps, dead
    regions). Raises ValueError naming the config key for invalid values.
    """

    n_pixels: int
    pixel_size_m: float
    distance_m: float
    photon_energy_ev: float
    beam_stop_radius_m: float = 0.0
    polarization: str = "x"
    invalid_rectangles: list = field(default_factory=list)

    def __post_init__(self):
        if int(self.n_pixels) != self.n_pixels or self.n_pixels < 2:
            raise ValueError(f"detector.n_pixels must be an integer >= 2, got {self.n_pixels}")
        for key in ("pixel_size_m", "distance_m"):
            if not getattr(self, key) > 0:
                raise ValueError(f"detector.{key} must be > 0, got {getattr(self, key)}")
        wavelength_angstrom(self.photon_energy_ev)
        if self.beam_stop_radius_m < 0:
            raise ValueError(f"detector.beam_stop_radius_m must be >= 0, got {self.beam_stop_radius_m}")
        half = self.n_pixels * self.pixel_size_m / 2
        if self.beam_stop_radius_m >= half:
            raise ValueError(f"detector.beam_stop_radius_m = {self.beam_stop_radius_m} m covers the whole "
                             f"detector (half width {half:.4g} m)")
        if self.polarization not in ("x", "y", "unpolarized"):
            raise ValueError(f"detector.polarization must be 'x', 'y' or 'unpolarized', got {self.polarization!r}")
        for rect in self.invalid_rectangles:
            if len(rect) != 4 or not (0 <= rect[0] < rect[1] <= self.n_pixels and 0 <= rect[2] < rect[3] <= self.n_pixels):
                raise ValueError(f"detector.invalid_rectangles entry {rect} is not [y0, y1, x0, x1] "
                                 f"within 0..{self.n_pixels}")

    @property
    def wavelength(self) -> float:
        """λ in Å."""
        return wavelength_angstrom(self.photon_energy_ev)

    def positions(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel-centre x and y in metres, each (n, n) indexed [iy, ix]."""
        c = (np.arange(self.n_pixels) - (self.n_pixels - 1) / 2) * self.pixel_size_m
        y, x = np.meshgrid(c, c, indexing="ij")
        return x, y

    def q(self) -> np.ndarray:
        """Scattering vector of every pixel on the Ewald sphere, (n, n, 3) Å⁻¹ [qx, qy, qz]."""
        x, y = self.positions()
        r = np.sqrt(x ** 2 + y ** 2 + self.distance_m ** 2)
        k = 1.0 / self.wavelength
        return np.stack([k * x / r, k * y / r, k * (self.distance_m / r - 1.0)], axis=-1)

    def pixel_factor(self) -> np.ndarray:
        """Solid angle (sr) × polarisation factor of every pixel, (n, n)."""
        x, y = self.positions()
        r2 = x ** 2 + y ** 2 + self.distance_m ** 2
        r = np.sqrt(r2)
        omega = self.pixel_size_m ** 2 * self.distance_m / r ** 3
        if self.polarization == "x":
            pol = 1 - x ** 2 / r2
        elif self.polarization == "y":
            pol = 1 - y ** 2 / r2
        else:
            pol = 1 - (x ** 2 + y ** 2) / (2 * r2)
        return omega * pol

    def valid(self, dead_pixel_fraction: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
        """Boolean (n, n) mask: False under the beam stop, in invalid rectangles, dead pixels.

        dead_pixel_fraction: fraction of the remaining pixels marked dead at random (rng).
        """
        x, y = self.positions()
        ok = np.sqrt(x ** 2 + y ** 2) > self.beam_stop_radius_m
        for y0, y1, x0, x1 in self.invalid_rectangles:
            ok[y0:y1, x0:x1] = False
        if dead_pixel_fraction > 0:
            if not dead_pixel_fraction < 1:
                raise ValueError(f"detector.dead_pixel_fraction must be in [0, 1), got {dead_pixel_fraction}")
            rng = rng or np.random.default_rng(0)
            ok &= rng.random(ok.shape) >= dead_pixel_fraction
        if not ok.any():
            raise ValueError("detector: no valid pixel left (beam stop, invalid_rectangles and dead pixels cover it all)")
        return ok


def reconstruction_grid(q: np.ndarray, valid: np.ndarray, oversampling: float = 1.0):
    """The cubic grid that reconstructions and the truth share.

    Spacing ``dq`` = the q step between the two pixels nearest the beam (the detector's
    finest sampling) divided by ``oversampling``; size ``n = 2 ⌈q_max / dq⌉ + 3`` (odd) so
    every valid pixel, corners included, and its trilinear neighbours lie inside.
    q: (ny, nx, 3) Å⁻¹; valid (ny, nx). Returns a :class:`spiflow.grid.Grid`.
    Raises ValueError when the geometry gives no usable step (``dq`` not > 0, ``q_max`` not
    finite, or more than 10⁵ steps to ``q_max``: a corrupt or mislabelled geometry).
    """
    from .grid import Grid

    qn = np.linalg.norm(q, axis=-1)
    iy, ix = np.unravel_index(np.argmin(qn), qn.shape)
    jx = ix + 1 if ix + 1 < q.shape[1] else ix - 1
    dq = float(np.linalg.norm(q[iy, jx] - q[iy, ix])) / oversampling
    q_max = float(qn[valid].max())
    if not (dq > 0 and np.isfinite(q_max) and q_max / dq < 1e5):
        raise ValueError(f"the detector geometry gives a q step of {dq} Å⁻¹ between neighbouring "
                         f"pixels and q_max {q_max} Å⁻¹: no usable reconstruction grid")
    return Grid(2 * int(np.ceil(q_max / dq)) + 3, dq)
