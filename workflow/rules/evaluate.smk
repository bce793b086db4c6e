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
        plots=multiext(P["eval_dir"] + "/", "intensity_sections.png", "density_slices.png", "orientation_errors.png"),
    log:
        f"{LOGS}/evaluate_{{method}}.log",
    benchmark:
        f"{BENCH}/evaluate_{{method}}.tsv"
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
        plots=multiext(P["summary_dir"] + "/", "fsc.png", "patterns_montage.png"),
    log:
        f"{LOGS}/summary.log",
    threads: 1
    script:
        "../scripts/summary.py"
