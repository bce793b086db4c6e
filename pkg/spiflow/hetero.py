"""Heterogeneous samples: a different atom set per frame, drawn from a conformation parameter.

Every sample has ``parameter_names`` and two methods: ``draw(n, rng)`` → parameters
(n, P) float64 (one row per frame, stored in the truth store as ``conformation (frame,
parameter)``, :func:`spiflow.stores.conformation_dataset`), and ``atoms(row)`` →
:class:`~spiflow.structure.Atoms` of that conformation (positions in Å, centred on the
origin). Samples:

* :class:`Interpolation` — a continuous conformational change between two end states,
  ``r_j(t) = (1 − t) r_j^A + t r_j^B`` with t ~ U[0, 1] (parameter ``t``). :func:`adenylate_kinase`
  builds it from PDB 1AKE (closed, t = 0) and 4AKE (open, t = 1), chain A: atoms matched
  residue by residue (sequence number, insertion code, residue name) and by atom name
  (gemmi), 4AKE superposed onto 1AKE by the Kabsch algorithm on the matched atoms. The
  frame is the closed state's axes translated to the matched atoms' centre (so both
  ends, and every t, have their centre at 0). Linear Cartesian interpolation is a toy
  path: midway bonds are distorted by up to a few Å, but the large-scale hinge motion
  (LID and NMP domains closing, Müller et al., Structure 4, 147 (1996)) is continuous.
* :class:`Mixture` — discrete states (structure files or atom sets) drawn with given
  fractions (parameter ``state``, the state's index).
* :class:`GoldNanoparticles` — fcc gold (a = 4.078 Å) octahedra truncated by cube faces,
  as the shape-varying particles of Zhuang et al., IUCrJ 9, 204 (2022): the lattice sites
  ``(a/2)(i, j, k)``, i + j + k even (an atom at the centre), inside ``|x| + |y| + |z| ≤ R``
  (the {111} faces) and ``max(|x|, |y|, |z|) ≤ (1 − τ) R`` (the {100} faces). Parameters
  ``size_angstrom`` = R (centre to octahedron vertex) and ``truncation`` = τ: τ = 0 the
  octahedron, 1/3 the truncated octahedron, 1/2 the cuboctahedron. The atom set has the
  full Oh symmetry. R and τ are drawn uniformly from configurable ranges.

:func:`make_sample` builds one by name (for a config file). :func:`read_xyz` reads XYZ files (with or without the count/comment header; with an
element column or, like ``data/AuBall.xyz``, x y z only and a given element).
:func:`expected_counts` gives the noise-free photon counts of frames with per-frame atoms
through :func:`spiflow.scattering.expected_counts`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import gemmi
import numpy as np
import torch

from . import scattering
from .structure import Atoms, merge_altlocs, read_structure

GOLD_LATTICE_ANGSTROM = 4.078  # fcc gold at room temperature


@dataclass(frozen=True)
class Interpolation:
    """Linear interpolation between two matched atom sets (parameter ``t`` ∈ [0, 1]).

    start, end: (M, 3) Å, atom j of one is atom j of the other, both centred on 0.
    elements: (M,); occupancy_start, occupancy_end: (M,) (interpolated like the positions).
    t_range: the uniform range t is drawn from. names: labels of the two ends.
    labels: (M,) atom identifiers ``"resnum[icode]:resname:atom"`` (or empty).
    """

    start: np.ndarray
    end: np.ndarray
    elements: np.ndarray
    occupancy_start: np.ndarray
    occupancy_end: np.ndarray
    t_range: tuple[float, float] = (0.0, 1.0)
    names: tuple[str, str] = ("start", "end")
    labels: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    parameter_names: tuple[str, ...] = ("t",)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """t ~ U[t_range] for n frames, shape (n, 1)."""
        return rng.uniform(*self.t_range, size=(n, 1))

    def atoms(self, params) -> Atoms:
        """The atoms at ``t = params[0]``: ``(1 − t) start + t end``."""
        t = float(np.ravel(params)[0])
        pos = (1 - t) * self.start + t * self.end
        occ = (1 - t) * self.occupancy_start + t * self.occupancy_end
        return Atoms(pos, self.elements, occ, f"{self.names[0]}→{self.names[1]} t={t:.4f}", np.zeros(3))

    @property
    def radius(self) -> float:
        """Bound on the atoms' distance from the centre for every t, Å."""
        return float(max(np.linalg.norm(self.start, axis=1).max(), np.linalg.norm(self.end, axis=1).max()))

    @property
    def rmsd(self) -> float:
        """RMSD between the two (superposed) end states, Å."""
        return float(np.sqrt(((self.start - self.end) ** 2).sum(1).mean()))


