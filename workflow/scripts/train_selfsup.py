"""rule train_selfsup → spiflow.pipeline.stage_selfsup, across selfsup.processes ranks (spiflow.launch)."""
from spiflow.launch import run_stage
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    run_stage("selfsup", config, config["selfsup"]["processes"], snakemake.threads, patterns=snakemake.input.patterns,
              intensity=snakemake.output.intensity, orientations=snakemake.output.orientations,
              log_csv=snakemake.output.log_csv, checkpoint=snakemake.params.checkpoint)
