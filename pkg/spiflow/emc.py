"""Expand–maximise–compress (EMC) orientation recovery and 3D merging, in PyTorch.

References: N. D. Loh & V. Elser, PRE 80, 026705 (2009) (the algorithm); K. Ayyer et al.,
J. Appl. Cryst. 49, 1320 (2016) (Dragonfly: per-frame scale factors, deterministic
annealing with β). Runs unchanged on CPU or CUDA.

Model. Pixel p of frame i at sampled orientation r expects ``μ_irp = φ_i s_p W(R_rᵀ q_p)``
photons: ``s_p`` the pixel factor (solid angle × polarisation), ``φ_i`` the frame's gain
(mean 1 over the data set), ``W`` the intensity on a :class:`~spiflow.grid.Grid` read by
trilinear slicing. Only valid pixels count. One iteration:

* expand / E-step: ``L_ri = Σ_{p∈O} [K_ip log μ_irp − μ_irp]`` (Poisson, log K! dropped)
  over the *orientation pixels* O: the valid pixels at ``|q| ≥ orientation_min_radius_voxels
  · dq``. The central speckle holds most photons but encodes little beyond the particle's
  inertia ellipsoid, whose near-D2 symmetry traps EMC in symmetric mixtures; like
  Dragonfly's detector mask value 1 (Ayyer et al. 2016, "used for merging, not for
  orientation determination"), those pixels are merged but do not vote on orientations,
  ``P_ri = w_r exp(β L_ri) / Σ_r' w_r' exp(β L_r'i)`` (w_r the SO(3) quadrature weights
  of :func:`spiflow.sampling.so3_sampling`, log-sum-exp over r);
* gain (Dragonfly's scaling update): ``φ_i = Σ_p K_ip / Σ_r P_ri Σ_p s_p W_rp`` with the
  current W over all valid pixels, then φ is divided by its mean and W multiplied by it;
* maximise + compress (all valid pixels): ``W = F[Σ_r merge_r(Σ_i P_ri K_ip)] / F[Σ_r merge_r(s_p Σ_i P_ri φ_i)]``
  with the new φ, ``merge_r`` the trilinear adjoint of slicing at ``R_rᵀ q_p`` and ``F``
  :func:`spiflow.grid.friedel_symmetrize` (numerator and denominator are symmetrised
  *before* dividing, so W is Friedel symmetric); W = 0 where the denominator is 0.

Slicing and merging use torch's fused trilinear kernels (``grid_sample`` and its input
gradient), 5–10× faster than :func:`spiflow.grid.slice_volume` / :func:`~spiflow.grid.merge_into`
and equal to them (same weights, corners outside the grid read 0; tested).

The frames × orientations matrices are built one frame block at a time (block size from
``memory_budget_gb``) and one orientation chunk at a time inside (slices of ``chunk ×
valid pixels``); frames × orientations × pixels is never formed. Photons are read block by
block as ``photons[i0:i1]`` so a Zarr array larger than memory streams from disk.

Resolution marching (``EMCSettings.resolution_start``, ``resolution_iterations``): iteration t
uses only the valid pixels with ``|q| <= f_t · q_top`` (:meth:`EMCSettings.resolution_fraction`)
in the E-step, the gain update and the merge; the orientation pixels are sorted by |q| so
those are a prefix of them; voxels no included pixel reaches keep their previous value.

Coarse-to-fine search (``EMCSettings.search = "coarse_to_fine"``): the E-step first
evaluates every frame at the coarse sampling ``coarse_num_div`` (at the pixels up to
``coarse_num_div / num_div`` of the radius and at :data:`COARSE_BETA_FACTOR` · β), keeps
for each frame the most probable coarse rotations holding ``search_mass`` of that
posterior plus their neighbours (:func:`spiflow.sampling.coarse_to_fine`), and evaluates
only the fine rotations in the nearest-neighbour cells of those. The kept (fine rotation,
frame) pairs are a sparse pattern: their log-likelihoods are the pattern's entries of
``log S_o @ K_oᵀ``, computed coarse cell by coarse cell (the cell's fine rotations against
the frames that keep it are a dense block of the pattern: one small product, each photon
row read once per block; :func:`spiflow.slicing_cpu.block_products` on CPU, measured 4× faster
than ``torch.sparse.sampled_addmm``), so no likelihood outside a frame's cells is computed. ``P_ri`` is normalised over the kept pairs
and the gain update uses it; the merge takes the pairs with ``P_ri >=``
:data:`MERGE_MIN_PROBABILITY` as a sparse × dense product ``P K`` and merges only the
rotations that hold one (at β ≈ 1 a few per frame), and voxels that none of them reaches
keep their previous value. The coarse mass left out plus the fine mass below that
threshold is logged as ``neglected_mass`` (the frame mean; an estimate: the fine
posterior outside the cells is not computed). A frame block whose kept pairs exceed
:data:`COARSE_TO_FINE_MAX_FRACTION` of all (a broad posterior, low β) is searched
exhaustively. The log's ``orientations_per_frame`` counts the likelihoods evaluated per
frame (coarse + fine), ``support_per_frame`` the fine rotations kept per frame.

Multi-model EMC (``EMCSettings.models`` K > 1; Dragonfly's "modes", Ayyer et al. 2016):
K models W_k. In the exhaustive E-step the log-likelihoods of all (model, rotation) pairs
are columns ``k M : (k + 1) M`` of one (b, K M) matrix (one :meth:`_Engine._loglik` call per
model), normalised jointly with the prior ``w_r / K``; the gain update sums over both, and
model k is merged with its columns of the posterior (one :meth:`_Engine._merge` per model).
Work buffers grow K-fold: the frame block shrinks to keep ``memory_budget_gb``. The
coarse-to-fine search is single-model (a settings error for K > 1). Local refinement
refines every frame against its most probable model (:func:`_local_models`). The result's
models are ordered by particle size (:func:`model_size_order`).

Photon formats (``EMCSettings.photon_format``). *dense*: a block is a (frames × valid pixels)
matrix K and the E-step and merge are dense matmuls, ``log S_o @ K_oᵀ`` and ``P @ K``
(cost ∝ frames × orientations × pixels). *sparse*: like Dragonfly's photons files, each
frame keeps only its pixels with K_ip > 0 (compressed sparse rows), and
``Σ_{p∈O: K_ip>0} K_ip log W_rp`` and ``Σ_i P_ri K_ip`` are sparse × dense products (cost ∝
orientations × non-zero pixels, :data:`SPARSE_PRODUCT_COLUMNS` rotations at a time), far
cheaper at low photon counts. Both give the same result to floating-point rounding (the
same sums in a different order).

The exhaustive E-step's posterior of a block (prior, normalisation, log P, the statistics,
the gain denominators and the merge cut; :meth:`_Engine._posterior`) is one numba kernel
on CPU that reads each frame's row five times while it sits in cache
(:func:`spiflow.slicing_cpu.posterior_rows`), and torch operations elsewhere.
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .align import align_intensity_rotation, rotate_volume
from .distributed import FrameRange, Ranks, frame_ranges, photon_chunk, setup
from .grid import Grid, friedel_symmetrize, slice_volume
from .io import (RunLog, data_digest, load_checkpoint, resolve_device, save_checkpoint,
                 validate_detector_inputs)
from .rotation import canonical, matrix_to_quaternion, quaternion_to_matrix
from .refine import LocalResult, local_iteration, refine_steps_deg
from .sampling import coarse_to_fine, n_orientations, so3_sampling
from .settings import EMCSettings
from . import slicing_cpu
from .slicing import merge_ratio, merge_rotated, slice_rotated

log = logging.getLogger(__name__)
LOG_COLUMNS = ["iteration", "start", "beta", "log_likelihood", "rms_change", "mutual_info",
               "mean_max_probability", "gain_std", "seconds", "step_deg", "moved_fraction",
               "neglected_mass", "orientations_per_frame", "support_per_frame", "q_radius"]
#: photon_format "auto" uses sparse blocks when at most this fraction of (frame, orientation
#: pixel) entries is non-zero (benchmarks/README.md: on CPU, with the numba kernels, sparse
#: was faster at 9 % non-zero, dense at 20 %).
AUTO_SPARSE_DENSITY = 0.1
#: sparse photons: the sparse × dense products of the E-step and the merge take at most this
#: many rotations at a time. On 2 CPU cores (torch 2.13, MKL) the merge's ``Kᵀ P`` per 1,024
#: rotations took 0.034 s in blocks of 256, 0.062 s in one block of 1,024 and 0.129 s in
#: blocks of 2,048 (the default orientation_chunk), on the 300-photon benchmark's data.
SPARSE_PRODUCT_COLUMNS = 256
#: coarse-to-fine search: the coarse E-step uses the pixels up to ``coarse_num_div / num_div``
#: of the iteration's q radius (the angular sampling a resolution needs grows linearly with
#: it, Loh & Elser 2009) and the tempered ``COARSE_BETA_FACTOR · β``: a coarse rotation lies up
#: to the coarse covering radius from a frame's orientation, so its likelihood is a
#: blurred guide. Measured on the default data with a converged model (3,000 frames, β 1,
#: num_div 10 over 5): the fine orientation of largest posterior equals the exhaustive
#: search's for 98.2–98.4 % of the frames at factor 1 and 99.1–99.4 % at 0.5 (README).
COARSE_BETA_FACTOR = 0.5
#: coarse-to-fine: a frame block whose kept (fine rotation, frame) pairs exceed this fraction
#: of all of them is searched exhaustively. A kept pair costs a dot product of a cell's
#: block, its share of the pattern's bookkeeping and a sparse × dense merge row; measured
#: on 2 CPU cores (torch 2.13) with the sampled dense-dense product that preceded the cell
#: blocks, about 25× the cost per pair of the dense matrix products of the exhaustive search.
COARSE_TO_FINE_MAX_FRACTION = 1 / 32
#: coarse-to-fine: kept pairs with a posterior P_ri below this are left out of the merge
#: (their mass is added to the logged ``neglected_mass``). At β ≈ 1 almost all of a frame's
#: mass sits on a few fine rotations, so only those rotations are merged (RELION likewise
#: back-projects only the orientations with significant weights, Scheres, J. Struct. Biol.
#: 180, 519 (2012)). A frame leaves out at most (kept pairs) × this of its mass.
MERGE_MIN_PROBABILITY = 1e-6
#: coarse-to-fine: the kept coarse rotations of a frame are looked for among its this many
#: most probable ones first (a full sort only for frames whose mass needs more).
COARSE_TOP = 64
#: models > 1: the SO(3) sampling of the search that rotates every model into the main
#: model's frame (:func:`common_frame`; the evaluation's default alignment sampling).
MODEL_ALIGN_NUM_DIV = 4


@dataclass
class EMCResult:
    """Output of :func:`run_emc`.

    intensity: (n, n, n) float32, W in photons per unit pixel factor (gain-1 frame).
    weight: (n, n, n) float32, the merge denominator of a final E-step with the final
    model, or of the last local iteration (voxels with weight > 0 are measured).
    quaternion: (frames, 4) float64, the most likely sampled orientation of each frame, or
    its refined orientation after local refinement. gain: (frames,) float64, mean 1.
    probability_max: (frames,) float64, the probability of the most likely sampled
    orientation in the final global E-step. log: one row per
    iteration (columns :data:`LOG_COLUMNS`).

    With ``settings.models`` K > 1 also: models (K, n, n, n) float32, the K models ordered by
    the particle size they stand for, smallest first (:func:`model_size_order`); model
    (frames,) int64, each frame's most probable model (index into models); model_probability
    (frames,) float64, its marginal posterior ``Σ_r P_kri`` in the final global E-step;
    model_weight (K, n, n, n) float32, the models' merge denominators. Then intensity and
    weight are those of the most populated model (most frames), probability_max the joint
    probability of the most likely rotation of the frame's most probable model, and
    quaternion that rotation (refined against that model with local refinement). None for K = 1.
    """

    intensity: np.ndarray
    weight: np.ndarray
    quaternion: np.ndarray
    gain: np.ndarray
    probability_max: np.ndarray
    log: pd.DataFrame
    models: np.ndarray | None = None
    model: np.ndarray | None = None
    model_probability: np.ndarray | None = None
    model_weight: np.ndarray | None = None


def compress(counts: torch.Tensor, prob: torch.Tensor, gain: torch.Tensor, q_valid: torch.Tensor,
             s_valid: torch.Tensor, rotations: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """The maximise + compress step for given probabilities (all tensors on one device/dtype).

    counts (F, P) photons of the valid pixels; prob (R, F) P_ri; gain (F,); q_valid (P, 3)
    Å⁻¹; s_valid (P,) pixel factors; rotations (R, 3, 3). Returns ``(W, weight)``, both
    (n, n, n): ``F[num] / F[den]`` (0 where den = 0) and ``F[den]``, F the Friedel
    symmetrisation. With one-hot ``prob`` this merges frames at known orientations.
    """
    accum = torch.zeros((2,) + (grid.n,) * 3, dtype=counts.dtype, device=counts.device)
    values = torch.stack([prob @ counts, (prob @ gain)[:, None] * s_valid[None, :]])
    merge_rotated(accum, q_valid, rotations, grid, values)
    return merge_ratio(accum[0], accum[1]), friedel_symmetrize(accum[1])


@dataclass
class SparseBlock:
    """One frame block's photons as compressed sparse rows (photon_format "sparse").

    ko: CSR (b, n_orient), the counts at orientation pixels (E-step); kt: CSR (P, b), all
    valid pixels, transposed (merge); frame_sums (b,) over all valid pixels, frame_sums_o
    (b,) over the orientation pixels; pixel_sums (P,). nbytes: memory held."""

    ko: torch.Tensor
    kt: torch.Tensor
    frame_sums: torch.Tensor
    frame_sums_o: torch.Tensor
    pixel_sums: torch.Tensor
    nbytes: int

    def dense(self) -> torch.Tensor:
        """The block as a dense (b, P) matrix (for :func:`spiflow.refine.local_iteration`)."""
        return self.kt.to_dense().T


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape, device) -> torch.Tensor:
    """CSR tensor from COO triplets sorted by row (int32 indices, as MKL and cuSPARSE take)."""
    crow = np.zeros(shape[0] + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=crow[1:])
    return _csr_tensor(torch.as_tensor(crow), torch.as_tensor(cols.astype(np.int32)), torch.as_tensor(vals),
                       shape).to(device)


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, vals: torch.Tensor, shape) -> torch.Tensor:
    """``torch.sparse_csr_tensor`` without the invariant checks (the callers build valid
    indices) and without torch's "beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, vals, size=shape, check_invariants=False)