def _residue_atoms(path: str | Path, chain: str) -> dict[tuple, tuple]:
    """{(seq number, icode, residue name, atom name): (position, element, occupancy)} of the
    amino-acid residues of ``chain`` (no hydrogens, no water, no ligands; one conformer)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    st = gemmi.read_structure(str(path))
    mdl = st[0]
    merge_altlocs(mdl)
    if mdl.find_chain(chain) is None:
        raise ValueError(f"{path}: no chain {chain!r}")
    out = {}
    for res in mdl[chain]:
        info = gemmi.find_tabulated_residue(res.name)
        if info is None or not info.is_amino_acid():
            continue
        for atom in res:
            if not atom.element.is_hydrogen:
                out[(res.seqid.num, res.seqid.icode, res.name, atom.name)] = (
                    atom.pos.tolist(), atom.element.name, atom.occ)
    return out


def kabsch(mobile: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Proper rotation R (3, 3) and translation t (3,) minimising ``Σ |R m_j + t − x_j|²``.

    mobile, target: (M, 3) matched points. W. Kabsch, Acta Cryst. A32, 922 (1976), with
    the determinant correction that excludes reflections.
    """
    cm, ct = mobile.mean(0), target.mean(0)
    h = (mobile - cm).T @ (target - ct)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, ct - rot @ cm


def matched_interpolation(start_path: str | Path, end_path: str | Path, chain: str = "A",
                          t_range: tuple[float, float] = (0.0, 1.0)) -> Interpolation:
    """:class:`Interpolation` between two models of one protein chain (PDB or mmCIF).

    Atoms present in both files (same residue number, insertion code, residue name and
    atom name; amino acids only, no H, highest-occupancy conformer) are kept in the start
    file's order. Frame: the start state's axes, centred on its matched atoms; the end
    state is superposed onto it (:func:`kabsch`). Raises ValueError when fewer than 3
    atoms match.
    """
    a, b = _residue_atoms(start_path, chain), _residue_atoms(end_path, chain)
    keys = [k for k in a if k in b]
    if len(keys) < 3:
        raise ValueError(f"{start_path} and {end_path}: only {len(keys)} atoms of chain {chain} match")
    pa = np.array([a[k][0] for k in keys])
    pb = np.array([b[k][0] for k in keys])
    rot, shift = kabsch(pb, pa)
    centre = pa.mean(0)
    return Interpolation(start=pa - centre, end=pb @ rot.T + shift - centre,
                         elements=np.array([a[k][1] for k in keys]),
                         occupancy_start=np.array([a[k][2] for k in keys], dtype=float),
                         occupancy_end=np.array([b[k][2] for k in keys], dtype=float),
                         t_range=t_range, names=(Path(start_path).stem, Path(end_path).stem),
                         labels=np.array([f"{k[0]}{k[1].strip()}:{k[2]}:{k[3]}" for k in keys]))


def adenylate_kinase(data_dir: str | Path = "data", chain: str = "A") -> Interpolation:
    """1AKE (closed, t = 0) → 4AKE (open, t = 1) of *E. coli* adenylate kinase, chain A,
    from ``data_dir/1ake.pdb`` and ``data_dir/4ake.pdb`` (see :func:`matched_interpolation`)."""
    d = Path(data_dir)
    return matched_interpolation(d / "1ake.pdb", d / "4ake.pdb", chain)


