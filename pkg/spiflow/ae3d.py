"""Method ``ae3d``: direct phasing of a 3D Bragg-CDI intensity by a 3D convolutional autoencoder.

Following Scheinker & Pokharel (npj Comput. Mater. 10, 2024, doi 10.1038/s41524-024-01482-5),
3D-CDI-NN (Chan et al., Appl. Phys. Rev. 8, 021407 (2021)) and AutoPhaseNN (Yao et al.,
npj Comput. Mater. 8, 124 (2022)), a network maps the measured intensity ``I`` (n, n, n)
(photons, Bragg peak at the centre voxel; :mod:`spiflow.bragg`) to the complex density
``d = ρ e^{iφ}`` on the same (centred, odd) grid.

Network (:class:`AE3D`). Input: two channels, ``log(1 + I) / log(1 + max I)`` on measured
voxels (0 elsewhere) and the ``measured`` mask; the encoder first standardises channel 0 per
voxel with the mean and standard deviation over the training inputs (buffers of the model,
set by :func:`train_ae3d`, saved in checkpoints). Without that step the network collapsed to
one output for every input: channel 0 is dominated by the radial fall-off common to every
crystal (mean 0.41 per voxel, std across crystals 0.12), and with Adam at lr 3e-3 the
encoder's features never came to depend on the input (regressing the crystal size through
the same encoder: held-out R² ≈ 0 without, 0.76 with the standardisation;
``benchmarks/ae3d_collapse.py``). Encoder: three stride-2 3³ convolutions,
channels c, 2c, 4c (``n = 2^k + 1``: 33 → 17 → 9 → 5), each followed by a 3³
convolution; SiLU activations, GroupNorm; a linear map to the latent vector z
(``latent_dim``). Decoder: linear back to 4c × 5³, then three stride-2 transposed
convolutions (5 → 9 → 17 → 33; channels 2c, c, max(4, c/2)) mirroring the encoder (no
convolution at full resolution but the output's: a CPU budget), and two heads: the
amplitude ``ρ = sigmoid(·)`` ∈ [0, 1] (the truth's scale: 1 inside the crystal) and the
phase ``φ = π tanh(·)`` rad. Any odd n whose halvings ``(n + 1) / 2`` stay odd down to the
bottom works (17, 33, 65, …).

Strain phase head (``phase_head: strain``). The convolutional phase head never learned the
strain phase (README, "Direct ML phasing": the true amplitude with its phase scored as the
flat phase). Two obstacles, each shown by a probe: the decoder (a smooth polynomial phase
learned what it did not) and the twin. The twin of ``ρ e^{iφ}`` is ``ρ(−r) e^{−iφ(−r)}``, so
for the strain gradient ``φ = rᵀ K r`` of :func:`spiflow.bragg.displacement_phase` it has the
form −K; forms of either sign modulo ±1 form a projective space on which no continuous
function (a network) can choose a sign. This head therefore regresses what the intensity does
determine, the sign-free ``M = k kᵀ`` (6 × 6; k = K's six entries :data:`STRAIN_TERMS` in
units of the training forms' RMS entry, ``strain_scale``) by a linear map of z
(:func:`strain_loss`, against the forms fitted to the true phases by :func:`fit_strain_form`),
reads ±k from M's top eigenpair (:meth:`AE3D.strain_form`) and chooses the sign per object by
the Fourier-modulus error of ``ρ e^{±iφ}`` with the decoded amplitude ρ
(:meth:`AE3D.complex_density`): given ρ the sign is no longer a twin ambiguity (``ρ e^{−iφ}``
has the intensity I(−q), not I(q), unless ρ is centrosymmetric, when the two are twins). The
amplitude head is trained with the twin-invariant :func:`amplitude_loss`. The head represents
strain gradients only (no dislocation vortices).

Augmentation (``augment``). The crystals' distribution is invariant under the 48 signed axis
permutations of the cube (uniformly random rotations; K drawn from a rotation-invariant
ensemble), and a density and its intensity transform alike. Each training batch is replaced
by its image under one operation drawn per step (:func:`symmetry_operations`: those leaving
the measured mask unchanged; :func:`apply_symmetry`), the strain forms by ``T K Tᵀ``.

Losses (per object; means over the batch; the strain head replaces the supervised loss by
``amplitude_loss + strain_weight · strain_loss``, above):

* supervised, invariant to the ambiguities of the data (global phase α, twin
  ``d*(−r)``, :func:`spiflow.bragg.twin`): ``min_{t ∈ {d, twin(d)}} min_α ‖p − e^{iα} t‖² / ‖t‖²``
  ``= min_t (‖p‖² + ‖t‖² − 2 |⟨t, p⟩|) / ‖t‖²`` for the prediction p (the targets are
  centred, so translations need no search);
* label-free physics loss (AutoPhaseNN): ``‖k |F_p| − √I‖² / ‖√I‖²`` over measured voxels,
  ``F_p`` the far field of p with the sign of :func:`spiflow.bragg.far_field`, ``k`` the
  least-squares scale (the network does not know the photon count).

Training (:func:`train_ae3d`) minimises ``supervised + physics_weight · physics`` on
``n_train`` simulated crystals with Adam (cosine decay of the learning rate to lr / 100 per
step), batches shuffled by ``derived_seed(seed, epoch)``; it checkpoints every epoch
(:func:`spiflow.io.save_checkpoint`: model, optimiser, scheduler, log rows) and a run resumed
with the same settings (fingerprint: every setting but ``epochs``, ``n_test``,
``finetune_epochs``, ``refine_iterations`` and ``tracking``; the seed) continues to ``epochs`` and gives
the result of an uninterrupted run. :func:`finetune` adapts a trained network to
intensities without truth through the physics loss alone. :func:`predict` phases a batch;
:func:`refine` runs ER from its output (:func:`spiflow.phasing.phase_complex`, support from
the predicted amplitude): "network + N refinement iterations"; :func:`refine_cycle` runs one
cycle of an iterative schedule with shrinkwrap from it (``network+RAAR/ER``: RAAR, Luke,
Inverse Problems 21, 37 (2005), measured the best refinement of the network's output).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import bragg
from .io import RunLog, derived_seed, load_checkpoint, save_checkpoint
from .settings import ITERATIVE_ALGORITHMS, AE3DSettings, PhasingSettings

INPUT_STD_FLOOR = 0.02  # of the per-voxel std of the normalised log intensity (AE3D.set_input_statistics)
LOG_COLUMNS = ["epoch", "loss", "supervised", "physics", "lr", "seconds"]
PHASE_HEADS = ("convolutional", "strain")
STRAIN_TERMS = ("xx", "yy", "zz", "xy", "xz", "yz")  # k: K's entries; φ = Σ k_j b_j (strain_basis)
_AXES = (-3, -2, -1)


def _levels(n: int) -> int:
    """Stride-2 levels (3) after checking that ``n`` halves as (n + 1) / 2 thrice, odd."""
    m = n
    for _ in range(3):
        if m % 2 == 0 or m < 5:
            raise ValueError(f"ae3d needs an odd grid that halves to odd sizes (17, 33, 65, ...), got n = {n}")
        m = (m + 1) // 2
    return m


def _conv(cin: int, cout: int, stride: int = 1, transpose: bool = False, norm: bool = True) -> nn.Sequential:
    conv = (nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1) if transpose
            else nn.Conv3d(cin, cout, 3, stride=stride, padding=1))
    layers = [conv] + ([nn.GroupNorm(4 if cout % 4 == 0 else 1, cout)] if norm else []) + [nn.SiLU()]
    return nn.Sequential(*layers)


def strain_basis(n: int) -> np.ndarray:
    """The quadratic monomials (6, n, n, n) of the centred voxel coordinates r (voxels, 0 at
    index n // 2), ``x², y², z², 2xy, 2xz, 2yz`` (:data:`STRAIN_TERMS`), so that the phase of a
    strain gradient ``φ(r) = rᵀ K r`` (K symmetric, rad per voxel²;
    :func:`spiflow.bragg.displacement_phase`) is ``Σ_j k_j b_j`` with k = (K_xx, K_yy, K_zz,
    K_xy, K_xz, K_yz)."""
    r = np.stack(np.meshgrid(*[np.arange(n) - n // 2] * 3, indexing="ij")).astype(np.float64)
    x, y, z = r
    return np.stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z])


def fit_strain_form(amplitude, phase, threshold: float = 0.5) -> np.ndarray:
    """Least-squares strain forms k (B, 6) rad per voxel² (:func:`strain_basis`) of phases
    (B, n, n, n) rad over each object's support ``amplitude > threshold`` (a constant phase
    fitted alongside and dropped). Exact for the strain gradients of
    :func:`spiflow.bragg.displacement_phase`; with dislocations the best quadratic. Raises
    ValueError for an object whose support has fewer than 7 voxels."""
    amp, ph = np.asarray(amplitude), np.asarray(phase)
    if amp.ndim == 3:
        amp, ph = amp[None], ph[None]
    basis = strain_basis(amp.shape[-1]).reshape(6, -1).T
    out = []
    for i, (a, p) in enumerate(zip(amp, ph)):
        m = a.ravel() > threshold
        if m.sum() < 7:
            raise ValueError(f"object {i}: a support of {int(m.sum())} voxels cannot fit a strain form")
        c = np.linalg.lstsq(np.c_[basis[m], np.ones(m.sum())], p.ravel()[m].astype(np.float64), rcond=None)[0]
        out.append(c[:6])
    return np.array(out)


def symmetry_operations(measured) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The signed axis permutations ``(perm, signs)`` of the cube (48: rotations and
    inversions) that leave ``measured`` (n, n, n) bool on the centred odd grid unchanged, the
    identity first. An operation maps a volume V to ``V.permute(perm)`` flipped along the axes
    with sign −1, i.e. the point r to ``T r`` with ``T = diag(signs) P`` (:func:`apply_symmetry`);
    a density and its intensity transform alike (the Fourier transform commutes with T)."""
    import itertools
    m = torch.as_tensor(np.asarray(measured), dtype=torch.bool)
    ops = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            if torch.equal(_transform(m, perm, signs), m):
                ops.append((perm, signs))
    return ops


