"""rule phase / phase_half → spiflow.pipeline.stage_phase."""
from spiflow.pipeline import snakemake_stage, stage_phase

with snakemake_stage(snakemake):
    stage_phase(snakemake.config, snakemake.input.intensity, snakemake.output.density,
                snakemake.output.mrc, snakemake.output.log_csv, seed_offset=int(snakemake.wildcards.get("half", 0)))
