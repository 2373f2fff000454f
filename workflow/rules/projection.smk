# Projection of every shard onto each subspace (G·V, block-group parts summed when
# subspace.block_jobs > 1), and the subspace diagnostics read from the reduced stores.


if not SPLIT_BLOCKS:

    rule project:
        input:
            model=MODEL,
            data=f"{R}/data/{{dataset}}",
            stats=STATS,
            subspace=f"{R}/subspace/{{space}}/subspace.zarr",
        output:
            directory(f"{R}/reduced/{{space}}/{{dataset}}/shard-{{shard}}.zarr"),
        params:
            code=code_version("project"),
            spec=lambda wc: jarg({**subspace_grad_params(), "space": wc.space,
                                  "method": config["subspace"]["project"]["method"]}),
        log:
            f"{LOGS}/subspace/project/{{space}}/{{dataset}}/shard-{{shard}}.log",
        benchmark:
            f"{BENCH}/project/{{space}}/{{dataset}}/shard-{{shard}}.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=16000, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace project --model {input.model} --data-dir {input.data} "
            "--stats {input.stats} --subspace {input.subspace} --shard {wildcards.shard} "
            "--params {params.spec} --out {output} > {log} 2>&1"

else:

    # subspace.block_jobs > 1: G·V = Σ_g G_g V_g, one job per block group (only that
    # group's rows of V on the device), summed per shard by project_merge.
    rule project_block:
        input:
            model=MODEL,
            data=f"{R}/data/{{dataset}}",
            stats=STATS,
            subspace=f"{R}/subspace/{{space}}/subspace.zarr",
        output:
            directory(f"{R}/reduced/{{space}}/{{dataset}}/group-{{group}}/shard-{{shard}}.zarr"),
        wildcard_constraints:
            group="|".join(BLOCK_GROUPS),
        params:
            code=code_version("project"),
            spec=lambda wc: jarg({**subspace_grad_params(), "space": wc.space,
                                  "method": config["subspace"]["project"]["method"]}),
            group=lambda wc: block_group_arg(wc.group),
        log:
            f"{LOGS}/subspace/project_block/{{space}}/{{dataset}}/group-{{group}}/shard-{{shard}}.log",
        benchmark:
            f"{BENCH}/project_block/{{space}}/{{dataset}}/group-{{group}}/shard-{{shard}}.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=16000, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace project --model {input.model} --data-dir {input.data} "
            "--stats {input.stats} --subspace {input.subspace} --shard {wildcards.shard} "
            "--block-group {params.group} --params {params.spec} --out {output} > {log} 2>&1"

    rule project_merge:
        input:
            parts=reduced_parts,
            subspace=f"{R}/subspace/{{space}}/subspace.zarr",
        output:
            directory(f"{R}/reduced/{{space}}/{{dataset}}/shard-{{shard}}.zarr"),
        params:
            code=code_version("project"),
        log:
            f"{LOGS}/subspace/project_merge/{{space}}/{{dataset}}/shard-{{shard}}.log",
        benchmark:
            f"{BENCH}/project_merge/{{space}}/{{dataset}}/shard-{{shard}}.tsv"
        resources:
            **attempt_scaled(mem_mb=4000, runtime=15),
        conda:
            CONDA_ENV
        shell:
            "gradspace project-merge --parts {input.parts} --subspace {input.subspace} "
            "--out {output} > {log} 2>&1"


rule subspace_diagnostics:
    input:
        subspace=f"{R}/subspace/{{space}}/subspace.zarr",
        reduced=lambda wc: [s for ds in TEST_DATASETS for s in shard_stores(ds, kind=f"reduced/{wc.space}")],
    output:
        directory(f"{R}/diagnostics/{{space}}"),
    params:
        code=code_version("subspace"),
        reduced=lambda wc: reduced_args(wc.space),
    log:
        f"{LOGS}/subspace/diagnostics/{{space}}.log",
    benchmark:
        f"{BENCH}/subspace_diagnostics/{{space}}.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=30),
    conda:
        CONDA_ENV
    shell:
        "gradspace subspace-diagnostics --subspace {input.subspace} {params.reduced} "
        "--space {wildcards.space} --out-dir {output} > {log} 2>&1"


rule gradient_diagnostics:
    input:
        model=MODEL,
        stats=STATS,
        ag=f"{R}/subspace/ag/subspace.zarr" if "ag" in SPACES else [],
        data=expand(f"{R}/data/{{dataset}}", dataset=TEST_DATASETS),
        reduced=[s for sp in SPACES for ds in TEST_DATASETS for s in shard_stores(ds, kind=f"reduced/{sp}")],
    output:
        directory(f"{R}/diagnostics/gradient"),
    params:
        code=code_version("subspace"),
        spec=jarg({**subspace_grad_params(), **config["subspace"]["diagnostics"], "seed": config["seed"]}),
        args=gradient_diagnostics_args(),
    log:
        f"{LOGS}/subspace/diagnostics/gradient.log",
    benchmark:
        f"{BENCH}/gradient_diagnostics.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=16000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace gradient-diagnostics --model {input.model} "
        "--stats {input.stats} {params.args} --params {params.spec} --out-dir {output} > {log} 2>&1"
