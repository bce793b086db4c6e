rule evaluate:
    """Align one method to the truth; FSC, intensity CC, orientation and gain errors, plots."""
    input:
        truth=P["truth"],
        patterns=P["patterns"],
        intensity=P["intensity"],
        orientations=P["orientations"],
        density=P["density"],
    output:
        fsc=P["fsc"],
        metrics=P["metrics"],
        plots=expand(P["eval_plot"], plot=["intensity_sections", "density_slices", "orientation_errors"],
                     allow_missing=True),
    log:
        f"{LOGS}/evaluate_{{method}}.log",
    benchmark:
        f"{BENCH}/evaluate_{{method}}.tsv"
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"


rule summary:
    """One table comparing every method on the same data, with the overview plots."""
    input:
        metrics=expand(P["metrics"], method=METHODS),
        fsc=expand(P["fsc"], method=METHODS),
        patterns=P["patterns"],
        emc_log=[P["emc_log"]] if "emc" in METHODS else [],
    output:
        summary=P["summary"],
        plots=expand(P["summary_plot"], plot=["fsc", "patterns_montage"]),
    log:
        f"{LOGS}/summary.log",
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    script:
        "../scripts/summary.py"
