EVAL_PLOTS = ["intensity_sections", "density_slices", "prtf"] + ([] if MEASURED else ["orientation_errors"])
LATENT_PLOTS = ["latent_pca", "latent_traversal"]


rule evaluate:
    """PRTF and, for evaluate.half_sets, the half-set FSC; with a truth (simulated data) also
    the alignment to it, FSC, intensity CC, orientation and gain errors; plots (every method
    but vae, which has rule evaluate_vae)."""
    input:
        unpack(lambda wc: halfset_inputs(config, P, wc.method)),
        truth=[] if MEASURED else P["truth"],
        patterns=P["patterns"],
        intensity=P["intensity"],
        orientations=P["orientations"],
        density=P["density"],
    output:
        fsc=[] if MEASURED else P["fsc"],
        prtf=P["prtf"],
        metrics=P["metrics"],
        plots=[report(P["eval_plot"].format(method="{method}", plot=p), caption="../report/method_plot.rst",
                      category="Methods", subcategory="{method}", labels={"method": "{method}", "figure": p})
               for p in EVAL_PLOTS],
    wildcard_constraints:
        method=PLAIN_METHODS,
    log:
        f"{LOGS}/evaluate_{{method}}.log",
    benchmark:
        f"{BENCH}/evaluate_{{method}}.tsv"
    params:  # multi-model EMC phases each model too (spiflow.latent.evaluate_models)
        config=lambda wc: stage_config(config, "evaluate_models" if wc.method == "emc"
                                       and config["emc"].get("models", 1) > 1 else "evaluate"),
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"


rule evaluate_vae:
    """evaluate for method vae, plus its latent analysis: PCA (coloured by the true
    conformation), Spearman ρ of PC1, k-means states decoded, phased and compared by FSC
    with the matching true states, traversal along PC1."""
    input:
        truth=P["truth"],
        patterns=P["patterns"],
        intensity=P["intensity"].format(method="vae"),
        orientations=P["orientations"].format(method="vae"),
        density=P["density"].format(method="vae"),
        latent=P["latent"],
        decoder=P["vae_decoder"],
    output:
        fsc=P["fsc"].format(method="vae"),
        prtf=P["prtf"].format(method="vae"),
        metrics=P["metrics"].format(method="vae"),
        plots=[report(P["eval_plot"].format(method="vae", plot=p), category="Methods", subcategory="vae",
                      caption="../report/latent.rst" if p.startswith("latent") else "../report/method_plot.rst",
                      labels={"method": "vae", "figure": p}) for p in EVAL_PLOTS + LATENT_PLOTS],
        states=directory(P["vae_states"]),
    log:
        f"{LOGS}/evaluate_vae.log",
    benchmark:
        f"{BENCH}/evaluate_vae.tsv"
    params:
        config=stage_config(config, "evaluate_vae"),
    conda:
        "../envs/spiflow.yaml"
    threads: workflow.cores
    resources:
        mem_mb=4000,
        gpu=GPU,
    script:
        "../scripts/evaluate.py"


rule summary:
    """One table comparing every method on the same data, with the overview plots."""
    input:
        metrics=expand(P["metrics"], method=METHODS),
        fsc=[] if MEASURED else expand(P["fsc"], method=METHODS),
        patterns=P["patterns"],
        emc_log=[P["emc_log"]] if "emc" in METHODS else [],
    output:
        summary=report(P["summary"], caption="../report/summary.rst", category="Summary",
                       labels={"figure": "summary table"}),
        config=report(P["run_config"], caption="../report/config.rst", category="Configuration",
                      labels={"file": "config.yaml"}),
        fsc=report(P["summary_plot"].format(plot="fsc"), caption="../report/fsc.rst", category="Summary",
                   labels={"figure": "FSC curves"}),
        montage=report(P["summary_plot"].format(plot="patterns_montage"), caption="../report/montage.rst",
                       category="Summary", labels={"figure": "pattern montage"}),
        emc_log=[report(P["summary_plot"].format(plot="emc_log"), caption="../report/emc_log.rst",
                        category="Summary", labels={"figure": "EMC log"})] if "emc" in METHODS else [],
    log:
        f"{LOGS}/summary.log",
    params:
        config=stage_config(config, "summary"),
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    script:
        "../scripts/summary.py"
