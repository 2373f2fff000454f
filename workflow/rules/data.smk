# prepare: one job per dataset -> manifest (ids, labels, shard of each sample),
# info.json, and for array-backed demo sets the images as a Zarr store.


rule prepare:
    output:
        directory(f"{R}/data/{{dataset}}"),
    params:
        code=code_version("prepare"),
        spec=lambda wc: jarg(prepare_params(wc.dataset)),
        seed=config["seed"],
    log:
        f"{LOGS}/prepare/{{dataset}}.log",
    benchmark:
        f"{BENCH}/prepare/{{dataset}}.tsv"
    resources:
        **attempt_scaled(mem_mb=4000, runtime=30),
    conda:
        CONDA_ENV
    shell:
        "gradspace prepare --dataset {wildcards.dataset} --params {params.spec} "
        "--seed {params.seed} --out {output} > {log} 2>&1"
