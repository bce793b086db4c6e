"""rule summary → spiflow.pipeline.stage_summary."""
from spiflow.pipeline import snakemake_stage, stage_summary

with snakemake_stage(snakemake) as config:
    i = snakemake.input
    stage_summary(config, list(i.metrics), list(i.fsc), i.patterns, snakemake.output.summary,
                  i.emc_log[0] if i.emc_log else None)
