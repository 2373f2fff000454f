# The average-gradient (AG) subspace (Wu et al.): class sums of the normalized gradients
# in class-range jobs per data part, reduced to the centred class means (orthonormalized).


rule ag_partial:
    input:
        model=MODEL,
        data=f"{R}/data/id_train",
        stats=STATS,
    output:
        temp(directory(f"{R}/subspace/ag/partial/classes-{{cgroup}}/part-{{part}}.zarr")),
    wildcard_constraints:
        cgroup=r"\d+",
    params:
        code=code_version("subspace"),
        spec=jarg({**subspace_grad_params(), "method": config["subspace"]["method"],
                   "num_classes": config["data"]["id"]["num_classes"]}),
        shards=lambda wc: part_shards(wc.part),
        classes=lambda wc: ag_classes_arg(wc.cgroup),
    log:
        f"{LOGS}/subspace/ag_partial/classes-{{cgroup}}/part-{{part}}.log",
    benchmark:
        f"{BENCH}/ag_partial/classes-{{cgroup}}/part-{{part}}.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=16000, runtime=120),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace ag-partial --model {input.model} --data-dir {input.data} "
        "--stats {input.stats} --shards {params.shards} {params.classes} --params {params.spec} --out {output} "
        "> {log} 2>&1"


rule ag_reduce:
    input:
        partials=ag_partials(),
        stats=STATS,
    output:
        directory(f"{R}/subspace/ag/subspace.zarr"),
    params:
        code=code_version("subspace"),
        # what the reduce itself takes (ag.class_jobs only splits the partial jobs)
        spec=jarg({"orthonormalize": SUB["ag"]["orthonormalize"]}),
        # the partials' only consumer releases them when done (before Snakemake's own
        # temp() handling, which would otherwise race a later job deleting them)
        release=release_arg(ag_partials()),
    log:
        f"{LOGS}/subspace/ag_reduce.log",
    benchmark:
        f"{BENCH}/ag_reduce.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace ag-reduce --partials {input.partials} --stats {input.stats} --params {params.spec} "
        "{params.release} --out {output} > {log} 2>&1"
