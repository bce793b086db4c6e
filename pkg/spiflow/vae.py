"""Heterogeneity (method ``vae``): a variational autoencoder with a latent space of conformations.

After Y. Zhuang et al., "Unsupervised learning approaches to characterizing heterogeneous
samples using X-ray single-particle imaging", IUCrJ 9, 204–214 (2022), arXiv 2109.06179,
and its code (github.com/Yulong-Zhuang/3Dvolume_recon_for_FEL_single_particel_imaging;
facts read from it: a 2D CNN encoder of the pattern together with the frame's orientation
estimate → μ, log σ² of z; a 3D transposed-convolution decoder z → intensity volume;
the volume symmetrised (cubic flips, axis permutations, Friedel) before it is sliced with
``grid_sample`` at the frame's orientation; KL term ``−½ mean(1 + log σ² − μ² − σ²)``; Adam,
lr 1e-3). Differences: the loss here is the Poisson likelihood of the photon counts (the
reference fits 2D intensity averages with a binary cross-entropy + squared error); the
volume is averaged over a chosen point group by :mod:`spiflow.symmetry` (the reference's
flips, cyclic axis permutations and Friedel amount to the 24 operations of Th, which lacks
the axis transpositions of Oh); the decoder multiplies a fixed radial profile measured from
the data; the orientation enters as a 6D vector (Zhou et al., CVPR 2019) or
a quaternion, never Euler angles.

Model. Frame i with known orientation ``R_i`` (``quaternions``, e.g. from EMC) and gain
``g_i``; valid pixel p at ``q_p`` (Å⁻¹) with pixel factor ``s_p``:

* encoder ``q(z | K_i, c_i) = N(μ_i, diag σ_i²)``: a 2D CNN on ``[log(1 + K_i), valid]``
  (zeros at invalid pixels), its features concatenated with ``c_i = (orientation of R_i,
  log g_i)`` (the conditional VAE; ``conditional=False`` drops c_i) → MLP → μ_i, log σ_i².
  ``encoder="lstm"``: the CNN + c features of frames i − L + 1 … i (frame order; earlier
  indices clamped to 0) pass through an LSTM whose last output gives μ_i, log σ_i², for
  time-ordered data whose conformation changes slowly;
* decoder ``W(z)``: Linear → 3D transposed convolutions (kernel 3, stride 2) → centre crop to
  the model grid (``volume_n`` odd, default the reconstruction grid's n, same q_max) →
  ``δ``; ``W = G[b · exp(δ)]`` (``positivity="exp"``) or ``G[b · softplus(δ) / log 2]``, b the
  radial baseline ``Σ_i K_ip / Σ_i g_i s_p`` in |q| bins of width dq (its mean when
  ``radial_baseline`` is off), G the exact average over ``symmetry`` + inversion
  (:func:`spiflow.symmetry.symmetrize`: Friedel only for ``C1``, all 48 for ``Oh``);
* ``μ_ip = g_i s_p W(z_i)(R_iᵀ q_p)`` (trilinear, as :func:`spiflow.slicing.slice_model`), z_i sampled by
  the reparameterisation trick in training;
* loss per frame and valid pixel: ``(1/P) Σ_p [μ − K log μ + log K!] + β_t KL_i / P``, KL_i =
  ``−½ Σ_d (1 + log σ² − μ² − σ²)``, ``β_t = beta · min(1, step / (beta_warmup_epochs · steps))``.

``factorized=True`` replaces every linear, 2D convolution and 3D transposed convolution by
its rank-``cp_rank`` CP decomposition (V. Lebedev et al., ICLR 2015: 1 × 1 → one depthwise
1D kernel per axis → 1 × 1) where that has fewer parameters (a layer from a 2-dimensional z
stays full); :func:`parameter_counts` compares the sizes. The LSTM is not
factorised. W is in photons per unit pixel factor of a gain-1 frame (the scale of EMC's W).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import xarray as xr
from tqdm import tqdm

from .grid import Grid, slice_volume
from .io import (RunLog, data_digest, derived_seed, load_checkpoint, radial_log_profile, resolve_device,
                 save_checkpoint, validate_detector_inputs)
from .slicing import grid_coordinates
from .nets import matrix_to_rotation_6d
from .rotation import canonical, quaternion_to_matrix
from .selfsup import FrameStream
from .settings import VAESettings
from .symmetry import point_group, symmetrize

LOG_COLUMNS = ["epoch", "loss", "recon", "kl", "beta", "lr", "patterns_per_second", "seconds"]


# ---------------------------------------------------------------- layers (full or CP)

class CPLinear(nn.Module):
    """Rank-R factorised linear map ``W = U V`` (V: in → R, U: R → out, bias on U)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.v, self.u = nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out)

    def forward(self, x):
        return self.u(self.v(x))


