"""Atomic form factors and the molecular transform ``F(q) = Σ_j f_j(|q|) exp(2πi q·r_j)``.

Form factors: the four-Gaussian fit of International Tables for Crystallography Vol. C
(1992), Table 6.1.1.4 (IT92), as tabulated by gemmi:
``f(s) = Σ_{i=1..4} a_i exp(−b_i s²) + c`` with ``s = sin θ / λ = |q| / 2`` (Å⁻¹).

The sum over atoms is evaluated either exactly (``direct``: a complex matrix product,
any device) or by a non-uniform FFT (Barnett, Magland & af Klinteberg, SIAM J. Sci.
Comput. 41, C479 (2019); finufft on CPU, cufinufft on CUDA when installed): type 3 for
arbitrary q (detector pixels), type 1 for the cubic grid. Atoms are grouped by element so
each transform carries one strength vector per element. :func:`expected_counts` turns F at
rotated detector pixels into expected photon counts.
"""
from __future__ import annotations

import math

import gemmi
import numpy as np
import torch

from .grid import Grid
from .rotation import quaternion_to_matrix
from .structure import Atoms


def form_factor(element: str, q_norm: np.ndarray) -> np.ndarray:
    """IT92 atomic form factor of a neutral atom, in electrons, at |q| (Å⁻¹, any shape).

    Raises ValueError for an element without IT92 coefficients.
    """
    coefs = gemmi.Element(element).it92
    if coefs is None:
        raise ValueError(f"no IT92 form factor for element {element!r}")
    a = np.asarray(coefs.a, dtype=np.float64)
    b = np.asarray(coefs.b, dtype=np.float64)
    s2 = (np.asarray(q_norm, dtype=np.float64) / 2.0) ** 2
    return (a * np.exp(-np.multiply.outer(s2, b))).sum(-1) + coefs.c


def _element_strengths(atoms: Atoms) -> tuple[list[str], np.ndarray]:
    """Unique elements and (E, M) complex strengths: occupancy where the atom is element e."""
    elements = sorted(set(atoms.elements.tolist()))
    strengths = np.zeros((len(elements), len(atoms)), dtype=np.complex128)
    for e, name in enumerate(elements):
        sel = atoms.elements == name
        strengths[e, sel] = atoms.occupancy[sel]
    return elements, strengths


def structure_factor(atoms: Atoms, q: np.ndarray | torch.Tensor, method: str = "auto",
                     device: torch.device | str = "cpu", eps: float = 1e-9,
                     chunk: int = 32768, q_norm: np.ndarray | None = None) -> np.ndarray:
    """Molecular transform ``F(q) = Σ_j occ_j f_j(|q|) exp(2πi q·r_j)`` in electrons.

    q: (..., 3) scattering vectors in Å⁻¹ (no 2π). method: ``"direct"`` (exact sum,
    memory bounded by ``chunk`` q points at a time), ``"nufft"`` (finufft type 3 on CPU,
    cufinufft on CUDA, relative tolerance ``eps``; ``eps ≥ 1e-6`` runs in single precision,
    about 3× faster, whose floor is near 1e-6) or ``"auto"`` (NUFFT when the library for
    the device is installed, else direct). q_norm: optional |q| broadcastable to
    ``q.shape[:-1]`` (e.g. the detector's |q| for rotated copies of its pixels, which share
    it): the form factors are then evaluated on it rather than on every point.
    Returns complex128 array of shape (...). Raises ValueError for an unknown method, a q
    array whose last axis is not 3, or a q_norm that does not broadcast.
    """
    q = torch.as_tensor(q).double().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q, np.float64)
    if q.shape[-1] != 3:
        raise ValueError(f"q must have shape (..., 3), got {q.shape}")
    method = _choose_method(method, torch.device(device))
    shape = q.shape[:-1]
    qf = q.reshape(-1, 3)
    elements, strengths = _element_strengths(atoms)
    if method == "nufft":
        per_element = _nufft3(atoms.positions, strengths, qf, eps, torch.device(device))
    else:
        per_element = _direct(atoms.positions, strengths, qf, torch.device(device), chunk)
    if q_norm is None:
        qn = np.linalg.norm(q, axis=-1)
    else:
        qn = np.asarray(q_norm, dtype=np.float64)
        try:
            np.broadcast_shapes(qn.shape, shape)
        except ValueError:
            raise ValueError(f"q_norm of shape {qn.shape} does not broadcast to q's {shape}") from None
    F = np.zeros(shape, dtype=np.complex128)
    for e, name in enumerate(elements):
        F += form_factor(name, qn) * per_element[e].reshape(shape)
    return F


