"""rule import_cxi → spiflow.pipeline.stage_import_cxi."""
from spiflow.pipeline import snakemake_stage, stage_import_cxi

with snakemake_stage(snakemake):
    stage_import_cxi(snakemake.config, snakemake.output.patterns)
