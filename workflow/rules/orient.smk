rule recon_truth:
    """The oracle: true intensity and orientations, restricted to the detector's q range."""
    input:
        truth=P["truth"],
        patterns=P["patterns"],
    output:
        intensity=directory(P["intensity"].format(method="truth")),
        orientations=directory(P["orientations"].format(method="truth")),
    log:
        f"{LOGS}/recon_truth.log",
    benchmark:
        f"{BENCH}/recon_truth.tsv"
    params:
        config=stage_config(config, "recon_truth"),
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/recon_truth.py"


rule orient_emc:
    """EMC: orientations, gains and the merged 3D intensity (resumes from its checkpoint)."""
    input:
        patterns=P["patterns"],
    output:
        intensity=directory(P["intensity"].format(method="emc")),
        orientations=directory(P["orientations"].format(method="emc")),
        log_csv=P["emc_log"],
    log:
        f"{LOGS}/orient_emc.log",
    benchmark:
        f"{BENCH}/orient_emc.tsv"
    params:
        checkpoint=P["emc_checkpoint"],
        config=stage_config(config, "orient_emc"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=lambda wc: int(config["emc"]["memory_budget_gb"] * 1024 * 2 + 2000),
        gpu=GPU,
    script:
        "../scripts/orient_emc.py"


rule orient_mtip:
    """M-TIP: orientation matching, merging and phasing in one loop; ``mtip_selfsup`` starts
    from the selfsup orientations (the paper's synergy), ``mtip`` from random ones."""
    input:
        patterns=P["patterns"],
        prior=lambda wc: P["orientations"].format(method="selfsup") if wc.method == "mtip_selfsup" else [],
    output:
        intensity=directory(P["intensity"]),
        orientations=directory(P["orientations"]),
        log_csv=P["recon_log"],
    wildcard_constraints:
        method="mtip|mtip_selfsup",
    log:
        f"{LOGS}/orient_{{method}}.log",
    benchmark:
        f"{BENCH}/orient_{{method}}.tsv"
    params:
        checkpoint=P["recon_checkpoint"],
        config=stage_config(config, "orient_mtip"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=lambda wc: int(config["mtip"]["memory_budget_gb"] * 1024 * 2 + 2000),
        gpu=GPU,
    script:
        "../scripts/orient_mtip.py"


rule orient_half:
    """evaluate.half_sets: EMC or M-TIP on one half of the frames (seed + half), for the half-set FSC."""
    input:
        patterns=P["half_patterns"],
    output:
        intensity=directory(P["half_intensity"]),
        orientations=directory(P["half_orientations"]),
        log_csv=P["half_log"],
    wildcard_constraints:
        method="emc|mtip",
    log:
        f"{LOGS}/orient_{{method}}_half{{half}}.log",
    benchmark:
        f"{BENCH}/orient_{{method}}_half{{half}}.tsv"
    params:
        checkpoint=P["half_checkpoint"],
        config=lambda wc: stage_config(config, f"orient_{wc.method}"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=lambda wc: int(config[wc.method]["memory_budget_gb"] * 1024 * 2 + 2000),
        gpu=GPU,
    script:
        "../scripts/orient_half.py"
