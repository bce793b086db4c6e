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
        config=stage_config(config, "train_selfsup"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=lambda wc: int(config["selfsup"]["memory_budget_gb"] * 1024 + 4000),
        gpu=GPU,
    script:
        "../scripts/train_selfsup.py"


rule train_vae:
    """Heterogeneity VAE: latent space of conformations at the orientations and gains of
    vae.orientations (emc, selfsup; truth is an ablation that reads the truth store)."""
    input:
        patterns=P["patterns"],
        source=vae_orientations_source(config, P),
    output:
        intensity=directory(P["intensity"].format(method="vae")),
        orientations=directory(P["orientations"].format(method="vae")),
        latent=directory(P["latent"]),
        decoder=P["vae_decoder"],
        log_csv=P["recon_log"].format(method="vae"),
    log:
        f"{LOGS}/train_vae.log",
    benchmark:
        f"{BENCH}/train_vae.tsv"
    params:
        checkpoint=P["recon_checkpoint"].format(method="vae"),
        config=stage_config(config, "train_vae"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=lambda wc: int(config["vae"]["memory_budget_gb"] * 1024 + 4000),
        gpu=GPU,
    script:
        "../scripts/train_vae.py"
