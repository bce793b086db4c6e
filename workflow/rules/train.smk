rule train_selfsup:
    """Self-supervised orientation and gain encoders + SIREN (or voxel) intensity decoder."""
    input:
        patterns=P["patterns"],
    output:
        intensity=directory(P["intensity"].format(method="selfsup")),
        orientations=directory(P["orientations"].format(method="selfsup")),
        log_csv=P["recon_log"].format(method="selfsup"),
    log:
        f"{LOGS}/train_selfsup.log",
    benchmark:
        f"{BENCH}/train_selfsup.tsv"
    params:
        checkpoint=P["recon_checkpoint"].format(method="selfsup"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=lambda wc: int(config["selfsup"]["memory_budget_gb"] * 1024 + 4000),
        gpu=GPU,
    script:
        "../scripts/train_selfsup.py"
