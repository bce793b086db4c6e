"""rule import_cxi → spiflow.pipeline.stage_import_cxi."""
from spiflow.pipeline import snakemake_stage, stage_import_cxi

with snakemake_stage(snakemake) as config:
    stage_import_cxi(config, snakemake.output.patterns)