def structure_factor_grid(atoms: Atoms, grid: Grid, eps: float = 1e-9, single: bool = False) -> np.ndarray:
    """``F(q)`` on every voxel of the centred cubic ``grid``, (n, n, n) electrons: complex128,
    or complex64 with ``single`` (the NUFFT then runs in single precision with upsampling
    1.25, 1.5–3× faster measured on 57³–73³, to a floor near 1e-5 whatever ``eps``: measured
    on 2CEX at 59³, max error 6.5e-6 of max |F|, median relative error 8e-6; double at
    eps 1e-6: 2e-8, 4e-8).

    Type-1 NUFFT with modes k = −n//2 … n//2 at source points ``2π dq r_j`` (exact
    periodicity of exp(i k x) makes any particle size admissible; the particle should
    still fit in the real-space box 1/dq to avoid aliasing of the density), one transform
    per element, each times its IT92 form factor at the voxel's |q| (exact at the voxels).
    """
    import finufft

    elements, strengths = _element_strengths(atoms)
    x = 2 * math.pi * grid.dq * atoms.positions
    real, cplx = (np.float32, np.complex64) if single else (np.float64, np.complex128)
    x, strengths = x.astype(real), strengths.astype(cplx)
    # single: upsampling 1.25 (the FFT 4x smaller than at 2.0; measured fastest, finufft's own
    # choice is often 2.0 in single precision), whose kernel finufft caps at width 8 (the
    # accuracy stated above; showwarn=0 drops its note saying so); double: finufft's choice
    opts = {"upsampfac": 1.25, "showwarn": 0} if single else {}
    out = finufft.nufft3d1(x[:, 0].copy(), x[:, 1].copy(), x[:, 2].copy(), strengths,
                           (grid.n, grid.n, grid.n), eps=eps, isign=1, **opts)
    qn = grid.q_norm()
    F = np.zeros((grid.n,) * 3, dtype=cplx)
    for e, name in enumerate(elements):
        F += form_factor(name, qn).astype(real) * out[e]
    return F


def expected_counts(atoms: Atoms, q: np.ndarray, pixel_factor: np.ndarray, quats: np.ndarray,
                    scale: float, method: str, device: torch.device, eps: float) -> np.ndarray:
    """Noise-free ``scale · Ω P · |F(R_iᵀ q)|²`` for frames with quaternions (B, 4)
    ``[w, x, y, z]``: the expected photon counts of :mod:`spiflow.simulate` at gain 1.

    q: (ny, nx, 3) Å⁻¹; pixel_factor (ny, nx) sr; scale = J r_e² (Å² × photons/Å²); method,
    device, eps: as :func:`structure_factor`. Returns (B, ny, nx) float64 photons.
    """
    rot = quaternion_to_matrix(torch.as_tensor(quats, dtype=torch.float64)).numpy()
    q_rot = np.einsum("yxj,bjk->byxk", q, rot)  # (Rᵀ q)ᵀ = qᵀ R
    F = structure_factor(atoms, q_rot, method=method, device=device, eps=eps, q_norm=np.linalg.norm(q, axis=-1))
    return scale * pixel_factor * np.abs(F) ** 2


def _choose_method(method: str, device: torch.device) -> str:
    if method not in ("auto", "nufft", "direct"):
        raise ValueError(f"simulate.transform must be 'auto', 'nufft' or 'direct' here (per-pixel transforms; "
                         f"'slice' is spiflow.simulate.SliceTransform), got {method!r}")
    if method != "auto":
        return method
    try:
        if device.type == "cuda":
            import cufinufft  # noqa: F401
        else:
            import finufft  # noqa: F401
        return "nufft"
    except ImportError:
        return "direct"


def _nufft3(positions: np.ndarray, strengths: np.ndarray, q: np.ndarray, eps: float,
            device: torch.device) -> np.ndarray:
    """Σ_j c_ej exp(+2πi q·r_j) for each element row e: type-3 NUFFT, returns (E, Q)
    complex128 (computed in single precision when ``eps ≥ 1e-6``)."""
    s = 2 * math.pi * q
    if eps >= 1e-6:
        positions, strengths, s = positions.astype(np.float32), strengths.astype(np.complex64), s.astype(np.float32)
    if device.type == "cuda":
        import cufinufft

        out = cufinufft.nufft3d3(*(positions[:, i].copy() for i in range(3)), strengths,
                                 *(s[:, i].copy() for i in range(3)), eps=eps, isign=1)
        return np.asarray(out.get() if hasattr(out, "get") else out).astype(np.complex128, copy=False)
    import finufft

    out = finufft.nufft3d3(*(positions[:, i].copy() for i in range(3)), strengths,
                           *(s[:, i].copy() for i in range(3)), eps=eps, isign=1)
    return out.astype(np.complex128, copy=False)


def _direct(positions: np.ndarray, strengths: np.ndarray, q: np.ndarray, device: torch.device,
            chunk: int) -> np.ndarray:
    """Exact Σ_j c_ej exp(+2πi q·r_j) as complex matrix products, (E, Q), chunked over q."""
    r = torch.as_tensor(positions, device=device)
    c = torch.as_tensor(strengths, device=device)
    out = []
    for i in range(0, len(q), chunk):
        qc = torch.as_tensor(q[i:i + chunk], device=device)
        phase = torch.exp(2j * math.pi * (qc @ r.T))  # (Q, M) complex128
        out.append((c @ phase.T).cpu().numpy())
    return np.concatenate(out, axis=1)