def _sparse_block(k: np.ndarray, n_orient: int, device) -> SparseBlock:
    """:class:`SparseBlock` of a dense block k (b, P) whose first n_orient columns are the
    orientation pixels."""
    b, P = k.shape
    rows, cols = np.nonzero(k)  # row-major: sorted by frame, then pixel
    vals = k[rows, cols]
    o = cols < n_orient
    order = np.argsort(cols, kind="stable")
    ko = _csr(rows[o], cols[o], vals[o], (b, n_orient), device)
    kt = _csr(cols[order], rows[order], vals[order], (P, b), device)
    sums = [torch.as_tensor(x).to(device) for x in (k.sum(1), k[:, :n_orient].sum(1), k.sum(0))]
    nbytes = (int(o.sum()) + len(vals)) * (4 + vals.itemsize) + (b + P + 2) * 4 + (2 * b + P) * vals.itemsize
    return SparseBlock(ko, kt, *sums, nbytes)


def _sums(K) -> tuple[torch.Tensor, torch.Tensor]:
    """(photons per pixel (P,), photons per frame (b,)) of a dense or sparse block."""
    if isinstance(K, SparseBlock):
        return K.pixel_sums, K.frame_sums
    return K.sum(0), K.sum(1)


class PhotonBlocks:
    """The photons of the valid pixels, frame block by frame block: iterating gives
    ``(i0, i1, K)`` for frames ``i0:i1``, read as ``photons[i0:i1]`` (photons (frames, ny, nx),
    any array-like: numpy, Zarr). K is a dense (i1 − i0, P) tensor of ``dtype`` on
    ``device``, or with ``sparse_orient`` (the number of orientation pixels, which come
    first) a :class:`SparseBlock`. Column p of K is flat pixel ``pixels[p]`` of a frame
    (``pixels`` may also be a bool mask). ``block``: frames per block. With ``cache`` the
    blocks are kept after the first pass; sparse blocks only while their total size stays
    within ``cache_bytes``. Used by :func:`run_emc`, :mod:`spiflow.refine` and
    :mod:`spiflow.mtip`. Iterating raises ValueError for negative or non-finite counts in
    valid pixels, naming the frames."""

    def __init__(self, photons, pixels: np.ndarray, block: int, cache: bool, device, dtype,
                 sparse_orient: int | None = None, cache_bytes: float = float("inf")):
        pixels = np.asarray(pixels)
        self.photons = photons
        self.pixels = np.flatnonzero(pixels.reshape(-1)) if pixels.dtype == bool else pixels
        self.frames = photons.shape[0]
        self.block, self.device, self.dtype = block, device, dtype
        self.sparse_orient, self.cache_bytes = sparse_orient, cache_bytes
        self._cache: list | None = [] if cache else None
        self._complete = False

    def __iter__(self):
        if self._complete:
            yield from self._cache
            return
        held = 0
        for i0 in range(0, self.frames, self.block):
            i1 = min(self.frames, i0 + self.block)
            raw = np.asarray(self.photons[i0:i1])
            k = raw.reshape(i1 - i0, -1)[:, self.pixels]
            if not np.isfinite(k).all() or (k < 0).any():
                o = getattr(self.photons, "start", 0)  # a FrameRange's first frame
                raise ValueError(f"photons[{o + i0}:{o + i1}]: negative or non-finite counts in valid pixels")
            k = k.astype(np.float32 if self.dtype == torch.float32 else np.float64, copy=False)
            if self.sparse_orient is None:
                item = (i0, i1, torch.as_tensor(k).to(self.device))
            else:
                item = (i0, i1, _sparse_block(k, self.sparse_orient, self.device))
                held += item[2].nbytes
                if held > self.cache_bytes:
                    self._cache = None
            if self._cache is not None:
                self._cache.append(item)
            yield item
        self._complete = self._cache is not None


@dataclass
class _Pixels:
    """The pixels of one iteration (resolution marching): q (P_t, 3), s (P_t,), log s over
    the orientation pixels (po,), po the number of orientation pixels among them (they come
    first), sel (P_t,) their columns among all valid pixels (None: all of them)."""

    q: torch.Tensor
    s: torch.Tensor
    logs_o: torch.Tensor
    po: int
    sel: torch.Tensor | None


@dataclass
class _Block:
    """One frame block's photons restricted to the pixels of :class:`_Pixels`: either dense
    ``Km`` (b, P_t) with ``Ko = Km[:, :po]``, or sparse (``ko`` CSR (b, n_orient), ``kt``
    CSR (P, b) over all valid pixels); photons per frame over the iteration's pixels
    (n_all) and orientation pixels (n_o), and ``klogs = Σ_{p∈O_t} K_ip log s_p``."""

    Km: torch.Tensor | None
    Ko: torch.Tensor | None
    ko: torch.Tensor | None
    kt: torch.Tensor | None
    n_all: torch.Tensor
    n_o: torch.Tensor
    klogs: torch.Tensor


@dataclass
class _Hierarchy:
    """The coarse level of the coarse-to-fine search: coarse rotations (Mc, 3, 3), their
    log quadrature weights, the coarse parent of every fine rotation (M,) (the fine
    rotations sorted by parent, so that each coarse cell is a run of them), the fine index
    bounds of the cells (Mc + 1,) and the coarse neighbour matrix (Mc, Mc) (sparse, 0/1,
    the diagonal included)."""

    rot: torch.Tensor
    logw: torch.Tensor
    parent: torch.Tensor
    cells: torch.Tensor
    neighbours: torch.Tensor

    @property
    def M(self) -> int:
        return len(self.rot)


