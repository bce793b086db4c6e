"""One tiny end-to-end Snakemake run, single-stage reruns, the CLI, bad input at start-up,
and spiflow.rules (light, and the config keys of each stage)."""
import re
import subprocess
import sys

import mrcfile
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import ROOT, TINY, snakemake
from spiflow import cli, formats
from spiflow.config import load_config
from spiflow.pipeline import SUMMARY_COLUMNS, SUMMARY_EXTRA
from spiflow.rules import STAGE_KEYS, check_run, stage_config


def test_rules_module_imports_no_numerical_library():
    """The Snakefile imports spiflow.rules alone: a dry run, lint or DAG picture loads none of these."""
    heavy = ["torch", "numpy", "xarray", "numba", "pydantic", "pandas", "zarr"]
    code = f"import sys, spiflow.rules; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stage_config_holds_exactly_the_declared_keys():
    config = load_config()
    emc = stage_config(config, "orient_emc")
    assert emc == {"emc": config["emc"], "dataset": {"seed": config["dataset"]["seed"]}, "device": config["device"]}
    emc["emc"]["num_div"] = 99  # a copy: the stage cannot change the run's config
    assert config["emc"]["num_div"] != 99
    assert stage_config(config, "recon_truth") == {}
    assert stage_config(config, "evaluate") == {"evaluate": {k: config["evaluate"][k]
                                                             for k in ("align_num_div", "symmetry")}}
    assert stage_config(config, "summary") == config  # it writes the whole config to evaluate/config.yaml
    for rule in STAGE_KEYS:  # every declared key exists
        stage_config(config, rule)
    with pytest.raises(ValueError, match="orient_magic"):
        stage_config(config, "orient_magic")
    with pytest.raises(KeyError):  # a stage reading a key its rule does not declare fails
        stage_config(config, "orient_emc")["mtip"]


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tiny_run):
    r = tiny_run / "results" / "tiny"
    summary = pd.read_csv(r / "evaluate" / "summary.csv")
    # the encoder's one-pass error: selfsup only; PRTF: every run
    assert list(summary.columns) == SUMMARY_COLUMNS + ["encoder_orientation_error_median_deg", "prtf_resolution_angstrom"]
    assert sorted(summary.method) == sorted(TINY["reconstruction"]["methods"])
    encoder = summary.set_index("method").encoder_orientation_error_median_deg
    assert np.isfinite(encoder["selfsup"]) and encoder.drop("selfsup").isna().all()
    truth_row = summary.set_index("method").loc["truth"]
    assert truth_row.orientation_error_median_deg < 1e-6 and truth_row.gain_pearson == pytest.approx(1.0)
    assert np.all(np.isfinite(summary.resolution_fsc05_angstrom)) and np.all(summary.wall_seconds > 0)
    for method in TINY["reconstruction"]["methods"]:
        fsc = pd.read_csv(r / "evaluate" / method / "fsc.csv")
        assert list(fsc.columns)[:3] == ["q_inv_angstrom", "resolution_angstrom", "fsc"]
        rec = xr.open_zarr(r / "recon" / method / "intensity.zarr")
        assert rec.intensity.dims == ("qx", "qy", "qz")
        ori = xr.open_zarr(r / "recon" / method / "orientations.zarr")
        assert ori.quaternion.dims == ("frame", "component") and ori.sizes["frame"] == 120
        den = xr.open_zarr(r / "phase" / method / "density.zarr")
        with mrcfile.open(r / "phase" / method / "density.mrc") as mrc:
            assert mrc.data.shape == den.density.shape
            assert float(mrc.voxel_size.x) == pytest.approx(float(den.x[1] - den.x[0]), rel=1e-5)
    assert (r / "recon" / "emc" / "checkpoint.pt").exists()
    for png in ("fsc.png", "patterns_montage.png", "emc_log.png"):
        assert (r / "evaluate" / png).stat().st_size > 1000
    assert (r / "logs" / "orient_emc.log").exists()
    assert (r / "benchmarks" / "orient_emc.tsv").exists()


