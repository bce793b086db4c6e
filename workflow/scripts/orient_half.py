"""rule orient_half → spiflow.pipeline.stage_emc / stage_mtip on one half of the frames."""
from spiflow.pipeline import snakemake_stage, stage_emc, stage_mtip

with snakemake_stage(snakemake) as config:
    stage = {"emc": stage_emc, "mtip": stage_mtip}[snakemake.wildcards.method]
    stage(config, snakemake.input.patterns, snakemake.output.intensity, snakemake.output.orientations,
          snakemake.output.log_csv, snakemake.params.checkpoint, seed_offset=int(snakemake.wildcards.half))
