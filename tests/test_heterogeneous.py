"""Heterogeneous samples in the simulate stage, their config errors, and the vae stage helpers."""
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from spiflow import config as cfg
from spiflow import hetero, latent, simulate
from spiflow.rotation import random_quaternions
from spiflow.settings import VAESettings
from spiflow.vae import VAEModel

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
ADK = {"kind": "interpolation", "path": str(DATA / "1ake.pdb"),
       "interpolation": {"end_path": str(DATA / "4ake.pdb"), "chain": "A"}, "reference_states": 3}


def small(sample, **over):
    base = {"sample": sample, "dataset": {"n_patterns": 12, "seed": 4, "chunk_frames": 5},
            "detector": {"n_pixels": 12, "pixel_size_m": 2.6e-3, "beam_stop_radius_m": 2e-3},
            "beam": {"mean_photons_per_pattern": 800.0}, "simulate": {"pilot_orientations": 8}}
    return cfg.validate(cfg.merge(base, over))


def test_batched_per_frame_counts_equal_one_transform_per_frame():
    adk = hetero.adenylate_kinase(DATA)
    c = small(ADK)
    det = simulate.detector_from_config(c)
    q, pf = det.q(), det.pixel_factor()
    rng = np.random.default_rng(0)
    quats = random_quaternions(5, rng)
    for sample in (adk, hetero.GoldNanoparticles((8.0, 12.0), (0.0, 0.5))):  # fixed and varying atom counts
        params = sample.draw(5, rng)
        ref = hetero.expected_counts(sample, params, q, pf, quats, 2.0, method="direct")
        new = simulate.expected_counts_per_frame([sample.atoms(p) for p in params], q, pf, quats, 2.0,
                                                 torch.device("cpu"), budget=20000)
        np.testing.assert_allclose(new, ref, rtol=1e-9)


def test_interpolation_truth_store_and_chunk_independence(tmp_path):
    c = small(ADK)
    simulate.simulate(c, tmp_path / "a" / "p.zarr", tmp_path / "a" / "t.zarr", progress=False)
    tr = xr.open_zarr(tmp_path / "a" / "t.zarr")
    assert tr.conformation.dims == ("frame", "parameter") and list(tr.parameter.values) == ["t"]
    t = tr.conformation.values[:, 0]
    assert t.shape == (12,) and 0 <= t.min() and t.max() <= 1 and len(np.unique(t)) == 12
    # reference states: bin centres of t; the reference conformation is mid-range
    np.testing.assert_allclose(tr.state_conformation.values[:, 0], [1 / 6, 1 / 2, 5 / 6])
    assert tr.attrs["reference_conformation"] == [0.5]
    assert tr.state_intensity.dims == ("state", "qx", "qy", "qz") and tr.state_density.sizes["state"] == 3
    np.testing.assert_allclose(tr.state_intensity.values[1], tr.intensity.values, rtol=1e-6)  # t = 0.5 both
    assert not np.allclose(tr.state_intensity.values[0], tr.state_intensity.values[2], rtol=0.05)
    pat = xr.open_zarr(tmp_path / "a" / "p.zarr")
    assert "conformation" not in pat and pat.attrs["sample_kind"] == "interpolation"
    c2 = small(ADK, dataset={"chunk_frames": 7})
    simulate.simulate(c2, tmp_path / "b" / "p.zarr", tmp_path / "b" / "t.zarr", progress=False)
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "b" / "p.zarr").photons.values, pat.photons.values)


def test_mixture_and_nanoparticle_truth(tmp_path):
    mix = {"kind": "mixture", "mixture": {"paths": [str(DATA / "1ake.pdb"), str(DATA / "4ake.pdb")],
                                          "fractions": [1.0, 3.0]}}
    simulate.simulate(small(mix), tmp_path / "m" / "p.zarr", tmp_path / "m" / "t.zarr", progress=False)
    tr = xr.open_zarr(tmp_path / "m" / "t.zarr")
    assert set(np.unique(tr.conformation.values)) <= {0.0, 1.0} and list(tr.parameter.values) == ["state"]
    assert tr.attrs["reference_conformation"] == [1.0]  # the larger fraction
    np.testing.assert_allclose(tr.state_density.values[1], tr.density.values)
    nano = {"kind": "nanoparticles", "nanoparticles": {"size_range_angstrom": [8.0, 12.0]}, "reference_states": 2}
    simulate.simulate(small(nano), tmp_path / "n" / "p.zarr", tmp_path / "n" / "t.zarr", progress=False)
    tr = xr.open_zarr(tmp_path / "n" / "t.zarr")
    assert list(tr.parameter.values) == ["size_angstrom", "truncation"] and tr.sizes["state"] == 4
    assert 8 <= tr.conformation.values[:, 0].min() and tr.conformation.values[:, 0].max() <= 12