@dataclass(frozen=True)
class Mixture:
    """Discrete states drawn with probabilities ``fractions`` (parameter ``state`` = index).

    states: atom sets (each centred); fractions: (S,) >= 0, normalised here; labels: names.
    Raises ValueError for mismatched lengths or fractions that are negative or sum to 0.
    """

    states: tuple[Atoms, ...]
    fractions: tuple[float, ...]
    labels: tuple[str, ...] = ()
    parameter_names: tuple[str, ...] = ("state",)

    def __post_init__(self):
        f = np.asarray(self.fractions, dtype=float)
        if len(f) != len(self.states) or len(f) == 0 or (f < 0).any() or f.sum() <= 0:
            raise ValueError(f"mixture fractions {self.fractions} must be >= 0, not all 0, one per state "
                             f"({len(self.states)} states)")
        if self.labels and len(self.labels) != len(self.states):
            raise ValueError("mixture labels must give one name per state")

    @classmethod
    def from_files(cls, paths, fractions, **read_kw) -> "Mixture":
        """States read with :func:`~spiflow.structure.read_structure` (``.xyz`` with :func:`read_xyz`)."""
        states = tuple(read_xyz(p) if str(p).endswith(".xyz") else read_structure(p, **read_kw) for p in paths)
        return cls(states, tuple(fractions), tuple(Path(p).stem for p in paths))

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """State indices (n, 1) as float64, drawn with the normalised fractions."""
        f = np.asarray(self.fractions, dtype=float)
        return rng.choice(len(f), size=n, p=f / f.sum()).astype(float)[:, None]

    def atoms(self, params) -> Atoms:
        return self.states[int(np.ravel(params)[0])]

    @property
    def radius(self) -> float:
        return max(s.radius for s in self.states)


def truncated_octahedron(size: float, truncation: float, lattice: float = GOLD_LATTICE_ANGSTROM,
                         element: str = "Au") -> Atoms:
    """fcc atoms inside an octahedron of vertex distance ``size`` (Å) cut by cube faces at
    ``(1 − truncation) · size`` (see the module docstring). Centred on an atom; Oh symmetric.

    Raises ValueError unless size > 0 and 0 <= truncation < 1.
    """
    if not size > 0 or not 0 <= truncation < 1:
        raise ValueError(f"nanoparticle size must be > 0 Å and truncation in [0, 1), got {size}, {truncation}")
    m = int(np.floor(2 * size / lattice)) + 1
    ax = np.arange(-m, m + 1)
    ijk = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    ijk = ijk[ijk.sum(1) % 2 == 0]
    pos = ijk * (lattice / 2)
    eps = 1e-9 * lattice
    keep = (np.abs(pos).sum(1) <= size + eps) & (np.abs(pos).max(1) <= (1 - truncation) * size + eps)
    pos = pos[keep]
    return Atoms(pos, np.full(len(pos), element), np.ones(len(pos)),
                 f"fcc {element} octahedron R={size:.3f} Å τ={truncation:.3f}", np.zeros(3))


@dataclass(frozen=True)
class GoldNanoparticles:
    """Truncated fcc octahedra with R ~ U[size_range] Å and τ ~ U[truncation_range] per frame.

    Parameters (n, 2): ``size_angstrom``, ``truncation``. Raises ValueError for ranges
    outside size > 0, 0 <= τ < 1, or with low > high.
    """

    size_range: tuple[float, float] = (20.0, 30.0)
    truncation_range: tuple[float, float] = (0.0, 0.5)
    lattice: float = GOLD_LATTICE_ANGSTROM
    element: str = "Au"
    parameter_names: tuple[str, ...] = ("size_angstrom", "truncation")
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        (s0, s1), (t0, t1) = self.size_range, self.truncation_range
        if not (0 < s0 <= s1 and 0 <= t0 <= t1 < 1):
            raise ValueError(f"nanoparticle size_range {self.size_range} must be 0 < low <= high and "
                             f"truncation_range {self.truncation_range} within [0, 1), low <= high")

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.stack([rng.uniform(*self.size_range, n), rng.uniform(*self.truncation_range, n)], 1)

    def atoms(self, params) -> Atoms:
        size, trunc = (float(v) for v in np.ravel(params)[:2])
        key = (round(size, 9), round(trunc, 9))
        if key not in self._cache:  # repeated (discrete) parameters are built once
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = truncated_octahedron(size, trunc, self.lattice, self.element)
        return self._cache[key]

    @property
    def radius(self) -> float:
        return float(self.size_range[1])


