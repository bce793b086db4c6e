"""spiflow.settings is the one source of every setting: the generated schema and the
defaults file agree with it, and the schema rejects what the classes reject."""
from pathlib import Path

import jsonschema
import pytest
import yaml

from spiflow import settings as s

ROOT = Path(__file__).resolve().parents[1]


def test_schema_file_is_generated_from_the_settings():
    assert s.SCHEMA_PATH.read_text() == s.schema_text(), "run: python -m spiflow.settings"


def test_defaults_file_lists_every_default():
    assert yaml.safe_load((ROOT / "config" / "config.yaml").read_text()) == s.defaults()


def test_schema_fills_the_same_defaults_as_the_classes():
    schema = yaml.safe_load(s.SCHEMA_PATH.read_text())

    def fill(node):
        out = {}
        for key, sub in node["properties"].items():
            out[key] = fill(sub) if sub.get("type") == "object" and "properties" in sub else sub["default"]
        return out

    assert fill(schema) == s.defaults()
    jsonschema.Draft202012Validator(schema).validate(s.defaults())


@pytest.mark.parametrize("bad, key", [
    ({"emc": {"num_div": 0}}, "emc.num_div"),
    ({"emc": {"num_div": "3"}}, "emc.num_div"),
    ({"emc": {"photon_format": "csr"}}, "emc.photon_format"),
    ({"phase": {"beta_raar": 1.5}}, "phase.beta_raar"),
    ({"vae": {"volume_n": 32}}, "vae.volume_n"),
    ({"reconstruction": {"methods": ["emc", "emc"]}}, "reconstruction.methods"),
    ({"detector": {"invalid_rectangles": [[0, 1, 2]]}}, "detector.invalid_rectangles"),
    ({"selfsup": {"epoch": 3}}, "selfsup.epoch"),
    ({"ae3d": {"tracking": {"steps_per_period": 1}}}, "ae3d.tracking.steps_per_period"),
    ({"ae3d": {"tracking": {"radius_range_voxels": [3.0]}}}, "ae3d.tracking.radius_range_voxels"),
])
def test_schema_and_classes_reject_the_same_values(bad, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        s.settings(bad)
    full = {**s.defaults()}
    for section, values in bad.items():
        full[section] = {**full[section], **values}
    errors = list(jsonschema.Draft202012Validator(yaml.safe_load(s.SCHEMA_PATH.read_text())).iter_errors(full))
    assert errors, f"the schema accepts {bad}"


def test_every_section_is_typed():
    cfg = s.settings({"emc": {"num_div": 4}})
    assert isinstance(cfg.emc, s.EMCSettings) and cfg.emc.num_div == 4
    assert cfg.phase == s.PhasingSettings()
    assert s.EMCSettings(n_starts=4, start_iterations=15, iterations=5).trial_iterations == 4
