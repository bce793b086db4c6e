"""Heterogeneous samples (spiflow.hetero): ADK interpolation, mixtures, gold nanoparticles."""
from pathlib import Path

import gemmi
import numpy as np
import pytest
from scipy.spatial.distance import pdist

from spiflow import hetero
from spiflow.scattering import expected_counts
from spiflow.stores import conformation_dataset
from spiflow.symmetry import atoms_invariant

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def adk():
    return hetero.adenylate_kinase(DATA)


def _ca(path):
    """{residue number: CA position} of chain A, read independently with gemmi."""
    st = gemmi.read_structure(str(path))
    st.remove_alternative_conformations()
    return {r.seqid.num: np.array(r["CA"][0].pos.tolist()) for r in st[0]["A"] if r.find_atom("CA", "*")}


def test_adk_matches_atoms_and_keeps_both_end_structures(adk):
    # chain A is 214 residues (1,656 non-hydrogen protein atoms in both entries)
    assert 1600 <= len(adk.start) <= 1700 and set(adk.elements) == {"C", "N", "O", "S"}
    s0, s1 = adk.atoms([0.0]), adk.atoms([1.0])
    np.testing.assert_array_equal(s0.positions, adk.start)
    np.testing.assert_allclose(s1.positions, adk.end, atol=1e-12)
    np.testing.assert_allclose(adk.start.mean(0), 0, atol=1e-9)  # centred on the matched atoms
    np.testing.assert_allclose(adk.end.mean(0), 0, atol=1e-9)
    # the end points are the real structures up to a rigid motion: CA distance matrices agree
    a, b = _ca(DATA / "1ake.pdb"), _ca(DATA / "4ake.pdb")
    nums = sorted(set(a) & set(b))
    assert len(nums) == 214
    rows = [i for i, lab in enumerate(adk.labels) if lab.endswith(":CA")]
    assert [int(adk.labels[i].split(":")[0]) for i in rows] == nums
    np.testing.assert_allclose(pdist(adk.start[rows]), pdist(np.array([a[n] for n in nums])), atol=1e-3)
    np.testing.assert_allclose(pdist(adk.end[rows]), pdist(np.array([b[n] for n in nums])), atol=1e-3)
    # the known large hinge motion: several Å between closed and open
    assert 5.0 < adk.rmsd < 10.0


def test_kabsch_superposition_is_optimal(adk):
    rng = np.random.default_rng(0)
    base = adk.rmsd
    for _ in range(5):  # small random rotations of the end state never lower the RMSD
        w = rng.normal(size=3) * 0.02
        k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
        rot = np.eye(3) + np.sin(np.linalg.norm(w)) / np.linalg.norm(w) * k + \
            (1 - np.cos(np.linalg.norm(w))) / np.linalg.norm(w) ** 2 * k @ k
        moved = adk.end @ rot.T
        assert np.sqrt(((adk.start - moved) ** 2).sum(1).mean()) > base
    r, t = hetero.kabsch(adk.start @ np.diag([1, -1, -1]).T + 3.0, adk.start)  # a known motion
    np.testing.assert_allclose(r, np.diag([1.0, -1.0, -1.0]), atol=1e-10)
    np.testing.assert_allclose(t, [-3.0, 3.0, 3.0], atol=1e-9)


def test_interpolation_midpoint_and_draws(adk):
    mid = adk.atoms(np.array([0.5]))
    np.testing.assert_allclose(mid.positions, 0.5 * (adk.start + adk.end))
    assert mid.radius <= adk.radius
    t = adk.draw(1000, np.random.default_rng(0))
    assert t.shape == (1000, 1) and 0 <= t.min() and t.max() <= 1 and abs(t.mean() - 0.5) < 0.05