class _Engine:
    """One EMC problem: sampled rotations, valid pixels, photon blocks and work buffers.

    The first ``n_orient`` valid pixels are the orientation pixels (E-step), sorted by |q|
    (resolution marching takes a prefix of them); all are merged. With ``settings.search``
    "coarse_to_fine" the fine rotations are ordered by coarse cell."""

    def __init__(self, data: PhotonBlocks, q_valid, s_valid, n_orient: int, grid: Grid, settings: EMCSettings,
                 device, dtype, comm: Ranks | None = None):
        self.comm = comm or Ranks(device=device)
        quats, weights = so3_sampling(settings.num_div)
        self.hier = None
        if settings.search == "coarse_to_fine" and settings.coarse_num_div > 0:
            parent, _, edges = coarse_to_fine(settings.num_div, settings.coarse_num_div)
            order = np.argsort(parent, kind="stable")  # each coarse cell a run of fine rotations
            quats, weights, parent = quats[order], weights[order], parent[order]
            cq, cw = so3_sampling(settings.coarse_num_div)
            self.hier = _Hierarchy(quaternion_to_matrix(torch.as_tensor(cq)).to(device, dtype),
                                   torch.as_tensor(np.log(cw)).to(device, dtype),
                                   torch.as_tensor(parent).to(device),
                                   torch.as_tensor(np.searchsorted(parent, np.arange(len(cq) + 1))).to(device),
                                   torch.sparse_coo_tensor(torch.as_tensor(edges.T), torch.ones(len(edges)),
                                                           (len(cq), len(cq)), check_invariants=False
                                                           ).to(device, dtype).coalesce())
            self.mass = settings.search_mass
            self.coarse_fraction = settings.coarse_num_div / settings.num_div
        self.quats, self.M = quats, len(quats)
        self.rot = quaternion_to_matrix(torch.as_tensor(quats)).to(device, dtype)
        self.logw = torch.as_tensor(np.log(weights)).to(device, dtype)
        self.K = settings.models
        # joint (model, rotation) log prior: log w_r − log K (uniform over the models; K = 1: log w_r)
        self.logw_joint = self.logw if self.K == 1 else (self.logw - np.log(self.K)).repeat(self.K)
        self.model_best = self.model_probability = None  # filled by iterate (models > 1)
        self.q = torch.as_tensor(q_valid).to(device, dtype)
        self.s = torch.as_tensor(s_valid).to(device, dtype)
        self.logs = torch.log(self.s)
        self.po = int(n_orient)
        self.q_o = np.linalg.norm(np.asarray(q_valid)[:self.po], axis=1)  # ascending (see _run)
        self.q_top = float(np.linalg.norm(np.asarray(q_valid), axis=1).max())
        self.grid, self.data, self.chunk = grid, data, settings.orientation_chunk
        self.tiny = torch.finfo(dtype).tiny
        self.log_floor = float(np.log(self.tiny)) + 1  # the floor of log P (see _posterior)
        self._buf = torch.empty(2 * self.K * self.M * data.block, dtype=dtype, device=device)
        self._vals = torch.empty(2 * min(self.chunk, self.M) * len(q_valid), dtype=dtype, device=device)
        self._tmp = torch.empty(min(self.chunk, self.M) * data.block, dtype=dtype, device=device)

    def release(self) -> None:
        """Free the work buffers (up to ``memory_budget_gb``) once the global iterations are
        done, so that the local refinement's own (also within the budget) do not add to them."""
        self._buf = self._vals = self._tmp = None

    def pixels(self, fraction: float = 1.0) -> _Pixels:
        """The pixels with ``|q| <= fraction · q_top`` (all for fraction >= 1): the orientation
        pixels up to that radius (at least one) and every central pixel (the central radius
        is below the marching radius: checked by :func:`run_emc`)."""
        n_o = self.po if fraction >= 1 else max(1, int(np.searchsorted(self.q_o, fraction * self.q_top, "right")))
        if n_o == self.po:
            return _Pixels(self.q, self.s, self.logs[:self.po], self.po, None)
        dev = self.q.device
        sel = torch.cat([torch.arange(n_o, device=dev), torch.arange(self.po, len(self.q), device=dev)])
        return _Pixels(self.q[sel], self.s[sel], self.logs[:n_o], n_o, sel)

    def _block(self, K, px: _Pixels, dense: bool) -> _Block:
        """K (a dense block or :class:`SparseBlock`) restricted to px; ``dense`` forces a
        dense block (the coarse-to-fine search takes its sampled products from dense photons)."""
        if isinstance(K, SparseBlock) and dense:
            K = K.dense()
        if not isinstance(K, SparseBlock):
            Km = K if px.sel is None else K[:, px.sel]
            Ko = Km[:, :px.po]
            return _Block(Km, Ko, None, None, Km.sum(1), Ko.sum(1), Ko @ px.logs_o, )
        if px.sel is None:
            klogs = torch.sparse.mm(K.ko, self.logs[:self.po, None])[:, 0]
            return _Block(None, None, K.ko, K.kt, K.frame_sums, K.frame_sums_o, klogs)
        inner = torch.zeros(self.po, 2, dtype=self.s.dtype, device=self.s.device)
        inner[:px.po, 0], inner[:px.po, 1] = 1, px.logs_o
        n_o, klogs = torch.sparse.mm(K.ko, inner).T
        return _Block(None, None, K.ko, K.kt, K.frame_sums - (K.frame_sums_o - n_o), n_o, klogs)

    def _loglik(self, W, rot, ko, g, px: _Pixels, out: torch.Tensor, s_dot: torch.Tensor) -> None:
        """out (b, R) = ``Σ_{p∈O_t} K_ip log W_rp − φ_i Σ_{p∈O_t} s_p W_rp`` for rotations rot
        (R, 3, 3), frames ko (dense (b, po) or sparse CSR (b, n_orient)) at gains g (b,);
        s_dot (R,) = ``Σ_p s_p W_rp`` over the iteration's pixels (gain update). ``out`` may
        be a column slice of a wider row-major matrix (the GEMM writes it in place)."""
        C = self.chunk
        for r0 in range(0, len(rot), C):
            r1 = min(len(rot), r0 + C)
            S = slice_rotated(W, px.q, rot[r0:r1], self.grid)  # (C, P_t)
            torch.mv(S, px.s, out=s_dot[r0:r1])
            So = S[:, :px.po]
            s_dot_o = So @ px.s[:px.po]
            logS = So.clamp_min_(self.tiny).log_()
            if ko.layout == torch.sparse_csr:  # Σ_{p: K_ip > 0} K_ip log W_rp = K_o log S_oᵀ
                if px.po < self.po:  # log W = 0 beyond the radius: those pixels add nothing
                    logS = torch.cat([logS, logS.new_zeros((r1 - r0, self.po - px.po))], 1)
                for c0 in range(0, r1 - r0, SPARSE_PRODUCT_COLUMNS):
                    c1 = min(r1 - r0, c0 + SPARSE_PRODUCT_COLUMNS)
                    out[:, r0 + c0:r0 + c1] = torch.sparse.mm(ko, logS[c0:c1].T.contiguous())
            else:  # into a contiguous buffer: BLAS writes a column slice of L at about ⅔ the rate
                tmp = torch.mm(ko, logS.T, out=self._tmp[:len(g) * (r1 - r0)].view(len(g), r1 - r0))
                out[:, r0:r1].copy_(tmp.addr_(g, s_dot_o, alpha=-1))
                continue
            out[:, r0:r1].addr_(g, s_dot_o, alpha=-1)

    def _posterior(self, L: torch.Tensor, P: torch.Tensor, beta: float, s_dot: torch.Tensor):
        """The exhaustive soft E-step's posterior of one block: L (b, K·M) the log-likelihoods
        (columns: model, then rotation; weights ``logw_joint``), overwritten with log P_ri; P
        (b, K·M) receives P_ri, with the pairs below :data:`MERGE_MIN_PROBABILITY` ``/ M`` set
        to 0 (left out of the merge: :meth:`_merge`); s_dot (K·M,) = Σ_p s_p W_rp.

        Returns (log Σ_r w_r e^{βL_ri}, max P, its index, Σ_r P_ri log w_r, Σ_r P_ri log P_ri,
        Σ_r P_ri s_dot_r, the mass left out of the merge), each (b,), and each model's mass
        Σ_{r∈k} P_kri (b, K); all sums are of P before the cut. Row reductions only (each
        frame's orientations are contiguous).

        log P is floored at ``log(finfo.tiny) + 1`` before the exponential, so P holds no
        subnormal numbers (they slow CPU arithmetic and GEMMs several-fold: README, "One
        reconstruction across processes"); a floored entry carries at most e·tiny
        (3e-38 in float32) instead of less, against a row sum of 1.

        The cut leaves a frame less than MERGE_MIN_PROBABILITY of its mass whatever the
        sampling, pair by pair, so the result does not depend on how the frames are split
        into blocks or ranks. On CPU one numba kernel does all of this in five passes over
        each row while it sits in cache (:func:`spiflow.slicing_cpu.posterior_rows`);
        elsewhere torch operations over the whole block (the same formulas; tested equal).
        The posterior is EMC's (Loh & Elser, Phys. Rev. E 80, 026705 (2009)), tempered by
        β as in Dragonfly (Ayyer et al., J. Appl. Cryst. 49, 1320 (2016))."""
        threshold = MERGE_MIN_PROBABILITY / self.M
        if slicing_cpu.available(L, P, s_dot):
            lse, pmax, pw, plogp, psd, left, mass, best = slicing_cpu.posterior_rows(
                L, P, self.logw_joint, beta, self.log_floor, s_dot, threshold, self.K)
            dt = L.dtype
            return (lse.to(dt), pmax.to(dt), best, pw.to(dt), plogp.to(dt), psd.to(dt), left,
                    mass.to(dt))
        b = L.shape[0]
        L.mul_(beta).add_(self.logw_joint[None, :])
        m, best = L.max(1)
        L.sub_(m[:, None]).clamp_min_(self.log_floor)
        torch.exp(L, out=P)
        total = P.sum(1)
        P.div_(total[:, None])
        log_total = torch.log(total)
        L.sub_(log_total[:, None])
        pw, psd = P @ self.logw_joint, P @ s_dot
        mass = P.view(b, self.K, self.M).sum(2)
        small = P < threshold
        left = torch.where(small, P, 0).sum(1).double()  # each entry below the threshold: no cancellation
        plogp = L.mul_(P).sum(1)
        P.masked_fill_(small, 0)
        return m + log_total, 1 / total, best, pw, plogp, psd, left, mass

    def _merge(self, accum, rot, P, blk: _Block, gain, px: _Pixels) -> None:
        """accum += the merge of ``Σ_i P_ri K_ip`` and ``s_p Σ_i P_ri φ_i`` for rotations rot
        (R, 3, 3), P (b, R) over the frames of the block with their gains (b,). The rotations
        that keep no pair (P already cut by :meth:`_posterior`; at β ≈ 1 most of them) are
        not merged at all."""
        C = self.chunk
        skip = P.amax(0) == 0  # (R,)
        active = torch.nonzero(~skip)[:, 0]
        everything = len(active) == len(rot)
        for a0 in range(0, len(active), C):
            a1 = min(len(active), a0 + C)
            if everything:
                Pr, rr = P[:, a0:a1], rot[a0:a1]
            else:
                idx = active[a0:a1]
                Pr, rr = P[:, idx], rot[idx]
            vals = self._vals[:2 * (a1 - a0) * len(px.q)].view(2, a1 - a0, len(px.q))
            if blk.Km is None:  # Σ_i P_ri K_ip = (Kᵀ P)ᵀ
                for c0 in range(0, a1 - a0, SPARSE_PRODUCT_COLUMNS):
                    c1 = min(a1 - a0, c0 + SPARSE_PRODUCT_COLUMNS)
                    full = torch.sparse.mm(blk.kt, Pr[:, c0:c1].contiguous())
                    vals[0, c0:c1].copy_((full if px.sel is None else full[px.sel]).T)
            else:
                torch.mm(Pr.T, blk.Km, out=vals[0])
            torch.mul((gain @ Pr)[:, None], px.s[None, :], out=vals[1])
            merge_rotated(accum, px.q, rr, self.grid, vals)

    def iterate(self, W: torch.Tensor, gain: torch.Tensor, beta: float, update_gain: bool, fraction: float = 1.0):
        """One E + gain + M pass with model W (n, n, n) and gains (frames,) over the pixels
        with ``|q| <= fraction · q_top`` (:meth:`pixels`; voxels none of them reaches keep
        their value in W_new).

        Returns (W_new, gain_new, stats, most likely index (frames,), its P (frames,),
        Friedel-symmetrised merge denominator (n, n, n)). Across ranks (``self.comm``) the
        frames are this rank's; the merge sums and the statistics are all-reduced.

        With ``settings.models`` K > 1 (exhaustive search only): W, W_new and the
        denominator are (K, n, n, n); the posterior runs over (model, rotation) jointly
        (:class:`~spiflow.settings.EMCSettings`), the returned index is the most likely
        rotation of each frame's most probable model and P its joint probability; that
        model (frames,) and its marginal probability Σ_r P_kri (frames,) are left in
        ``self.model_best`` and ``self.model_probability``; a model no frame reaches keeps
        its previous value."""
        M, dev, dt, nk = self.M, W.device, W.dtype, self.K
        frames = self.data.frames
        px = self.pixels(fraction)
        Wk = W if nk > 1 else W[None]
        accum = torch.zeros((nk, 2) + Wk.shape[1:], dtype=dt, device=dev)  # per model: numerator, denominator
        new_gain = gain.clone()
        ll, mi, neglected, evaluated, support = (torch.zeros(frames, dtype=torch.float64, device=dev)
                                                 for _ in range(5))
        pmax, best = torch.zeros(frames, dtype=dt, device=dev), torch.zeros(frames, dtype=torch.long, device=dev)
        s_dot = torch.empty(nk * M, dtype=dt, device=dev)  # Σ_p s_p W_krp over the iteration's pixels (gain)
        skipped = False  # some rotation left out of an exhaustive merge
        if nk > 1:
            self.model_best = torch.zeros(frames, dtype=torch.long, device=dev)
            self.model_probability = torch.zeros(frames, dtype=dt, device=dev)
        for i0, i1, K in self.data:
            b, g = i1 - i0, gain[i0:i1]
            blk = self._block(K, px, dense=False)
            const = blk.klogs + torch.xlogy(blk.n_o, g)  # Σ_p K log s + N log φ over O_t
            res = None
            if self.hier is not None:  # dense photons for it; a fallback keeps the block's own format
                dense_blk = blk if blk.Km is not None else self._block(K, px, dense=True)
                res = self._coarse_to_fine(W, dense_blk, g, beta, px, s_dot)
                if res is not None:
                    blk = dense_blk
            sparse = blk.Km is None
            if res is not None:
                pairs, lse, plogp, pw, bmax, barg, gden, neg, ev, sup = res
                pmax[i0:i1], best[i0:i1] = bmax, barg
                neglected[i0:i1], evaluated[i0:i1], support[i0:i1] = neg, ev, sup
                if update_gain:
                    new_gain[i0:i1] = blk.n_all / gden
                self._merge_pairs(accum[0], pairs, blk.Km, new_gain[i0:i1], px)
            else:  # columns k M : (k + 1) M of L and P belong to model k
                L = self._buf[:nk * M * b].view(b, nk * M)
                P = self._buf[nk * M * b:2 * nk * M * b].view(b, nk * M)
                for k in range(nk):
                    self._loglik(Wk[k], self.rot, blk.ko if sparse else blk.Ko, g, px, L[:, k * M:(k + 1) * M],
                                 s_dot[k * M:(k + 1) * M])
                lse, bmax, barg, pw, plogp, psd, left, mass = self._posterior(L, P, beta, s_dot)
                if nk == 1:
                    pmax[i0:i1], best[i0:i1] = bmax, barg
                else:  # the most probable model, then its most likely rotation (above the cut)
                    self.model_probability[i0:i1], kbest = mass.max(1)
                    self.model_best[i0:i1] = kbest
                    pmax[i0:i1], best[i0:i1] = P.view(b, nk, M)[torch.arange(b, device=dev), kbest].max(1)
                evaluated[i0:i1] = nk * M + (self.hier.M if self.hier is not None else 0)
                support[i0:i1] = nk * M
                if update_gain:
                    new_gain[i0:i1] = blk.n_all / psd
                for k in range(nk):
                    self._merge(accum[k], self.rot, P[:, k * M:(k + 1) * M], blk, new_gain[i0:i1], px)
                neglected[i0:i1] = left
                skipped = skipped or bool(neglected[i0:i1].any())
            ll[i0:i1] = ((plogp - pw + lse) / beta + const).double()  # Σ_r P_ri L_ri
            mi[i0:i1] = (plogp - pw).double()  # Σ_r P_ri log(P_ri / w_r)
        comm = self.comm
        comm.sum_(accum)
        scale = comm.mean(new_gain) if update_gain else torch.ones((), dtype=dt, device=dev)
        W_new = merge_ratio(accum[:, 0], accum[:, 1]) * scale
        weight = friedel_symmetrize(accum[:, 1])
        if nk == 1:
            W_new, weight = W_new[0], weight[0]
        if px.sel is not None or self.hier is not None or nk > 1 or comm.total(float(skipped))[0] > 0:
            # voxels beyond the pixels' reach, reached by no merged rotation, or (models > 1)
            # of a model no frame reaches, keep their value
            W_new = torch.where(weight > 0, W_new, W)
        stats = {"log_likelihood": comm.mean(ll).item(), "mutual_info": comm.mean(mi).item(),
                 "mean_max_probability": comm.mean(pmax.double()).item(),
                 "neglected_mass": comm.mean(neglected).item(), "orientations_per_frame": comm.mean(evaluated).item(),
                 "support_per_frame": comm.mean(support).item(), "q_radius": fraction * self.q_top}
        return W_new, new_gain / scale, stats, best, pmax, weight

    def _coarse_to_fine(self, W, blk: _Block, g, beta: float, px: _Pixels, s_dot: torch.Tensor):
        """The coarse-to-fine soft E-step of one dense block (see :class:`EMCSettings`).

        The kept (fine rotation r, frame i) pairs form a sparse (M, b) pattern in compressed
        sparse rows (rows: fine rotations). Their log-likelihoods are the pattern's entries
        of ``log S_o K_oᵀ``, one dense block per kept coarse cell (no likelihood outside the
        kept cells is computed), and the merge is the sparse × dense product ``P K``.

        Returns None when the kept pairs exceed :data:`COARSE_TO_FINE_MAX_FRACTION` of the
        fine rotations × frames or some frame keeps none (then the block is searched
        exhaustively), else ``(pairs, lse, Σ P log P, Σ P log w, max P, its fine index,
        Σ_r P_ri s·W_r, neglected mass, likelihoods evaluated, support size)``: the
        per-frame arrays (b,) and ``pairs = (crow (M + 1,), col (nnz,), P (nnz,), active)``
        with ``active`` the fine rotations that some frame keeps (s_dot is filled there)."""
        h, b, dt, dev = self.hier, len(g), W.dtype, W.device
        Lc = self._buf[:h.M * b].view(b, h.M)
        pc = self.pixels(self.coarse_fraction * px.q.norm(dim=1).max().item() / self.q_top)
        self._loglik(W, h.rot, blk.Ko[:, :pc.po], g, pc, Lc, torch.empty(h.M, dtype=dt, device=dev))
        Pc = torch.softmax(Lc.mul_(beta * COARSE_BETA_FACTOR).add_(h.logw[None, :]), 1).T  # coarse posterior (Mc, b)
        keep = torch.zeros((h.M, b), dtype=torch.bool, device=dev)
        neglected = torch.zeros(b, dtype=torch.float64, device=dev)
        srt, order = Pc.topk(min(COARSE_TOP, h.M), 0)
        short = torch.nonzero(srt.sum(0, dtype=torch.float64) < self.mass)[:, 0]
        for cols in (None, short):  # the top rotations, then a full sort where they hold too little
            if cols is not None:
                if len(cols) == 0:
                    break
                srt, order = Pc[:, cols].sort(0, descending=True)
            cum = srt.double().cumsum(0)
            keep_sorted = (cum - srt) < self.mass  # the mass before it is short of the target
            kept = (srt * keep_sorted).sum(0, dtype=torch.float64)
            if cols is None:
                keep.scatter_(0, order, keep_sorted)
                neglected = (1 - kept).clamp_min(0)
            else:
                keep[:, cols] = torch.zeros_like(keep_sorted).scatter_(0, order, keep_sorted)
                neglected[cols] = (1 - kept).clamp_min(0)
        del srt, order, keep_sorted, Pc
        keep = torch.sparse.mm(h.neighbours, keep.to(dt)) > 0  # and their neighbours' cells (Mc, b)
        per_cell = keep.sum(1)  # frames keeping each coarse cell
        cnt = per_cell[h.parent]  # frames keeping each fine rotation (M,)
        nnz = int(cnt.sum())
        if nnz > COARSE_TO_FINE_MAX_FRACTION * self.M * b:
            return None
        kept_cells = torch.nonzero(keep)  # (cell, frame), by cell, then frame
        kc = kept_cells[:, 1]
        fine = torch.zeros(b, dtype=torch.long, device=dev).index_add_(0, kc, h.cells.diff()[kept_cells[:, 0]])
        if bool((fine == 0).any()):
            return None
        # the pattern: row r holds the frames (columns) that keep r's coarse cell, ascending
        cell_start = torch.cumsum(per_cell, 0) - per_cell
        crow = torch.zeros(self.M + 1, dtype=torch.long, device=dev)
        torch.cumsum(cnt, 0, out=crow[1:])
        row = torch.repeat_interleave(torch.arange(self.M, device=dev), cnt)
        col = kc[cell_start[h.parent][row] + torch.arange(nnz, device=dev) - crow[row]]
        L = torch.zeros(nnz, dtype=dt, device=dev)
        s_dot_o = torch.zeros(self.M, dtype=dt, device=dev)
        # cell by cell: a kept coarse cell's fine rotations against the frames that keep it
        # are a dense block of the pattern (its rows are consecutive, each over those
        # frames, ascending), so its log-likelihoods are one small product; the active
        # cells are taken in groups of at most orientation_chunk fine rotations for slicing
        act = torch.nonzero(per_cell)[:, 0]
        n_rows = (h.cells[act + 1] - h.cells[act]).cpu().numpy()
        act_np, cells_np = act.cpu().numpy(), h.cells.cpu().numpy()
        n_cols, col_start = per_cell[act].cpu().numpy(), cell_start[act].cpu().numpy()
        out_start = crow[h.cells[act]].cpu().numpy()
        ends = np.cumsum(n_rows)
        group_of = (ends - n_rows) // self.chunk  # a cell starts its group's chunk
        bounds = np.flatnonzero(np.diff(group_of, prepend=-1, append=group_of[-1] + 1))
        Ko = blk.Ko.contiguous()
        numba_ok = slicing_cpu.ENABLED and slicing_cpu.available(Ko, L)
        kc_np = kc.cpu().numpy() if numba_ok else None
        for g0, g1 in zip(bounds[:-1], bounds[1:]):
            nr = n_rows[g0:g1]
            offsets = np.cumsum(nr) - nr  # each cell's first row within the group
            r_np = np.repeat(cells_np[act_np[g0:g1]] - offsets, nr) + np.arange(int(nr.sum()))
            r = torch.as_tensor(r_np, device=dev)
            S = slice_rotated(W, px.q, self.rot[r], self.grid)  # (C, P_t)
            s_dot[r] = S @ px.s
            So = S[:, :px.po]
            s_dot_o[r] = So @ px.s[:px.po]
            logS = So.clamp_min_(self.tiny).log_()
            if numba_ok:
                slicing_cpu.block_products(logS, Ko, offsets, nr, kc_np, col_start[g0:g1], n_cols[g0:g1],
                                           out_start[g0:g1], L)
                continue
            for a0, n, f0, nf, o0 in zip(offsets, nr, col_start[g0:g1], n_cols[g0:g1], out_start[g0:g1]):
                Kf = Ko.index_select(0, kc[f0:f0 + nf])  # (nf, P_o)
                torch.mm(logS[a0:a0 + n], Kf.T, out=L[o0:o0 + n * nf].view(n, nf))
        L.sub_(s_dot_o[row] * g[col]).mul_(beta).add_(self.logw[row])
        m = torch.full((b,), -torch.inf, dtype=dt, device=dev).scatter_reduce_(0, col, L, "amax")
        sumexp = torch.zeros(b, dtype=dt, device=dev).index_add_(0, col, torch.exp(L - m[col]))
        lse = m + torch.log(sumexp)
        L.sub_(lse[col])  # log P_ri
        P = torch.exp(L)
        plogp = torch.zeros(b, dtype=dt, device=dev).index_add_(0, col, P * L)
        pw = torch.zeros(b, dtype=dt, device=dev).index_add_(0, col, P * self.logw[row])
        gden = torch.zeros(b, dtype=dt, device=dev).index_add_(0, col, P * s_dot[row])
        pmax = torch.zeros(b, dtype=dt, device=dev).scatter_reduce_(0, col, P, "amax")
        best = torch.full((b,), -1, dtype=torch.long, device=dev).scatter_reduce_(
            0, col, torch.where(P == pmax[col], row, -1), "amax")
        fine = fine.double()
        # the merge: only the pairs with P >= MERGE_MIN_PROBABILITY; the mass left out is neglected too
        big = P >= MERGE_MIN_PROBABILITY
        neglected += torch.zeros(b, dtype=torch.float64, device=dev).index_add_(0, col, torch.where(big, 0, P).double())
        n_big = torch.zeros(self.M, dtype=torch.long, device=dev).index_add_(0, row, big.long())
        crow_big = torch.zeros(self.M + 1, dtype=torch.long, device=dev)
        torch.cumsum(n_big, 0, out=crow_big[1:])
        pairs = (crow_big, col[big], P[big], torch.nonzero(n_big)[:, 0])
        return pairs, lse, plogp, pw, pmax, best, gden, neglected, fine + h.M, fine

    def _runs(self, active: torch.Tensor, crow: torch.Tensor):
        """The ``active`` fine rotations (ascending) in runs of at most ``orientation_chunk``:
        yields ``(rotations (C,), p0, p1, crow of their rows (C + 1,) from 0)``, the entries
        p0:p1 of the pattern being theirs (rotations between them hold none)."""
        for a0 in range(0, len(active), self.chunk):
            r = active[a0:a0 + self.chunk]
            ends = crow[r + 1]
            p0, p1 = int(crow[r[0]]), int(ends[-1])
            yield r, p0, p1, torch.cat([crow[r[:1]], ends]) - p0

    def _merge_pairs(self, accum, pairs, Km: torch.Tensor, gain: torch.Tensor, px: _Pixels) -> None:
        """accum += the merge of ``Σ_i P_ri K_ip`` and ``s_p Σ_i P_ri φ_i`` over the sparse
        posterior ``pairs`` of :meth:`_coarse_to_fine`, for the dense block Km (b, P_t) with
        gains (b,): sparse × dense products, only the rotations some frame keeps merged."""
        crow, col, P, active = pairs
        b = len(gain)
        for r, p0, p1, sub in self._runs(active, crow):
            Pr = _csr_tensor(sub, col[p0:p1], P[p0:p1], (len(r), b))
            vals = self._vals[:2 * len(r) * len(px.q)].view(2, len(r), len(px.q))
            vals[0].copy_(torch.sparse.mm(Pr, Km))
            torch.mul(torch.sparse.mm(Pr, gain[:, None]), px.s[None, :], out=vals[1])
            merge_rotated(accum, px.q, self.rot[r], self.grid, vals)


