"""rule orient_emc → spiflow.pipeline.stage_emc."""
from spiflow.pipeline import snakemake_stage, stage_emc

with snakemake_stage(snakemake) as config:
    stage_emc(config, snakemake.input.patterns, snakemake.output.intensity,
              snakemake.output.orientations, snakemake.output.log_csv, snakemake.params.checkpoint)