@pytest.mark.slow
def test_report_holds_every_method_and_the_config(tiny_run):
    r = tiny_run / "results" / "tiny"
    assert yaml.safe_load((r / "evaluate" / "config.yaml").read_text())["emc"] == {
        **yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["emc"], **TINY["emc"]}
    snakemake(tiny_run, "--report", str(tiny_run / "report.html"))
    html = (tiny_run / "report.html").read_text(errors="replace")
    assert len(html) > 100_000  # the report embeds the figures
    for name in ["summary.csv", "config.yaml", "fsc.png", "patterns_montage.png", "emc_log.png",
                 "intensity_sections.png", "density_slices.png", "orientation_errors.png"]:
        assert name in html, name
    for method in TINY["reconstruction"]["methods"]:
        assert f"evaluate/{method}/intensity_sections.png" in html, method


@pytest.mark.slow
def test_rerun_one_stage_leaves_upstream_untouched(tiny_run):
    r = tiny_run / "results" / "tiny"
    before = (r / "simulate" / "patterns.zarr" / "zarr.json").stat().st_mtime_ns
    density = r / "phase" / "emc" / "density.zarr"
    phased = (density / "zarr.json").stat().st_mtime_ns
    out = snakemake(tiny_run, "--forcerun", "phase", targets=[str(density.relative_to(tiny_run))])  # one method's
    assert re.findall(r"^(?:local)?rule (\w+):", out.stdout + out.stderr, re.M) == ["phase"]
    assert (density / "zarr.json").stat().st_mtime_ns > phased
    assert (r / "simulate" / "patterns.zarr" / "zarr.json").stat().st_mtime_ns == before
    out = snakemake(tiny_run, "-n")  # everything downstream of it is now out of date, nothing upstream
    jobs = out.stdout.split("Job stats:")[-1]
    assert "simulate" not in jobs and "orient_emc" not in jobs and "evaluate" in jobs and "summary" in jobs


@pytest.mark.slow
def test_sharded_simulate_runs_as_separate_jobs(tmp_path):
    sharded = {**TINY, "simulate": {**TINY["simulate"], "shards": 3}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(sharded))
    target = tmp_path / "results" / "tiny" / "simulate" / "patterns.zarr"
    res = snakemake(tmp_path, "--until", "simulate")
    log = res.stdout + res.stderr
    assert log.count("rule simulate_shard:") == 3 and "rule simulate:" in log
    pat = xr.open_zarr(target)
    assert pat.photons.shape == (120, 12, 12) and pat.photons.encoding["chunks"][0] == 50
    assert not (tmp_path / "results" / "tiny" / "simulate" / "shards").exists() or not any(
        (tmp_path / "results" / "tiny" / "simulate" / "shards").iterdir())  # temporary, removed once gathered
    bad = {**TINY, "simulate": {**TINY["simulate"], "shards": 4}}  # 120 frames = 3 chunks of 50
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "-n", check=False)
    assert res.returncode != 0 and "simulate.shards" in res.stdout + res.stderr


@pytest.mark.slow
def test_bad_config_stops_the_workflow_at_once_naming_the_key(tmp_path):
    # through Snakemake: the schema (an unknown method) and check_run (a missing sample)
    bad = dict(TINY, reconstruction={"methods": ["truth", "magic"]})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "-n", check=False)
    assert res.returncode != 0 and "magic" in res.stdout + res.stderr
    bad = dict(TINY, sample={"path": str(tmp_path / "absent.pdb")})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "-n", check=False)
    assert res.returncode != 0 and "sample.path" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()


def test_bad_config_stops_at_once_naming_the_key(tmp_path):
    # the Snakefile's other start-up checks, as it calls them (check_run on the validated config)
    for bad, key in [(dict(TINY, cxi={"path": str(tmp_path / "absent.cxi")}), "cxi.path"),
                     (dict(TINY, cxi={"path": str(ROOT / "Snakefile")}), "reconstruction.methods"),  # truth, no truth
                     (dict(TINY, evaluate={"half_sets": ["emc"]}, reconstruction={"methods": ["truth"]}),
                      "evaluate.half_sets")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(key)):
            check_run(load_config(ROOT / "config" / "config.yaml", tmp_path / "bad.yaml"))


