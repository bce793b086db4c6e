"""rule simulate → spiflow.pipeline.stage_simulate (gathers the shards when there are any)."""
from spiflow.pipeline import snakemake_stage, stage_simulate

with snakemake_stage(snakemake) as config:
    stage_simulate(config, snakemake.output.patterns, snakemake.output.truth,
                   shards=list(snakemake.input.shards))