class CPConv2d(nn.Module):
    """CP-decomposed k × k convolution: 1 × 1 (in → R), depthwise k × 1 and 1 × k (stride per
    axis), 1 × 1 (R → out, bias): kernel ``Σ_r A_or B_ir H_hr W_wr`` (Lebedev et al. 2015)."""

    def __init__(self, c_in, c_out, k, stride, padding, rank):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Conv2d(c_in, rank, 1, bias=False),
            nn.Conv2d(rank, rank, (k, 1), (stride, 1), (padding, 0), groups=rank, bias=False),
            nn.Conv2d(rank, rank, (1, k), (1, stride), (0, padding), groups=rank, bias=False),
            nn.Conv2d(rank, c_out, 1))

    def forward(self, x):
        return self.seq(x)


class CPConvTranspose3d(nn.Module):
    """CP-decomposed k³ transposed convolution: 1³ (in → R), one depthwise transposed 1D
    kernel per axis (stride, padding on that axis), 1³ (R → out, bias). Same output size as
    ``nn.ConvTranspose3d(c_in, c_out, k, stride, padding)``."""

    def __init__(self, c_in, c_out, k, stride, padding, rank):
        super().__init__()
        axis = [nn.ConvTranspose3d(rank, rank, tuple(k if a == i else 1 for a in range(3)),
                                   tuple(stride if a == i else 1 for a in range(3)),
                                   tuple(padding if a == i else 0 for a in range(3)), groups=rank, bias=False)
                for i in range(3)]
        self.seq = nn.Sequential(nn.Conv3d(c_in, rank, 1, bias=False), *axis, nn.Conv3d(rank, c_out, 1))

    def forward(self, x):
        return self.seq(x)


def _linear(d_in, d_out, cfg):
    r = cfg.cp_rank
    return CPLinear(d_in, d_out, r) if cfg.factorized and r * (d_in + d_out) < d_in * d_out else nn.Linear(d_in, d_out)


def _conv(c_in, c_out, cfg):
    r = cfg.cp_rank
    if cfg.factorized and r * (c_in + 6 + c_out) < 9 * c_in * c_out:
        return CPConv2d(c_in, c_out, 3, 2, 1, r)
    return nn.Conv2d(c_in, c_out, 3, 2, 1)


def _deconv(c_in, c_out, cfg):
    r = cfg.cp_rank
    if cfg.factorized and r * (c_in + 9 + c_out) < 27 * c_in * c_out:
        return CPConvTranspose3d(c_in, c_out, 3, 2, 1, r)
    return nn.ConvTranspose3d(c_in, c_out, 3, 2, 1)


# ---------------------------------------------------------------- networks

class Encoder(nn.Module):
    """``(image, cond) → (μ, log σ²)``, each (B, latent_dim).

    image: (B, 2, ny, nx) (channels: log(1 + K) at valid pixels, valid mask) or, for
    ``encoder="lstm"``, (B, L, 2, ny, nx) with the L frames of the sequence, oldest first.
    cond: (B, C) or (B, L, C): orientation (6 or 4 numbers) and log gain; C = 0 when not
    ``conditional``.
    """

    def __init__(self, cfg: VAESettings, cond_dim: int):
        super().__init__()
        layers, c = [], 2
        for i in range(cfg.encoder_layers):
            layers += [_conv(c, cfg.encoder_channels * 2 ** i, cfg), nn.LeakyReLU(0.1)]
            c = cfg.encoder_channels * 2 ** i
        self.cnn = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        d = 16 * c + cond_dim
        self.lstm = nn.LSTM(d, cfg.lstm_hidden, batch_first=True) if cfg.encoder == "lstm" else None
        d = cfg.lstm_hidden if self.lstm is not None else d
        self.head = nn.Sequential(_linear(d, cfg.hidden, cfg), nn.LeakyReLU(0.1),
                                  _linear(cfg.hidden, 2 * cfg.latent_dim, cfg))
        self.latent_dim = cfg.latent_dim

    def forward(self, image: torch.Tensor, cond: torch.Tensor):
        lead = image.shape[:-3]
        h = self.cnn(image.reshape((-1,) + image.shape[-3:])).reshape(lead + (-1,))
        h = torch.cat([h, cond], -1)
        if self.lstm is not None:
            h = self.lstm(h)[0][:, -1]
        out = self.head(h)
        return out[..., :self.latent_dim], out[..., self.latent_dim:]


