"""rule orient_mtip → spiflow.pipeline.stage_mtip."""
from spiflow.pipeline import snakemake_stage, stage_mtip

with snakemake_stage(snakemake) as config:
    stage_mtip(config, snakemake.input.patterns, snakemake.output.intensity,
               snakemake.output.orientations, snakemake.output.log_csv, snakemake.params.checkpoint,
               prior=snakemake.input.prior or None)
