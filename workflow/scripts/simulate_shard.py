"""rule simulate_shard → spiflow.pipeline.stage_simulate_shard."""
from spiflow.pipeline import snakemake_stage, stage_simulate_shard

with snakemake_stage(snakemake) as config:
    stage_simulate_shard(config, int(snakemake.wildcards.shard), snakemake.output.shard)
