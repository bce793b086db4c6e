"""rule orient_emc → spiflow.pipeline.stage_emc, across emc.processes ranks (spiflow.launch)."""
from spiflow.launch import run_stage
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    run_stage("emc", config, config["emc"]["processes"], snakemake.threads, patterns=snakemake.input.patterns,
              intensity=snakemake.output.intensity, orientations=snakemake.output.orientations,
              log_csv=snakemake.output.log_csv, checkpoint=snakemake.params.checkpoint)
