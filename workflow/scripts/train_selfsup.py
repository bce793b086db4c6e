"""rule train_selfsup → spiflow.pipeline.stage_selfsup."""
from spiflow.pipeline import snakemake_stage, stage_selfsup

with snakemake_stage(snakemake) as config:
    stage_selfsup(config, snakemake.input.patterns, snakemake.output.intensity,
                  snakemake.output.orientations, snakemake.output.log_csv, snakemake.params.checkpoint)
