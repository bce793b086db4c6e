"""Configuration: defaults and validation from one JSON schema (``config.schema.yaml``).

The schema is the single source of every key, its type, range and default. The Snakefile
validates with ``snakemake.utils.validate`` against the same file; the ``spiflow`` command
line uses :func:`load_config`. ``config/config.yaml`` writes the defaults out for users.
"""
from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


def schema() -> dict:
    """The configuration JSON schema as a dict."""
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def defaults() -> dict:
    """A config dict holding every default of the schema."""
    return fill_defaults({})


def fill_defaults(config: dict, node: dict | None = None) -> dict:
    """Return a copy of ``config`` with every missing key set to the schema default."""
    node = schema() if node is None else node
    out = copy.deepcopy(config)
    for key, sub in node.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if sub.get("type") == "object" and isinstance(out.get(key), dict):
            out[key] = fill_defaults(out[key], sub)
    return out


def merge(base: dict, update: dict) -> dict:
    """Recursive dict update (nested sections are merged, not replaced), as Snakemake does."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def validate(config: dict) -> dict:
    """Fill defaults and validate; returns the complete config.

    Raises ValueError whose message names the offending key path (e.g. ``emc.num_div``).
    """
    full = fill_defaults(config)
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(full), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors]
        raise ValueError("invalid configuration:\n" + "\n".join(lines))
    return full


def load_config(*paths: str | Path, overrides: dict | None = None) -> dict:
    """Read YAML config files in order (later ones win, merged recursively), validate.

    Raises FileNotFoundError / ValueError naming the file for a missing or unparsable file.
    """
    config: dict = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"cannot parse config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys")
        config = merge(config, data)
    return validate(merge(config, overrides or {}))
