"""Reruns follow the config: each rule declares the config keys its stage reads as params
(spiflow.rules.stage_config), so after a change Snakemake reruns exactly the jobs that read
it and those downstream of them. Dry runs on the session's tiny run (tests/conftest.py)."""
import re

import pytest
import yaml

from conftest import TINY, snakemake

pytestmark = pytest.mark.slow


def planned_jobs(work, config):
    """{(rule, method or ""): reason} of the jobs (but the target rule all) a dry run with
    ``config`` would run."""
    (work / "changed.yaml").write_text(yaml.safe_dump(config))
    out = snakemake(work, "-n", configfile="changed.yaml")
    text = out.stdout + out.stderr
    jobs = {}
    for block in re.split(r"^(?=(?:local)?rule \w+:$)", text, flags=re.M)[1:]:
        rule = re.match(r"(?:local)?rule (\w+):", block).group(1)
        if rule == "all":
            continue
        method = re.search(r"^\s+wildcards: method=(\w+)", block, re.M)
        reason = re.search(r"^\s+reason: (.*)$", block, re.M)
        jobs[(rule, method.group(1) if method else "")] = reason.group(1) if reason else ""
    if not jobs:
        assert "Nothing to be done" in text, text[-3000:]
    return jobs


def test_rerun_follows_the_config_sections_a_stage_reads(tiny_run):
    snakemake(tiny_run)  # up to date, whatever other tests forced before
    assert planned_jobs(tiny_run, TINY) == {}
    jobs = planned_jobs(tiny_run, {**TINY, "emc": {**TINY["emc"], "num_div": 3}})
    assert set(jobs) == {("orient_emc", ""), ("phase", "emc"), ("evaluate", "emc"), ("summary", "")}
    assert "Params have changed" in jobs[("orient_emc", "")]
    # a key that only the summary reads (and writes to evaluate/config.yaml)
    jobs = planned_jobs(tiny_run, {**TINY, "evaluate": {**TINY["evaluate"], "montage_frames": 3}})
    assert set(jobs) == {("summary", "")}