def _transform(v: torch.Tensor, perm, signs) -> torch.Tensor:
    lead = v.ndim - 3
    v = v.permute(*range(lead), *[lead + p for p in perm])
    flips = [lead + k for k in range(3) if signs[k] < 0]
    return v.flip(flips) if flips else v


def apply_symmetry(op, volumes: list[torch.Tensor], forms: torch.Tensor | None = None):
    """Apply one operation ``(perm, signs)`` of :func:`symmetry_operations` to volumes
    (..., n, n, n) (the last three axes) and to strain forms (B, 6) (``K → T K Tᵀ``).
    Returns ``(volumes, forms)``."""
    perm, signs = op
    out = [_transform(v, perm, signs) for v in volumes]
    if forms is None:
        return out, None
    T = torch.zeros(3, 3, dtype=forms.dtype)
    T[range(3), list(perm)] = 1.0
    T = torch.diag(torch.as_tensor(signs, dtype=forms.dtype)) @ T
    idx = [(0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2)]
    K = forms.new_zeros(len(forms), 3, 3)
    for j, (a, b) in enumerate(idx):
        K[:, a, b] = forms[:, j]
        K[:, b, a] = forms[:, j]
    K = T @ K @ T.T
    return out, torch.stack([K[:, a, b] for a, b in idx], 1)