@pytest.mark.slow
def test_measured_data_without_truth_gives_halfset_fsc_and_prtf(tiny_run, tmp_path):
    """A CXI file in (here the tiny run's own patterns, exported): no truth store; evaluate
    reports the PRTF and the half-set FSC; EMC on the imported data equals EMC on the original."""
    formats.export_cxi(tiny_run / "results" / "tiny" / "simulate" / "patterns.zarr", tmp_path / "run.cxi")
    cfg = dict(TINY, run="measured", cxi={"path": str(tmp_path / "run.cxi")}, reconstruction={"methods": ["emc"]},
               evaluate={**TINY["evaluate"], "half_sets": ["emc"]})
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, configfile="m.yaml")
    log = out.stdout + out.stderr
    assert "rule import_cxi:" in log and "rule simulate:" not in log
    assert log.count("rule orient_half:") == 2 and log.count("rule phase_half:") == 2
    r = tmp_path / "results" / "measured"
    assert not (r / "simulate" / "truth.zarr").exists()
    assert not (r / "simulate" / "half1").exists()  # the half-set patterns are temporary
    row = pd.read_csv(r / "evaluate" / "summary.csv").set_index("method").loc["emc"]
    assert all(np.isnan(row[c]) for c in SUMMARY_COLUMNS[1:-1])  # nothing to compare with
    for c in ("prtf_resolution_angstrom", "halfset_resolution_fsc0143_angstrom", "halfset_resolution_fsc05_angstrom"):
        assert 0 < row[c] < 200, c
    assert row.halfset_resolution_fsc05_angstrom >= row.halfset_resolution_fsc0143_angstrom
    fsc = pd.read_csv(r / "evaluate" / "emc" / "halfset_fsc.csv")
    assert list(fsc.columns)[:3] == ["q_inv_angstrom", "resolution_angstrom", "fsc"] and fsc.fsc.iloc[1] > 0.5
    for png in ("emc/prtf.png", "emc/intensity_sections.png", "fsc.png"):
        assert (r / "evaluate" / png).stat().st_size > 1000
    ours = xr.open_zarr(r / "recon" / "emc" / "intensity.zarr").intensity.values
    theirs = xr.open_zarr(tiny_run / "results" / "tiny" / "recon" / "emc" / "intensity.zarr").intensity.values
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6 * theirs.max())


