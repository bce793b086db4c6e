"""Self-supervised reconstruction (method ``selfsup``): an orientation encoder and an
intensity decoder trained together to reproduce the measured patterns.

After Z. Chen et al., "Augmenting x-ray single particle imaging reconstruction with
self-supervised machine learning", arXiv 2311.16652, and its code (github.com/zhantaochen/
neurorient; facts read from it: ResNet-18 encoder ending in the 6D rotation representation,
SIREN of 5 × 256 with ω₀ = 30 made Friedel symmetric as f(q) + f(−q), MSE on
``log(1 + photons)``, AdamW lr 3e-4 / wd 1e-4, cosine schedule with linear warm-up,
random zeroed patches on the input, a separate per-frame scale predictor). Differences:
the networks start from random weights (the reference starts from ImageNet ResNet-18);
the model is written in photons (below), so the same code offers a Poisson loss; the
decoder adds a fixed radial log-profile measured from the data (``radial_baseline``); the
pixels' q is scaled by the grid's q_max to [−1, 1] (the reference scales the largest pixel
q to π).

Model. Frame i, valid pixel p: ``μ_ip = g_i s_p exp(D(R_iᵀ q_p / q_max))`` photons, with
``s_p`` the pixel factor, ``R_i`` from the encoder (spiflow convention, docs/conventions.md: frame i
records ``I(R_iᵀ q)``), ``g_i`` the gain, ``D = b(|q|) + decoder`` the log-intensity: ``b``
the log radial profile ``Σ_i K_ip / (frames · s_p)`` in bins of width dq (or its mean when
``radial_baseline`` is off) and ``decoder`` a :class:`~spiflow.nets.FriedelSiren` or a
:class:`~spiflow.nets.VoxelVolume`. The encoder sees ``log(1 + K)`` on the valid pixels
(0 elsewhere); ``log g_i = log(N_i / N̄) + head_i`` (N_i the photons it sees, N̄ the data
set's mean per frame; ``head`` is a zero-initialised linear layer on the encoder features).
Loss over valid pixels only: ``mse`` ``(log(1 + μ) − log(1 + K))²`` (the reference's) or
``poisson`` ``μ − K log μ``. Augmentation (training only, encoder input only): ``patch_count``
zeroed rectangles, and the counts the encoder sees scaled by a log-normal fluence factor
``f`` (mean 1, coefficient of variation ``fluence_jitter``) whose effect the gain undoes
(``g = g_pred / f``), so the loss is always against the measured counts.

Pose-search warm start (``search_epochs`` > 0; issue 12: trained from random weights on
this loss alone the encoder never oriented the default data, 142° median error, see
benchmarks/selfsup_diagnosis.py). In epochs 1 … ``search_epochs`` the decoder is trained by
the pose-marginalised likelihood of each batch over the 600-cell sampling of
``search_num_div`` (:meth:`SelfSupModel.marginal_loss`: every frame against the slices of
the M sampled rotations, the gain at its maximum, inverse temperature annealed from
``search_beta_start`` to ``search_beta_end``; low q first: the pixels up to a |q| cut rising
from ``search_q_start`` of the largest to all of them). That is the objective of EMC (Loh &
Elser, PRE 80, 026705 (2009)) minimised by stochastic gradient descent as in cryoSPARC's
ab initio reconstruction (Punjani et al., Nature Methods 14, 290 (2017)); the cryoDRGN2 /
DRGN-AI schedule of searching poses in the first epochs and amortizing them later. Each
frame's best sampled rotation becomes its pose, and the encoder is trained to reproduce it
(chordal loss ``pose_weight ‖R − R_pose‖²_F``). Later epochs refine those poses locally
against the decoder's volume (``refine_iterations`` hard-assignment iterations of
:func:`spiflow.refine.local_search` on all valid pixels, Poisson score with the gain at its
maximum: :func:`poisson_pose_score`) and train the decoder by the photon loss at them and
the gain head and encoder as before. After training (``final_refine``) the result's poses
are those per-frame poses refined once more (with ``search_epochs`` 0: the encoder's poses
refined from the search scale down) and its gains the maximum-likelihood gains
``N_i / Σ_p s_p W(R_iᵀ q_p)`` at them; the encoder's own one-pass poses are returned as
``encoder_quaternion``.

The encoder's pose loss counts a pose and its Friedel mate ``M R`` (π about the beam axis) as
one (:func:`mate_chordal`): one pattern tells them apart only through the Ewald curvature, and
against either as a label the plain loss taught nothing (README, "Why selfsup did not
orient"). Amortization (``amortize_steps`` > 0, :func:`amortize`): after the epochs the
encoder is trained on patterns simulated from the learnt intensity at known random rotations,
as many as wanted, since the measured frames were too few to teach it.
No truth and no EMC result is read.

Output (:func:`run_selfsup`): ``intensity = exp(D)`` on the grid × mean(g) in photons per
unit pixel factor of a gain-1 frame (the scale of EMC's W), gains divided by their mean,
quaternions of the encoder's R_i on the unaugmented patterns (eval mode); with
``final_refine`` the refined poses, and g their maximum-likelihood gains. The learnt frame
is arbitrary up to one global rotation (and the intensity's symmetries); evaluation aligns it.

Data: photons are read as ``photons[i0:i1]`` in chunks of ``chunk_frames`` (a Zarr array
streams from disk) and kept in memory only when frames × valid pixels fits in
``memory_budget_gb``. Each epoch visits the frames in an order drawn from (seed, epoch):
groups of 4 chunks in random order, frames shuffled within a group.

Distributed (``selfsup.processes`` > 1, started by :func:`spiflow.launch.run_stage`, or any
``torchrun``: environment ``WORLD_SIZE`` > 1): the model is wrapped in
DistributedDataParallel (NCCL on CUDA, else gloo, one GPU per ``LOCAL_RANK``): each rank
takes ``batch_size / N`` frames per step and the step averages the N ranks' gradients, so a
step sees ``batch_size`` frames and an epoch has as many steps as in one process (measured on
the tiny case of tests/test_selfsup.py: doubling the frames per step, i.e. halving the steps,
loses the pose search: 150° instead of 5°). Rank r trains on the small batches r, r + N, …
(the last ``nb mod N`` of an epoch are skipped). The pose search's per-frame poses are merged
after every search epoch (each frame was scored by the one rank that drew its batch); the
local refinement, the gains and the final encoder pass split the frames into contiguous
chunk-aligned ranges (:func:`spiflow.distributed.frame_ranges`) and gather them, so every rank
ends with the same bits. Only rank 0 writes the log and checkpoint; every rank returns the
result.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import IterableDataset
from tqdm import tqdm

from .distributed import Ranks, frame_ranges
from .distributed import setup as setup_ranks
from .grid import Grid
from .io import (RunLog, data_digest, derived_seed, load_checkpoint, radial_log_profile, resolve_device,
                 save_checkpoint, validate_detector_inputs)
from .nets import FriedelSiren, ResNetEncoder, VoxelVolume, rotation_6d_to_matrix
from .refine import local_search, step_schedule
from .rotation import BEAM_FLIP, canonical, matrix_to_quaternion, quaternion_to_matrix
from .sampling import COVERING_RADIUS_DEG, local_rotations, so3_sampling
from .settings import SelfSupSettings
from .slicing import slice_rotated

LOG_COLUMNS = ["epoch", "loss", "lr", "patterns_per_second", "seconds", "pose_loss", "search_seconds"]
GROUP_CHUNKS = 4  # chunks shuffled together


@dataclass
class SelfSupResult:
    """Output of :func:`run_selfsup`.

    intensity: (n, n, n) float32, exp(log-intensity) on the grid in photons per unit pixel
    factor of a gain-1 frame. quaternion: (frames, 4) float64 ``[w, x, y, z]``, w >= 0, the
    encoder's R_i, refined per frame when ``final_refine`` (else equal to encoder_quaternion).
    encoder_quaternion: (frames, 4) the encoder's R_i alone (amortized: one forward pass; up to
    the Friedel mate, :func:`mate_chordal`). gain: (frames,) float64,
    mean 1. log: one row per epoch (:data:`LOG_COLUMNS`). amortize: ``amortize_loss`` and
    ``amortize_seconds`` of :func:`amortize` (empty when off).
    """

    intensity: np.ndarray
    quaternion: np.ndarray
    gain: np.ndarray
    log: pd.DataFrame
    encoder_quaternion: np.ndarray
    amortize: dict


@dataclass
class SearchBatch:
    """One batch of the pose-search phase (:meth:`SelfSupModel.marginal_loss`): q_unit (P', 3)
    the marching pixels' q / q_max; base_log_s (P',) the radial baseline b(|q|) + log s_p there;
    rotations (M, 3, 3) the global sampling; log_w (M,) log quadrature weights; K (B, P')
    counts; beta the inverse temperature."""

    q_unit: torch.Tensor
    base_log_s: torch.Tensor
    rotations: torch.Tensor
    log_w: torch.Tensor
    K: torch.Tensor
    beta: float


class FrameStream(IterableDataset):
    """Batches ``(index (B,) int64, counts (B, P) float32)`` of the valid pixels of
    ``photons[i]``, read chunk-wise as ``photons[i0:i1]`` (validated: finite, >= 0).

    Training order (:meth:`set_epoch`): a permutation drawn from ``(seed, epoch)`` that keeps
    groups of :data:`GROUP_CHUNKS` chunks together; ``max(1, frames // batch)`` batches, the
    last taking the remainder; with ``world`` ranks, rank r gets batches r, r + world, …
    (``batches // world`` each). :meth:`sequential` yields all frames in order.
    """

    def __init__(self, photons, valid: np.ndarray, chunk: int, batch: int, seed: int, cache: bool,
                 rank: int = 0, world: int = 1):
        self.photons, self.flat = photons, np.asarray(valid).reshape(-1)
        self.frames, self.chunk, self.batch, self.seed = photons.shape[0], chunk, batch, seed
        self.rank, self.world, self.cache = rank, world, cache
        self.batches = max(1, self.frames // batch)
        self._chunks: dict[int, np.ndarray] = {}
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        n_chunks = -(-self.frames // self.chunk)
        starts = rng.permutation(-(-n_chunks // GROUP_CHUNKS)) * GROUP_CHUNKS * self.chunk
        return np.concatenate([rng.permutation(np.arange(s, min(s + GROUP_CHUNKS * self.chunk, self.frames)))
                               for s in starts])

    def _read(self, c: int) -> np.ndarray:
        if c not in self._chunks:
            if not self.cache and len(self._chunks) >= 2 * GROUP_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))
            i0, i1 = c * self.chunk, min(self.frames, (c + 1) * self.chunk)
            k = np.asarray(self.photons[i0:i1]).reshape(i1 - i0, -1)[:, self.flat]
            if not np.isfinite(k).all() or (k < 0).any():
                raise ValueError(f"photons[{i0}:{i1}]: negative or non-finite counts in valid pixels")
            self._chunks[c] = k.astype(np.float32)
        return self._chunks[c]

    def take(self, idx: np.ndarray) -> torch.Tensor:
        """Counts (len(idx), P) of frames ``idx``."""
        out = np.empty((len(idx), int(self.flat.sum())), np.float32)
        for c in np.unique(idx // self.chunk):
            sel = idx // self.chunk == c
            out[sel] = self._read(int(c))[idx[sel] - c * self.chunk]
        return torch.from_numpy(out)

    def __iter__(self):
        order = self.order(self.epoch)
        for b in range(self.rank, self.batches // self.world * self.world, self.world):
            idx = order[b * self.batch:(b + 1) * self.batch if b < self.batches - 1 else None]
            yield torch.from_numpy(idx), self.take(idx)

    def sequential(self, batch: int, start: int = 0, stop: int | None = None):
        """Frames ``start … stop − 1`` (default all) in order, ``batch`` at a time."""
        stop = self.frames if stop is None else stop
        for i0 in range(start, stop, batch):
            idx = np.arange(i0, min(stop, i0 + batch))
            yield torch.from_numpy(idx), self.take(idx)


class SelfSupModel(nn.Module):
    """Encoder (pattern → R_i, log g_i) and log-intensity D(u) (see the module docstring).

    image_shape: detector (ny, nx); profile: (n_r,) the log radial baseline b at
    ``|u| · grid.center = 0, 1, …`` (u = q / q_max), read by linear interpolation.
    """

    def __init__(self, settings: SelfSupSettings, image_shape: tuple[int, int], grid: Grid, profile: torch.Tensor):
        super().__init__()
        c = settings
        self.trunk = ResNetEncoder(min(image_shape), c.encoder_width, c.encoder_stages, c.encoder_blocks,
                                   c.encoder_pool)
        self.rot_head = (nn.Sequential(nn.Linear(self.trunk.features, c.encoder_hidden), nn.ReLU(),
                                       nn.Linear(c.encoder_hidden, 6)) if c.encoder_hidden
                         else nn.Linear(self.trunk.features, 6))
        self.gain_head = nn.Linear(self.trunk.features, 1)
        nn.init.zeros_(self.gain_head.weight)
        nn.init.zeros_(self.gain_head.bias)
        self.decoder = (FriedelSiren(c.siren_width, c.siren_layers, c.siren_omega0) if c.decoder == "siren"
                        else VoxelVolume(grid.n))
        if c.decoder == "voxel" and c.voxel_init_noise > 0:  # a random start, as EMC's W0 (1 + 0.1 u)
            nn.init.uniform_(self.decoder.volume, 0.0, c.voxel_init_noise)
        self.register_buffer("profile", profile.float())
        self.center, self.fit_gain = grid.center, c.fit_gain

    def encode(self, image: torch.Tensor, log_n: torch.Tensor, amp: bool = False):
        """image (B, 1, ny, nx) encoder input, log_n (B,) ``log(N_i / N̄)`` of that input.
        Returns R (B, 3, 3) and log g (B,), float32."""
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            h = self.trunk(image)
            d6, g = self.rot_head(h), self.gain_head(h)
        log_g = log_n + g.float().squeeze(-1) if self.fit_gain else torch.zeros_like(log_n)
        return rotation_6d_to_matrix(d6.float()), log_g

    def baseline(self, u: torch.Tensor) -> torch.Tensor:
        """b(|u|): u (..., 3) = q / q_max → (...) the radial log baseline, linearly interpolated."""
        r = (u.norm(dim=-1) * self.center).clamp(max=len(self.profile) - 1)
        i0 = r.floor().long().clamp(max=len(self.profile) - 2)
        w = r - i0
        return (1 - w) * self.profile[i0] + w * self.profile[i0 + 1]

    def log_intensity(self, u: torch.Tensor) -> torch.Tensor:
        """D(u) = b(|u|) + decoder(u): u (..., 3) = q / q_max → (...) log photons per unit pixel factor."""
        return self.baseline(u) + self.decoder(u)

    def forward(self, image, log_n, q_unit, log_s, amp: bool = False, pose: torch.Tensor | None = None,
                search: "SearchBatch | None" = None):
        """log μ (B, P) for valid pixels at q_unit (P, 3) = q / q_max, pixel factors log_s (P,);
        also the encoder's R (B, 3, 3) and log g (B,). pose: (B, 3, 3) rotations to slice
        the decoder at instead of the encoder's. search: a :class:`SearchBatch`; then the
        pose-search phase: returns ``(marginal loss, best rotation index (B,), R, log g)``
        (:meth:`marginal_loss`; the decoder is trained by that loss only)."""
        R, log_g = self.encode(image, log_n, amp)
        if search is not None:
            loss, best = self.marginal_loss(search)
            return loss, best, R, log_g
        log_mu = self.log_intensity(torch.matmul(q_unit, R if pose is None else pose)) + log_g[:, None] + log_s[None, :]
        return log_mu, R, log_g

    def marginal_loss(self, b: "SearchBatch"):
        """Negative log marginal likelihood per pixel of a batch over the global sampling.

        With the decoder's slices ``log S_jp = D(R_jᵀ q_p) + log s_p`` at the M sampled
        rotations (shared by all frames) and the gain at its maximum, frame i scores
        ``L_ij = Σ_p K_ip log S_jp − N_i log Σ_p S_jp`` (:func:`poisson_pose_score`); the loss is
        ``−(1/β) mean_i log Σ_j w_j exp(β L_ij)`` divided by the pixels P' (w_j the sampling's
        quadrature weights, β the inverse temperature): EMC's objective (Loh & Elser 2009)
        as the pose-marginalised likelihood that cryoSPARC's ab initio reconstruction
        minimises by stochastic gradient descent (Punjani et al., Nature Methods 14, 290
        (2017)), so its gradient is the posterior-weighted one and no frame is forced to one
        rotation of a still-random model. Returns (loss, argmax_j L_ij (B,))."""
        u = torch.matmul(b.q_unit, b.rotations)  # (M, P', 3): R_jᵀ q_p rows
        log_S = self.decoder(u) + b.base_log_s[None, :]
        L = b.K @ log_S.T - b.K.sum(1, keepdim=True) * torch.logsumexp(log_S, 1)[None, :]
        marginal = torch.logsumexp(b.beta * L + b.log_w[None, :], 1) / b.beta
        return -marginal.mean() / b.K.shape[1], L.detach().argmax(1)
    @torch.no_grad()
    def render(self, grid: Grid) -> torch.Tensor:
        """The log-intensity D on the grid, (n, n, n) float32 on the model's device."""
        u = torch.as_tensor(grid.q_points().reshape(-1, 3) / grid.q_max, dtype=torch.float32,
                            device=self.profile.device)
        return torch.cat([self.log_intensity(c) for c in u.split(32768)]).reshape((grid.n,) * 3)


def pattern_loss(log_mu: torch.Tensor, counts: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean over the given (valid) pixels: ``poisson`` ``μ − K log μ`` or ``mse``
    ``(log(1 + μ) − log(1 + K))²`` (log(1 + μ) = softplus(log μ)). log_mu, counts (B, P)."""
    if kind == "poisson":
        return (torch.exp(log_mu) - counts * log_mu).mean()
    return (F.softplus(log_mu) - torch.log1p(counts)).square().mean()


def mate_chordal(R: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Chordal distance² of R (B, 3, 3) to the nearer of ``target`` and its Friedel mate
    ``M target`` (:data:`spiflow.rotation.BEAM_FLIP`): ``min(‖R − T‖²_F, ‖R − M T‖²_F)``, (B,).

    A frame at R records ``I(Rᵀ q)``; at ``M R`` it records ``I(Rᵀ M q)`` with
    ``M q = −q + 2 q_z ẑ``, which by Friedel's law ``I(−q) = I(q)`` is ``I(Rᵀ (q − 2 q_z ẑ))``:
    the same pattern but for the Ewald sphere's curvature (``q_z = −λ|q|²/2``, conventions).
    An encoder cannot tell the two apart from low-q speckles, and a plain chordal loss against
    targets that are either one pulls it to their mean, which keeps only the beam direction:
    measured on the default data (benchmarks/selfsup_diagnosis.py, mode simulated: 102,400
    patterns simulated from the true intensity, with the training augmentation), the plain
    loss left the encoder at chance (89° modulo the mate, 120° direct), this loss brought it
    to 48.9° modulo the mate (29.7° without the augmentation). Which of the two a frame is,
    the local refinement decides
    (:func:`refine_poses`: at the encoder's precision the likelihoods of the two do not
    separate them, measured on the tiny case of tests/test_selfsup.py: 45 % chosen wrongly)."""
    M = BEAM_FLIP.to(R)
    return torch.minimum((R - target).square().sum((1, 2)), (R - M @ target).square().sum((1, 2)))


class EncoderInputs:
    """Encoder inputs from valid-pixel counts: images, ``log(N_i/N̄)``, and augmentation."""

    def __init__(self, valid: np.ndarray, mean_photons: float, settings: SelfSupSettings, device):
        self.shape, self.device = valid.shape, device
        self.flat = torch.as_tensor(np.flatnonzero(valid)).to(device)
        self.log_mean = math.log(mean_photons)
        self.cfg = settings

    def __call__(self, K: torch.Tensor, gen: torch.Generator | None = None):
        """K (B, P) on device → (image (B, 1, ny, nx), log_n (B,), log f (B,)); augmented with ``gen``."""
        B, (ny, nx), c = K.shape[0], self.shape, self.cfg
        log_f = torch.zeros(B, device=self.device)
        visible = torch.ones_like(K, dtype=torch.bool)
        if gen is not None and c.fluence_jitter > 0:
            sigma = math.sqrt(math.log1p(c.fluence_jitter ** 2))
            log_f = (sigma * torch.randn(B, generator=gen) - sigma ** 2 / 2).to(self.device)
        if gen is not None and c.patch_count > 0:
            def spans(n):
                lo = max(1, round(c.patch_size_min * n))
                hi = max(lo, round(c.patch_size_max * n))
                start = torch.randint(0, n, (B, c.patch_count), generator=gen)[..., None].to(self.device)
                size = torch.randint(lo, hi + 1, (B, c.patch_count), generator=gen)[..., None].to(self.device)
                ax = torch.arange(n, device=self.device)
                return ((ax >= start) & (ax < start + size)).float()  # (B, patches, n)
            covered = torch.bmm(spans(ny).transpose(1, 2), spans(nx)) > 0  # (B, ny, nx)
            visible = ~covered.view(B, -1)[:, self.flat]
        x = K * torch.exp(log_f)[:, None] * visible
        image = torch.zeros((B, ny * nx), device=self.device)
        image[:, self.flat] = torch.log1p(x)
        frac = visible.float().mean(1).clamp_min(1e-6)
        log_n = torch.log((x.sum(1) / frac).clamp_min(1e-3)) - self.log_mean
        return image.view(B, 1, ny, nx), log_n, log_f


def poisson_pose_score(S: torch.Tensor, K: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Poisson log-likelihood of counts K (b, P) under slices S (..., P) (b leading, or
    (M, P) shared by all frames), with the frame's gain at its maximum: ``L = Σ_p K_p log S_p
    − N log Σ_p s_p S_p`` (N = Σ_p K_p; the gain-free likelihood, as EMC's scaling update
    φ = N / Σ s S in Loh & Elser, PRE 80, 026705 (2009), substituted back; constants
    dropped). s (P,) pixel factors. Returns (b, M) or (b, J) scores, higher better."""
    tiny = torch.finfo(S.dtype).tiny
    logS, norm = S.clamp_min(tiny).log(), (S @ s).clamp_min(tiny).log()
    N = K.sum(1)
    if S.dim() == 2:
        return K @ logS.T - N[:, None] * norm[None, :]
    return torch.einsum("bjp,bp->bj", logS, K) - N[:, None] * norm


def refine_poses(blocks, W: torch.Tensor, quaternion: torch.Tensor, q_valid: torch.Tensor, s_valid: torch.Tensor,
                 grid: Grid, steps_deg, radius_steps: int, memory_budget_gb: float = 2.0) -> torch.Tensor:
    """Local hard-assignment refinement of each frame's rotation against W: for every step
    of ``steps_deg`` the candidates ``R_i D_j`` (:func:`spiflow.sampling.local_rotations`,
    a ball of ``radius_steps`` steps) are scored by :func:`poisson_pose_score` through
    :func:`spiflow.refine.local_search` and the best becomes R_i. blocks: a callable
    returning a fresh iterable of ``(i0, i1, K (b, P))``; quaternion (frames, 4). Returns
    the refined (frames, 4) quaternions (w ≥ 0)."""
    for step in steps_deg:
        D = torch.as_tensor(local_rotations(float(step), radius_steps)).to(W.device, W.dtype)
        new = quaternion.clone()
        score = lambda S, k, i0, i1: poisson_pose_score(S, k, s_valid)  # noqa: E731
        for i0, i1, _, cand, _, _, L in local_search(blocks(), W, quaternion, D, q_valid, grid, score,
                                                     memory_budget_gb):
            new[i0:i1] = canonical(cand[torch.arange(i1 - i0, device=W.device), L.argmax(1)])
        quaternion = new / new.norm(dim=1, keepdim=True)
    return quaternion


class PoseSearch:
    """The pose-search phase and per-frame refinement of :func:`run_selfsup` (module doc).

    stream: the :class:`FrameStream`; qv (P, 3) Å⁻¹ and sv (P,) of the valid pixels;
    settings: the ``search_*`` and ``refine_*`` fields of :class:`SelfSupSettings`; ranks:
    the process group (:class:`spiflow.distributed.Ranks`; None: one process): refinement and
    gains run on this rank's frames (:func:`spiflow.distributed.frame_ranges`) and are gathered.
    """

    def __init__(self, stream: FrameStream, qv: np.ndarray, sv: np.ndarray, grid: Grid,
                 settings: SelfSupSettings, device, ranks: Ranks | None = None):
        self.stream, self.grid, self.cfg, self.device = stream, grid, settings, device
        self.ranks = ranks or Ranks(device=torch.device(device))
        spans = frame_ranges(stream.frames, self.ranks.world, stream.chunk)
        self.counts = [b - a for a, b in spans]
        self.span = spans[self.ranks.rank]
        self.q = torch.as_tensor(qv, dtype=torch.float32, device=device)
        self.s = torch.as_tensor(sv, dtype=torch.float32, device=device)
        self.q_norm = np.linalg.norm(qv, axis=1)
        quat, weight = so3_sampling(settings.search_num_div)
        self.quaternions = torch.as_tensor(quat, dtype=torch.float32, device=device)
        self.rotations = quaternion_to_matrix(self.quaternions)
        self.log_w = torch.as_tensor(np.log(weight), dtype=torch.float32, device=device)

    def blocks(self):
        """``(i0, i1, K)`` blocks of this rank's frames (all frames in one process)."""
        for idx, K in self.stream.sequential(self.stream.chunk, *self.span):
            yield int(idx[0]), int(idx[-1]) + 1, K.to(self.device)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The per-frame x (frames, …), valid on this rank's frames, with every rank's frames."""
        a, b = self.span
        return self.ranks.gather(x[a:b].contiguous(), self.counts)

    def merge_poses(self, poses: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """After a search epoch: every rank's new poses (frames, 4) where its ``scored``
        (frames,) bool marks the frames of its batches; the other frames keep theirs."""
        if self.ranks.world == 1:
            return poses
        mask = scored.to(poses.dtype)[:, None]
        both = self.ranks.sum_(torch.cat([poses * mask, mask], 1).to(torch.float64))
        n = both[:, 4:]
        return torch.where(n > 0, both[:, :4] / n.clamp_min(1), poses.double()).to(poses.dtype)

    def pixels(self, epoch: int) -> torch.Tensor:
        """Frequency marching: indices of the valid pixels with ``|q| <= q_cut`` in search
        epoch ``epoch`` (1-based), q_cut rising linearly from ``search_q_start`` of the largest
        pixel |q| in the first search epoch to all of it in the last."""
        c = self.cfg
        t = min(1.0, (epoch - 1) / max(1, c.search_epochs - 1))
        cut = self.q_norm.max() * (c.search_q_start + (1 - c.search_q_start) * t)
        return torch.as_tensor(np.flatnonzero(self.q_norm <= cut + 1e-12), device=self.device)

    def beta(self, epoch: int) -> float:
        """Inverse temperature of search epoch ``epoch``: geometric from ``search_beta_start``
        to ``search_beta_end`` over the search epochs (deterministic annealing, as EMC's)."""
        c = self.cfg
        t = min(1.0, (epoch - 1) / max(1, c.search_epochs - 1))
        return float(c.search_beta_start * (c.search_beta_end / c.search_beta_start) ** t)

    def batch_maker(self, model: "SelfSupModel", q_unit: torch.Tensor, log_s: torch.Tensor, epoch: int):
        """A function K (B, P) → :class:`SearchBatch` for search epoch ``epoch``."""
        px = self.pixels(epoch)
        qu = q_unit[px]
        with torch.no_grad():
            base = model.baseline(qu) + log_s[px]
        beta = self.beta(epoch)
        return lambda K: SearchBatch(qu, base, self.rotations, self.log_w, K[:, px], beta)

    def global_steps(self) -> np.ndarray:
        """Local steps after the global search: from the sampling's covering radius spread
        over the ball (:data:`spiflow.sampling.COVERING_RADIUS_DEG` / num_div / radius) to
        ``refine_step_end_deg``, ``refine_iterations`` of them."""
        c = self.cfg
        start = COVERING_RADIUS_DEG / c.search_num_div / c.refine_radius_steps
        return step_schedule(start, min(start, c.refine_step_end_deg), c.refine_iterations)

    @torch.no_grad()
    def gains(self, W: torch.Tensor, quat: torch.Tensor) -> torch.Tensor:
        """Each frame's maximum-likelihood gain at its pose, ``φ_i = N_i / Σ_p s_p W(R_iᵀ q_p)``
        (EMC's scaling update, Loh & Elser 2009), (frames,) float64, not normalised."""
        out = torch.zeros(len(quat), dtype=torch.float64)
        for i0, i1, K in self.blocks():
            S = slice_rotated(W, self.q, quaternion_to_matrix(quat[i0:i1].to(self.device, torch.float32)), self.grid)
            out[i0:i1] = (K.sum(1) / (S @ self.s).clamp_min(1e-30)).double().cpu()
        return self.gather(out.to(self.ranks.device)).cpu()

    def refine(self, W: torch.Tensor, quat: torch.Tensor, steps) -> torch.Tensor:
        """Local refinement on all valid pixels from ``quat`` (frames, 4) against W (n, n, n)."""
        new = refine_poses(self.blocks, W, quat.to(self.device, torch.float32), self.q, self.s, self.grid,
                           steps, self.cfg.refine_radius_steps, self.cfg.memory_budget_gb)
        return self.gather(new)


def amortize(model: SelfSupModel, W: torch.Tensor, gains: torch.Tensor, search: PoseSearch, inputs: EncoderInputs,
             settings: SelfSupSettings, seed: int, bar=None) -> dict:
    """Simulation-based amortization of the poses: the encoder learns from patterns of the
    learnt intensity whose rotations are known.

    ``amortize_steps`` steps; each draws ``amortize_batch / ranks`` rotations R uniform on
    SO(3) (normalised Gaussian quaternions), gains φ from ``gains`` (frames,) (the frames'
    maximum-likelihood gains against W, so the counts have the data's scale and spread) and
    counts ``K ~ Poisson(φ s_p W(Rᵀ q_p))`` on the valid pixels (W (n, n, n) the decoder's
    intensity, the model of the module docstring), and trains the trunk and the two heads
    (the decoder is not touched) on ``mate_chordal(R_enc, R) + (log g_enc − log φ)²``, with
    the training augmentation (:class:`EncoderInputs`) only if ``amortize_augment`` (measured
    on the default data it cost more than it gave: 48.9° against 29.7° modulo the mate).
    AdamW at ``amortize_lr``, 10 % linear warm-up, then cosine to 1 %. This is neural
    posterior estimation from simulations (Cranmer, Brehmer & Louppe, PNAS 117, 30055
    (2020)) with the learnt model as simulator:
    the 3,000 measured frames of the default data were too few to teach the encoder (README,
    "Why selfsup did not orient"), simulated ones are unlimited. Nothing but the learnt
    intensity and gains is read. Ranks draw different patterns (seed, rank) and average their
    gradients. Returns ``{"amortize_loss": mean loss of the last 10 % of steps,
    "amortize_seconds": …}``."""
    c, ranks, device = settings, search.ranks, W.device
    t0 = time.perf_counter()
    params = [p for n, p in model.named_parameters() if not n.startswith("decoder.")]
    opt = torch.optim.AdamW(params, lr=c.amortize_lr, weight_decay=c.weight_decay)
    warm = max(1, c.amortize_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warm, c.amortize_steps, 0.01))
    gen = torch.Generator().manual_seed(derived_seed(seed, 0x5A4D, ranks.rank))
    batch = max(1, c.amortize_batch // ranks.world)
    g = gains.to(torch.float32).cpu()
    tail = []
    model.train()
    for step in range(c.amortize_steps):
        quat = torch.randn(batch, 4, generator=gen, dtype=torch.float64)
        R = quaternion_to_matrix(quat / quat.norm(dim=1, keepdim=True)).to(device, torch.float32)
        phi = g[torch.randint(len(g), (batch,), generator=gen)].to(device)
        with torch.no_grad():
            mu = slice_rotated(W, search.q, R.to(W.dtype), search.grid).float() * search.s[None] * phi[:, None]
            K = torch.poisson(mu.clamp_min(0).cpu(), generator=gen).to(device)
        image, log_n, log_f = inputs(K, gen if c.amortize_augment else None)
        R_enc, log_g = model.encode(image, log_n)
        loss = mate_chordal(R_enc, R).mean() + ((log_g - log_f) - phi.log()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if ranks.world > 1:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= ranks.world
        opt.step()
        sched.step()
        if step >= c.amortize_steps - max(1, c.amortize_steps // 10):
            tail.append(loss.item())
        if bar is not None:
            bar.update(1)
    model.eval()
    return {"amortize_loss": float(np.mean(tail)) if tail else float("nan"),
            "amortize_seconds": time.perf_counter() - t0}


def _lr_factor(step: int, warm: int, total: int, floor: float) -> float:
    """Linear warm-up over ``warm`` steps, then cosine from 1 to ``floor`` at ``total``."""
    if step < warm:
        return (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _fingerprint(settings: SelfSupSettings, seed: int, grid: Grid, shape, n_valid: int, world: int, data: str) -> str:
    fp = {**settings.model_dump(exclude={"epochs", "amp", "memory_budget_gb", "processes"}), "seed": seed}
    fp.update(grid_n=grid.n, grid_dq=grid.dq, data_shape=list(shape), n_valid=int(n_valid), world=world,
              data=data)
    return json.dumps(fp, sort_keys=True)


def run_selfsup(photons, valid, q, pixel_factor, grid: Grid, settings: SelfSupSettings | None = None, *,
                seed: int = 0, device: str = "auto", log_path: str | os.PathLike | None = None,
                checkpoint_path: str | os.PathLike | None = None, progress: bool = True,
                epoch_callback=None) -> SelfSupResult:
    """Train the encoder and decoder on the patterns and return intensity, orientations, gains.

    photons: (frames, ny, nx) counts, any array-like sliced as ``photons[i0:i1]`` (numpy,
    Zarr). valid: (ny, nx) bool; q: (ny, nx, 3) Å⁻¹ (valid pixels beyond ``grid.q_max``
    are dropped with a warning); pixel_factor: (ny, nx) > 0. grid: the output grid (also
    the voxel decoder's and the q scale). settings: :class:`spiflow.settings.SelfSupSettings`
    (None: its defaults). seed: network initialisation, data order and augmentation.
    device: "auto" (CUDA when available), "cpu", "cuda", …
    log_path: CSV, one row per epoch (:data:`LOG_COLUMNS`), appended per epoch: ``loss`` the
    marginal loss per pixel in search epochs, else the photon loss; ``pose_loss`` the mean
    chordal distance² of the encoder to the poses (0 without poses; 6 is chance);
    ``search_seconds`` the local refinement's share of ``seconds``.
    checkpoint_path: written atomically after every epoch with ``{epoch, model, optimizer,
    scheduler, rng, fingerprint}`` and read with ``torch.load(weights_only=True)``; an
    existing one with the same fingerprint (every setting but epochs, amp, memory_budget_gb;
    seed; grid; data shape; valid pixels; ranks) is resumed (the CSV cut back to
    its epoch), and gives the same result as an uninterrupted run; another fingerprint
    restarts (UserWarning). progress: tqdm bar (rank 0). epoch_callback: called as
    ``epoch_callback(epoch, model, poses)`` after every epoch (diagnostics, e.g.
    benchmarks/selfsup_diagnosis.py; poses the pose-search quaternions or None).
    Raises ValueError for mismatched shapes, an empty mask, pixel_factor <= 0, negative or
    non-finite counts in valid pixels, no photon at all, patch_size_min > patch_size_max and
    min_lr > lr.
    """
    settings = settings or SelfSupSettings()
    if settings.patch_size_min > settings.patch_size_max:
        raise ValueError(f"selfsup.patch_size_min ({settings.patch_size_min}) exceeds selfsup.patch_size_max "
                         f"({settings.patch_size_max})")
    if settings.min_lr > settings.lr:
        raise ValueError(f"selfsup.min_lr ({settings.min_lr}) exceeds selfsup.lr ({settings.lr})")
    frames, valid, qv, sv = validate_detector_inputs(photons, valid, q, pixel_factor, grid)
    ranks = setup_ranks(resolve_device(device))  # torchrun's environment (spiflow.distributed)
    rank, world, device, own_group = ranks.rank, ranks.world, ranks.device, ranks.owned
    amp = settings.amp and device.type == "cuda" and torch.cuda.is_bf16_supported()
    cache = frames * len(qv) * 4 <= settings.memory_budget_gb * 1e9
    if settings.batch_size % world:
        raise ValueError(f"selfsup.batch_size ({settings.batch_size}) is not a multiple of the {world} ranks "
                         f"(selfsup.processes): each step takes batch_size / ranks frames on every rank")
    stream = FrameStream(photons, valid, settings.chunk_frames, settings.batch_size // world, seed, cache, rank,
                         world)
    if stream.batches < world:
        raise ValueError(f"{frames} frames give {stream.batches} batches of {settings.batch_size // world} per "
                         f"rank, fewer than the {world} ranks")
    sum_counts, n_frame = np.zeros(len(qv)), np.zeros(frames)
    for idx, K in stream.sequential(settings.chunk_frames):  # validates all counts
        sum_counts += K.double().sum(0).numpy()
        n_frame[idx.numpy()] = K.double().sum(1).numpy()
    if n_frame.sum() <= 0:
        raise ValueError("photons: no photon in any valid pixel")

    profile = torch.as_tensor(radial_log_profile(sum_counts, qv, sv, frames, grid, settings.radial_baseline))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SelfSupModel(settings, valid.shape, grid, profile).to(device)
    net = (nn.parallel.DistributedDataParallel(model, find_unused_parameters=not settings.fit_gain) if world > 1
           else model)
    inputs = EncoderInputs(valid, n_frame.mean(), settings, device)
    q_unit = torch.as_tensor(qv / grid.q_max, dtype=torch.float32, device=device)
    log_s = torch.as_tensor(np.log(sv), dtype=torch.float32, device=device)
    steps = stream.batches // world
    dec, dec_lr = list(model.decoder.parameters()), settings.decoder_lr or settings.lr
    rest = [p for p in model.parameters() if all(p is not d for d in dec)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": dec, "lr": dec_lr}],
                            lr=settings.lr, weight_decay=settings.weight_decay)
    dec_warm = 0 if settings.search_epochs > 0 else settings.warmup_epochs  # the search needs every step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [
        lambda s: _lr_factor(s, settings.warmup_epochs * steps, settings.epochs * steps, settings.min_lr / settings.lr),
        lambda s: _lr_factor(s, dec_warm * steps, settings.epochs * steps, min(1.0, settings.min_lr / dec_lr))])

    fp = _fingerprint(settings, seed, grid, photons.shape, len(qv), world, data_digest(n_frame))
    search = PoseSearch(stream, qv, sv, grid, settings, device, ranks)
    poses = None  # (frames, 4) quaternions of the pose-search phase, else None
    start, ckpt = 0, load_checkpoint(checkpoint_path, fp)
    if ckpt is not None:
        start = int(ckpt["epoch"])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        poses = ckpt.get("poses")
        poses = None if poses is None else poses.to(device)
    rows = RunLog(log_path if rank == 0 else None, LOG_COLUMNS, ckpt, key="epoch")

    def save(epoch: int, **extra) -> None:  # rank 0 writes; extra: "amortized" after the amortization
        if rank == 0 and checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                              "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                                              "fingerprint": fp, "log_rows": rows.state(),
                                              **({} if poses is None else {"poses": poses.cpu()}), **extra})

    bar = tqdm(total=settings.epochs * steps, initial=min(start, settings.epochs) * steps,
               disable=not progress or rank != 0, desc="selfsup")
    late_steps = step_schedule(2 * settings.refine_step_end_deg, settings.refine_step_end_deg,
                               settings.refine_iterations)
    for epoch in range(start + 1, settings.epochs + 1):
        t0 = time.perf_counter()
        stream.set_epoch(epoch)
        searching = epoch <= settings.search_epochs
        if searching and poses is None:
            poses = search.quaternions[:1].repeat(frames, 1)
        if not searching and poses is not None and settings.refine_iterations > 0:  # local refinement
            steps_deg = search.global_steps() if epoch == settings.search_epochs + 1 else late_steps
            poses = search.refine(torch.exp(model.render(grid)), poses, steps_deg)
        t_search = time.perf_counter() - t0
        gen = torch.Generator().manual_seed(derived_seed(seed, epoch, rank))
        maker = search.batch_maker(model, q_unit, log_s, epoch) if searching else None
        scored = torch.zeros(frames, dtype=torch.bool, device=device) if searching else None
        acc, lr = train_epoch(net, stream, inputs, opt, sched, q_unit, log_s, settings.loss, gen, amp, bar,
                               poses, settings.pose_weight, maker, search.quaternions, scored)
        if searching:
            poses = search.merge_poses(poses, scored)
        if world > 1:
            dist.all_reduce(acc)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": (acc[0] / acc[1]).item(), "lr": lr,
               "patterns_per_second": acc[1].item() / seconds, "seconds": seconds,
               "pose_loss": (acc[2] / acc[1]).item(), "search_seconds": t_search}
        rows.append(row)
        save(epoch)
        bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4g}")
        if epoch_callback is not None:
            epoch_callback(epoch, model, poses)
    bar.close()

    W = torch.exp(model.render(grid))
    final = None
    if settings.final_refine:  # semi-amortized: per-frame poses refined against the decoder
        if poses is not None:  # the poses of the search, refined in every later epoch
            final = search.refine(W, poses, late_steps)
        else:  # the encoder's, refined from the global search's scale down
            encoded = infer(model, stream, inputs, grid, settings.batch_size, device, amp, search)
            final = search.refine(W, torch.as_tensor(encoded["quaternion"]), search.global_steps())
    amortized = {}
    if settings.amortize_steps > 0:
        if ckpt is not None and "amortized" in ckpt:  # resumed after the amortization
            amortized = dict(ckpt["amortized"])
        else:
            phi = search.gains(W, final if final is not None else poses if poses is not None else
                               torch.as_tensor(infer(model, stream, inputs, grid, settings.batch_size, device, amp,
                                                     search)["quaternion"]))
            bar = tqdm(total=settings.amortize_steps, disable=not progress or rank != 0, desc="amortize")
            amortized = amortize(model, W, phi, search, inputs, settings, seed, bar)
            bar.close()
            save(settings.epochs, amortized=amortized)
    if world > 1:  # BatchNorm statistics differ between ranks: use rank 0's
        for b in model.buffers():
            dist.broadcast(b, 0)
    result = infer(model, stream, inputs, grid, settings.batch_size, device, amp, search)
    result["encoder_quaternion"] = result["quaternion"]
    if final is not None:
        gain = search.gains(W, final).numpy()
        result.update(quaternion=final.double().cpu().numpy(), gain=gain / gain.mean(),
                      intensity=(W.double().cpu().numpy() * gain.mean()).astype(np.float32))
    log = rows.frame()
    if own_group:
        dist.destroy_process_group()
    return SelfSupResult(log=log, amortize=amortized, **result)


def train_epoch(net, stream, inputs, opt, sched, q_unit, log_s, loss_kind: str, gen, amp: bool, bar,
                poses: torch.Tensor | None = None, pose_weight: float = 1.0, search=None,
                sampling: torch.Tensor | None = None, scored: torch.Tensor | None = None):
    """One pass over this rank's batches; returns (Σ loss × frames, frames, Σ pose loss ×
    frames) and the last step's lr.

    poses (frames, 4): the decoder is sliced at them and the encoder's R is pulled towards
    them by ``pose_weight`` × the chordal distance to the pose or its Friedel mate
    (:func:`mate_chordal`; the amortization of the pose search); None: at the encoder's R (the method of Chen et al.). search: a
    function K → :class:`SearchBatch` (the pose-search phase): the loss is the marginal
    likelihood (:meth:`SelfSupModel.marginal_loss`) and each frame's best rotation of the
    ``sampling`` (M, 4) becomes its pose (written into ``poses``) and the encoder's target;
    ``scored`` (frames,) bool, if given, is set True at those frames.
    """
    net.train()
    acc = torch.zeros(3, dtype=torch.float64, device=q_unit.device)
    for idx, K in stream:
        K = K.to(q_unit.device)
        image, log_n, log_f = inputs(K, gen)
        if search is not None:
            loss, best, R, log_g = net(image, log_n, q_unit, log_s, amp, search=search(K))
            poses[idx.to(poses.device)] = sampling[best]
            if scored is not None:
                scored[idx.to(scored.device)] = True
            loss = loss + 0.0 * log_g.sum()  # every parameter takes part (DistributedDataParallel)
        target = None if poses is None else quaternion_to_matrix(poses[idx.to(poses.device)]).to(q_unit)
        if search is None:
            log_mu, R, _ = net(image, log_n, q_unit, log_s, amp, target)
            loss = pattern_loss(log_mu - log_f[:, None], K, loss_kind)  # gain of the measured frame: g / f
        pose_loss = (torch.zeros((), device=q_unit.device) if target is None
                     else mate_chordal(R, target).mean())
        opt.zero_grad(set_to_none=True)
        (loss + pose_weight * pose_loss).backward()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        acc[0] += loss.detach().double() * len(K)
        acc[1] += len(K)
        acc[2] += pose_loss.detach().double() * len(K)
        bar.update(1)
    return acc, lr


@torch.no_grad()
def infer(model: SelfSupModel, stream: FrameStream, inputs: EncoderInputs, grid: Grid, batch: int, device,
          amp: bool, search: PoseSearch | None = None) -> dict:
    """Encoder outputs on all unaugmented frames (eval mode) and the log-intensity on the
    grid; with ``search`` each rank encodes its own frames and they are gathered."""
    model.eval()
    out = torch.zeros((stream.frames, 5), dtype=torch.float64, device=device)
    span = search.span if search is not None else (0, stream.frames)
    for idx, K in stream.sequential(max(batch, 256), *span):
        image, log_n, _ = inputs(K.to(device))
        R, lg = model.encode(image, log_n, amp)
        out[idx.to(device), :4] = matrix_to_quaternion(R.double())
        out[idx.to(device), 4] = lg.double()
    if search is not None:
        out = search.gather(out)
    out = out.cpu().numpy()
    quat, log_g = out[:, :4], out[:, 4]
    gain = np.exp(log_g)
    scale = gain.mean()
    intensity = torch.exp(model.render(grid).double().cpu()).numpy() * scale
    return {"intensity": intensity.astype(np.float32), "quaternion": quat, "gain": gain / scale}


