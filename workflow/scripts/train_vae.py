"""rule train_vae → spiflow.pipeline.stage_vae."""
from spiflow.pipeline import snakemake_stage, stage_vae

with snakemake_stage(snakemake) as config:
    o = snakemake.output
    stage_vae(config, snakemake.input.patterns, snakemake.input.source, o.intensity, o.orientations,
              o.latent, o.log_csv, snakemake.params.checkpoint, o.decoder)
