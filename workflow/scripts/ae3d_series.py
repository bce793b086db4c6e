"""rule ae3d_series → spiflow.estrack.stage_series."""
from spiflow.estrack import stage_series
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    o = snakemake.output
    stage_series(config, o.intensity, o.truth)
