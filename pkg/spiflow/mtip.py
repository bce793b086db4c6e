"""Multi-tiered iterative phasing (M-TIP): orientation matching, merging and phasing in one loop.

References: J. J. Donatelli, J. A. Sethian & P. H. Zwart, PNAS 114, 7222 (2017) (the
algorithm); spinifel, the LCLS/ExaFEL implementation (read in the niteya-shah/spinifel copy on
GitHub, ``spinifel/sequential`` and ``spinifel/mpi``): a first merge at random orientations,
then generations of (match every pattern to the nearest of the model's slices at reference
orientations, by a Euclidean distance computed as a matrix product on std-normalised
slices; merge at the matched orientations, there by conjugate gradient on the NUFFT
slicing operator; phase with ER/HIO and shrinkwrap, warm-started with the previous density
and support), each matching slicing the *phased* intensity ``|F[ρ]|²``. Here, on CPU or CUDA:

Model (as in :mod:`spiflow.emc`): pixel p of frame i expects ``φ_i s_p W(R_iᵀ q_p)``
photons, ``s_p`` the pixel factor, ``φ_i`` the frame's gain (mean 1), W the intensity on a
:class:`~spiflow.grid.Grid` (photons per unit pixel factor for a gain-1 frame), read by
trilinear slicing. Only valid pixels count. One iteration:

1. merge: ``W = F[Σ_i merge_i(K_i)] / F[Σ_i merge_i(φ_i s)]`` at the current orientations,
   ``merge_i`` the trilinear adjoint of slicing at ``R_iᵀ q_p``, F the Friedel
   symmetrisation (emc's compress with one-hot probabilities; no conjugate gradient);
   measured voxels: weight = F[Σ_i merge_i(φ_i s)] > 0.
2. phase: ``phasing_hio`` HIO (β = ``beta_hio``) then ``phasing_er`` ER iterations
   (Fienup, Appl. Opt. 21, 2758 (1982); support and positivity) against ``√W`` on the
   measured voxels (free elsewhere), shrinkwrap (Marchesini et al., PRB 68, 140101 (2003))
   every ``shrinkwrap_every`` HIO iterations: the projections of :mod:`spiflow.phasing`.
   ρ is carried over from the previous iteration (random at the first, seeded), but the
   support restarts every iteration from the thresholded autocorrelation of the current W:
   carrying the shrink-wrapped support over, as spinifel does, locked runs from random
   orientations into a wrong model on the test data (measured), since a support once too
   tight never grows back.
3. match: the model is the phased ``|F[ρ]|²`` (``use_phased_model``; an intensity consistent
   with a bounded, positive density everywhere, unmeasured voxels included) or the merged W.
   Every frame gets the sampled orientation (:func:`spiflow.sampling.so3_sampling`) of
   smallest distance (global matching), or, in the local iterations below, the rotation of
   smallest distance among ``R_i D_j`` around its current orientation ``R_i``; and the gain
   ``φ_i = N_i / Σ_p s_p W(R_iᵀ q_p)`` (N_i its photons), normalised to mean 1.

The global iterations stop after ``iterations`` or once at most ``converge_fraction`` of
the frames moved by more than half the sampling step (73.5° / num_div / 2). Global
matching cannot place a frame closer than the sampling allows (covering radius 53° /
num_div, 13° at num_div 4), so ``refine_iterations`` local iterations follow, as in EMC
(:mod:`spiflow.refine`): merge and phase as above, then match each frame only among the
rotations ``R_i D_j``, D_j the ball of ``refine_radius_steps`` steps of a step that
shrinks geometrically from ``53° / (num_div · refine_radius_steps)`` to
``refine_step_end_deg`` (:func:`spiflow.refine.refine_steps_deg`), by the distance below,
through the search EMC's local iterations use (:func:`spiflow.refine.local_search`).
Measured on the default data (2CEX, 3,000 patterns of 40², about 3,000 photons each;
num_div 4, 20 global iterations): median orientation error 9.4° after the global
iterations; after 6, 8, 10 and 14 local iterations (radius 2, 6.6° → 0.5°) 2.0°, 1.9°,
1.8° and 1.8°, at about 7 s per local iteration on 2 CPU cores (the default, 10: FSC 0.5
at 6.2 Å against 5.7 Å for the photons merged at the true orientations).

Distance (``distance``), over the *orientation pixels* O only: the valid pixels at ``|q| ≥
orientation_min_radius_voxels · dq``, as in :mod:`spiflow.emc` (the central speckle holds
most photons but little orientation; with it, the local iterations on the default data
settled at a 3.0° median error even from the true orientations, without it at 1.6°); all
valid pixels are merged and give the gains. ``"poisson"`` (default) is the negative
multinomial log-likelihood of the frame's photons among the pixels of O (sums over p ∈ O,
N_i its photons there), without the r-independent ``Σ_p K_ip log s_p``: ``D_ri = N_i log
Σ_p s_p W_rp − Σ_p K_ip log W_rp``. It is the Poisson
log-likelihood with the gain at its optimum for each orientation, so it is right for photon
counts (most pixels hold 0 or 1 photon, where a Euclidean distance weighs noise like
signal) and independent of the gain and of the model's scale. ``"euclidean"`` is
spinifel's kind, ``‖K_i / N_i − s W_r / Σ_p s_p W_rp‖²`` (patterns and slices normalised to
unit sum, so gains and scale drop out here too), suited to high counts. Both are one matrix
product per frame block and orientation chunk; frames × orientations × pixels is never
formed, and photons stream block by block as in :mod:`spiflow.emc`. The log's
``data_distance`` is, for "poisson", ``−Σ_i Σ_p K_ip log(s_p W_ip / Σ_p' s_p' W_ip') / Σ_i N_i``
(sums over O) in nats per photon at the matched orientations (the photons' cross entropy against the
slices), for "euclidean" the mean distance.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .distributed import FrameRange, Ranks, frame_ranges, photon_chunk, setup
from .emc import PhotonBlocks
from .grid import Grid, friedel_symmetrize
from .io import RunLog, data_digest, load_checkpoint, resolve_device, save_checkpoint, validate_detector_inputs
from .phasing import (autocorrelation_support, fourier_error, half_spectrum, modulus_projection, phasing_step,
                      shrinkwrap)
from .refine import local_search, orientation_pixel_order, refine_steps_deg
from .rotation import angle_between, canonical, quaternion_to_matrix, random_quaternions
from .sampling import angular_step_deg, local_rotations, so3_sampling
from .settings import MTIPSettings
from .slicing import merge_ratio, merge_rotated, slice_rotated

LOG_COLUMNS = ["iteration", "orientation_change", "data_distance", "phasing_error", "support_fraction",
               "gain_std", "seconds", "step_deg"]
_AXES = (-3, -2, -1)


@dataclass
class MTIPResult:
    """Output of :func:`run_mtip` (all numpy, on the grid of docs/conventions.md).

    intensity: (n, n, n) float32, W merged at the final orientations and gains, photons per
    unit pixel factor for a gain-1 frame (0 where unmeasured). weight: (n, n, n) float32,
    its Friedel-symmetrised merge denominator (measured where > 0). phased_intensity:
    (n, n, n) float32, ``|F[ρ]|²`` of the last phasing in the same units (the last
    matching's model when ``use_phased_model``). density: (n, n, n) float32, ρ on the
    centred real-space grid (voxel ``1 / (n dq)`` Å), e/Å³ times the model's unknown
    scale √(photons per unit pixel factor per electron²); support: (n, n, n) bool.
    quaternion: (frames, 4) float64 [w, x, y, z], w >= 0, frame i recording
    ``W(R_iᵀ q)``; gain: (frames,) float64, mean 1; distance: (frames,) float64, each
    frame's final distance (module docstring); log: one row per iteration
    (:data:`LOG_COLUMNS`); converged: whether the global iterations reached
    ``converge_fraction``.
    """

    intensity: np.ndarray
    weight: np.ndarray
    phased_intensity: np.ndarray
    density: np.ndarray
    support: np.ndarray
    quaternion: np.ndarray
    gain: np.ndarray
    distance: np.ndarray
    log: pd.DataFrame
    converged: bool


class _Problem:
    """The data (photon blocks), pixels, reference rotations and the three M-TIP steps."""

    def __init__(self, data: PhotonBlocks, qv, sv, n_orient: int, grid: Grid, settings: MTIPSettings, device, dtype,
                 comm: Ranks | None = None):
        self.data, self.grid, self.cfg, self.chunk = data, grid, settings, settings.orientation_chunk
        self.comm = comm or Ranks(device=device)  # across ranks: data are this rank's frames
        self.po = n_orient  # the first po valid pixels are the orientation pixels
        self.q = torch.as_tensor(qv).to(device, dtype)
        self.s = torch.as_tensor(sv).to(device, dtype)
        self.logs = torch.log(self.s)
        self.quats = torch.as_tensor(so3_sampling(settings.num_div)[0]).to(device, dtype)
        self.rot = quaternion_to_matrix(self.quats)
        self.device, self.dtype = device, dtype

    # -- 1. merge --------------------------------------------------------------------------------
    def merge(self, rot: torch.Tensor, gain: torch.Tensor):
        """W (n, n, n) and its Friedel-symmetrised weight at per-frame rotations (frames, 3, 3)
        (this rank's frames; the sums are all-reduced over the ranks)."""
        accum = torch.zeros((2,) + (self.grid.n,) * 3, dtype=self.dtype, device=self.device)
        for i0, i1, K in self.data:
            vals = torch.stack([K, gain[i0:i1, None] * self.s.expand_as(K)])
            merge_rotated(accum, self.q, rot[i0:i1], self.grid, vals)
        self.comm.sum_(accum)
        return merge_ratio(accum[0], accum[1]), friedel_symmetrize(accum[1])

    # -- 2. phase --------------------------------------------------------------------------------
    def phase(self, W, measured, rho, generator: torch.Generator):
        """One phasing cycle on W (n, n, n) with measured (n, n, n) bool, starting from ρ
        (un-centred, or None: uniform random from ``generator``). Returns (ρ, support
        (un-centred), error, ``|F[ρ]|²`` (n, n, n) centred, in W's units).

        The steps are those of :mod:`spiflow.phasing`. Un-centred layout: ``rfftn(ρ)(k) =
        F(−k) / v`` (v the voxel volume), so the target modulus is ``√W / v`` on measured
        voxels and their Friedel mates (free elsewhere). The support starts as the
        thresholded autocorrelation of W (:func:`~spiflow.phasing.autocorrelation_support`)
        and is shrink-wrapped (:func:`~spiflow.phasing.shrinkwrap`, estimate ρ) every
        ``shrinkwrap_every`` HIO iterations (fixed during ER). The error ``‖|G| − A‖ / ‖A‖``
        (measured voxels) is that of the iterate entering the last ER iteration."""
        cfg, n, v = self.cfg, self.grid.n, self.grid.voxel_size ** 3
        M = measured | measured.flip(_AXES)
        A, Mh = half_spectrum(W.clamp_min(0).sqrt() / v), half_spectrum(M)
        support = autocorrelation_support(W.clamp_min(0), M, self.grid, cfg.autocorr_threshold, self.device)
        if rho is None:
            rho = torch.rand((n,) * 3, generator=generator, dtype=torch.float64).to(self.device, self.dtype)
        rho = rho * support
        for k in range(cfg.phasing_hio + cfg.phasing_er):
            y, mag = modulus_projection(rho, A, Mh)
            err = fourier_error(mag, A, Mh)
            rho = phasing_step("HIO" if k < cfg.phasing_hio else "ER", rho, y, support, cfg.beta_hio)
            if k < cfg.phasing_hio and cfg.shrinkwrap_every and (k + 1) % cfg.shrinkwrap_every == 0:
                support = shrinkwrap(rho, support, cfg.shrinkwrap_sigma, cfg.shrinkwrap_threshold)
        phased = torch.fft.fftshift(torch.fft.fftn(rho).abs() ** 2, dim=_AXES) * v ** 2
        return rho, support, float(err), phased

    # -- 3. match --------------------------------------------------------------------------------
    def _distance(self, S, K, floor):
        """Distances (module docstring) of slices S (C, P) to frames K (B, P): (C, B); or of
        per-frame slices S (B, J, P): (B, J); over the orientation pixels (the first ``po``
        columns; S may hold only those). Slice values are floored at ``floor`` in logs."""
        S, K = S[..., :self.po], K[:, :self.po]
        pair, N = S.dim() == 2, K.sum(1)
        sS = S * self.s[:self.po]
        sdot = sS.sum(-1)
        if self.cfg.distance == "poisson":  # N log Σ s W − Σ K log W  (Σ K log s added in the log only)
            logS = torch.log(S.clamp_min(floor))
            if pair:
                return N * sdot.log()[:, None] - logS @ K.T
            return N[:, None] * sdot.log() - torch.einsum("bjp,bp->bj", logS, K)
        b = sS / sdot.clamp_min(floor)[..., None]  # unit-sum slices and patterns
        a = K / N.clamp_min(1)[:, None]
        if pair:
            return (b * b).sum(1)[:, None] + (a * a).sum(1) - 2 * b @ a.T
        return (b * b).sum(-1) + (a * a).sum(1)[:, None] - 2 * torch.einsum("bjp,bp->bj", b, a)

    def match(self, W):
        """Match every frame to model W (n, n, n) among the reference orientations:
        quaternions (frames, 4), ``Σ_p s_p W(R_iᵀ q_p)`` (frames,) and distances (frames,) at
        them, all on the device."""
        floor = _floor(W)
        frames, M, C = self.data.frames, len(self.quats), self.chunk
        quat = torch.empty((frames, 4), dtype=self.dtype, device=self.device)
        sdot, dist = torch.empty_like(quat[:, 0]), torch.empty_like(quat[:, 0])
        for i0, i1, K in self.data:
            best = torch.full((i1 - i0,), float("inf"), dtype=self.dtype, device=self.device)
            arg = torch.zeros(i1 - i0, dtype=torch.long, device=self.device)
            for r0 in range(0, M, C):  # global search, one orientation chunk at a time
                S = slice_rotated(W, self.q[:self.po], self.rot[r0:r0 + C], self.grid)
                val, idx = self._distance(S, K, floor).min(0)
                better = val < best
                best, arg = torch.where(better, val, best), torch.where(better, idx + r0, arg)
            q_blk = self.quats[arg]
            S = slice_rotated(W, self.q, quaternion_to_matrix(q_blk), self.grid)
            quat[i0:i1] = canonical(q_blk)
            dist[i0:i1] = self._distance(S[:, None], K, floor)[:, 0]
            sdot[i0:i1] = S @ self.s
        return quat, sdot, dist

    def match_local(self, W, quat, step_deg: float):
        """Match every frame to model W among the rotations ``R_i D_j`` around its orientation
        ``R_i`` (quat (frames, 4)), D_j the ball of ``refine_radius_steps`` steps of
        ``step_deg`` (:func:`spiflow.sampling.local_rotations`), searched by
        :func:`spiflow.refine.local_search` with the distance as score. Returns as :meth:`match`."""
        floor = _floor(W)
        D = torch.as_tensor(local_rotations(step_deg, self.cfg.refine_radius_steps)).to(self.device, self.dtype)
        new, sdot, dist = torch.empty_like(quat), torch.empty_like(quat[:, 0]), torch.empty_like(quat[:, 0])

        def score(S, K, i0, i1):
            return -self._distance(S, K, floor)

        for i0, i1, _, cand, _, S, L in local_search(self.data, W, quat, D, self.q, self.grid, score,
                                                     self.cfg.memory_budget_gb):
            rows, best = torch.arange(i1 - i0, device=self.device), L.argmax(1)
            new[i0:i1] = canonical(cand[rows, best])
            dist[i0:i1] = -L[rows, best]
            sdot[i0:i1] = S[rows, best] @ self.s
        return new, sdot, dist


def _floor(W):
    """The floor of slice values in the distance's logarithms: 1e-6 of W's largest magnitude."""
    return 1e-6 * W.abs().max().clamp_min(torch.finfo(W.dtype).tiny)


def _fingerprint(settings: MTIPSettings, seed: int, grid: Grid, shape, n_valid: int, init, data: str) -> str:
    """All settings but the iteration count and the cost settings (orientation_chunk,
    memory_budget_gb, processes), the seed, grid, data
    shape, valid-pixel count, per-frame photon totals and initial orientations."""
    fp = settings.model_dump(exclude={"iterations", "orientation_chunk", "memory_budget_gb", "processes"})
    fp.update(seed=seed, grid_n=grid.n, grid_dq=grid.dq, data_shape=list(shape), n_valid=int(n_valid), data=data,
              init=None if init is None else hashlib.sha1(np.ascontiguousarray(init).tobytes()).hexdigest())
    return json.dumps(fp, sort_keys=True)


def _setup(photons, valid, q, pixel_factor, grid: Grid, settings: MTIPSettings, device,
           comm: Ranks | None = None):
    """Validated inputs → (_Problem, photons per frame N_i (frames,), and over the orientation
    pixels O: ``Σ_i Σ_{p∈O} K_ip log s_p`` and ``Σ_i Σ_{p∈O} K_ip``). With ``comm`` (ranks)
    the problem holds this rank's frames (range ``problem.frames``, every rank's count in
    ``problem.counts``) and the photon totals are those of all frames; a bad block on any
    rank raises on all."""
    comm = comm or Ranks(device=resolve_device(device))
    frames, valid, qv, sv = validate_detector_inputs(photons, valid, q, pixel_factor, grid)
    order, n_orient = orientation_pixel_order(qv, grid, settings.orientation_min_radius_voxels,
                                              "mtip.orientation_min_radius_voxels")
    qv, sv, pixels = qv[order], sv[order], np.flatnonzero(valid.reshape(-1))[order]
    device, dtype = comm.device, getattr(torch, settings.dtype)
    ranges = frame_ranges(frames, comm.world, photon_chunk(photons)) if comm.world > 1 else [(0, frames)]
    f0, f1 = ranges[comm.rank]
    mine = photons if comm.world == 1 else FrameRange(photons, f0, f1)
    item, P = torch.finfo(dtype).bits // 8, len(qv)
    budget = settings.memory_budget_gb * 1e9
    block = int(max(1, min(f1 - f0, budget // (item * (40 * P + settings.orientation_chunk)))))
    data = PhotonBlocks(mine, pixels, block, (f1 - f0) * P * item <= budget, device, dtype)
    problem = _Problem(data, qv, sv, n_orient, grid, settings, device, dtype, comm)
    problem.frames, problem.counts = (f0, f1), [b - a for a, b in ranges]
    n_local, klogs, n_orient_photons, error = np.zeros(f1 - f0), 0.0, 0.0, None
    try:
        for i0, i1, K in data:  # validates every block, fills the cache when enabled
            n_local[i0:i1] = K.sum(1).double().cpu().numpy()
            klogs += (K[:, :n_orient] @ problem.logs[:n_orient]).double().sum().item()
            n_orient_photons += K[:, :n_orient].double().sum().item()
    except ValueError as exc:
        error = exc
    comm.agree(error)
    klogs, n_orient_photons = comm.total(klogs, n_orient_photons)
    n_frame = n_local if comm.world == 1 else \
        comm.gather(torch.as_tensor(n_local, device=device), problem.counts).cpu().numpy()
    if n_frame.sum() <= 0:
        raise ValueError("photons: no photon in any valid pixel")
    return problem, n_frame, klogs, n_orient_photons


def _quaternions(quat, frames: int, name: str) -> np.ndarray:
    quat = np.asarray(quat, dtype=np.float64)
    if quat.shape != (frames, 4) or not np.isfinite(quat).all() or (np.linalg.norm(quat, axis=1) == 0).any():
        raise ValueError(f"{name} must be finite, non-zero quaternions of shape {(frames, 4)}, got {quat.shape}")
    return quat / np.linalg.norm(quat, axis=1, keepdims=True)


def match_orientations(model, photons, valid, q, pixel_factor, grid: Grid, settings: MTIPSettings | None = None,
                       *, device: str = "auto"):
    """Global orientation matching alone (step 3): the best sampled orientation of every frame
    against ``model``.

    model: (n, n, n) intensity on ``grid``; photons, valid, q, pixel_factor, device as in
    :func:`run_mtip`; of ``settings`` num_div, distance, orientation_chunk,
    memory_budget_gb and dtype are used. Returns numpy ``(quaternion (frames, 4) [w, x, y, z] w >= 0, gain (frames,)
    φ_i = N_i / Σ_p s_p W(R_iᵀ q_p) normalised to mean 1, distance (frames,))``.
    """
    settings = settings or MTIPSettings()
    problem, n_frame, *_ = _setup(photons, valid, q, pixel_factor, grid, settings, device)
    W = torch.as_tensor(np.asarray(model)).to(problem.device, problem.dtype)
    if W.shape != (grid.n,) * 3:
        raise ValueError(f"model has shape {tuple(W.shape)}, expected {(grid.n,) * 3}")
    quat, sdot, dist = problem.match(W)
    gain = n_frame / sdot.double().cpu().numpy()
    return quat.double().cpu().numpy(), gain / gain.mean(), dist.double().cpu().numpy()


def merge_frames(photons, valid, q, pixel_factor, grid: Grid, quaternion, gain=None,
                 settings: MTIPSettings | None = None, *, device: str = "auto"):
    """Merging alone (step 1): frames at known orientations into ``(W, weight)``, numpy (n, n, n).

    quaternion: (frames, 4) [w, x, y, z], frame i recording ``W(R_iᵀ q)``; gain: (frames,)
    (default 1). W in photons per unit pixel factor for a gain-1 frame, 0 where weight = 0.
    Of ``settings`` orientation_chunk, memory_budget_gb and dtype are used; device as in
    :func:`run_mtip`.
    """
    settings = settings or MTIPSettings()
    problem, n_frame, *_ = _setup(photons, valid, q, pixel_factor, grid, settings, device)
    quat = torch.as_tensor(_quaternions(quaternion, len(n_frame), "quaternion")).to(problem.device, problem.dtype)
    g = torch.as_tensor(np.ones(len(n_frame)) if gain is None else np.asarray(gain, dtype=np.float64))
    W, weight = problem.merge(quaternion_to_matrix(quat), g.to(problem.device, problem.dtype))
    return W.cpu().numpy(), weight.cpu().numpy()


def run_mtip(photons, valid, q, pixel_factor, grid: Grid, settings: MTIPSettings | None = None, init_quaternions=None,
             *, seed: int = 0, device: str = "auto", log_path: str | os.PathLike | None = None,
             checkpoint_path: str | os.PathLike | None = None, progress: bool = True) -> MTIPResult:
    """Reconstruct the 3D intensity, density and frame orientations by M-TIP (module docstring).

    photons: (frames, ny, nx) counts, any array-like sliced as ``photons[i0:i1]`` (numpy,
    Zarr), streamed block by block as in :func:`spiflow.emc.run_emc`. valid: (ny, nx)
    bool; q: (ny, nx, 3) Å⁻¹ (no 2π; valid pixels beyond ``grid.q_max`` are dropped with a
    warning); pixel_factor: (ny, nx) > 0 (solid angle × polarisation). grid: the model grid.
    settings: :class:`spiflow.settings.MTIPSettings` (default: its defaults, the
    workflow's). init_quaternions: optional (frames, 4) [w, x, y, z] starting orientations
    (e.g. learned ones: "synergy" seeding); default uniformly random, seeded by ``seed``,
    which also seeds the first phasing's random ρ. device: "auto", "cpu", "cuda", …
    (:func:`spiflow.io.resolve_device`). Gains start at ``N_i / mean N`` (1 without update_gain).
    log_path: CSV, one row per iteration (:data:`LOG_COLUMNS`), appended as it goes.
    The log's ``step_deg`` is the local search step of a local iteration (NaN for global ones).
    checkpoint_path: ``torch.save`` of ``{iteration, quaternion, gain, distance, rho,
    support, converged, local_done, fingerprint}`` written atomically after every
    iteration; an existing one with the same fingerprint (every setting except iterations,
    orientation_chunk and memory_budget_gb; seed; grid; data shape; valid-pixel count; the
    per-frame photon totals; init_quaternions) is resumed (loaded with
    ``weights_only=True``), the CSV cut back to it; a run whose global iterations ended
    (converged or at ``iterations``) continues with the local ones, and one with all
    ``refine_iterations`` done is returned as it is (one final merge). A different
    fingerprint restarts from scratch (UserWarning). The result's W is one final merge at
    the final orientations and gains.

    Across processes (``WORLD_SIZE`` > 1: torchrun, srun; :mod:`spiflow.distributed`) every
    rank calls run_mtip with the same arguments and reads only its contiguous frames (whole
    Zarr chunks); matching and local refinement run per rank, the merge sums and the
    per-frame means and sums of the log are all-reduced, and the phasing runs identically
    on every rank (the same merged W and generator). Rank 0 writes the log and checkpoints
    (per-frame arrays of all frames gathered: they resume with any process count); every
    rank returns the whole result, equal to one process's up to summation order (tested).
    Raises ValueError for bad shapes, an empty mask, pixel_factor <= 0, negative or
    non-finite counts, no photon at all, bad init_quaternions and a negative seed (invalid
    settings are refused by :class:`~spiflow.settings.MTIPSettings` itself).
    """
    settings = settings or MTIPSettings()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    comm = setup(resolve_device(device))
    try:
        return _run(comm, photons, valid, q, pixel_factor, grid, settings, init_quaternions, seed, log_path,
                    checkpoint_path, progress)
    finally:
        comm.close()


def _run(comm: Ranks, photons, valid, q, pixel_factor, grid, settings, init_quaternions, seed, log_path,
         checkpoint_path, progress) -> MTIPResult:
    """:func:`run_mtip` on this rank's frames (all of them in one process)."""
    problem, n_frame, klogs, n_orient_photons = _setup(photons, valid, q, pixel_factor, grid, settings, comm.device,
                                                       comm)
    (f0, f1), counts = problem.frames, problem.counts
    progress = progress and comm.is_root
    generator = torch.Generator().manual_seed(seed)
    frames, device, dtype = len(n_frame), problem.device, problem.dtype
    init = None if init_quaternions is None else _quaternions(init_quaternions, frames, "init_quaternions")
    fp = _fingerprint(settings, seed, grid, photons.shape, len(problem.q), init, data_digest(n_frame))
    steps = refine_steps_deg(settings)

    start, converged, done = 0, False, 0
    ckpt = comm.broadcast(load_checkpoint(checkpoint_path, fp) if comm.is_root else None)
    if ckpt is not None:
        start, converged, done = int(ckpt["iteration"]), bool(ckpt["converged"]), int(ckpt["local_done"])
        quat, gain, dist = (ckpt[k][f0:f1].to(device, dtype) for k in ("quaternion", "gain", "distance"))
        rho, support = ckpt["rho"].to(device, dtype), ckpt["support"].to(device)
    else:
        q0 = init if init is not None else random_quaternions(frames, np.random.default_rng(seed))
        quat = canonical(torch.as_tensor(q0[f0:f1])).to(device, dtype)
        g0 = n_frame / n_frame.mean() if settings.update_gain else np.ones(frames)
        gain, rho, support = torch.as_tensor(g0[f0:f1]).to(device, dtype), None, None
        dist = torch.full((f1 - f0,), float("nan"), dtype=dtype, device=device)
    rows = RunLog(log_path if comm.is_root else None, LOG_COLUMNS, ckpt)

    total = settings.iterations + len(steps)
    bar = tqdm(total=total, initial=min(start, total), disable=not progress, desc="M-TIP")
    it = start
    while True:
        if not (converged or done or it >= settings.iterations):
            step = None                           # global matching
        elif done < len(steps):
            step = float(steps[done])             # local matching (spiflow.refine) at this step
        else:
            break
        it, t0 = it + 1, time.perf_counter()
        W, weight = problem.merge(quaternion_to_matrix(quat), gain)                      # 1. merge
        rho, support, err, phased = problem.phase(W, weight > 0, rho, generator)           # 2. phase
        model = phased if settings.use_phased_model else W                                 # 3. match
        new, sdot, dist = problem.match(model) if step is None else problem.match_local(model, quat, step)
        # a frame "changed" when it moved by more than half the search step
        threshold = angular_step_deg(settings.num_div) / 2 if step is None else step / 2
        change = comm.mean((angle_between(quat, new) > threshold).double()).item()
        if settings.update_gain:
            gain = torch.as_tensor(n_frame[f0:f1]).to(device, dtype) / sdot.clamp_min(torch.finfo(dtype).tiny)
            gain = gain / comm.mean(gain)
        quat = new
        if step is None:
            converged = change <= settings.converge_fraction
        else:
            done += 1
        d = comm.mean(dist.double()).item() if settings.distance == "euclidean" else \
            (comm.total(dist.double().sum().item())[0] - klogs) / max(n_orient_photons, 1.0)
        row = {"iteration": it, "orientation_change": change, "data_distance": d, "phasing_error": err,
               "support_fraction": support.double().mean().item(),
               "gain_std": comm.std(gain), "seconds": time.perf_counter() - t0,
               "step_deg": np.nan if step is None else step}
        rows.append(row)
        if checkpoint_path is not None:
            state = {"iteration": it, **{k: comm.gather(v, counts).cpu() for k, v in
                                         (("quaternion", quat), ("gain", gain), ("distance", dist))},
                     "rho": rho.cpu(), "support": support.cpu(), "converged": converged, "local_done": done,
                     "fingerprint": fp, "log_rows": rows.state()}
            if comm.is_root:
                save_checkpoint(checkpoint_path, state)
        bar.update(1)
        bar.set_postfix(change=f"{change:.3f}", distance=f"{d:.4g}", phasing=f"{err:.3f}")
    bar.close()

    W, weight = problem.merge(quaternion_to_matrix(quat), gain)
    phased = torch.fft.fftshift(torch.fft.fftn(rho).abs() ** 2, dim=_AXES) * grid.voxel_size ** 6
    log = rows.frame()
    quat, gain, dist = (comm.gather(x, counts) for x in (quat, gain, dist))
    quat = canonical(quat.double() / quat.double().norm(dim=1, keepdim=True))
    f32 = lambda x: x.cpu().numpy().astype(np.float32)  # noqa: E731
    return MTIPResult(intensity=f32(W), weight=f32(weight), phased_intensity=f32(phased),
                      density=f32(torch.fft.fftshift(rho, dim=_AXES)),
                      support=torch.fft.fftshift(support, dim=_AXES).cpu().numpy(),
                      quaternion=quat.cpu().numpy(), gain=gain.double().cpu().numpy(),
                      distance=dist.double().cpu().numpy(), log=log, converged=converged)