def read_xyz(path: str | Path, element: str = "Au") -> Atoms:
    """Atoms of an XYZ file, centred on their geometric centre (occupancy 1).

    Accepts the standard layout (atom count, comment line, then ``El x y z``) and bare
    ``x y z`` or ``El x y z`` lines; lines with three numbers take ``element``. Å.
    Raises FileNotFoundError, or ValueError naming the file for an unreadable line, an
    atom count that does not match, no atoms, or an element without IT92 form factor.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"XYZ file not found: {path}")
    lines = [ln.split() for ln in path.read_text().splitlines()]
    count = None
    if lines and len(lines[0]) == 1 and lines[0][0].isdigit():
        count, lines = int(lines[0][0]), lines[2:]
    pos, elem = [], []
    for i, tok in enumerate(lines):
        if not tok:
            continue
        try:
            if len(tok) == 3:
                pos.append([float(v) for v in tok])
                elem.append(element)
            elif len(tok) >= 4:
                pos.append([float(v) for v in tok[1:4]])
                elem.append(gemmi.Element(tok[0]).name)
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"{path}: cannot read atom line {' '.join(tok)!r}") from None
    if count is not None and count != len(pos):
        raise ValueError(f"{path}: header says {count} atoms, found {len(pos)}")
    if not pos:
        raise ValueError(f"{path}: no atoms")
    for e in set(elem):
        if gemmi.Element(e).it92 is None or gemmi.Element(e).atomic_number == 0:
            raise ValueError(f"{path}: unknown element {e!r}")
    pos = np.asarray(pos, dtype=float)
    centre = pos.mean(0)
    return Atoms(pos - centre, np.asarray(elem), np.ones(len(pos)), str(path), centre)


def expected_counts(sample, params: np.ndarray, q: np.ndarray, pixel_factor: np.ndarray, quats: np.ndarray,
                    scale: float, method: str = "auto", device: torch.device | str = "cpu",
                    eps: float = 1e-9) -> np.ndarray:
    """Noise-free ``scale · Ω P · |F_i(R_iᵀ q)|²`` with frame i's atoms ``sample.atoms(params[i])``.

    params (B, P), quats (B, 4) ``[w, x, y, z]``; q (ny, nx, 3) Å⁻¹; pixel_factor (ny, nx);
    scale = J r_e² as in :func:`spiflow.scattering.expected_counts` (reused; frames with
    identical parameters share one call). Returns (B, ny, nx) float64 photons at gain 1.
    """
    params = np.asarray(params, dtype=float).reshape(len(quats), -1)
    out = np.empty((len(quats),) + pixel_factor.shape)
    uniq, inverse = np.unique(params, axis=0, return_inverse=True)
    for u, row in enumerate(uniq):
        sel = np.flatnonzero(inverse.ravel() == u)
        out[sel] = scattering.expected_counts(sample.atoms(row), q, pixel_factor, np.asarray(quats)[sel], scale,
                                              method, torch.device(device), eps)
    return out


def make_sample(kind: str, **options):
    """A heterogeneous sample by name: ``"interpolation"`` (start, end: structure paths;
    chain, t_range), ``"mixture"`` (paths, fractions), ``"nanoparticles"`` (size_range,
    truncation_range, lattice, element). Raises ValueError for an unknown kind."""
    if kind == "interpolation":
        return matched_interpolation(options.pop("start"), options.pop("end"), **options)
    if kind == "mixture":
        return Mixture.from_files(options.pop("paths"), options.pop("fractions"), **options)
    if kind == "nanoparticles":
        return GoldNanoparticles(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    raise ValueError(f"heterogeneous sample kind must be interpolation, mixture or nanoparticles, got {kind!r}")
