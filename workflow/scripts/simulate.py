"""rule simulate → spiflow.pipeline.stage_simulate (gathers the shards when there are any)."""
from spiflow.pipeline import snakemake_stage, stage_simulate

with snakemake_stage(snakemake):
    stage_simulate(snakemake.config, snakemake.output.patterns, snakemake.output.truth,
                   shards=list(snakemake.input.shards))