def _initial_model(sum_counts: np.ndarray, q_valid: np.ndarray, s_valid: np.ndarray, gain_sum: float,
                   grid: Grid, seed: int) -> np.ndarray:
    """W0: radial profile ``Σ_bin Σ_i K_ip / Σ_bin s_p Σ_i φ_i`` (bins of width dq in |q|),
    interpolated linearly to every voxel's |q| (constant beyond the ends), times
    ``1 + 0.1 u`` with u ~ U[0, 1) from ``numpy.random.default_rng(seed)`` (an int or a
    sequence of ints). (n, n, n) float64."""
    k = np.rint(np.linalg.norm(q_valid, axis=1) / grid.dq).astype(np.int64)
    top = np.bincount(k, weights=sum_counts)
    bottom = np.bincount(k, weights=s_valid * gain_sum)
    filled = bottom > 0
    radii = np.flatnonzero(filled)
    profile = np.interp(grid.q_norm() / grid.dq, radii, top[filled] / bottom[filled])
    return profile * (1 + 0.1 * np.random.default_rng(seed).random(profile.shape))


def _initial_models(comm: Ranks, data: PhotonBlocks, counts: list[int], sum_counts: np.ndarray, q_valid: np.ndarray,
                    s_valid: np.ndarray, gain: np.ndarray, grid: Grid, settings: EMCSettings, seed: int) -> np.ndarray:
    """The initial model(s): :func:`_initial_model` of all frames ((n, n, n), models 1), or
    (K, n, n, n) for ``settings.models`` K > 1 by ``settings.model_init``: "random", every
    model the profile of all frames with noise seeded ``(seed, k)``; "radial_split", the
    frames (all ranks', counts per rank, this rank's in ``data``) sorted by the
    photon-weighted mean |q| of their valid pixels ``Σ_p K_ip |q_p| / Σ_p K_ip`` and cut
    into K groups of equal size, model k the profile of group k (noise seeded ``(seed, k)``).
    sum_counts (P,) photons per valid pixel over all frames, gain (all frames,) the initial gains."""
    nk = settings.models
    if nk == 1:
        return _initial_model(sum_counts, q_valid, s_valid, gain.sum(), grid, seed)
    if settings.model_init == "random":
        return np.stack([_initial_model(sum_counts, q_valid, s_valid, gain.sum(), grid, [seed, k]) for k in range(nk)])
    qn = torch.as_tensor(np.linalg.norm(q_valid, axis=1)).to(data.device, data.dtype)
    proxy = np.zeros(data.frames)
    for i0, i1, K in data:
        Kd = K.dense() if isinstance(K, SparseBlock) else K
        proxy[i0:i1] = ((Kd @ qn) / Kd.sum(1).clamp_min(1)).double().cpu().numpy()
    proxy = _gathered(comm, proxy, counts)
    n = len(proxy)
    group = np.empty(n, np.int64)
    group[np.argsort(proxy, kind="stable")] = np.arange(n) * nk // n  # group 0: the lowest mean |q|
    f0 = sum(counts[:comm.rank])
    mine = torch.as_tensor(group[f0:f0 + data.frames]).to(data.device)
    sums = torch.zeros((nk, len(q_valid)), dtype=torch.float64, device=data.device)
    for i0, i1, K in data:
        Kd = K.dense() if isinstance(K, SparseBlock) else K
        onehot = torch.nn.functional.one_hot(mine[i0:i1], nk).T.to(Kd.dtype)
        sums += (onehot @ Kd).double()
    sums = _reduced(comm, sums.cpu().numpy())
    return np.stack([_initial_model(sums[k], q_valid, s_valid, gain[group == k].sum(), grid, [seed, k])
                     for k in range(nk)])


