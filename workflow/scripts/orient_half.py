"""rule orient_half → spiflow.pipeline.stage_emc / stage_mtip on one half of the frames (EMC
across emc.processes ranks, spiflow.launch)."""
from spiflow.launch import run_stage
from spiflow.pipeline import snakemake_stage, stage_mtip

with snakemake_stage(snakemake) as config:
    args = dict(patterns=snakemake.input.patterns, intensity=snakemake.output.intensity,
                orientations=snakemake.output.orientations, log_csv=snakemake.output.log_csv,
                checkpoint=snakemake.params.checkpoint, seed_offset=int(snakemake.wildcards.half))
    if snakemake.wildcards.method == "emc":
        run_stage("emc", config, config["emc"]["processes"], snakemake.threads, **args)
    else:
        stage_mtip(config, **args)
