"""rule recon_truth → spiflow.pipeline.stage_recon_truth (the oracle)."""
from spiflow.pipeline import snakemake_stage, stage_recon_truth

with snakemake_stage(snakemake) as config:
    stage_recon_truth(config, snakemake.input.truth, snakemake.input.patterns,
                      snakemake.output.intensity, snakemake.output.orientations)
