rule phase:
    """Iterative phasing (RAAR/HIO/ER + shrinkwrap, several restarts) of one method's intensity."""
    input:
        intensity=P["intensity"],
    output:
        density=directory(P["density"]),
        mrc=P["density_mrc"],
        log_csv=P["phase_log"],
    log:
        f"{LOGS}/phase_{{method}}.log",
    benchmark:
        f"{BENCH}/phase_{{method}}.tsv"
    params:
        config=stage_config(config, "phase"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        gpu=GPU,
    script:
        "../scripts/phase.py"


rule phase_half:
    """Phasing of one half-set reconstruction (evaluate.half_sets; random phases from seed + half)."""
    input:
        intensity=P["half_intensity"],
    output:
        density=directory(P["half_density"]),
        mrc=P["half_density_mrc"],
        log_csv=P["half_phase_log"],
    log:
        f"{LOGS}/phase_{{method}}_half{{half}}.log",
    benchmark:
        f"{BENCH}/phase_{{method}}_half{{half}}.tsv"
    params:
        config=stage_config(config, "phase"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        gpu=GPU,
    script:
        "../scripts/phase.py"
