"""rule evaluate / evaluate_vae → spiflow.pipeline.stage_evaluate."""
from pathlib import Path

from spiflow.pipeline import snakemake_stage, stage_evaluate

with snakemake_stage(snakemake) as config:
    i = snakemake.input
    method = snakemake.wildcards.get("method", "vae")
    halves = {kind: [i[f"half_{kind}_1"], i[f"half_{kind}_2"]] for kind in ("intensity", "density")} \
        if "half_density_1" in i.keys() else None
    stage_evaluate(config, method, i.truth or None, i.patterns, i.intensity, i.orientations, i.density,
                   str(Path(snakemake.output.metrics).parent), latent=i.get("latent"), decoder=i.get("decoder"),
                   halves=halves)
