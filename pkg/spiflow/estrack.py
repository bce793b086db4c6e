"""Adaptive latent tracking of a changing crystal by bounded extremum seeking (ES).

A trained :class:`spiflow.ae3d.AE3D` maps an intensity to a latent vector z and decodes z
to a complex density. For a time series of intensities ``I_t`` of a slowly changing object
(:func:`spiflow.bragg.simulate_series`), Scheinker & Pokharel (npj Comput. Mater. 10, 2024,
doi 10.1038/s41524-024-01482-5) keep the decoder fixed and tune z frame by frame, without
labels and without retraining, against the label-free cost

    C_t(z) = physics loss of decode(z) against √I_t (:func:`spiflow.ae3d.physics_loss`:
    ``‖k |F| − √I‖² / ‖√I‖²`` over measured voxels, k the least-squares scale),

by bounded extremum seeking (Scheinker & Krstić, IEEE Trans. Autom. Control 58, 1107
(2013), "Minimum-seeking for CLFs: universal semiglobally stabilizing feedback under unknown
control directions"; Scheinker & Krstić, "Extremum seeking with bounded update rates",
Syst. Control Lett. 63, 25 (2014); book: Scheinker & Krstić, *Model-Free Stabilization by
Extremum Seeking*, Springer 2017):

    dz_i/dt = √(α ω_i) cos(ω_i t + k C(z(t)))      (one distinct ω_i per latent component)

which on average (for large ω) is the gradient descent dz/dt ≈ −(k α / 2) ∇C, with the rate
of every component bounded by √(α ω_i) whatever C does (hence "bounded"; C need not be
differentiable or even known in closed form: only its values are used). Discretised here with
the forward-Euler step ``dt`` (z_i ← z_i + dt √(α ω_i) cos(ω_i t + k C)), with
``ω_i = ω_max (0.55 + 0.45 i / (D − 1))`` (distinct, i = 0 … D − 1) and ``ω_max dt = 2π /
steps_per_period``. The ES time t runs on across frames, so the dither continues from one
frame to the next (tracking), and each frame starts from the previous frame's tuned z. The
dither amplitude in z is ``√(α / ω_i)``.

Measured (README "Direct ML phasing", n = 17): ES keeps C below the untuned encoder's on
every frame of a 20-frame series, but the error against the truth improves only where the
decoder can represent the object; a lower C in the latent space of a weak decoder is not a
better density.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from . import ae3d, bragg

DEFAULT_ALPHA = 1.0  # α: dither amplitude √(α/ω) ≈ 1.4 in z at ω ≈ 0.5 (trained latents: spread ~2 across crystals, ~6 within a vector)
DEFAULT_GAIN = 40.0  # k, on the cost divided by its value at the frame's start (measured: α 1, k 40 lowered C 0.228 → 0.163 in 300 steps; α 0.005, k 5 did not move it)


def es_frequencies(dim: int, omega_max: float) -> np.ndarray:
    """Distinct dithering frequencies (dim,) rad per unit ES time:
    ``ω_max (0.55 + 0.45 i / (dim − 1))``. Raises ValueError for dim < 1 or ω_max <= 0."""
    if dim < 1 or not omega_max > 0:
        raise ValueError(f"need dim >= 1 and omega_max > 0, got {dim}, {omega_max}")
    return omega_max * (0.55 + 0.45 * np.arange(dim) / max(dim - 1, 1))


@torch.no_grad()
def latent_cost(model: ae3d.AE3D, z: torch.Tensor, sqrt_intensity: torch.Tensor, measured: torch.Tensor):
    """Physics loss (B,) of the decoded densities of latents z (B, D) against √I (B, n, n, n)."""
    amp, phi = model.decode(z)
    return ae3d.physics_loss(torch.polar(amp, phi), sqrt_intensity, measured)


@torch.no_grad()
def extremum_seek(model: ae3d.AE3D, z0, intensity, measured, steps: int, alpha: float, gain: float,
                  omega_max: float = 2 * math.pi / 10, dt: float = 1.0, t0: float = 0.0):
    """Bounded ES (module docstring) on the latent of one frame: ``steps`` Euler steps from z0
    (D,) against ``intensity`` (n, n, n) photons with ``measured`` (n, n, n) bool. alpha (α),
    gain (k, applied to the cost divided by its value at z0, so k does not depend on the
    photon count), omega_max and dt as in the module docstring; t0 the ES time at the start.
    Returns ``(z (D,) tensor, costs (steps + 1,) ndarray: C before each step and at the end,
    t_end)``; the returned z is the final iterate, not the best visited one (ES has no
    access to anything but C's values, as on a running experiment)."""
    dev = next(model.parameters()).device
    z = torch.as_tensor(z0, dtype=torch.float32, device=dev).clone().reshape(1, -1)
    sqrt_I = torch.as_tensor(np.sqrt(np.clip(np.asarray(intensity, dtype=np.float32), 0, None)), device=dev)[None]
    m = torch.as_tensor(np.asarray(measured), dtype=torch.bool, device=dev)
    w = torch.as_tensor(es_frequencies(z.shape[1], omega_max), dtype=torch.float32, device=dev)
    amp = dt * torch.sqrt(alpha * w)
    costs = []
    c0 = float(latent_cost(model, z, sqrt_I, m)[0])
    scale = 1.0 / max(c0, 1e-12)
    t = t0
    for _ in range(steps):
        c = float(latent_cost(model, z, sqrt_I, m)[0])
        costs.append(c)
        z = z + amp * torch.cos(w * t + gain * c * scale)
        t += dt
    costs.append(float(latent_cost(model, z, sqrt_I, m)[0]))
    return z[0], np.array(costs), t


def track_series(model: ae3d.AE3D, series, steps: int, alpha: float, gain: float,
                 omega_max: float = 2 * math.pi / 10, iterative=None, progress: bool = False):
    """Track a time series (:class:`spiflow.bragg.CrystalSet` of frames, truth included) and
    compare, per frame, three phasings of the same intensity against the truth
    (:func:`spiflow.bragg.complex_errors`, ambiguities removed): ``encoder`` (the network
    applied to each frame alone, :func:`spiflow.ae3d.predict`), ``ES-tracked latent`` (z of
    frame 0 from the encoder, then :func:`extremum_seek` with ``steps`` per frame, each frame
    starting from the previous frame's z; no truth, no retraining) and, when ``iterative``
    (a :class:`spiflow.settings.PhasingSettings`) is given, ``iterative``
    (:func:`spiflow.phasing.phase_complex` from random phases, seed = frame). Returns a
    DataFrame: frame, method, seconds, physics_loss (the ES cost; NaN for iterative), then
    the error columns."""
    import pandas as pd

    from .phasing import phase_complex
    dev = next(model.parameters()).device
    rows = []
    x = ae3d.network_input(series.intensity, series.measured).to(dev)
    with torch.no_grad():
        z = model.encode(x[:1])[0]
    t_es = 0.0
    m = torch.as_tensor(np.asarray(series.measured), dtype=torch.bool, device=dev)
    for f in range(len(series.intensity)):
        I = series.intensity[f]
        truth = series.amplitude[f].astype(np.float64) * np.exp(1j * series.phase[f].astype(np.float64))
        sqrt_I = torch.as_tensor(np.sqrt(np.clip(I, 0, None)), dtype=torch.float32, device=dev)[None]

        def record(method, seconds, density, cost):
            rows.append({"frame": f, "method": method, "seconds": seconds, "physics_loss": cost,
                         **bragg.complex_errors(density, truth, series.grid, I, series.measured)})

        t0 = time.perf_counter()
        with torch.no_grad():
            z_enc = model.encode(x[f:f + 1])
            amp, phi = model.decode(z_enc)
        t_enc = time.perf_counter() - t0
        record("encoder", t_enc, torch.polar(amp, phi)[0].cpu().numpy(),
               float(ae3d.physics_loss(torch.polar(amp, phi), sqrt_I, m)[0]))
        t0 = time.perf_counter()
        z, costs, t_es = extremum_seek(model, z, I, series.measured, steps, alpha, gain, omega_max, t0=t_es)
        with torch.no_grad():
            amp, phi = model.decode(z[None])
        record("ES-tracked latent", time.perf_counter() - t0, torch.polar(amp, phi)[0].cpu().numpy(), costs[-1])
        if iterative is not None:
            t0 = time.perf_counter()
            it = phase_complex(I, iterative, measured=series.measured, seed=f)
            record("iterative", time.perf_counter() - t0, it.density, float("nan"))
        if progress:
            print(pd.DataFrame(rows[-3:])[["frame", "method", "seconds", "physics_loss", "complex_error"]]
                  .to_string(header=f == 0), flush=True)
    return pd.DataFrame(rows)