@pytest.mark.parametrize("sample, key", [
    ({"kind": "interpolation", "path": str(DATA / "1ake.pdb")}, "sample.interpolation.end_path"),
    ({**ADK, "interpolation": {"end_path": "absent.pdb"}}, "sample.interpolation.end_path"),
    ({**ADK, "interpolation": {"end_path": str(DATA / "4ake.pdb"), "chain": "Q"}}, "sample.interpolation.chain"),
    ({**ADK, "interpolation": {"end_path": str(DATA / "4ake.pdb"), "t_range": [0.8, 0.2]}},
     "sample.interpolation.t_range"),
    ({"kind": "mixture", "mixture": {"paths": [str(DATA / "1ake.pdb")]}}, "sample.mixture.paths"),
    ({"kind": "mixture", "mixture": {"paths": [str(DATA / "1ake.pdb"), str(DATA / "4ake.pdb")],
                                     "fractions": [1.0]}}, "sample.mixture.fractions"),
    ({"kind": "mixture", "mixture": {"paths": [str(DATA / "1ake.pdb"), "gone.pdb"]}}, "sample.mixture.paths"),
    ({"kind": "nanoparticles", "nanoparticles": {"size_range_angstrom": [30.0, 20.0]}},
     "sample.nanoparticles.size_range_angstrom"),
    ({"kind": "structure", "path": "nowhere.pdb"}, "sample.path"),
])
def test_bad_heterogeneous_sample_names_the_key(sample, key):
    with pytest.raises((ValueError, FileNotFoundError), match=key.replace(".", r"\.")):
        simulate.build_sample(small(sample))


@pytest.mark.parametrize("bad, key", [({"kind": "blob"}, "sample.kind"),
                                      ({"nanoparticles": {"truncation_range": [0.0, 1.0]}}, "sample.nanoparticles"),
                                      ({"mixture": {"fractions": [-1.0]}}, "sample.mixture.fractions")])
def test_schema_rejects_bad_sample_keys(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        cfg.validate({"sample": bad})


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_build_their_samples(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # sample paths are relative to the repository, as Snakemake runs
    simulate.build_sample(cfg.load_config(path))


def test_vae_section_and_helpers(tmp_path):
    from spiflow.rules import layout, vae_orientations_source

    c = cfg.validate({"vae": {"epochs": 3, "symmetry": "Oh", "orientations": "truth"}, "device": "cpu"})
    P = layout("r", "x")
    assert vae_orientations_source(c, P) == P["truth"]
    assert vae_orientations_source(cfg.validate({}), P) == P["orientations"].format(method="emc")
    with pytest.raises(ValueError, match="vae.orientations"):
        cfg.validate({"vae": {"orientations": "mtip"}})
    with pytest.raises(ValueError, match="vae.volume_n"):
        cfg.validate({"vae": {"volume_n": 20}})
    # representative frames and state matching
    z = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [5.1, 5.0], [5.0, 5.1], [0.4, 0.1]])
    assert latent.representative_frame(z, "mean", 2, 0) in (1, 5)
    assert latent.representative_frame(z, "largest_cluster", 2, 0) in (2, 3, 4)
    states = np.array([[0.1], [0.5], [0.9]])
    np.testing.assert_array_equal(latent.match_states(np.array([[0.0], [0.45], [1.0]]), states, np.array([1.0])),
                                  [0, 1, 2])
    # the decoder round-trips through its file
    vc = VAESettings(latent_dim=2, decoder_channels=4, decoder_layers=2, volume_n=9)
    dec = VAEModel(vc, 9).decoder
    from spiflow.grid import Grid
    latent.save_decoder(tmp_path / "d.pt", dec, Grid(9, 0.01), vc)
    back, grid = latent.load_decoder(tmp_path / "d.pt")
    zz = torch.randn(3, 2)
    torch.testing.assert_close(back(zz), dec.eval()(zz))
    assert grid == Grid(9, 0.01)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        latent.load_decoder(tmp_path / "nothing.pt")


@pytest.mark.slow
def test_cli_vae_phase_evaluate_without_snakemake(tmp_path):
    """spiflow simulate → vae (orientations: truth, the ablation) → phase → evaluate."""
    import yaml
    from spiflow import cli

    conf = {"run": "cli_vae", "sample": ADK, "dataset": {"n_patterns": 40, "seed": 2, "chunk_frames": 20},
            "detector": {"n_pixels": 12, "pixel_size_m": 2.6e-3, "beam_stop_radius_m": 2e-3},
            "beam": {"mean_photons_per_pattern": 2000.0}, "simulate": {"pilot_orientations": 8},
            "reconstruction": {"methods": ["vae"]},
            "vae": {"orientations": "truth", "epochs": 1, "batch_size": 20, "encoder_channels": 4,
                    "encoder_layers": 2, "hidden": 16, "decoder_channels": 4, "decoder_layers": 2, "volume_n": 9,
                    "clusters": 2, "traversal_steps": 2},
            "phase": {"n_restarts": 1, "n_average": 1, "n_cycles": 1, "schedule": "RAAR:10", "final_er": 5},
            "evaluate": {"align_num_div": 1}}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(conf))
    common = ["--configfile", str(f), "--results", str(tmp_path / "results"), "--quiet", "--threads", "1"]
    for stage in (["simulate"], ["vae"], ["phase", "--method", "vae"], ["evaluate", "--method", "vae"]):
        assert cli.main([*stage, *common]) == 0, stage
    r = tmp_path / "results" / "cli_vae"
    assert xr.open_zarr(r / "recon" / "vae" / "latent.zarr").z_mu.shape == (40, 2)
    m = __import__("json").loads((r / "evaluate" / "vae" / "metrics.json").read_text())
    z = xr.open_zarr(r / "recon" / "vae" / "latent.zarr").z_mu.values
    t = xr.open_zarr(r / "simulate" / "truth.zarr").conformation.values
    assert m["latent_spearman"] == pytest.approx(latent.latent_spearman(z, t)[0], rel=1e-12)
    assert np.isfinite(m["latent_spearman"]) and len(m["states"]) == 2
