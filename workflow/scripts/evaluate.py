"""rule evaluate → spiflow.pipeline.stage_evaluate."""
from pathlib import Path

from spiflow.pipeline import snakemake_stage, stage_evaluate

with snakemake_stage(snakemake):
    i = snakemake.input
    stage_evaluate(snakemake.config, snakemake.wildcards.method, i.truth, i.patterns, i.intensity,
                   i.orientations, i.density, str(Path(snakemake.output.metrics).parent))
