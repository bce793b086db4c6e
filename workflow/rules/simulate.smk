SHARDS = config["simulate"]["shards"]


if MEASURED == "cxi":

    rule import_cxi:
        """Measured data in: the CXI file cxi.path as the run's patterns store (no truth)."""
        input:
            cxi=config["cxi"]["path"],
        output:
            patterns=directory(P["patterns"]),
        log:
            f"{LOGS}/import_cxi.log",
        benchmark:
            f"{BENCH}/import_cxi.tsv"
        params:
            config=stage_config(config, "import_cxi"),
        conda:
            "../envs/spiflow.yaml"
        threads: 1
        resources:
            mem_mb=2000,
        script:
            "../scripts/import_cxi.py"

elif MEASURED == "euxfel":

    rule import_euxfel:
        """Measured data in: the hits of the European XFEL run euxfel.path (corrected AGIPD-1M
        data) as the run's patterns store (no truth); every frame's lit-pixel count and hit flag
        in simulate/hits.csv, their histogram in simulate/hits.png."""
        output:
            patterns=directory(P["patterns"]),
            hits_csv=P["hits_csv"],
            hits_png=report(P["hits_png"], category="Summary", labels={"figure": "hit finding"}),
        log:
            f"{LOGS}/import_euxfel.log",
        benchmark:
            f"{BENCH}/import_euxfel.tsv"
        params:
            config=stage_config(config, "import_euxfel"),
        conda:
            "../envs/spiflow.yaml"
        threads: 1
        resources:
            mem_mb=4000,
        script:
            "../scripts/import_euxfel.py"

else:

    rule simulate_shard:
        """simulate.shards > 1: one shard of frames (whole Zarr chunks) as its own job."""
        input:
            sample=sample_files(config),
        output:
            shard=temp(directory(P["shard"])),
        wildcard_constraints:
            shard=r"\d+",
        log:
            f"{LOGS}/simulate_shard_{{shard}}.log",
        benchmark:
            f"{BENCH}/simulate_shard_{{shard}}.tsv"
        params:
            config=stage_config(config, "simulate_shard"),
        conda:
            "../envs/spiflow.yaml"
        threads: 2
        resources:
            mem_mb=4000,
        script:
            "../scripts/simulate_shard.py"


    rule simulate:
        """Noisy diffraction patterns of config['sample'] (one structure or a heterogeneous
        sample, sample.kind) plus the ground truth; with simulate.shards > 1 it gathers the
        shards chunk by chunk (the shard stores are temporary)."""
        input:
            sample=sample_files(config),
            shards=expand(P["shard"], shard=range(SHARDS)) if SHARDS > 1 else [],
        output:
            patterns=directory(P["patterns"]),
            truth=directory(P["truth"]),
        log:
            f"{LOGS}/simulate.log",
        benchmark:
            f"{BENCH}/simulate.tsv"
        params:
            config=stage_config(config, "simulate"),
        conda:
            "../envs/spiflow.yaml"
        threads: 2
        resources:
            mem_mb=4000,
        script:
            "../scripts/simulate.py"


rule split_halves:
    """evaluate.half_sets: the even and odd frames as two temporary patterns stores."""
    input:
        patterns=P["patterns"],
    output:
        half1=temp(directory(P["half_patterns"].format(half=1))),
        half2=temp(directory(P["half_patterns"].format(half=2))),
    log:
        f"{LOGS}/split_halves.log",
    params:
        config=stage_config(config, "split_halves"),
    conda:
        "../envs/spiflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/split_halves.py"
