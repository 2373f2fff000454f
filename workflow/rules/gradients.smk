# grad_scores: one job per (dataset, shard): per-sample gradients of the configured
# parameter set (engine in gradspace.grads), reduced to the configured gradient-norm
# scores in one pass, written to a Zarr store read by `stored_grad_score` detectors.


rule grad_scores:
    input:
        unpack(grad_scores_inputs),
    output:
        directory(f"{R}/gradscores/{{dataset}}/shard-{{shard}}.zarr"),
    params:
        code=code_version("gradients"),
        spec=jarg(grad_scores_params()),
        ref=lambda wc, input: f"--ref-data-dir {input.ref}" if "ref" in input.keys() else "",
    log:
        f"{LOGS}/grad_scores/{{dataset}}/shard-{{shard}}.log",
    benchmark:
        f"{BENCH}/grad_scores/{{dataset}}/shard-{{shard}}.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=16000, runtime=120),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace grad-scores --model {input.model} --data-dir {input.data} "
        "--shard {wildcards.shard} --params {params.spec} {params.ref} --out {output} > {log} 2>&1"
