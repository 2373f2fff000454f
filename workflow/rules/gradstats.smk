# Normalization statistics of the energy gradient over ID train (Wu et al.): partial
# sums Σg, Σg² per data part (subspace.data_parts sets of ID-train shards, one job each),
# one reduce to the mean and scale every subspace stage normalizes with.


rule gradstats_partial:
    input:
        model=MODEL,
        data=f"{R}/data/id_train",
    output:
        f"{R}/subspace/stats/partial/part-{{part}}.npz",
    params:
        code=code_version("subspace"),
        spec=jarg(subspace_grad_params(stats=True)),
        shards=lambda wc: part_shards(wc.part),
    log:
        f"{LOGS}/subspace/gradstats_partial/part-{{part}}.log",
    benchmark:
        f"{BENCH}/gradstats_partial/part-{{part}}.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=16000, runtime=120),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace gradstats-partial --model {input.model} "
        "--data-dir {input.data} --shards {params.shards} --params {params.spec} "
        "--out {output} > {log} 2>&1"


rule gradstats_reduce:
    input:
        expand(f"{R}/subspace/stats/partial/part-{{part}}.npz", part=DATA_PARTS_IDS),
    output:
        directory(f"{R}/subspace/stats/stats.zarr"),
    params:
        code=code_version("subspace"),
        spec=jarg({"normalize": config["subspace"]["normalize"]}),
    log:
        f"{LOGS}/subspace/gradstats_reduce.log",
    benchmark:
        f"{BENCH}/gradstats_reduce.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace gradstats-reduce --partials {input} --params {params.spec} --out {output} > {log} 2>&1"
