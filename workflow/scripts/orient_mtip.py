"""rule orient_mtip → spiflow.pipeline.stage_mtip, across mtip.processes ranks (spiflow.launch)."""
from spiflow.launch import run_stage
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    run_stage("mtip", config, config["mtip"]["processes"], snakemake.threads, patterns=snakemake.input.patterns,
              intensity=snakemake.output.intensity, orientations=snakemake.output.orientations,
              log_csv=snakemake.output.log_csv, checkpoint=snakemake.params.checkpoint,
              prior=snakemake.input.prior or None)
