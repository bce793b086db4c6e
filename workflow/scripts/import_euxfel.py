"""rule import_euxfel → spiflow.pipeline.stage_import_euxfel."""
from spiflow.pipeline import snakemake_stage, stage_import_euxfel

with snakemake_stage(snakemake) as config:
    stage_import_euxfel(config, snakemake.output.patterns, snakemake.output.hits_csv, snakemake.output.hits_png)
