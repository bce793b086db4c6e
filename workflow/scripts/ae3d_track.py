"""rule ae3d_track → spiflow.estrack.stage_track."""
from spiflow.estrack import stage_track
from spiflow.pipeline import snakemake_stage

with snakemake_stage(snakemake) as config:
    i, o = snakemake.input, snakemake.output
    stage_track(config, i.series_intensity, i.series_truth, i.model, o.table_csv, o.summary_md, o.figure,
                progress=True)