def _fingerprint(settings: EMCSettings, seed: int, grid: Grid, shape, n_valid: int, data: str) -> str:
    """The settings a checkpoint must share to be resumed: all but the iteration count
    (a resumed run may go on), the random starts' and the resolution marching's counts of
    it (``trial_iterations`` and ``resolution_span`` stand for them), and the cost settings (orientation_chunk, memory_budget_gb, photon_format,
    processes); ``models`` and ``model_init`` only when models > 1;
    plus the seed, grid, data shape, valid-pixel count and per-frame photon totals."""
    fp = settings.model_dump(exclude={"iterations", "start_iterations", "orientation_chunk", "memory_budget_gb",
                                      "photon_format", "processes"})
    if settings.models == 1:  # one model: the fingerprint of the code before emc.models (its checkpoints resume)
        fp.pop("models"), fp.pop("model_init")
    fp.update(seed=seed, trial_iterations=settings.trial_iterations, resolution_span=settings.resolution_span,
              grid_n=grid.n, grid_dq=grid.dq,
              data_shape=list(shape), n_valid=int(n_valid), data=data)
    return json.dumps(fp, sort_keys=True)


def expectation_step(photons, valid, q, pixel_factor, grid: Grid, model: np.ndarray, gain: np.ndarray,
                     settings: EMCSettings | None = None, *, beta: float = 1.0, device: str = "cpu",
                     passes: int = 1) -> dict:
    """One global EMC pass (E-step, gains, merge) of :func:`run_emc` with a given model, at
    every valid pixel: for checking a search (``settings.search``) against another on the
    same model, or assigning orientations with a known intensity. With ``passes`` > 1 the
    passes are chained (each pass's merged model and gains feed the next), as the last
    iterations of :func:`run_emc` at constant β. The photons are held in the format
    ``settings.photon_format`` chooses, as in :func:`run_emc`.

    photons, valid, q, pixel_factor, grid: as :func:`run_emc`; model (n, n, n) W in photons
    per unit pixel factor; gain (frames,); beta: the inverse temperature. Returns a dict (of
    the last pass): ``quaternion`` (frames, 4) float64, the most probable sampled orientation
    of each frame; ``probability_max`` (frames,); ``model`` (n, n, n) float64, the merged W
    with the updated gains; ``gain`` (frames,); ``stats`` the log columns of the pass
    (log_likelihood, mutual_info, mean_max_probability, neglected_mass,
    orientations_per_frame, support_per_frame, q_radius); ``seconds`` (passes,) the wall
    seconds of each pass (without the set-up: sampling, reading the photons). With
    ``settings.models`` K > 1, model is (K, n, n, n) (in and out) and the dict adds
    ``model_best`` (frames,) each frame's most probable model and ``model_probability``
    (frames,) its marginal posterior. One process. Raises ValueError as :func:`run_emc`,
    and for passes < 1."""
    settings = settings or EMCSettings()
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    frames, valid, qv, sv = validate_detector_inputs(photons, valid, q, pixel_factor, grid)
    dev, dtype = resolve_device(device), getattr(torch, settings.dtype)
    central = np.linalg.norm(qv, axis=1) < settings.orientation_min_radius_voxels * grid.dq
    order = np.lexsort((np.linalg.norm(qv, axis=1), central))
    pixels = np.flatnonzero(valid.reshape(-1))[order]
    n_orient = int((~central).sum())
    fmt = settings.photon_format
    if fmt == "auto":
        fmt = choose_photon_format(photons, pixels[:n_orient])
    data = PhotonBlocks(photons, pixels, frames, True, dev, dtype, sparse_orient=n_orient if fmt == "sparse" else None)
    engine = _Engine(data, qv[order], sv[order], n_orient, grid, settings, dev, dtype)
    W = torch.as_tensor(np.asarray(model)).to(dev, dtype)
    g = torch.as_tensor(np.asarray(gain)).to(dev, dtype)
    for _ in data:  # read the photons once, outside the timing
        pass
    seconds = []
    for _ in range(passes):
        t0 = time.perf_counter()
        W, g, stats, best, pmax, _ = engine.iterate(W, g, beta, True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds.append(time.perf_counter() - t0)
    out = {"quaternion": engine.quats[best.cpu().numpy()], "probability_max": pmax.double().cpu().numpy(),
           "model": W.double().cpu().numpy(), "gain": g.double().cpu().numpy(), "stats": stats,
           "seconds": np.asarray(seconds)}
    if engine.K > 1:
        out.update(model_best=engine.model_best.cpu().numpy(),
                   model_probability=engine.model_probability.double().cpu().numpy())
    return out


def choose_photon_format(photons, pixels: np.ndarray, frames: int = 256) -> str:
    """photon_format "auto": "sparse" when at most :data:`AUTO_SPARSE_DENSITY` of the
    entries (frame, pixel) of ``photons[:frames]`` at flat pixel indices ``pixels`` (the
    orientation pixels) are non-zero, else "dense"."""
    head = np.asarray(photons[:min(frames, photons.shape[0])])
    k = head.reshape(len(head), -1)[:, pixels]
    return "sparse" if np.count_nonzero(k) <= AUTO_SPARSE_DENSITY * k.size else "dense"


def run_emc(photons, valid, q, pixel_factor, grid: Grid, settings: EMCSettings | None = None, *, seed: int = 0,
            device: str = "auto", log_path: str | os.PathLike | None = None,
            checkpoint_path: str | os.PathLike | None = None, progress: bool = True) -> EMCResult:
    """Reconstruct the 3D intensity and frame orientations by EMC (see the module docstring).

    photons: (frames, ny, nx) photon counts, any array-like sliced as ``photons[i0:i1]``
    (numpy, Zarr); read block by block and kept in memory only when frames × valid pixels
    fits in ``memory_budget_gb``. valid: (ny, nx) bool; q: (ny, nx, 3) Å⁻¹ (valid pixels
    beyond ``grid.q_max`` are dropped with a warning); pixel_factor: (ny, nx) > 0.
    grid: the model grid. settings: :class:`spiflow.settings.EMCSettings` (default: its
    defaults, the workflow's). seed: the initial models' noise (start k uses seed + k).
    device: "auto", "cpu", "cuda", … (:func:`spiflow.io.resolve_device`).
    log_path: CSV with one row per iteration (:data:`LOG_COLUMNS`), appended per
    iteration; log_likelihood is the frame mean of ``Σ_r P_ri L_ri`` (nats, over the
    orientation pixels, with the r-independent Poisson terms except log K!); the local
    iterations fill ``step_deg`` and ``moved_fraction`` (NaN in the global ones) and have
    β NaN for hard assignment. checkpoint_path: written atomically after every iteration
    with ``{iteration, model, gain, beta, fingerprint}`` (local iterations add the
    orientations, probability_max, weight and ``local_done``); if it exists with the same
    fingerprint (every setting but ``iterations``, ``start_iterations`` beyond
    ``trial_iterations`` and the cost settings orientation_chunk, memory_budget_gb,
    photon_format, processes; the seed, grid, data shape, valid-pixel count and the data's per-frame
    photon totals (:func:`spiflow.io.data_digest`)) the run resumes from it, the CSV is
    rewritten from the checkpoint's rows (:class:`spiflow.io.RunLog`: complete even if the
    CSV was deleted), and a finished run only repeats the final global E-step (or nothing,
    after local refinement). A different fingerprint restarts from scratch
    (UserWarning). progress: tqdm bar.

    Gains start at ``φ_i = N_i / mean N`` (N_i the photons in valid pixels) when
    ``update_gain``, else 1; the model starts from the data (:func:`_initial_model`).
    One final global E-step with the final model and gains at the last iteration's β
    gives the orientations, probability_max and weight; with ``refine_iterations`` the
    local iterations (:mod:`spiflow.refine`) start from those orientations and give the
    returned model, orientations, gains and weight.
    Raises ValueError for mismatched shapes, an empty valid mask, pixel_factor <= 0,
    negative or non-finite counts in valid pixels (checked per block), frames without any
    photon at all. Invalid settings are refused by :class:`~spiflow.settings.EMCSettings` itself.

    Across processes (started by ``torchrun`` or ``srun``: ``WORLD_SIZE`` > 1, see
    :mod:`spiflow.distributed`), every rank calls run_emc with the same arguments; rank r
    reads only its contiguous frames (whole Zarr chunks, :func:`spiflow.distributed.frame_ranges`)
    and runs the E-step, gain update and local refinement on them; the merge numerator and
    denominator, the log-likelihood and every other sum over frames are all-reduced. The
    random starts share the first ``start_frames`` frames evenly. Rank 0 writes the log and
    the checkpoints (with the gains and orientations of all frames gathered, so a checkpoint
    resumes with any number of processes); every rank returns the complete result. The
    result equals the one-process run up to floating-point summation order (tested).
    """
    settings = settings or EMCSettings()
    frames, valid, qv, sv = validate_detector_inputs(photons, valid, q, pixel_factor, grid)
    comm = setup(resolve_device(device))
    try:
        return _run(comm, photons, frames, valid, qv, sv, grid, settings, seed, log_path, checkpoint_path, progress)
    finally:
        comm.close()


def _reduced(comm: Ranks, x: np.ndarray) -> np.ndarray:
    """The sum over ranks of the float64 array x (x itself in one process)."""
    if comm.world == 1:
        return x
    return comm.sum_(torch.as_tensor(x, device=comm.device)).cpu().numpy()


def _gathered(comm: Ranks, x: np.ndarray, counts: list[int]) -> np.ndarray:
    """The per-frame float64 arrays x of all ranks in frame order (x itself in one process)."""
    if comm.world == 1:
        return x
    return comm.gather(torch.as_tensor(x, device=comm.device), counts).cpu().numpy()


def _validated_sums(comm: Ranks, data: PhotonBlocks, n_pixels: int, counts: list[int]):
    """One pass over this rank's photon blocks (validating them, filling the cache when
    enabled): (photons per valid pixel (P,) summed over all frames of all ranks, photons per
    frame (all frames,)). A ValueError on any rank is raised on all (:meth:`Ranks.agree`)."""
    sum_counts, n_local, error = np.zeros(n_pixels), np.zeros(data.frames), None
    try:
        for i0, i1, K in data:
            pixel_sums, frame_sums = _sums(K)
            sum_counts += pixel_sums.double().cpu().numpy()
            n_local[i0:i1] = frame_sums.double().cpu().numpy()
    except ValueError as exc:
        error = exc
    comm.agree(error)
    return _reduced(comm, sum_counts), _gathered(comm, n_local, counts)


def _run(comm: Ranks, photons, frames, valid, qv, sv, grid, settings, seed, log_path, checkpoint_path, progress):
    """:func:`run_emc` on this rank's frames (all of them in one process)."""
    device, dtype = comm.device, getattr(torch, settings.dtype)
    ranges = frame_ranges(frames, comm.world, photon_chunk(photons)) if comm.world > 1 else [(0, frames)]
    f0, f1 = ranges[comm.rank]
    counts = [b - a for a, b in ranges]
    mine = photons if comm.world == 1 else FrameRange(photons, f0, f1)
    progress = progress and comm.is_root
    item = torch.finfo(dtype).bits // 8
    M = n_orientations(settings.num_div)
    budget = settings.memory_budget_gb * 1e9
    block = int(max(1, min(f1 - f0, budget // (item * (2 * M * settings.models + min(settings.orientation_chunk, M)
                                                      + len(qv))))))
    # orientation pixels first (by |q|: resolution marching), the central ones last: see EMCSettings
    central = np.linalg.norm(qv, axis=1) < settings.orientation_min_radius_voxels * grid.dq
    if central.all():
        raise ValueError(f"emc.orientation_min_radius_voxels = {settings.orientation_min_radius_voxels:g} "
                         f"leaves no valid pixel for orientation determination")
    order = np.lexsort((np.linalg.norm(qv, axis=1), central))
    qv, sv = qv[order], sv[order]
    first = settings.resolution_fraction(1) * np.linalg.norm(qv, axis=1).max()
    if settings.resolution_span > 0 and first <= settings.orientation_min_radius_voxels * grid.dq:
        # a small detector (few pixels beyond the central speckle): no marching, as before it
        warnings.warn(f"emc.resolution_start = {settings.resolution_start:g}: the first q radius {first:.4g} Å⁻¹ "
                      f"leaves no orientation pixel (they start at emc.orientation_min_radius_voxels · dq = "
                      f"{settings.orientation_min_radius_voxels * grid.dq:.4g} Å⁻¹); resolution marching is off "
                      f"for this run", UserWarning, stacklevel=3)
        settings = settings.model_copy(update={"resolution_iterations": 0})
    pixels = np.flatnonzero(valid.reshape(-1))[order]
    n_orient = int((~central).sum())
    if settings.photon_format == "auto":  # every rank reads the same first frames: the same choice
        settings = settings.model_copy(update={"photon_format": choose_photon_format(photons, pixels[:n_orient])})
    if settings.photon_format == "sparse":
        data = PhotonBlocks(mine, pixels, block, True, device, dtype, sparse_orient=n_orient, cache_bytes=budget)
    else:
        data = PhotonBlocks(mine, pixels, block, (f1 - f0) * len(qv) * item <= budget, device, dtype)

    sum_counts, n_frame = _validated_sums(comm, data, len(qv), counts)
    if n_frame.sum() <= 0:
        raise ValueError("photons: no photon in any valid pixel")
    engine = _Engine(data, qv, sv, n_orient, grid, settings, device, dtype, comm)
    fp = _fingerprint(settings, seed, grid, photons.shape, len(qv), data_digest(n_frame))

    start = 0
    ckpt = comm.broadcast(load_checkpoint(checkpoint_path, fp) if comm.is_root else None)
    rows = RunLog(log_path if comm.is_root else None, LOG_COLUMNS, ckpt)
    g0 = n_frame / n_frame.mean() if settings.update_gain else np.ones(frames)
    gain = torch.as_tensor(g0[f0:f1]).to(device, dtype)
    best_start = 0

    def checkpoint(it, **extra):  # rank 0 writes the per-frame arrays of all ranks
        if checkpoint_path is None:
            return
        state = {"iteration": it, "start": best_start, "model": W.cpu(), "gain": comm.gather(gain, counts).cpu(),
                 "beta": settings.beta(it), "fingerprint": fp, "log_rows": rows.state()}
        for k, v in extra.items():
            state[k] = (comm.gather(v, counts) if k in ("quaternion", "probability_max", "model_best",
                                                         "model_probability") else v)
            state[k] = state[k].cpu() if torch.is_tensor(state[k]) else state[k]
        if comm.is_root:
            save_checkpoint(checkpoint_path, state)

    if ckpt is not None:
        start, best_start = int(ckpt["iteration"]), int(ckpt["start"])
        log.info("EMC resumes from checkpoint %s after iteration %d", checkpoint_path, start)
        W, gain = ckpt["model"].to(device, dtype), ckpt["gain"][f0:f1].to(device, dtype)
    elif settings.trial_iterations > 0:
        W, best_start = _random_starts(photons, pixels, qv, sv, n_orient, grid, settings, seed, device, dtype,
                                       rows, progress, comm)
        start = settings.trial_iterations
        checkpoint(start)
    else:
        W = torch.as_tensor(_initial_models(comm, data, counts, sum_counts, qv, sv, g0, grid, settings, seed)
                            ).to(device, dtype)

    steps = refine_steps_deg(settings)
    local = ckpt is not None and "quaternion" in ckpt  # a checkpoint of the local refinement
    bar = tqdm(total=settings.iterations + len(steps), initial=min(start, settings.iterations + len(steps)),
               disable=not progress, desc="EMC")

    for it in range(start + 1, settings.iterations + 1) if not local else ():
        W, gain = _step(engine, W, gain, it, best_start, settings, rows)
        checkpoint(it)
        bar.update(1)
        bar.set_postfix(beta=f"{settings.beta(it):.3g}", loglik=f"{rows[-1]['log_likelihood']:.4g}",
                        change=f"{rows[-1]['rms_change']:.2e}")

    last_beta = settings.beta(max(start, settings.iterations))
    multi = settings.models > 1
    mbest = mprob = None
    if local:
        quat, pmax = (ckpt[k][f0:f1].to(device, dtype) for k in ("quaternion", "probability_max"))
        weight = ckpt["weight"].to(device, dtype)
        if multi:
            mbest, mprob = ckpt["model_best"][f0:f1].to(device), ckpt["model_probability"][f0:f1].to(device, dtype)
    else:
        _, _, _, best, pmax, weight = engine.iterate(W, gain, last_beta, update_gain=False,
                                                     fraction=settings.resolution_fraction(max(start, settings.iterations)))
        quat = torch.as_tensor(engine.quats).to(device, dtype)[best]
        mbest, mprob = engine.model_best, engine.model_probability
    per_model = {"model_best": mbest, "model_probability": mprob} if multi else {}
    engine.release()
    done = int(ckpt["local_done"]) if local else 0
    q_t, s_t = torch.as_tensor(qv).to(device, dtype), torch.as_tensor(sv).to(device, dtype)
    for k in range(done, len(steps)):
        t0, it = time.perf_counter(), settings.iterations + k + 1
        res = (_local_models if multi else local_iteration)(
            data, W, quat, gain, q_t, s_t, n_orient, grid, float(steps[k]), settings.refine_radius_steps,
            settings.refine_assignment, settings.beta_max, settings.update_gain, settings.memory_budget_gb,
            comm=comm, **({"model": mbest} if multi else {}))
        change = (torch.linalg.norm(res.W - W) / torch.linalg.norm(W).clamp_min(1e-30)).item()
        W, quat, gain, weight = res.W, res.quaternion, res.gain, res.weight
        if W.device.type == "cuda":
            torch.cuda.synchronize(W.device)
        row = {"iteration": it, "start": best_start,
               "beta": settings.beta_max if settings.refine_assignment == "soft" else np.nan, **res.stats,
               "rms_change": change, "gain_std": comm.std(gain),
               "seconds": time.perf_counter() - t0, "step_deg": float(steps[k])}
        rows.append(row)
        checkpoint(it, quaternion=quat, probability_max=pmax, weight=weight, local_done=k + 1, **per_model)
        bar.update(1)
        bar.set_postfix(step=f"{steps[k]:.2g}°", loglik=f"{row['log_likelihood']:.4g}",
                        moved=f"{row['moved_fraction']:.2f}")
    bar.close()

    log_df = rows.frame()
    quat, gain, pmax = (comm.gather(x, counts) for x in (quat, gain, pmax))
    extra = {}
    if multi:
        Wn, wn = W.double().cpu().numpy(), weight.double().cpu().numpy()
        order = model_size_order(Wn, wn, grid)
        rank = np.argsort(order)  # old index -> new index
        mb = rank[comm.gather(mbest, counts).cpu().numpy()]
        main = int(np.bincount(mb, minlength=len(order)).argmax())
        Wn, wn = Wn[order], wn[order]
        # every model into the main model's frame, and its frames' orientations with it
        A = common_frame(Wn, wn, grid, main)
        rot = quaternion_to_matrix(quat.double().cpu())
        rot = rot @ torch.as_tensor(A).transpose(1, 2)[torch.as_tensor(mb)]
        quat = matrix_to_quaternion(rot)
        Wn, wn = (np.stack([x if k == main else np.asarray(rotate_volume(x, A[k])) for k, x in enumerate(v)]
                           ).astype(np.float32) for v in (Wn, wn))
        extra = {"models": Wn, "model_weight": wn, "model": mb.astype(np.int64),
                 "model_probability": comm.gather(mprob, counts).double().cpu().numpy()}
        W, weight = torch.as_tensor(Wn[main]), torch.as_tensor(wn[main])
    return EMCResult(intensity=W.cpu().numpy().astype(np.float32),
                     weight=weight.cpu().numpy().astype(np.float32),
                     quaternion=canonical(quat.double()).cpu().numpy(),
                     gain=gain.double().cpu().numpy(),
                     probability_max=pmax.double().cpu().numpy(), log=log_df, **extra)