@pytest.mark.slow
def test_corrupt_or_incomplete_patterns_store_is_named(tmp_path, capsys):
    """A photons chunk cut short, or missing (Zarr would read zeros), stops EMC with an
    error naming the store; nothing is written."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(dict(TINY, reconstruction={"methods": ["emc"]})))
    args = ["--configfile", str(tmp_path / "c.yaml"), "--results", str(tmp_path / "results"), "--quiet"]
    assert cli.main(["simulate", *args]) == 0
    store = tmp_path / "results" / "tiny" / "simulate" / "patterns.zarr"
    chunk = store / "photons" / "c" / "1" / "0" / "0"
    good = chunk.read_bytes()
    for damage, words in ((good[: len(good) // 2], "cannot read photons"), (None, "1 of 3 photon chunks are missing")):
        chunk.unlink()
        if damage is not None:
            chunk.write_bytes(damage)
        capsys.readouterr()
        assert cli.main(["emc", *args]) == 1
        err = capsys.readouterr().err
        assert str(store) in err and words in err, err
        assert not (tmp_path / "results" / "tiny" / "recon" / "emc" / "intensity.zarr").exists()


def test_cli_config_and_errors(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"emc": {"num_div": 3}}))
    assert cli.main(["config", "--configfile", str(f)]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["emc"]["num_div"] == 3
    f.write_text(yaml.safe_dump({"emc": {"num_div": -1}}))
    assert cli.main(["simulate", "--configfile", str(f)]) == 2
    assert "emc.num_div" in capsys.readouterr().err
    assert cli.main(["phase", "--method", "nope"]) == 2


def test_cli_runs_stages_without_snakemake(tmp_path):
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump({**TINY, "dataset": {"n_patterns": 20, "seed": 1, "chunk_frames": 10}}))
    common = ["--configfile", str(f), "--results", str(tmp_path / "results"), "--quiet"]
    assert cli.main(["simulate", *common]) == 0
    assert cli.main(["recon-truth", *common]) == 0
    r = tmp_path / "results" / "tiny"
    assert xr.open_zarr(r / "simulate" / "patterns.zarr").photons.shape[0] == 20
    assert xr.open_zarr(r / "recon" / "truth" / "intensity.zarr").intensity.ndim == 3


# A heterogeneous sample (ADK, closed 1AKE ↔ open 4AKE) through simulate → emc → vae → phase →
# evaluate; EMC runs because vae.orientations is emc, though it is not a listed method.
TINY_HETERO = {
    **TINY,
    "run": "tiny_hetero",
    "sample": {"kind": "interpolation", "path": str(ROOT / "data" / "1ake.pdb"),
               "interpolation": {"end_path": str(ROOT / "data" / "4ake.pdb"), "chain": "A"}, "reference_states": 3},
    "dataset": {"n_patterns": 96, "seed": 3, "chunk_frames": 50},
    "simulate": {"pilot_orientations": 8},
    "reconstruction": {"methods": ["truth", "vae"]},
    "vae": {"orientations": "emc", "epochs": 2, "batch_size": 32, "encoder_channels": 4, "encoder_layers": 2,
            "hidden": 16, "decoder_channels": 4, "decoder_layers": 2, "volume_n": 9, "clusters": 2,
            "traversal_steps": 3},
}


@pytest.mark.slow
def test_tiny_heterogeneous_workflow_with_vae(tmp_path):
    (tmp_path / "hetero.yaml").write_text(yaml.safe_dump(TINY_HETERO))
    snakemake(tmp_path, configfile="hetero.yaml")
    r = tmp_path / "results" / "tiny_hetero"
    truth = xr.open_zarr(r / "simulate" / "truth.zarr")
    assert truth.conformation.dims == ("frame", "parameter") and truth.conformation.shape == (96, 1)
    assert truth.state_density.sizes["state"] == 3
    lat = xr.open_zarr(r / "recon" / "vae" / "latent.zarr")
    assert lat.z_mu.dims == lat.z_logvar.dims == ("frame", "latent") and lat.z_mu.shape == (96, 2)
    assert (r / "recon" / "emc" / "orientations.zarr").exists() and (r / "recon" / "vae" / "decoder.pt").exists()
    np.testing.assert_array_equal(xr.open_zarr(r / "recon" / "vae" / "orientations.zarr").quaternion.values,
                                  xr.open_zarr(r / "recon" / "emc" / "orientations.zarr").quaternion.values)
    assert xr.open_zarr(r / "recon" / "vae" / "intensity.zarr").intensity.shape == truth.intensity.shape
    summary = pd.read_csv(r / "evaluate" / "summary.csv")
    # (no halfset columns without half sets, no model columns without multi-model EMC)
    assert list(summary.columns) == SUMMARY_COLUMNS + [c for c in SUMMARY_EXTRA if not c.startswith(("halfset", "model_", "encoder_"))]
    assert sorted(summary.method) == ["truth", "vae"]
    row = summary.set_index("method").loc["vae"]
    from spiflow.latent import latent_spearman  # 0.14 here: 2 epochs on 96 frames is no test of the VAE (test_vae is)
    assert row.latent_spearman == pytest.approx(latent_spearman(lat.z_mu.values, truth.conformation.values)[0])
    assert np.isfinite(row.latent_spearman) and np.isfinite(row.state_resolution_fsc05_angstrom_mean)
    states = pd.read_csv(r / "evaluate" / "vae" / "states.csv")
    assert len(states) == 2 and {"frame", "true_t", "matched_t", "resolution_fsc05_angstrom"} <= set(states.columns)
    for k in range(2):
        with mrcfile.open(r / "evaluate" / "vae" / "states" / f"state_{k}.mrc") as mrc:
            assert mrc.data.shape == truth.density.shape
    for png in ("latent_pca", "latent_traversal", "intensity_sections"):
        assert (r / "evaluate" / "vae" / f"{png}.png").stat().st_size > 1000
    assert (r / "logs" / "train_vae.log").exists() and (r / "benchmarks" / "train_vae.tsv").exists()


@pytest.mark.slow
def test_bad_heterogeneous_config_stops_at_once_naming_the_key(tmp_path):
    bad = {**TINY_HETERO, "sample": {"kind": "interpolation", "path": str(ROOT / "data" / "1ake.pdb")}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "-n", check=False)
    assert res.returncode != 0 and "sample.interpolation.end_path" in res.stdout + res.stderr
    bad = {**TINY_HETERO, "vae": {"orientations": "magic"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(bad))
    res = snakemake(tmp_path, "-n", check=False)
    assert res.returncode != 0 and "magic" in res.stdout + res.stderr
    assert not (tmp_path / "results").exists()
