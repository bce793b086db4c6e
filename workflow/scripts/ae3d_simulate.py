"""rule ae3d_simulate → spiflow.ae3d.stage_simulate."""
from spiflow.ae3d import stage_simulate
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    o = snakemake.output
    stage_simulate(config, o.train_intensity, o.train_truth, o.test_intensity, o.test_truth)