def speckle_halfwidths(models: np.ndarray, weights: np.ndarray, grid: Grid) -> np.ndarray:
    """The half-width of the central speckle of each of K models (K, n, n, n), Å⁻¹ (K,): the
    |q| at which the shell-averaged intensity (shells of width dq over the voxels that every
    model measures, weights (K, n, n, n) > 0; all voxels when none is common) first falls
    below half its largest value, linearly interpolated between shells (the last shell's
    |q| when it never does). The central maximum of ``|F(q)|²`` narrows as 1 / size, so
    this is a scale-free inverse size (the gains absorb a model's scale)."""
    common = (np.asarray(weights) > 0).all(0)
    mask = common if common.any() else np.ones(common.shape, bool)
    shell = np.rint(grid.q_norm()[mask] / grid.dq).astype(np.int64)
    count = np.bincount(shell)
    filled = np.flatnonzero(count > 0)
    half = []
    for m in np.asarray(models, dtype=np.float64):
        prof = (np.bincount(shell, weights=m[mask], minlength=len(count))[filled] / count[filled])
        top = int(prof.argmax())
        below = np.flatnonzero(prof[top:] < 0.5 * prof[top])
        if len(below) == 0:
            half.append(filled[-1] * grid.dq)
            continue
        j = top + int(below[0])  # prof[j - 1] >= half > prof[j]
        t = (prof[j - 1] - 0.5 * prof[top]) / (prof[j - 1] - prof[j])
        half.append((filled[j - 1] + t * (filled[j] - filled[j - 1])) * grid.dq)
    return np.asarray(half)


