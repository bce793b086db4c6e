# spiflow: simulate → orient (EMC, M-TIP) / train (selfsup, vae) → phase → evaluate, one rule file per stage.
# Paths come from spiflow.rules.layout (docs/conventions.md); every rule calls a thin script in
# workflow/scripts/ that calls a stage function of the spiflow package with the config keys
# the rule declares as params (spiflow.rules.stage_config): a job reruns when they change.
# spiflow.rules needs the standard library alone, so a dry run or a lint starts fast.
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version, validate

from spiflow.rules import (SCHEMA_PATH, check_run, halfset_inputs, layout, measured_source, sample_files,
                           shard_ranges, stage_config, vae_orientations_source)

min_version("8.0")


report: "workflow/report/workflow.rst"


configfile: Path(workflow.basedir) / "config" / "config.yaml"


validate(config, str(SCHEMA_PATH))
try:  # a bad sample, CXI file, method choice or shard count stops the workflow at once, naming its config key
    check_run(config)
    shard_ranges(config["dataset"]["n_patterns"], config["dataset"]["chunk_frames"], config["simulate"]["shards"])
except (FileNotFoundError, ValueError) as exc:
    raise WorkflowError(str(exc))

RUN = config["run"]
P = layout("results", RUN)
LOGS = f"results/{RUN}/logs"
BENCH = f"results/{RUN}/benchmarks"
METHODS = config["reconstruction"]["methods"]
# measured data in ("cxi" or "euxfel", else None: simulated): no truth store (evaluate reports PRTF and half-set FSC)
MEASURED = measured_source(config)
GPU = 1 if config["device"].startswith("cuda") else 0
# method vae is evaluated by its own rule (latent analysis); every other method by rule evaluate
PLAIN_METHODS = "|".join(m for m in METHODS if m != "vae") or "(?!x)x"


wildcard_constraints:
    method="|".join(METHODS),
    half="1|2",


# Rules of a few seconds run where Snakemake runs, not as cluster jobs (each SLURM job costs a
# queue wait and a Python start-up): the truth restricted to the detector's q range, the table.
localrules:
    recon_truth,
    summary,


include: "workflow/rules/simulate.smk"
include: "workflow/rules/orient.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/phase.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/ae3d.smk"


rule all:
    input:
        P["summary"],
    default_target: True
