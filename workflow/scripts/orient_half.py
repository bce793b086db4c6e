"""rule orient_half → spiflow.pipeline.stage_emc / stage_mtip on one half of the frames, across
emc.processes / mtip.processes ranks (spiflow.launch)."""
from spiflow.launch import run_stage
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    method = snakemake.wildcards.method
    run_stage(method, config, config[method]["processes"], snakemake.threads, patterns=snakemake.input.patterns,
              intensity=snakemake.output.intensity, orientations=snakemake.output.orientations,
              log_csv=snakemake.output.log_csv, checkpoint=snakemake.params.checkpoint,
              seed_offset=int(snakemake.wildcards.half))