def model_size_order(models: np.ndarray, weights: np.ndarray, grid: Grid) -> np.ndarray:
    """The order of K models (K, n, n, n) by the size of the particle each stands for,
    smallest first: by decreasing :func:`speckle_halfwidths`. Returns (K,) int64 indices;
    ties keep the input order."""
    return np.argsort(-speckle_halfwidths(models, weights, grid), kind="stable").astype(np.int64)


def common_frame(models: np.ndarray, weights: np.ndarray, grid: Grid, main: int,
                 num_div: int = MODEL_ALIGN_NUM_DIV) -> np.ndarray:
    """Rotations A (K, 3, 3) that bring every model into the frame of model ``main``:
    ``W_k(q s_k) ≈ W_main(A_k q)``, found by :func:`spiflow.align.align_intensity_rotation`
    (``num_div``) between model k resampled at ``q s_k`` and the main model, ``s_k`` the
    ratio of their :func:`speckle_halfwidths` (so that particles of different size, whose
    intensities are alike up to the scale of q, are compared at equal speckle width); the
    voxels used are those both measure (weights > 0). A_main = 1. Each model of
    multi-model EMC has its own arbitrary frame (nothing ties them); after
    ``W_k ← rotate_volume(W_k, A_k)`` and ``R_i ← R_i A_kᵀ`` for the frames of model k, all
    share the main model's frame."""
    hw = speckle_halfwidths(models, weights, grid)
    q = torch.as_tensor(grid.q_points())
    out = np.tile(np.eye(3), (len(models), 1, 1))
    for k in range(len(models)):
        if k == main:
            continue
        scale = hw[k] / hw[main]
        Wk = slice_volume(torch.as_tensor(models[k], dtype=torch.float64), q * scale, grid).numpy()
        meas = slice_volume(torch.as_tensor((weights[k] > 0).astype(np.float64)), q * scale, grid).numpy() > 0.99
        A, _ = align_intensity_rotation(Wk, models[main], grid, mask=meas, reference_mask=weights[main] > 0,
                                        num_div=num_div)
        out[k] = np.asarray(A, dtype=np.float64)
    return out


