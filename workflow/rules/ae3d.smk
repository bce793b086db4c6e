# Method ae3d (spiflow.ae3d): direct phasing of Bragg-CDI intensities by a 3D autoencoder,
# compared with iterative phasing on held-out crystals, and the latent tracking of a drifting
# crystal by extremum seeking (spiflow.estrack). Not part of rule all: run
#   snakemake --cores 2 --configfile config/ae3d.yaml ae3d


rule ae3d:
    """Target: the comparison table of method ae3d (results/RUN/ae3d/results.md) and the
    latent tracking of a drifting crystal (results/RUN/ae3d/tracking.{csv,md,png})."""
    input:
        P["ae3d_results_md"],
        P["ae3d_tracking_csv"],
        P["ae3d_tracking_md"],
        P["ae3d_tracking_png"],


rule ae3d_simulate:
    """Training and held-out Bragg-CDI crystals (spiflow.bragg): intensity stores, truth kept apart."""
    output:
        train_intensity=directory(P["ae3d_train_intensity"]),
        train_truth=directory(P["ae3d_train_truth"]),
        test_intensity=directory(P["ae3d_test_intensity"]),
        test_truth=directory(P["ae3d_test_truth"]),
    log:
        f"{LOGS}/ae3d_simulate.log",
    benchmark:
        f"{BENCH}/ae3d_simulate.tsv"
    params:
        config=stage_config(config, "ae3d_simulate"),
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/ae3d_simulate.py"


rule ae3d_train:
    """Train the ae3d network (supervised + Fourier-modulus loss), resumable from its checkpoint."""
    input:
        train_intensity=P["ae3d_train_intensity"],
        train_truth=P["ae3d_train_truth"],
    output:
        model=P["ae3d_model"],
        log_csv=P["ae3d_train_log"],
    log:
        f"{LOGS}/ae3d_train.log",
    benchmark:
        f"{BENCH}/ae3d_train.tsv"
    params:
        config=stage_config(config, "ae3d_train"),
        checkpoint=P["ae3d_checkpoint"],
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=8000,
        gpu=GPU,
    script:
        "../scripts/ae3d_train.py"


rule ae3d_evaluate:
    """Network alone, network + refinement and iterative phasing on the held-out crystals."""
    input:
        test_intensity=P["ae3d_test_intensity"],
        test_truth=P["ae3d_test_truth"],
        model=P["ae3d_model"],
    output:
        results_csv=P["ae3d_results_csv"],
        results_md=P["ae3d_results_md"],
        slices=P["ae3d_slices"],
    log:
        f"{LOGS}/ae3d_evaluate.log",
    benchmark:
        f"{BENCH}/ae3d_evaluate.tsv"
    params:
        config=stage_config(config, "ae3d_evaluate"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=4000,
    script:
        "../scripts/ae3d_evaluate.py"


rule ae3d_series:
    """A drifting crystal (spiflow.bragg.simulate_series, ae3d.tracking): intensity store, truth kept apart."""
    output:
        intensity=directory(P["ae3d_series_intensity"]),
        truth=directory(P["ae3d_series_truth"]),
    log:
        f"{LOGS}/ae3d_series.log",
    benchmark:
        f"{BENCH}/ae3d_series.tsv"
    params:
        config=stage_config(config, "ae3d_series"),
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/ae3d_series.py"


rule ae3d_track:
    """Latent tracking by extremum seeking vs the untuned encoder and iterative phasing, per frame."""
    input:
        series_intensity=P["ae3d_series_intensity"],
        series_truth=P["ae3d_series_truth"],
        model=P["ae3d_model"],
    output:
        table_csv=P["ae3d_tracking_csv"],
        summary_md=P["ae3d_tracking_md"],
        figure=P["ae3d_tracking_png"],
    log:
        f"{LOGS}/ae3d_track.log",
    benchmark:
        f"{BENCH}/ae3d_track.tsv"
    params:
        config=stage_config(config, "ae3d_track"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        gpu=GPU,
    script:
        "../scripts/ae3d_track.py"
