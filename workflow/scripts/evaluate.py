"""rule evaluate / evaluate_vae → spiflow.pipeline.stage_evaluate."""
from pathlib import Path

from spiflow.pipeline import snakemake_stage, stage_evaluate

with snakemake_stage(snakemake):
    i = snakemake.input
    method = snakemake.wildcards.get("method", "vae")
    stage_evaluate(snakemake.config, method, i.truth, i.patterns, i.intensity, i.orientations, i.density,
                   str(Path(snakemake.output.metrics).parent), latent=i.get("latent"), decoder=i.get("decoder"))
