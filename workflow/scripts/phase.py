"""rule phase / phase_half → spiflow.pipeline.stage_phase."""
from spiflow.pipeline import snakemake_stage, stage_phase

with snakemake_stage(snakemake) as config:
    stage_phase(config, snakemake.input.intensity, snakemake.output.density,
                snakemake.output.mrc, snakemake.output.log_csv, seed_offset=int(snakemake.wildcards.get("half", 0)))
