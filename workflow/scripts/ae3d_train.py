"""rule ae3d_train → spiflow.ae3d.stage_train."""
from spiflow.ae3d import stage_train
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    i, o = snakemake.input, snakemake.output
    stage_train(config, i.train_intensity, i.train_truth, o.model, o.log_csv, snakemake.params.checkpoint)
