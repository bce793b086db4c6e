"""Reading atomic structures (PDB, mmCIF) into positions, elements and occupancies.

Reading is gemmi's (https://gemmi.readthedocs.io): it parses PDB and PDBx/mmCIF and
infers the element from the atom name where PDB columns 77–78 are empty. The particle
frame (docs/conventions.md) is the file's own axes translated to the atoms' geometric centre,
never rotated.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gemmi
import numpy as np


@dataclass(frozen=True)
class Atoms:
    """Atoms of one particle.

    positions: (M, 3) float64 in Å, centred on the atoms' geometric centre.
    elements: (M,) element symbols (gemmi spelling, e.g. "C", "Zn").
    occupancy: (M,) float64 weights of each atom's scattering (0 … 1).
    source: the file read. centre: (3,) Å, the subtracted centre in file coordinates.
    """

    positions: np.ndarray
    elements: np.ndarray
    occupancy: np.ndarray
    source: str
    centre: np.ndarray

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def radius(self) -> float:
        """Largest distance of an atom from the centre, Å."""
        return float(np.linalg.norm(self.positions, axis=1).max())

    def electrons(self) -> float:
        """Σ occupancy × atomic number: the forward scattering F(0) of neutral atoms."""
        z = np.array([gemmi.Element(e).atomic_number for e in self.elements], dtype=float)
        return float((z * self.occupancy).sum())


def read_structure(path: str | Path, hydrogens: bool = False, hetatm: bool = True,
                   waters: bool = False, model: int = 0) -> Atoms:
    """Read atoms from a PDB or mmCIF file.

    Alternate locations: for each atom only the conformer of highest occupancy is kept
    (the first on a tie) and its occupancy becomes the sum over its conformers (at most
    1), as one particle holds one conformer. Other atoms scatter with their occupancy.

    hydrogens: keep H/D atoms. hetatm: keep HETATM residues other than water.
    waters: keep water molecules. model: index of the model in multi-model files.

    Raises FileNotFoundError if ``path`` does not exist, ValueError naming the file
    if it cannot be parsed, has no such model, or keeps no atoms.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file not found: {path}")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read structure file {path}: {exc}") from exc
    if len(st) <= model:
        raise ValueError(f"structure file {path} has {len(st)} model(s); model {model} requested")
    st.setup_entities()
    mdl = st[model]
    merge_altlocs(mdl)
    pos, elem, occ = [], [], []
    for chain in mdl:
        for res in chain:
            is_water = res.is_water()
            if is_water and not waters:
                continue
            if res.het_flag == "H" and not is_water and not hetatm:
                continue
            for atom in res:
                if atom.element.is_hydrogen and not hydrogens:
                    continue
                if atom.element.it92 is None or sum(atom.element.it92.get_coefs()) <= 0:
                    raise ValueError(f"{path}: atom {atom.name} of {res.name} {res.seqid} has an "
                                     f"unknown element {atom.element.name!r}")
                pos.append(atom.pos.tolist())
                elem.append(atom.element.name)
                occ.append(atom.occ)
    if not pos:
        raise ValueError(f"structure file {path} contains no atoms (after the hydrogen/"
                         f"HETATM/water selection)")
    pos = np.asarray(pos, dtype=np.float64)
    occ = np.asarray(occ, dtype=np.float64)
    if not np.all(np.isfinite(pos)) or np.any(occ < 0):
        raise ValueError(f"structure file {path} has non-finite coordinates or negative occupancy")
    centre = pos.mean(axis=0)
    return Atoms(pos - centre, np.asarray(elem), occ, str(path), centre)


def merge_altlocs(mdl: gemmi.Model) -> None:
    """Keep one conformer per atom of ``mdl`` (in place): the one of highest occupancy, with
    the conformers' summed occupancy (at most 1); the altloc labels are cleared."""
    for chain in mdl:
        for res in chain:
            groups: dict[str, list] = {}
            for atom in res:
                if atom.altloc != "\0":
                    groups.setdefault(atom.name, []).append(atom)
            for atoms in groups.values():
                total = min(1.0, sum(a.occ for a in atoms))
                best = max(atoms, key=lambda a: a.occ)
                for a in atoms:
                    a.occ = total if a is best else 0.0
    # drop the zero-occupancy losers, then the altloc labels themselves
    for chain in mdl:
        for res in chain:
            for i in reversed(range(len(res))):
                if res[i].altloc != "\0" and res[i].occ == 0.0:
                    del res[i]
            for atom in res:
                atom.altloc = "\0"
