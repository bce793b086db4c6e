rule simulate:
    """Noisy diffraction patterns of config['sample'] (one structure or a heterogeneous
    sample, sample.kind) plus the ground truth."""
    input:
        sample=sample_files(config),
    output:
        patterns=directory(P["patterns"]),
        truth=directory(P["truth"]),
    log:
        f"{LOGS}/simulate.log",
    benchmark:
        f"{BENCH}/simulate.tsv"
    conda:
        "../envs/spiflow.yaml"
    threads: 2
    resources:
        mem_mb=4000,
    script:
        "../scripts/simulate.py"
