"""Configuration files: read YAML files, merge them as Snakemake does, validate.

Every key, default and range is defined once, in :mod:`spiflow.settings`; this module only
reads files (the ``spiflow`` command line uses :func:`load_config`; the Snakefile
validates with ``snakemake.utils.validate`` against the schema generated from the same
classes).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .settings import SCHEMA_PATH, defaults, settings

__all__ = ["SCHEMA_PATH", "defaults", "load_config", "merge", "validate"]


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
    """Fill defaults and validate (:func:`spiflow.settings.settings`); returns the complete config.

    Raises ValueError whose message names the offending key path (e.g. ``emc.num_div``).
    """
    return settings(config).model_dump()


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