class _Selected:
    """The frames ``selected`` (bool (frames,) tensor) of photon blocks ``data``, as blocks
    ``(j0, j1, K)`` numbered among the selected frames only (dense K)."""

    def __init__(self, data, selected: torch.Tensor):
        self.data, self.selected = data, selected

    def __iter__(self):
        j = 0
        for i0, i1, K in self.data:
            idx = torch.nonzero(self.selected[i0:i1])[:, 0]
            if len(idx) == 0:
                continue
            dense = getattr(K, "dense", None)
            K = dense() if dense is not None else K
            yield j, j + len(idx), K[idx.to(K.device)]
            j += len(idx)


def _local_models(data, W, quat, gain, q_t, s_t, n_orient, grid, step_deg, radius_steps, assignment, beta,
                  update_gain, memory_budget_gb, comm: Ranks, model: torch.Tensor) -> LocalResult:
    """One local iteration (:func:`spiflow.refine.local_iteration`) for K models W (K, n, n, n):
    every frame refined against its own most probable model ``model`` (frames,) (this rank's
    frames), model k merged from its frames alone; a model without frames keeps its value
    (weight 0). Gains are normalised to mean 1 within each model's frames (the scale of a
    model and its frames' gains are interchangeable), so their overall mean stays 1. The
    statistics are frame-weighted means over the models. Returns a :class:`LocalResult`
    with W and weight (K, n, n, n)."""
    W_new, weight = W.clone(), torch.zeros_like(W)
    quat, gain = quat.clone(), gain.clone()
    sums, total = {}, 0.0
    for k in range(len(W)):
        sel = model == k
        (n_k,) = comm.total(int(sel.sum()))
        if n_k == 0:
            continue
        res = local_iteration(_Selected(data, sel), W[k], quat[sel], gain[sel], q_t, s_t, n_orient, grid, step_deg,
                              radius_steps, assignment, beta, update_gain, memory_budget_gb, comm=comm)
        W_new[k], weight[k], quat[sel], gain[sel] = res.W, res.weight, res.quaternion, res.gain
        for name, v in res.stats.items():
            sums[name] = sums.get(name, 0.0) + v * n_k
        total += n_k
    return LocalResult(W_new, quat, gain, weight, {name: v / total for name, v in sums.items()})


def _step(engine: _Engine, W, gain, it: int, start_index: int, settings: EMCSettings, rows: RunLog):
    """Iteration ``it`` (1-based) of the schedule: one :meth:`_Engine.iterate` pass, logged.
    Returns the new (W, gain)."""
    t0, beta, sent = time.perf_counter(), settings.beta(it), engine.comm.bytes_communicated
    W_new, gain, stats, _, _, _ = engine.iterate(W, gain, beta, settings.update_gain, settings.resolution_fraction(it))
    change = (torch.linalg.norm(W_new - W) / torch.linalg.norm(W).clamp_min(1e-30)).item()
    if W.device.type == "cuda":
        torch.cuda.synchronize(W.device)
    row = {"iteration": it, "start": start_index, "beta": beta, **stats, "rms_change": change,
           "gain_std": engine.comm.std(gain), "seconds": time.perf_counter() - t0}
    if engine.comm.world > 1:
        log.info("EMC iteration %d: %d bytes sent into collectives by rank %d of %d", it,
                 engine.comm.bytes_communicated - sent, engine.comm.rank, engine.comm.world)
    rows.append(row)
    return W_new, gain


def _random_starts(photons, pixels, qv, sv, n_orient, grid, settings: EMCSettings, seed: int, device, dtype,
                   rows: RunLog, progress, comm: Ranks) -> tuple[torch.Tensor, int]:
    """The first ``start_iterations`` of the schedule from ``n_starts`` seeded initial models
    on the first ``start_frames`` frames at ``start_num_div`` (see :class:`~spiflow.settings.EMCSettings`).
    Across ranks, each reads an even share of those frames.

    Returns the model of the start with the highest final log-likelihood and its index;
    every start's iterations are logged (``start`` column)."""
    n = min(settings.start_frames, photons.shape[0])
    ranges = frame_ranges(n, comm.world)
    a, b = ranges[comm.rank]
    sub = np.asarray(photons[a:b])
    trial = settings.model_copy(update={"num_div": min(settings.start_num_div, settings.num_div)})
    M = n_orientations(trial.num_div)
    item = torch.finfo(dtype).bits // 8
    block = int(max(1, min(b - a, settings.memory_budget_gb * 1e9
                           // (item * (2 * M * settings.models + min(settings.orientation_chunk, M) + len(qv))))))
    data = PhotonBlocks(sub, pixels, block, True, device, dtype,
                        sparse_orient=n_orient if settings.photon_format == "sparse" else None)
    engine = _Engine(data, qv, sv, n_orient, grid, trial, device, dtype, comm)
    sum_counts, n_frame = _validated_sums(comm, data, len(qv), [y - x for x, y in ranges])
    g0 = n_frame / n_frame.mean() if settings.update_gain else np.ones(n)
    best = (-np.inf, None, 0)
    bar = tqdm(total=settings.n_starts * settings.trial_iterations, disable=not progress, desc="EMC starts")
    for k in range(settings.n_starts):
        W = torch.as_tensor(_initial_models(comm, data, [y - x for x, y in ranges], sum_counts, qv, sv, g0, grid,
                                            settings, seed + k)).to(device, dtype)
        gain = torch.as_tensor(g0[a:b]).to(device, dtype)
        for it in range(1, settings.trial_iterations + 1):
            W, gain = _step(engine, W, gain, it, k, trial, rows)
            bar.update(1)
        if rows[-1]["log_likelihood"] > best[0]:
            best = (rows[-1]["log_likelihood"], W, k)
    bar.close()
    return best[1], best[2]