def test_octahedron_magic_numbers_and_oh_symmetry():
    a = hetero.GOLD_LATTICE_ANGSTROM
    for m in (1, 2, 3):  # octahedra of n = 2m + 1 atoms per edge hold (2n³ + n)/3 atoms
        n = 2 * m + 1
        assert len(hetero.truncated_octahedron(m * a, 0.0)) == (2 * n ** 3 + n) // 3
    assert len(hetero.truncated_octahedron(a, 0.5)) == 13  # cuboctahedron
    assert len(hetero.truncated_octahedron(2 * a, 0.5)) == 55
    for size, trunc in ((11.0, 0.0), (13.3, 0.2), (16.0, 1 / 3), (12.0, 0.5)):
        atoms = hetero.truncated_octahedron(size, trunc)
        assert atoms_invariant(atoms.positions, "Oh", tol=1e-9)
        assert set(atoms.elements) == {"Au"}
        np.testing.assert_allclose(atoms.positions.mean(0), 0, atol=1e-9)
        d = pdist(atoms.positions)
        np.testing.assert_allclose(d.min(), a / np.sqrt(2))  # fcc nearest neighbours
    assert not atoms_invariant(hetero.truncated_octahedron(12.0, 0.2).positions * [1, 1, 1.01], "Oh")


def test_gold_nanoparticles_draw_in_range():
    s = hetero.GoldNanoparticles(size_range=(10.0, 14.0), truncation_range=(0.1, 0.4))
    p = s.draw(200, np.random.default_rng(1))
    assert p.shape == (200, 2) and s.parameter_names == ("size_angstrom", "truncation")
    assert p[:, 0].min() >= 10 and p[:, 0].max() <= 14 and p[:, 1].min() >= 0.1 and p[:, 1].max() <= 0.4
    assert len(s.atoms(p[0])) > len(s.atoms([10.0, 0.4])) > 0
    assert s.radius == 14.0
    with pytest.raises(ValueError, match="truncation_range"):
        hetero.GoldNanoparticles(truncation_range=(0.2, 1.0))


def test_read_xyz_bare_and_standard(tmp_path):
    ball = hetero.read_xyz(DATA / "AuBall.xyz")
    assert len(ball) == 155 and set(ball.elements) == {"Au"}
    assert ball.electrons() == 155 * 79 and 9 < ball.radius < 13  # ≈ 2 nm particle
    f = tmp_path / "w.xyz"
    f.write_text("3\nwater\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    w = hetero.read_xyz(f)
    assert list(w.elements) == ["O", "H", "H"]
    np.testing.assert_allclose(w.positions.mean(0), 0, atol=1e-12)
    f.write_text("4\nwrong count\nO 0 0 0\n")
    with pytest.raises(ValueError, match="header says 4"):
        hetero.read_xyz(f)
    with pytest.raises(FileNotFoundError):
        hetero.read_xyz(tmp_path / "missing.xyz")


def test_mixture_fractions_and_conformation_store():
    a, b = hetero.truncated_octahedron(8.2, 0.0), hetero.truncated_octahedron(12.3, 0.0)
    mix = hetero.Mixture((a, b), (0.25, 0.75), ("small", "large"))
    p = mix.draw(4000, np.random.default_rng(2))
    assert abs(p.mean() - 0.75) < 0.03 and set(np.unique(p)) == {0.0, 1.0}
    assert mix.atoms(p[0]) is (b if p[0, 0] else a) and mix.radius == b.radius
    ds = conformation_dataset(p[:10], mix.parameter_names)
    assert ds["conformation"].dims == ("frame", "parameter") and list(ds["parameter"].values) == ["state"]
    with pytest.raises(ValueError, match="fractions"):
        hetero.Mixture((a, b), (1.0,))
    mix2 = hetero.make_sample("mixture", paths=[DATA / "AuBall.xyz", DATA / "2cex.pdb"], fractions=[1, 1])
    assert mix2.states[0].elements[0] == "Au" and len(mix2.states[1]) > 2000


def test_expected_counts_uses_each_frames_atoms():
    rng = np.random.default_rng(3)
    q = rng.normal(scale=0.05, size=(4, 5, 3))
    pf = rng.uniform(0.5, 1.0, size=(4, 5))
    s = hetero.GoldNanoparticles(size_range=(6.0, 9.0), truncation_range=(0.0, 0.5))
    params = np.concatenate([s.draw(3, rng), s.draw(1, rng).repeat(2, 0)])  # two identical rows
    quats = rng.normal(size=(5, 4))
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    mu = hetero.expected_counts(s, params, q, pf, quats, 2.0, method="direct")
    for i in range(5):
        ref = expected_counts(s.atoms(params[i]), q, pf, quats[i:i + 1], 2.0, "direct", "cpu", 1e-9)[0]
        np.testing.assert_allclose(mu[i], ref, rtol=1e-12)
