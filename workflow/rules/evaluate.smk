rule evaluate:
    """Align one method to the truth; FSC, intensity CC, orientation and gain errors, plots
    (every method but vae, which has rule evaluate_vae)."""
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
    wildcard_constraints:
        method=PLAIN_METHODS,
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
        metrics=P["metrics"].format(method="vae"),
        plots=expand(P["eval_plot"], method="vae", plot=["intensity_sections", "density_slices",
                     "orientation_errors", "latent_pca", "latent_traversal"]),
        states=directory(P["vae_states"]),
    log:
        f"{LOGS}/evaluate_vae.log",
    benchmark:
        f"{BENCH}/evaluate_vae.tsv"
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