class IntensityDecoder(nn.Module):
    """``z (B, latent_dim) → W (B, n, n, n)``: positive, symmetrised intensity on the model grid
    (photons per unit pixel factor of a gain-1 frame; see the module docstring).

    log_baseline: (n, n, n) log of the radial baseline b (a buffer, saved with the weights).
    """

    def __init__(self, cfg: VAESettings, n: int, log_baseline: torch.Tensor | None = None):
        super().__init__()
        k = cfg.decoder_layers
        self.n, self.s0 = n, math.ceil((n - 1) / 2 ** k) + 1
        self.m = (self.s0 - 1) * 2 ** k + 1  # size after k stride-2 layers, >= n, odd
        self.c0 = cfg.decoder_channels * 2 ** (k - 1)
        self.fc = _linear(cfg.latent_dim, self.c0 * self.s0 ** 3, cfg)
        layers = []
        for i in range(k):
            c_in = cfg.decoder_channels * 2 ** (k - 1 - i)
            last = i == k - 1
            layers.append(_deconv(c_in, 1 if last else c_in // 2, cfg))
            if not last:
                layers.append(nn.LeakyReLU(0.1))
        self.deconv = nn.Sequential(*layers)
        last = layers[-1].seq[-1] if isinstance(layers[-1], CPConvTranspose3d) else layers[-1]
        with torch.no_grad():  # start at W ≈ baseline
            for p in last.parameters():
                p.mul_(0.1)
        self.register_buffer("log_baseline", torch.zeros((n,) * 3) if log_baseline is None
                             else log_baseline.float().reshape((n,) * 3))
        self.ops = point_group(cfg.symmetry, friedel=True)
        self.positivity = cfg.positivity

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc(z), 0.1).reshape(-1, self.c0, self.s0, self.s0, self.s0)
        a = (self.m - self.n) // 2
        d = self.deconv(h)[:, 0, a:a + self.n, a:a + self.n, a:a + self.n]
        if self.positivity == "exp":
            w = torch.exp(self.log_baseline + d)
        else:
            w = torch.exp(self.log_baseline) * F.softplus(d) / math.log(2.0)
        return symmetrize(w, self.ops)


class VAEModel(nn.Module):
    """Encoder + :class:`IntensityDecoder` on a model grid of side ``n``."""

    def __init__(self, cfg: VAESettings, n: int, log_baseline: torch.Tensor | None = None):
        super().__init__()
        self.cond_dim = (6 if cfg.orientation_encoding == "6d" else 4) + 1 if cfg.conditional else 0
        self.encoder = Encoder(cfg, self.cond_dim)
        self.decoder = IntensityDecoder(cfg, n, log_baseline)


def orientation_features(quaternions, gains, cfg: VAESettings) -> torch.Tensor:
    """Encoder conditioning (frames, C) float32: the 6D vector (first two rows of R) or the
    canonical quaternion [w, x, y, z], then log gain; (frames, 0) when not ``conditional``."""
    q = canonical(torch.as_tensor(np.asarray(quaternions), dtype=torch.float64))
    if not cfg.conditional:
        return torch.zeros((len(q), 0))
    rep = matrix_to_rotation_6d(quaternion_to_matrix(q)) if cfg.orientation_encoding == "6d" else q
    log_g = torch.log(torch.as_tensor(np.asarray(gains), dtype=torch.float64))[:, None]
    return torch.cat([rep, log_g], 1).float()


def slice_volumes(volumes: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear slices (B, P) of volumes (B, n, n, n) at ``coords`` (B, P, 3) of
    :func:`spiflow.slicing.grid_coordinates` (one rotation per volume); 0 outside the grid.
    Differentiable; equal to :func:`spiflow.grid.slice_volume` at ``R_bᵀ q_p``."""
    out = F.grid_sample(volumes[:, None], coords[:, :, None, None, :], mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return out.reshape(coords.shape[:2])


def poisson_nll(mu: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Elementwise Poisson negative log-likelihood ``μ − K log μ + log K!`` (nats).

    Minimal over μ at μ = K (its derivative 1 − K/μ vanishes there); μ is clamped at 1e-30."""
    return mu - counts * torch.log(mu.clamp_min(1e-30)) + torch.lgamma(counts + 1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, σ²) ‖ N(0, 1))`` per frame, ``−½ Σ_d (1 + log σ² − μ² − σ²)``: (..., D) → (...)."""
    return -0.5 * (1 + logvar - mu.square() - logvar.exp()).sum(-1)


def vae_loss(mu_pix: torch.Tensor, counts: torch.Tensor, z_mu: torch.Tensor, z_logvar: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, recon, kl)``: recon the mean per-pixel Poisson NLL of (B, P) expected counts
    ``mu_pix`` and ``counts``; kl the mean KL per frame (nats); loss = recon + β kl / P."""
    recon = poisson_nll(mu_pix, counts).mean()
    kl = kl_divergence(z_mu, z_logvar).mean()
    return recon + beta * kl / counts.shape[1], recon, kl


def beta_at(step: int, steps_per_epoch: int, cfg: VAESettings) -> float:
    """β of 0-based training ``step``: linear warm-up over ``beta_warmup_epochs`` epochs."""
    warm = cfg.beta_warmup_epochs * steps_per_epoch
    return float(cfg.beta if warm == 0 else cfg.beta * min(1.0, (step + 1) / warm))


def model_grid(grid: Grid, cfg: VAESettings) -> Grid:
    """The decoder's grid: side ``volume_n`` (or grid.n) with the reconstruction grid's q_max."""
    n = cfg.volume_n or grid.n
    return grid if n == grid.n else Grid(n, grid.q_max / (n // 2))


def parameter_counts(cfg: VAESettings | None = None, grid_n: int | None = None) -> dict:
    """Trainable parameters of the full and the CP-factorised model with ``cfg`` otherwise.

    grid_n: decoder volume side (default ``cfg.volume_n`` or 15). Returns
    ``{"full": {"encoder", "decoder", "total"}, "factorized": {…}, "ratio": factorized / full}``.
    """
    cfg = cfg or VAESettings()
    n = grid_n or cfg.volume_n or 15
    out = {}
    for name, fact in (("full", False), ("factorized", True)):
        m = VAEModel(cfg.model_copy(update={"factorized": fact}), n)
        enc = sum(p.numel() for p in m.encoder.parameters())
        dec = sum(p.numel() for p in m.decoder.parameters())
        out[name] = {"encoder": enc, "decoder": dec, "total": enc + dec}
    out["ratio"] = out["factorized"]["total"] / out["full"]["total"]
    return out


# ---------------------------------------------------------------- training

@dataclass
class VAEResult:
    """Output of :func:`run_vae`.

    z_mu, z_logvar: (frames, latent_dim) float64, the encoder's posterior of each frame
    (eval mode, no sampling). decoder: the trained :class:`IntensityDecoder` (CPU, eval):
    ``decoder(z (B, D)) → (B, n, n, n)`` photons per unit pixel factor on ``grid``.
    grid: the decoder's grid. log: one row per epoch (:data:`LOG_COLUMNS`).
    """

    z_mu: np.ndarray
    z_logvar: np.ndarray
    decoder: IntensityDecoder
    grid: Grid
    log: pd.DataFrame


class _Batches:
    """Encoder inputs for frame indices: images, conditioning, rotations, gains on device."""

    def __init__(self, stream: FrameStream, valid: np.ndarray, cond: torch.Tensor, rot: torch.Tensor,
                 gains: torch.Tensor, cfg: VAESettings, device):
        self.stream, self.shape, self.device, self.cfg = stream, valid.shape, device, cfg
        self.flat = torch.as_tensor(np.flatnonzero(valid)).to(device)
        self.cond, self.rot, self.gains = cond.to(device), rot.to(device), gains.to(device)

    def image(self, K: torch.Tensor) -> torch.Tensor:
        """(B, P) counts → (B, 2, ny, nx)."""
        img = torch.zeros((K.shape[0], 2, self.shape[0] * self.shape[1]), device=self.device)
        img[:, 0, self.flat] = torch.log1p(K)
        img[:, 1, self.flat] = 1.0
        return img.view(K.shape[0], 2, *self.shape)

    def __call__(self, idx: np.ndarray, K: torch.Tensor):
        """(image, cond) for frames ``idx`` whose counts are K (B, P)."""
        if self.cfg.encoder != "lstm":
            return self.image(K), self.cond[idx]
        L = self.cfg.sequence_length
        win = np.clip(idx[:, None] - np.arange(L - 1, -1, -1)[None, :], 0, None)  # (B, L), oldest first
        Kw = self.stream.take(win.reshape(-1)).to(self.device)
        return self.image(Kw).view(len(idx), L, 2, *self.shape), self.cond[win]


def _fingerprint(cfg: VAESettings, seed: int, grid: Grid, shape, n_valid: int, quats, gains, data: str) -> str:
    fp = {**cfg.model_dump(exclude={"epochs", "memory_budget_gb", *VAESettings.WORKFLOW_KEYS}), "seed": seed}
    h = hashlib.sha256(np.ascontiguousarray(quats, dtype=np.float64).tobytes()
                       + np.ascontiguousarray(gains, dtype=np.float64).tobytes()).hexdigest()
    fp.update(grid_n=grid.n, grid_dq=grid.dq, data_shape=list(shape), n_valid=int(n_valid), inputs=h,
              data=data)
    return json.dumps(fp, sort_keys=True)


def run_vae(photons, valid, q, pixel_factor, grid: Grid, quaternions, gains, settings: VAESettings | None = None,
            *, seed: int = 0, device: str = "auto", log_path: str | os.PathLike | None = None,
            checkpoint_path: str | os.PathLike | None = None, progress: bool = True) -> VAEResult:
    """Train the VAE on frames at known orientations and return each frame's latent posterior.

    photons: (frames, ny, nx) counts, any array-like sliced as ``photons[i0:i1]`` (numpy,
    Zarr), streamed in chunks of ``chunk_frames``. valid: (ny, nx) bool; q: (ny, nx, 3) Å⁻¹
    (valid pixels beyond ``grid.q_max`` are dropped with a warning); pixel_factor: (ny, nx)
    > 0. grid: the reconstruction grid (the decoder's q_max; its n unless ``volume_n``).
    quaternions: (frames, 4) ``[w, x, y, z]``, active, frame i records ``I(R_iᵀ q)``;
    gains: (frames,) > 0 (mean 1). settings: :class:`spiflow.settings.VAESettings` (None: its
    defaults; its ``WORKFLOW_KEYS`` are not read here). seed: initialisation, data order,
    reparameterisation noise. device: "auto" (CUDA when available), "cpu", "cuda", …
    log_path: CSV, one row per epoch (:data:`LOG_COLUMNS`; recon = mean per-pixel Poisson
    NLL, kl = mean KL per frame in nats, beta = the epoch's last β), appended per epoch.
    checkpoint_path: written atomically after every epoch with ``{epoch, model, optimizer,
    fingerprint}`` and read with ``torch.load(weights_only=True)``; an existing one with the
    same fingerprint (every setting but epochs, memory_budget_gb and ``WORKFLOW_KEYS``; seed;
    grid; data shape; valid pixels; orientations and gains) is resumed (the CSV cut back to
    its epoch) and gives the same result as an uninterrupted run; another fingerprint
    restarts (UserWarning).
    Raises ValueError for mismatched shapes, an empty mask, pixel_factor <= 0, negative or
    non-finite counts, quaternions/gains of the wrong shape or gains <= 0.
    """
    cfg = settings or VAESettings()
    frames, valid, qv, sv = validate_detector_inputs(photons, valid, q, pixel_factor, grid)
    quats, gains = np.asarray(quaternions, dtype=np.float64), np.asarray(gains, dtype=np.float64)
    if quats.shape != (frames, 4) or not np.isfinite(quats).all() or (np.linalg.norm(quats, axis=1) == 0).any():
        raise ValueError(f"quaternions must be finite, non-zero, shape ({frames}, 4), got {quats.shape}")
    if gains.shape != (frames,) or not (np.isfinite(gains).all() and (gains > 0).all()):
        raise ValueError(f"gains must be finite and > 0, shape ({frames},), got {gains.shape}")
    device = resolve_device(device)
    mgrid = model_grid(grid, cfg)
    cache = frames * len(qv) * 4 <= cfg.memory_budget_gb * 1e9
    stream = FrameStream(photons, valid, cfg.chunk_frames, cfg.batch_size, seed, cache)
    sum_counts, n_frame = np.zeros(len(qv)), np.zeros(frames)
    for idx, K in stream.sequential(cfg.chunk_frames):  # validates all counts
        sum_counts += K.double().sum(0).numpy()
        n_frame[np.asarray(idx)] = K.double().sum(1).numpy()
    if sum_counts.sum() <= 0:
        raise ValueError("photons: no photon in any valid pixel")
    profile = radial_log_profile(sum_counts, qv, sv, gains.sum(), mgrid, cfg.radial_baseline)
    log_b = np.interp(mgrid.q_norm() / mgrid.dq, np.arange(len(profile)), profile)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VAEModel(cfg, mgrid.n, torch.as_tensor(log_b)).to(device)
    rot = quaternion_to_matrix(torch.as_tensor(quats)).float()
    batches = _Batches(stream, valid, orientation_features(quats, gains, cfg), rot,
                       torch.as_tensor(gains, dtype=torch.float32), cfg, device)
    q_t = torch.as_tensor(qv, dtype=torch.float32, device=device)
    s_t = torch.as_tensor(sv, dtype=torch.float32, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    fp = _fingerprint(cfg, seed, grid, photons.shape, len(qv), quats, gains, data_digest(n_frame))
    start, ckpt = 0, load_checkpoint(checkpoint_path, fp)
    if ckpt is not None:
        start = int(ckpt["epoch"])
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    rows = RunLog(log_path, LOG_COLUMNS, ckpt, key="epoch")

    steps = stream.batches
    bar = tqdm(total=cfg.epochs * steps, initial=min(start, cfg.epochs) * steps, disable=not progress, desc="vae")
    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        stream.set_epoch(epoch)
        gen = torch.Generator().manual_seed(derived_seed(seed, epoch))
        model.train()
        acc = np.zeros(4)  # Σ loss·B, Σ recon·B, Σ kl·B, frames
        for b, (idx, K) in enumerate(stream):
            idx, K = idx.numpy(), K.to(device)
            beta = beta_at((epoch - 1) * steps + b, steps, cfg)
            z_mu, z_logvar = model.encoder(*batches(idx, K))
            eps = torch.randn(z_mu.shape, generator=gen).to(device)
            W = model.decoder(z_mu + torch.exp(0.5 * z_logvar) * eps)
            S = slice_volumes(W, grid_coordinates(q_t, batches.rot[idx], mgrid))
            mu_pix = batches.gains[idx, None] * s_t[None, :] * S
            loss, recon, kl = vae_loss(mu_pix, K, z_mu, z_logvar, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc += np.array([loss.item(), recon.item(), kl.item(), 1.0]) * len(idx)
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": acc[0] / acc[3], "recon": acc[1] / acc[3], "kl": acc[2] / acc[3],
               "beta": beta, "lr": opt.param_groups[0]["lr"], "patterns_per_second": acc[3] / seconds,
               "seconds": seconds}
        rows.append(row)
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {"epoch": epoch, "model": model.state_dict(),
                                               "optimizer": opt.state_dict(), "fingerprint": fp,
                                               "log_rows": rows.state()})
        bar.set_postfix(epoch=epoch, loss=f"{row['loss']:.4g}", kl=f"{row['kl']:.3g}")
    bar.close()

    z_mu, z_logvar = encode_frames(model, stream, batches, max(cfg.batch_size, 256))
    return VAEResult(z_mu=z_mu, z_logvar=z_logvar, decoder=model.decoder.cpu().eval(), grid=mgrid, log=rows.frame())


@torch.no_grad()
def encode_frames(model: VAEModel, stream: FrameStream, batches: _Batches, batch: int):
    """(z_mu, z_logvar) (frames, D) float64 of every frame in order, eval mode."""
    model.eval()
    D = model.encoder.latent_dim
    mu, lv = np.zeros((stream.frames, D)), np.zeros((stream.frames, D))
    for idx, K in stream.sequential(batch):
        idx = idx.numpy()
        m, v = model.encoder(*batches(idx, K.to(batches.device)))
        mu[idx], lv[idx] = m.double().cpu().numpy(), v.double().cpu().numpy()
    return mu, lv


# ---------------------------------------------------------------- analysis

@dataclass
class PCA:
    """Principal components of latent means: scores (frames, k), components (k, D) (rows,
    unit, sign such that each row's largest-magnitude entry is positive), mean (D,),
    explained_variance (k,) and explained_variance_ratio (k,)."""

    scores: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray


def pca(z_mu: np.ndarray, n_components: int = 2) -> PCA:
    """PCA of ``z_mu`` (frames, D) by SVD of the centred data (numpy); k = min(n_components, D)."""
    z = np.asarray(z_mu, dtype=np.float64)
    mean = z.mean(0)
    u, s, vt = np.linalg.svd(z - mean, full_matrices=False)
    k = min(n_components, z.shape[1])
    comps = vt[:k] * np.sign(vt[:k][np.arange(k), np.abs(vt[:k]).argmax(1)])[:, None]
    var = s ** 2 / max(1, len(z) - 1)
    return PCA((z - mean) @ comps.T, comps, mean, var[:k], var[:k] / var.sum() if var.sum() > 0 else var[:k])


def kmeans_representatives(z_mu: np.ndarray, k: int, seed: int = 0):
    """k-means (scipy ``kmeans2``, k-means++ start) on ``z_mu`` (frames, D), each centre
    snapped to the nearest real frame. Returns (frame indices (k,), their z_mu (k, D),
    labels (frames,))."""
    from scipy.cluster.vq import kmeans2

    z = np.asarray(z_mu, dtype=np.float64)
    centres, labels = kmeans2(z, k, minit="++", seed=seed)
    frames = np.array([int(np.argmin(((z - c) ** 2).sum(1))) for c in centres])
    return frames, z[frames], labels


@torch.no_grad()
def decode(decoder: IntensityDecoder, z, grid: Grid | None = None, decoder_grid: Grid | None = None) -> np.ndarray:
    """Intensity volumes (m, n, n, n) float64 of latents z (m, D) or (D,).

    Photons per unit pixel factor of a gain-1 frame on the decoder's grid, or resampled
    trilinearly onto ``grid`` (then ``decoder_grid``, the decoder's own grid, is needed).
    Raises ValueError for ``grid`` without ``decoder_grid``."""
    if grid is not None and decoder_grid is None:
        raise ValueError("decode onto a grid needs decoder_grid, the decoder's own grid")
    p = next(decoder.parameters())
    z = torch.as_tensor(np.atleast_2d(np.asarray(z, dtype=np.float32)), device=p.device)
    vol = decoder.eval()(z).double().cpu()
    if grid is not None and decoder_grid is not None and grid != decoder_grid:
        pts = torch.as_tensor(grid.q_points())
        vol = torch.stack([slice_volume(v, pts, decoder_grid) for v in vol])
    return vol.numpy()


def traversal(decoder: IntensityDecoder, z_mu: np.ndarray, steps: int = 5, span: float = 2.0):
    """Volumes along PC1: ``z = mean + s σ₁ pc1`` for s in linspace(−span, span, steps)
    (σ₁ the PC1 standard deviation). Returns (z (steps, D), volumes (steps, n, n, n))."""
    p = pca(z_mu, 1)
    s = np.linspace(-span, span, steps) * math.sqrt(p.explained_variance[0])
    z = p.mean[None, :] + s[:, None] * p.components[0][None, :]
    return z, decode(decoder, z)


def latent_dataset(z_mu: np.ndarray, z_logvar: np.ndarray, attrs: dict | None = None) -> xr.Dataset:
    """The ``recon/vae/latent.zarr`` store of docs/conventions.md: ``z_mu``, ``z_logvar`` (frame, latent)."""
    z_mu, z_logvar = np.asarray(z_mu, np.float64), np.asarray(z_logvar, np.float64)
    return xr.Dataset({"z_mu": (("frame", "latent"), z_mu), "z_logvar": (("frame", "latent"), z_logvar)},
                      coords={"frame": np.arange(len(z_mu)), "latent": np.arange(z_mu.shape[1])},
                      attrs=attrs or {})
