"""rule split_halves → spiflow.pipeline.stage_split_halves."""
from spiflow.pipeline import snakemake_stage, stage_split_halves

with snakemake_stage(snakemake) as config:
    stage_split_halves(config, snakemake.input.patterns, [snakemake.output.half1, snakemake.output.half2])