class AE3D(nn.Module):
    """The encoder–decoder of the module docstring for an (n, n, n) grid, ``channels`` c,
    ``latent_dim`` and ``phase_head`` (:data:`PHASE_HEADS`). ``forward(x)`` with x
    (B, 2, n, n, n) → (amplitude, phase) (B, n, n, n); :meth:`encode` → z (B, latent_dim),
    :meth:`decode` z → (amplitude, phase) (the strain head: one of the two signs),
    :meth:`complex_density` z → the complex density (the strain head's sign chosen by the
    intensity). Raises ValueError for an n the strides cannot halve (see :func:`_levels`) or
    an unknown phase head."""

    def __init__(self, n: int, channels: int, latent_dim: int, phase_head: str = "convolutional"):
        super().__init__()
        if phase_head not in PHASE_HEADS:
            raise ValueError(f"phase_head must be one of {PHASE_HEADS}, got {phase_head!r}")
        self.n, self.bottom, self.phase_head = n, _levels(n), phase_head
        c, top = channels, max(4, channels // 2)
        self.enc = nn.Sequential(_conv(2, c, 2), _conv(c, c), _conv(c, 2 * c, 2), _conv(2 * c, 2 * c),
                                 _conv(2 * c, 4 * c, 2), _conv(4 * c, 4 * c))
        self.to_z = nn.Linear(4 * c * self.bottom ** 3, latent_dim)
        self.from_z = nn.Linear(latent_dim, 4 * c * self.bottom ** 3)
        self.dec = nn.Sequential(_conv(4 * c, 2 * c, transpose=True), _conv(2 * c, 2 * c),
                                 _conv(2 * c, c, transpose=True), _conv(c, c),
                                 _conv(c, top, transpose=True, norm=False))
        self.head = nn.Conv3d(top, 2, 3, padding=1)
        with torch.no_grad():  # start from an almost empty amplitude: most of the box is outside the crystal
            self.head.bias[0] = -3.0
        # per-voxel statistics of channel 0 over the training inputs (set_input_statistics;
        # saved with the weights): the encoder sees (x0 - mean) / std, the object-to-object
        # differences, not the common radial fall-off that dominates every log intensity
        self.register_buffer("input_mean", torch.zeros(n, n, n))
        self.register_buffer("input_std", torch.ones(n, n, n))
        self.c = c
        if phase_head == "strain":
            self.strain = nn.Linear(latent_dim, 21)  # the upper triangle of M ≈ k kᵀ (k = K's entries / scale)
            self.register_buffer("strain_scale", torch.ones(()))  # rad per voxel² (set_strain_scale)
            self.register_buffer("strain_basis", torch.as_tensor(strain_basis(n), dtype=torch.float32))

    @torch.no_grad()
    def set_input_statistics(self, x: torch.Tensor, operations=None) -> None:
        """Store the per-voxel mean and standard deviation (floored at :data:`INPUT_STD_FLOOR`)
        of channel 0 of network inputs x (B, 2, n, n, n) (:func:`network_input` of the training
        set), used by :meth:`encode`; with ``operations`` (:func:`symmetry_operations`), those of
        the inputs and all their images (the moments' images averaged: no copies of x)."""
        x0 = x[:, 0]
        if not operations or len(operations) == 1:
            self.input_mean.copy_(x0.mean(0))
            self.input_std.copy_(x0.std(0, unbiased=False).clamp_min(INPUT_STD_FLOOR))
            return
        mean, second = x0.mean(0), (x0 * x0).mean(0)
        mean = torch.stack([_transform(mean, *op) for op in operations]).mean(0)
        second = torch.stack([_transform(second, *op) for op in operations]).mean(0)
        self.input_mean.copy_(mean)
        self.input_std.copy_((second - mean ** 2).clamp_min(0).sqrt().clamp_min(INPUT_STD_FLOOR))

    def architecture(self) -> dict:
        """The constructor's arguments (``n``, ``channels``, ``latent_dim``, ``phase_head``),
        saved with the weights in checkpoints and read back by :func:`load_model`."""
        return {"n": self.n, "channels": self.c, "latent_dim": self.to_z.out_features, "phase_head": self.phase_head}

    @torch.no_grad()
    def set_strain_scale(self, forms: torch.Tensor) -> None:
        """Store the root-mean-square entry (rad per voxel²) of the training strain forms
        (B, 6) (:func:`fit_strain_form`): the unit of k in the regressed ``M ≈ k kᵀ``."""
        self.strain_scale.copy_(forms.pow(2).mean().sqrt().clamp_min(1e-12))

    def strain_outer(self, z: torch.Tensor) -> torch.Tensor:
        """The regressed sign-free strain matrix M (B, 6, 6), symmetric, ≈ k kᵀ with k the
        strain form's six entries (:data:`STRAIN_TERMS`) in units of ``strain_scale``."""
        m = self.strain(z)
        iu = torch.triu_indices(6, 6, device=z.device)
        M = z.new_zeros(len(z), 6, 6)
        M[:, iu[0], iu[1]] = m
        return M + M.transpose(1, 2) - torch.diag_embed(torch.diagonal(M, dim1=1, dim2=2))

    def strain_form(self, z: torch.Tensor) -> torch.Tensor:
        """The strain form k (B, 6), rad per voxel² (:data:`STRAIN_TERMS`), up to its sign:
        ``M v / √(vᵀ M v)`` with v the top eigenvector of :meth:`strain_outer` (taken without
        gradient; for a rank-one M = k kᵀ this is ±k exactly, and it is differentiable in M);
        0 where M has no positive eigenvalue."""
        M = self.strain_outer(z)
        with torch.no_grad():
            v = torch.linalg.eigh(M)[1][..., -1]
        Mv = (M @ v[..., None])[..., 0]
        lam = (v * Mv).sum(-1)
        k = Mv / lam.clamp_min(1e-12).sqrt()[:, None]
        return torch.where((lam > 1e-12)[:, None], k, torch.zeros_like(k)) * self.strain_scale  # M ≤ 0: no strain

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x0 = (x[:, :1] - self.input_mean) / self.input_std * x[:, 1:2]  # 0 on unmeasured voxels
        return self.to_z(self.enc(torch.cat([x0, x[:, 1:2]], dim=1)).flatten(1))

    def decode(self, z: torch.Tensor):
        h = self.from_z(z).view(-1, 4 * self.c, self.bottom, self.bottom, self.bottom)
        out = self.head(self.dec(nn.functional.silu(h)))
        if self.phase_head == "strain":  # one of the two twin signs, chosen by complex_density
            return torch.sigmoid(out[:, 0]), torch.einsum("bt,txyz->bxyz", self.strain_form(z), self.strain_basis)
        return torch.sigmoid(out[:, 0]), math.pi * torch.tanh(out[:, 1])

    def forward(self, x: torch.Tensor):
        return self.decode(self.encode(x))

    def complex_density(self, z: torch.Tensor, sqrt_intensity: torch.Tensor | None = None,
                        measured: torch.Tensor | None = None) -> torch.Tensor:
        """The decoded complex densities (B, n, n, n) of latents z (B, D). The strain head
        needs the measured ``sqrt_intensity`` (B, n, n, n) and ``measured`` (bool,
        broadcastable): of ``ρ e^{+iφ}`` and ``ρ e^{−iφ}`` it returns, per object, the one
        with the lower :func:`physics_loss` (the choice without gradient). Given the
        amplitude the sign is not a twin ambiguity: ``ρ e^{−iφ}`` has the intensity I(−q),
        not I(q), unless ρ is centrosymmetric, and then the two are twins and equally good.
        Raises ValueError when the strain head gets no intensity."""
        amp, phi = self.decode(z)
        plus = torch.polar(amp, phi)
        if self.phase_head != "strain":
            return plus
        if sqrt_intensity is None or measured is None:
            raise ValueError("the strain phase head needs the measured intensity to choose its sign")
        minus = torch.polar(amp, -phi)
        with torch.no_grad():
            flip = physics_loss(minus, sqrt_intensity, measured) < physics_loss(plus, sqrt_intensity, measured)
        return torch.where(flip[:, None, None, None], minus, plus)


def network_input(intensity, measured) -> torch.Tensor:
    """The network's input (B, 2, n, n, n) float32 from intensities (B, n, n, n) (photons,
    negatives clipped) and ``measured`` (n, n, n) or (B, n, n, n) bool: channel 0
    ``log(1 + I) / log(1 + max I)`` on measured voxels, 0 elsewhere; channel 1 the mask.
    Raises ValueError for non-finite or all-zero intensities."""
    I = torch.as_tensor(np.asarray(intensity), dtype=torch.float32)
    if I.ndim == 3:
        I = I[None]
    m = torch.as_tensor(np.asarray(measured), dtype=torch.bool).expand(I.shape)
    if not torch.isfinite(I).all():
        raise ValueError("intensity contains NaN or infinite values")
    L = torch.log1p(I.clamp_min(0) * m)
    peak = L.flatten(1).amax(1)
    if not (peak > 0).all():
        raise ValueError("an intensity is zero on every measured voxel")
    return torch.stack([L / peak[:, None, None, None], m.float()], dim=1)


def far_field_modulus(density: torch.Tensor) -> torch.Tensor:
    """|F| (B, n, n, n) of complex densities (B, n, n, n) on the centred grid, up to the
    constant factor v: the sign and layout of :func:`spiflow.bragg.far_field`."""
    F = torch.fft.ifftn(torch.fft.ifftshift(density, dim=_AXES), dim=_AXES, norm="forward")
    return torch.fft.fftshift(F, dim=_AXES).abs()


def physics_loss(density: torch.Tensor, sqrt_intensity: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
    """Label-free loss (B,): ``‖k |F| − √I‖² / ‖√I‖²`` over ``measured`` voxels with the
    least-squares scale k per object (module docstring). density (B, n, n, n) complex,
    sqrt_intensity (B, n, n, n), measured broadcastable bool."""
    F = far_field_modulus(density)
    m = measured.float()
    k = (m * F * sqrt_intensity).sum(_AXES) / (m * F ** 2).sum(_AXES).clamp_min(1e-12)
    num = (m * (k[:, None, None, None] * F - sqrt_intensity) ** 2).sum(_AXES)
    return num / (m * sqrt_intensity ** 2).sum(_AXES).clamp_min(1e-12)


def supervised_loss(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Twin- and global-phase-invariant loss (B,) of complex predictions against complex
    truths (B, n, n, n) on the centred odd grid (module docstring)."""
    tw = torch.conj(torch.flip(truth, dims=_AXES))
    pp, tt = (pred.abs() ** 2).sum(_AXES), (truth.abs() ** 2).sum(_AXES).clamp_min(1e-12)
    best = torch.maximum((torch.conj(truth) * pred).sum(_AXES).abs(), (torch.conj(tw) * pred).sum(_AXES).abs())
    return (pp + tt - 2 * best) / tt


def amplitude_loss(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Twin-invariant loss (B,) of real amplitudes (B, n, n, n) on the centred odd grid (the
    strain head's amplitude): ``min(‖p − ρ‖², ‖p − ρ(−r)‖²) / ‖ρ‖²``."""
    tt = (truth ** 2).sum(_AXES).clamp_min(1e-12)
    a = ((pred - truth) ** 2).sum(_AXES)
    b = ((pred - torch.flip(truth, dims=_AXES)) ** 2).sum(_AXES)
    return torch.minimum(a, b) / tt


def strain_loss(model: "AE3D", z: torch.Tensor, forms: torch.Tensor) -> torch.Tensor:
    """Sign-free loss (B,) of the strain head: ``‖M − k kᵀ‖²_F / 36`` with M
    (:meth:`AE3D.strain_outer`) and k the true forms (B, 6) (:func:`fit_strain_form`) in
    units of ``model.strain_scale``. k kᵀ is the same for k and −k: the network need not choose
    the twin's sign, which no continuous function of the intensity can do for forms of either
    sign (the nonzero forms modulo ±1, a projective space, have no continuous choice of sign)."""
    k = forms / model.strain_scale
    target = k[:, :, None] * k[:, None, :]
    return ((model.strain_outer(z) - target) ** 2).mean((1, 2))


def _fingerprint(cfg: AE3DSettings, seed: int) -> str:
    keep = cfg.model_dump(exclude={"epochs", "n_test", "finetune_epochs", "refine_iterations", "tracking"})
    return hashlib.sha1(json.dumps({"settings": keep, "seed": int(seed)}, sort_keys=True).encode()).hexdigest()


def _lr_lambda(total_steps: int):
    return lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def train_ae3d(cfg: AE3DSettings, train, seed: int, checkpoint_path=None, log_path=None,
               device: str | torch.device = "cpu", progress: bool = False, max_epochs: int | None = None):
    """Train :class:`AE3D` on ``train``, a :class:`spiflow.bragg.CrystalSet` (intensity,
    measured, amplitude, phase), for ``cfg.epochs`` epochs (module docstring).

    checkpoint_path: resume from it when its fingerprint matches, write it every epoch;
    log_path: CSV of :data:`LOG_COLUMNS` (one row per epoch: mean losses, learning rate at
    the epoch's end, wall seconds). max_epochs: stop after this many epochs in this call (as an
    interruption would; the learning-rate schedule still spans ``cfg.epochs``). Returns ``(model (eval mode, on device), log DataFrame)``.
    Raises ValueError for a grid the network cannot take."""
    dev = torch.device(device)
    torch.manual_seed(derived_seed(seed, 0))
    model = AE3D(cfg.crystals.n, cfg.channels, cfg.latent_dim, cfg.phase_head).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_obj = len(train.intensity)
    steps_per_epoch = math.ceil(n_obj / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.epochs * steps_per_epoch))
    fp = _fingerprint(cfg, seed)
    start, ckpt = 0, load_checkpoint(checkpoint_path, fp)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = int(ckpt["epoch"])
    log = RunLog(log_path, LOG_COLUMNS, ckpt, key="epoch")
    x_all = network_input(train.intensity, train.measured)
    ops = symmetry_operations(train.measured) if cfg.augment else [((0, 1, 2), (1, 1, 1))]
    strain = cfg.phase_head == "strain"
    forms = torch.as_tensor(fit_strain_form(train.amplitude, train.phase), dtype=torch.float32) if strain else None
    if ckpt is None:  # statistics over the training inputs and their images under the operations
        model.set_input_statistics(x_all.to(dev), ops)
        if strain:
            model.set_strain_scale(forms.to(dev))
    sqrt_I = torch.as_tensor(np.sqrt(np.clip(train.intensity, 0, None)), dtype=torch.float32)
    meas = torch.as_tensor(np.asarray(train.measured), dtype=torch.bool)
    truth = torch.polar(torch.as_tensor(train.amplitude, dtype=torch.float32),
                        torch.as_tensor(train.phase, dtype=torch.float32))
    stop = cfg.epochs if max_epochs is None else min(cfg.epochs, start + max_epochs)
    for epoch in range(start, stop):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n_obj, generator=torch.Generator().manual_seed(derived_seed(seed, epoch + 1)))
        sums = np.zeros(3)
        pick = torch.randint(len(ops), (steps_per_epoch,),
                             generator=torch.Generator().manual_seed(derived_seed(seed, epoch + 1, 1)))
        for step, b0 in enumerate(range(0, n_obj, cfg.batch_size)):
            idx = order[b0:b0 + cfg.batch_size]
            (xb, tb, sb), fb = apply_symmetry(ops[int(pick[step])], [x_all[idx], truth[idx], sqrt_I[idx]],
                                              forms[idx] if strain else None)
            xb, tb, sb = xb.to(dev), tb.to(dev), sb.to(dev)
            z = model.encode(xb)
            pred = model.complex_density(z, sb, meas.to(dev))
            if strain:
                sup = (amplitude_loss(pred.abs(), tb.abs()) + cfg.strain_weight * strain_loss(model, z, fb.to(dev))).mean()
            else:
                sup = supervised_loss(pred, tb).mean()
            phys = physics_loss(pred, sb, meas.to(dev)).mean()
            loss = sup + cfg.physics_weight * phys
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += len(idx) * np.array([loss.item(), sup.item(), phys.item()])
        sums /= n_obj
        row = log.append({"epoch": epoch + 1, "loss": sums[0], "supervised": sums[1], "physics": sums[2],
                          "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0})
        if progress:
            print(row, flush=True)
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, {"epoch": epoch + 1, "model": model.state_dict(),
                                              "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                              "fingerprint": fp, "log_rows": log.state(), **model.architecture()})
    return model.eval(), log.frame()


def load_model(checkpoint_path, device: str | torch.device = "cpu") -> AE3D:
    """The trained :class:`AE3D` of an ae3d checkpoint (its ``n``, ``channels``,
    ``latent_dim``, weights and input statistics), in eval mode. Raises FileNotFoundError, or
    ValueError naming the file when it is not an ae3d checkpoint or holds a network trained
    before the input standardisation (no ``input_mean``)."""
    p = Path(checkpoint_path)
    if not p.is_file():
        raise FileNotFoundError(f"ae3d checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        model = AE3D(int(ckpt["n"]), int(ckpt["channels"]), int(ckpt["latent_dim"]),
                     str(ckpt.get("phase_head", "convolutional")))
        if "input_mean" not in ckpt["model"]:
            raise ValueError(f"{p} holds a network trained without input standardisation (spiflow before the "
                             f"fix of its collapse, README 'Direct ML phasing'): retrain it")
        model.load_state_dict(ckpt["model"])
    except ValueError as exc:
        if str(p) in str(exc):
            raise
        raise ValueError(f"{p} is not an ae3d checkpoint: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        raise ValueError(f"{p} is not an ae3d checkpoint: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval()


def _sqrt_intensity(intensity) -> torch.Tensor:
    """√I (B, n, n, n) float32 of intensities (B, n, n, n) or (n, n, n), negatives clipped."""
    sqrt_I = torch.as_tensor(np.sqrt(np.clip(np.asarray(intensity, dtype=np.float32), 0, None)))
    return sqrt_I[None] if sqrt_I.ndim == 3 else sqrt_I


@torch.no_grad()
def predict(model: AE3D, intensity, measured, batch_size: int = 16) -> np.ndarray:
    """Complex densities (B, n, n, n) complex64 (amplitude ρ ∈ [0, 1], phase rad) of the
    intensities (B, n, n, n) or (n, n, n) (photons) with ``measured`` (n, n, n) bool."""
    model.eval()
    dev = next(model.parameters()).device
    x = network_input(intensity, measured)
    if x.shape[-1] != model.n:
        raise ValueError(f"the network takes {model.n}^3 volumes, got {tuple(x.shape[-3:])}")
    sqrt_I = _sqrt_intensity(intensity)
    meas = torch.as_tensor(np.asarray(measured), dtype=torch.bool).to(dev)
    out = []
    for b0 in range(0, len(x), batch_size):
        z = model.encode(x[b0:b0 + batch_size].to(dev))
        out.append(model.complex_density(z, sqrt_I[b0:b0 + batch_size].to(dev), meas).cpu())
    return torch.cat(out).numpy().astype(np.complex64)


def finetune(model: AE3D, intensity, measured, epochs: int, lr: float, batch_size: int = 16, seed: int = 0):
    """Label-free adaptation (AutoPhaseNN): ``epochs`` passes of Adam (``lr``) on the physics
    loss alone over the intensities (B, n, n, n) with ``measured``; no truth is used. Returns
    the list of mean physics losses per epoch (the model is updated in place, left in eval
    mode)."""
    dev = next(model.parameters()).device
    x = network_input(intensity, measured)
    sqrt_I = _sqrt_intensity(intensity)
    meas = torch.as_tensor(np.asarray(measured), dtype=torch.bool).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(derived_seed(seed, epoch)))
        total = 0.0
        for b0 in range(0, len(x), batch_size):
            idx = order[b0:b0 + batch_size]
            sb = sqrt_I[idx].to(dev)
            loss = physics_loss(model.complex_density(model.encode(x[idx].to(dev)), sb, meas), sb, meas).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
    model.eval()
    return losses


def refine(prediction, intensity, measured, iterations: int, threshold: float = 0.2):
    """Network + refinement: ``iterations`` ER iterations (support fixed: the predicted
    amplitude blurred by 1 voxel above ``threshold`` of its maximum) started from the
    network's complex ``prediction`` (n, n, n), with :func:`spiflow.phasing.phase_complex`.
    Returns its :class:`~spiflow.phasing.ComplexPhasingResult`."""
    from .phasing import phase_complex
    cfg = PhasingSettings(positivity=False, schedule=f"ER:{max(1, iterations)}", n_cycles=1, final_er=0,
                          shrinkwrap_every=0, n_restarts=1, n_average=1, sigma_end=1.0,
                          shrinkwrap_threshold=threshold)
    return phase_complex(intensity, cfg, measured=measured, start=prediction)


# support-only HIO/ER with shrinkwrap for complex objects (measured on the crystals of
# spiflow.bragg: σ 1.5 → 1 voxel and threshold 0.2 suit their sharp facets)
ITERATIVE_SETTINGS = PhasingSettings(positivity=False, schedule="HIO:50,ER:10", n_cycles=4, final_er=30,
                                     n_restarts=4, n_average=1, shrinkwrap_every=10, sigma_start=1.5,
                                     sigma_end=1.0, shrinkwrap_threshold=0.2)
# the same with RAAR (β 0.87, PhasingSettings' default; Luke 2005) in place of HIO: on the
# default held-out crystals 4 cycles x 4 restarts reach a median complex error of 0.038
# against HIO/ER's 0.111 (README, "network + RAAR/ER"), so both are baselines
RAAR_SETTINGS = ITERATIVE_SETTINGS.model_copy(update={"schedule": "RAAR:50,ER:10"})
ITERATIVE_BASELINES = dict(zip(ITERATIVE_ALGORITHMS, (ITERATIVE_SETTINGS, RAAR_SETTINGS)))


def refine_cycle(prediction, intensity, measured, settings: PhasingSettings):
    """Network + one iterative cycle: ``settings``' schedule once with its shrinkwrap
    (σ ``sigma_start`` → ``sigma_end``), then its ``final_er`` ER iterations, started from
    the network's complex ``prediction`` (n, n, n) (first support: its amplitude blurred by
    ``sigma_end`` and thresholded at ``shrinkwrap_threshold``; :func:`spiflow.phasing.phase_complex`
    with ``start``; ``n_restarts`` is ignored) against ``intensity`` (n, n, n) photons with
    ``measured`` (n, n, n) bool. Returns its :class:`~spiflow.phasing.ComplexPhasingResult`
    (density in the units of √intensity per voxel). Raises ValueError as ``phase_complex``
    (shapes, non-finite values, positivity on)."""
    from .phasing import phase_complex
    return phase_complex(intensity, settings.model_copy(update={"n_cycles": 1, "n_restarts": 1, "n_average": 1}),
                         measured=measured, start=prediction)


#: (cycles, restarts) of the iterative phasing from random starts that :func:`compare_methods`
#: times against the network, from one cycle of one run to RAAR/ER's best on the default
#: held-out crystals (4 × 4: README, "Network + RAAR/ER")
ITERATIVE_BUDGETS = ((1, 1), (1, 4), (2, 4), (4, 4))


def iterative_method(name: str, cycles: int, restarts: int) -> str:
    """The name of a :func:`compare_methods` row of iterative phasing ``name`` (a key of
    :data:`ITERATIVE_BASELINES`) from random starts with that budget."""
    return f"iterative {name} {cycles} cycles x {restarts} restarts"


def network_method(name: str) -> str:
    """The name of a :func:`compare_methods` row of the network followed by one cycle of the
    iterative phasing ``name`` (a key of :data:`ITERATIVE_BASELINES`)."""
    return f"network+{name}"


#: the rows shown in the slice figures (:func:`plot_complex_slices`): the truth, the network
#: alone, network + RAAR/ER and iterative RAAR/ER at the largest of ITERATIVE_BUDGETS
SLICES_METHODS = ("truth", "network", network_method("RAAR/ER"),
                  iterative_method("RAAR/ER", *max(ITERATIVE_BUDGETS, key=lambda b: b[0] * b[1])))


def compare_methods(model: AE3D, test, refine_iterations: int, iterative: dict | None = None,
                    budgets=ITERATIVE_BUDGETS, progress: bool = False, slices: dict | None = None):
    """Per held-out object of ``test`` (a :class:`spiflow.bragg.CrystalSet`) the errors
    (:func:`spiflow.bragg.complex_errors` against the truth, with the measured intensity) and
    wall seconds of: ``network`` (:func:`predict`, one object at a time); ``network+ER<N>``
    (:func:`refine` with ``refine_iterations``); for each ``NAME: settings`` of ``iterative``
    (default :data:`ITERATIVE_BASELINES`: ``HIO/ER`` and ``RAAR/ER``) ``network+NAME``
    (:func:`refine_cycle`: one cycle from the network's output) and ``iterative NAME K cycles x
    R restarts`` (:func:`spiflow.phasing.phase_complex` from random starts, seed = object
    index, ``n_cycles = K``, ``n_restarts = R`` for each (K, R) of ``budgets``). The seconds
    of the network's variants include the network's. slices: a dict to receive object 0's
    densities (``truth`` and one per method, aligned onto the truth by
    :func:`spiflow.bragg.align_complex`), e.g. for :func:`plot_complex_slices`. Returns a
    DataFrame: object, method, seconds, then the error columns."""
    import pandas as pd

    from .phasing import phase_complex
    iterative = ITERATIVE_BASELINES if iterative is None else iterative
    rows = []
    for i in range(len(test.intensity)):
        I, m = test.intensity[i], test.measured
        truth = test.amplitude[i].astype(np.float64) * np.exp(1j * test.phase[i].astype(np.float64))
        first = len(rows)

        def record(method, seconds, density):
            e = bragg.complex_errors(density, truth, test.grid, I, m)
            if slices is not None and i == 0:
                slices.setdefault("truth", truth)
                slices[method] = bragg.align_complex(density, truth)[0]
            rows.append({"object": i, "method": method, "seconds": seconds, **e})

        t0 = time.perf_counter()
        pred = predict(model, I, m)[0]
        t_net = time.perf_counter() - t0
        record("network", t_net, pred)
        t0 = time.perf_counter()
        ref = refine(pred, I, m, refine_iterations)
        record(f"network+ER{refine_iterations}", t_net + time.perf_counter() - t0, ref.density)
        for name, settings in iterative.items():
            t0 = time.perf_counter()
            ref = refine_cycle(pred, I, m, settings)
            record(network_method(name), t_net + time.perf_counter() - t0, ref.density)
        for name, settings in iterative.items():
            for k, r in budgets:
                t0 = time.perf_counter()
                it = phase_complex(I, settings.model_copy(update={"n_cycles": int(k), "n_restarts": int(r)}),
                                   measured=m, seed=i)
                record(iterative_method(name, k, r), time.perf_counter() - t0, it.density)
        if progress:
            print(pd.DataFrame(rows[first:])[["method", "seconds", "complex_error"]].to_string(), flush=True)
    return pd.DataFrame(rows)


def summarize(table):
    """Per method of :func:`compare_methods`' table: medians of the errors and seconds,
    then for each method whose name starts with ``network`` the row ``iterative to METHOD
    error (time ratio)``: per object the seconds of the cheapest iterative row (any
    algorithm and budget) whose complex error is at most the method's, divided by the
    method's seconds (median over the objects that reach it; ``objects`` counts them; NaN
    seconds if none does)."""
    import pandas as pd
    cols = ["complex_error", "phase_rmse_rad", "amplitude_fsc_mean", "fourier_error", "seconds"]
    out = table.groupby("method", sort=False)[cols].median().reset_index()
    out.insert(1, "objects", table.groupby("method", sort=False).size().values)
    its = table[table["method"].str.startswith("iterative")]
    speed = []
    for method in out["method"]:
        if not method.startswith("network"):
            continue
        net = table[table["method"] == method].set_index("object")
        ratios = []
        for obj, grp in its.groupby("object"):
            if obj not in net.index:
                continue
            ok = grp[grp["complex_error"] <= net.loc[obj, "complex_error"]]
            if len(ok):
                ratios.append(ok["seconds"].min() / net.loc[obj, "seconds"])
        speed.append({"method": f"iterative to {method} error (time ratio)", "objects": len(ratios),
                      "seconds": float(np.median(ratios)) if ratios else float("nan")})
    return pd.concat([out, pd.DataFrame(speed)], ignore_index=True)


def read_intensity_volume(path):
    """A user's intensity volume: ``(I (n, n, n) float64, dq Å⁻¹ or None)`` from an MRC map
    (``.mrc``/``.map``, :func:`spiflow.stores.read_mrc`; its voxel size taken as Δq) or a
    ``.npy`` array (no Δq). Raises FileNotFoundError, or ValueError naming the file for another
    format, a volume that is not 3D and cubic, non-finite or negative values."""
    from .stores import read_mrc
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"intensity volume not found: {p}")
    suffix = p.suffix.lower()
    if suffix in (".mrc", ".map"):
        vol = read_mrc(p)
        I, dq = np.asarray(vol.volume, dtype=np.float64), float(vol.voxel_size[0])
    elif suffix == ".npy":
        try:
            I, dq = np.asarray(np.load(p, allow_pickle=False), dtype=np.float64), None
        except (ValueError, OSError) as exc:
            raise ValueError(f"intensity volume {p}: cannot read it as .npy: {exc}") from exc
    else:
        raise ValueError(f"intensity volume {p}: unsupported format {suffix or '(none)'!r}; give an MRC map "
                         f"(.mrc, .map) or a NumPy array (.npy)")
    if I.ndim != 3 or len(set(I.shape)) != 1:
        raise ValueError(f"intensity volume {p}: must be a cubic 3D volume (n, n, n), got shape {I.shape}")
    if not np.isfinite(I).all():
        raise ValueError(f"intensity volume {p}: contains NaN or infinite values")
    if (I < 0).any():
        raise ValueError(f"intensity volume {p}: {(I < 0).sum()} negative values (min {I.min():g}); "
                         f"an intensity is |F|^2 >= 0")
    return I, (dq if dq and dq > 0 else None)


def phase_volume(intensity_path, checkpoint_path, out_prefix, refine_iterations: int = 0,
                 refine_algorithm: str | None = None, device: str | torch.device = "cpu") -> dict:
    """``spiflow ae3d-phase``: phase the intensity volume at ``intensity_path``
    (:func:`read_intensity_volume`; every voxel measured, Bragg peak or q = 0 at the centre
    voxel n // 2) with the network of ``checkpoint_path`` (:func:`load_model`), optionally
    followed by ``refine_iterations`` ER iterations (:func:`refine`) or, with
    ``refine_algorithm`` (a key of :data:`ITERATIVE_BASELINES`: "HIO/ER", "RAAR/ER"), one
    cycle of that iterative phasing (:func:`refine_cycle`; not both), and write
    ``OUT.zarr`` (:func:`spiflow.stores.write_complex_density`), ``OUT_amplitude.mrc`` and
    ``OUT_phase.mrc`` (:func:`spiflow.stores.write_mrc`; voxel ``1 / (n Δq)`` Å from an
    MRC's Δq, 1 (voxels) for .npy). The amplitude is scaled to a maximum of 1 and the phase
    is in radians. A real-valued density (SPI) is the special case φ = 0. Returns the paths
    written. Raises ValueError naming the file for bad input or a volume of another size
    than the network's, or for an unknown ``refine_algorithm`` or both refinements."""
    from .grid import Grid
    from .stores import write_complex_density, write_mrc
    if refine_algorithm is not None and refine_algorithm not in ITERATIVE_BASELINES:
        raise ValueError(f"refine algorithm {refine_algorithm!r}: expected one of {sorted(ITERATIVE_BASELINES)}")
    if refine_algorithm is not None and refine_iterations:
        raise ValueError("choose one refinement: ER iterations or an iterative algorithm, not both")
    I, dq = read_intensity_volume(intensity_path)
    model = load_model(checkpoint_path, device)
    n = I.shape[0]
    if n != model.n:
        raise ValueError(f"intensity volume {intensity_path}: {n}^3 voxels, but the network of {checkpoint_path} "
                         f"takes {model.n}^3")
    measured = np.ones(I.shape, dtype=bool)
    d = predict(model, I, measured)[0]
    if refine_iterations:
        d = refine(d, I, measured, refine_iterations).density
    elif refine_algorithm is not None:
        d = refine_cycle(d, I, measured, ITERATIVE_BASELINES[refine_algorithm]).density
    amp = np.abs(d)
    amp = amp / max(float(amp.max()), 1e-30)
    phi = np.angle(d)
    grid = Grid(n, dq if dq else 1.0 / n)
    out = Path(str(out_prefix))
    paths = {"zarr": out.with_name(out.name + ".zarr"), "amplitude_mrc": out.with_name(out.name + "_amplitude.mrc"),
             "phase_mrc": out.with_name(out.name + "_phase.mrc")}
    write_complex_density(paths["zarr"], amp, phi, grid, {"intensity_path": str(intensity_path),
                                                          "checkpoint": str(checkpoint_path),
                                                          "refine_iterations": int(refine_iterations),
                                                          "refine_algorithm": refine_algorithm,
                                                          "voxel_unit": "angstrom" if dq else "voxel"})
    write_mrc(paths["amplitude_mrc"], amp, grid.voxel_size)
    write_mrc(paths["phase_mrc"], phi, grid.voxel_size)
    return paths


# ---------------------------------------------------------------------------- workflow stages

def stage_simulate(config: dict, train_intensity, train_truth, test_intensity, test_truth) -> None:
    """rule ae3d_simulate: ``ae3d.n_train`` crystals (seed ``dataset.seed``) and ``ae3d.n_test``
    held-out ones (seed + 1) of ``ae3d.crystals``, each as an intensity store and a truth store
    (:func:`spiflow.bragg.write_crystal_set`, Zarr chunks of ``dataset.chunk_frames`` objects)."""
    from .settings import CrystalsSettings
    cr = CrystalsSettings.model_validate(config["ae3d"]["crystals"])
    seed, chunk = config["dataset"]["seed"], config["dataset"]["chunk_frames"]
    for n, s, paths in [(config["ae3d"]["n_train"], seed, (train_intensity, train_truth)),
                        (config["ae3d"]["n_test"], seed + 1, (test_intensity, test_truth))]:
        t0 = time.perf_counter()
        cs = bragg.simulate_crystals(cr, n, s)
        bragg.write_crystal_set(cs, *paths, chunk, {"seed": s, "crystals": json.dumps(cr.model_dump()),
                                                    "wall_seconds": time.perf_counter() - t0})


def stage_train(config: dict, train_intensity, train_truth, model_path, log_csv, checkpoint) -> None:
    """rule ae3d_train: :func:`train_ae3d` on the training stores (resumable from
    ``checkpoint``), then the trained network at ``model_path`` (read by :func:`load_model`)."""
    from .io import resolve_device
    cfg = AE3DSettings.model_validate(config["ae3d"])
    cs = bragg.read_crystal_set(train_intensity, train_truth)
    model, _ = train_ae3d(cfg, cs, config["dataset"]["seed"], checkpoint, log_csv,
                          device=resolve_device(config["device"]))
    save_checkpoint(model_path, {"model": model.cpu().state_dict(), **model.architecture(),
                                 "fingerprint": _fingerprint(cfg, config["dataset"]["seed"])})


def stage_evaluate(config: dict, test_intensity, test_truth, model_path, results_csv, results_md,
                   slices_png) -> None:
    """rule ae3d_evaluate: :func:`compare_methods` on the held-out stores (network alone,
    network + ``ae3d.refine_iterations`` ER, network + one HIO/ER and one RAAR/ER cycle,
    iterative phasing with both from random starts), plus, with
    ``ae3d.finetune_epochs`` > 0, the network after label-free :func:`finetune` on the
    held-out intensities (lr ``ae3d.lr`` / 10; no truth used); the table and its
    :func:`summarize` (markdown, with the 1-minute load average); central slices of the first
    object's :data:`SLICES_METHODS` (:func:`plot_complex_slices`) at ``slices_png``."""
    import copy
    import os

    from .io import atomic_path
    cfg = AE3DSettings.model_validate(config["ae3d"])
    test = bragg.read_crystal_set(test_intensity, test_truth)
    model = load_model(model_path)
    slices: dict = {}
    table = compare_methods(model, test, cfg.refine_iterations, slices=slices)
    plot_complex_slices({k: slices[k] for k in SLICES_METHODS if k in slices}, slices_png)
    if cfg.finetune_epochs:
        import pandas as pd
        tuned = copy.deepcopy(model)
        t0 = time.perf_counter()
        finetune(tuned, test.intensity, test.measured, cfg.finetune_epochs, cfg.lr / 10)
        per = (time.perf_counter() - t0) / len(test.intensity)
        pred = predict(tuned, test.intensity, test.measured)
        rows = []
        for i, p in enumerate(pred):
            truth = test.amplitude[i].astype(np.float64) * np.exp(1j * test.phase[i].astype(np.float64))
            rows.append({"object": i, "method": "network fine-tuned (label-free)", "seconds": per,
                         **bragg.complex_errors(p, truth, test.grid, test.intensity[i], test.measured)})
        table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    with atomic_path(results_csv) as tmp:
        table.to_csv(tmp, index=False)
    text = (f"# ae3d vs iterative phasing ({len(test.intensity)} held-out crystals, n = {test.grid.n})\n\n"
            f"1-minute load average at the end: {os.getloadavg()[0]:.1f}\n\n"
            + summarize(table).to_markdown(index=False, floatfmt=".3g") + "\n")
    with atomic_path(results_md) as tmp:
        Path(tmp).write_text(text)


def plot_complex_slices(volumes: dict, path) -> None:
    """Central slices (z = 0 and x = 0 planes) of complex densities, one row per entry of
    ``volumes`` (label → (n, n, n) complex, already aligned): amplitude (scaled to its
    maximum) and phase in radians (shown where the amplitude exceeds 10 % of its maximum).
    Written as a PNG at ``path`` (:func:`spiflow.plots.save_figure`). Raises ValueError for
    an empty dict or volumes of different shapes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import save_figure
    if not volumes or len({np.shape(v) for v in volumes.values()}) != 1:
        raise ValueError("plot_complex_slices needs one or more volumes of one shape")
    fig = Figure(figsize=(8.0, 2.0 * len(volumes) + 0.4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(volumes), 4, squeeze=False)
    for row, (label, v) in enumerate(volumes.items()):
        v = np.asarray(v)
        c = v.shape[0] // 2
        for k, (sec, plane) in enumerate([(v[:, :, c], "z = 0"), (v[c], "x = 0")]):
            amp = np.abs(sec) / max(float(np.abs(v).max()), 1e-30)
            ph = np.where(amp > 0.1, np.angle(sec), np.nan)
            a = axes[row, 2 * k].imshow(amp.T, origin="lower", cmap="gray_r", vmin=0, vmax=1)
            p = axes[row, 2 * k + 1].imshow(ph.T, origin="lower", cmap="twilight", vmin=-np.pi, vmax=np.pi)
            axes[row, 2 * k].set_title(f"{label}\namplitude, {plane}", fontsize=7)
            axes[row, 2 * k + 1].set_title(f"phase (rad), {plane}", fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(a, ax=axes[:, 0].tolist(), shrink=0.6, location="left")
    fig.colorbar(p, ax=axes[:, -1].tolist(), shrink=0.6)
    save_figure(fig, path)
