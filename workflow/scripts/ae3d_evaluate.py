"""rule ae3d_evaluate → spiflow.ae3d.stage_evaluate."""
from spiflow.ae3d import stage_evaluate
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    i, o = snakemake.input, snakemake.output
    stage_evaluate(config, i.test_intensity, i.test_truth, i.model, o.results_csv, o.results_md, o.slices)
