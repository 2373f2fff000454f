# extract: one job per (dataset, shard): logits, penultimate features, labels and
# predictions of every sample of the shard, written to a Zarr v3 store.


rule extract:
    input:
        model=MODEL,
        data=f"{R}/data/{{dataset}}",
    output:
        directory(f"{R}/embeddings/{{dataset}}/shard-{{shard}}.zarr"),
    params:
        code=code_version("extract"),
        spec=jarg(compute_params()),
    log:
        f"{LOGS}/extract/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/extract/{{dataset}}/shard-{{shard}}.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace extract --model {input.model} --data-dir {input.data} "
        "--shard {wildcards.shard} --params {params.spec} --out {output} > {log} 2>&1"
