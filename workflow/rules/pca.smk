# The PCA subspace (Wu et al.): block Krylov Rayleigh-Ritz over data passes (resumable
# at the last finished pass, converged to subspace.tol), or, where the normalized gradients
# fit in memory (subspace.solver: exact, or auto), one exact data pass (rule pca_exact).


# PCA by block Krylov Rayleigh–Ritz, unrolled into data passes t = 0, 1, …: every pass
# runs one job per data part (subspace.data_parts sets of ID-train shards; one job passes
# over all shards of its part), then the checkpoint pca_reduce writes V_{t+1}, the small
# Krylov record of pass t (sample-space images G·V_t, N×K') and its diagnostics. With
# subspace.iterations: auto the finalize inputs ask for one more pass until the largest
# residual of the top-k Ritz pairs meets subspace.tol (or max_iterations). Pass parts are
# temp(); each basis is released by the reduce after the pass that read it (in-job:
# Snakemake defers temp() deletion while checkpoints are pending, i.e. the whole
# iteration), so the disk in use holds at most V_t or V_{t+1}, the parts of one pass and
# V_{t+1}, whatever the shard count. The basis after the last pass stays, so a tighter
# tolerance later continues where the run stopped.
rule pca_init:
    input:
        STATS,
    output:
        directory(f"{PCA}/V-init.zarr"),
    params:
        code=code_version("subspace"),
        spec=jarg(pca_init_params()),
    log:
        f"{LOGS}/subspace/pca_init.log",
    benchmark:
        f"{BENCH}/pca_init.tsv"
    resources:
        **attempt_scaled(mem_mb=8000, runtime=30),
    conda:
        CONDA_ENV
    shell:
        "gradspace pca-init --stats {input} --params {params.spec} --out {output} > {log} 2>&1"


if not SPLIT_BLOCKS:

    rule pca_pass:
        input:
            model=MODEL,
            data=f"{R}/data/id_train",
            stats=STATS,
            basis=lambda wc: pca_basis(wc.it),
        output:
            temp(directory(f"{PCA}/pass-{{it}}/part-{{part}}.zarr")),
        params:
            code=code_version("subspace"),
            spec=jarg({**subspace_grad_params(), "method": SUB["method"]}),
            shards=lambda wc: part_shards(wc.part),
            release=lambda wc: release_arg(pca_previous_parts(wc.it)),
        log:
            f"{LOGS}/subspace/pca_pass/pass-{{it}}/part-{{part}}.log",
        benchmark:
            f"{BENCH}/pca_pass/pass-{{it}}/part-{{part}}.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=16000, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace pca-pass --model {input.model} --data-dir {input.data} "
            "--stats {input.stats} --basis {input.basis} --shards {params.shards} --params {params.spec} "
            "{params.release} --out {output} > {log} 2>&1"

else:

    # subspace.block_jobs > 1: each pass job becomes two per (data part, block group).
    # G·V = Σ_g G_g V_g, so pca_gv computes the part of its group with only that group's
    # rows of V_t on the device; pca_pass_block sums the parts of all groups to G·V_t and
    # computes G_bᵀ(G·V_t) for its group's blocks (no V needed). The mean correction
    # G_b = (∇_b E − m_b) s_b is blockwise, so the split is exact.
    rule pca_gv:
        input:
            model=MODEL,
            data=f"{R}/data/id_train",
            stats=STATS,
            basis=lambda wc: pca_basis(wc.it),
        output:
            temp(directory(f"{PCA}/pass-{{it}}/gv/group-{{group}}/part-{{part}}.zarr")),
        wildcard_constraints:
            group="|".join(BLOCK_GROUPS),
        params:
            code=code_version("subspace"),
            spec=jarg({**subspace_grad_params(), "method": SUB["method"]}),
            group=lambda wc: block_group_arg(wc.group),
            shards=lambda wc: part_shards(wc.part),
            release=lambda wc: release_arg(pca_previous_parts(wc.it)),
        log:
            f"{LOGS}/subspace/pca_gv/pass-{{it}}/group-{{group}}/part-{{part}}.log",
        benchmark:
            f"{BENCH}/pca_gv/pass-{{it}}/group-{{group}}/part-{{part}}.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=16000, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace pca-gv --model {input.model} --data-dir {input.data} "
            "--stats {input.stats} --basis {input.basis} --shards {params.shards} "
            "--block-group {params.group} --params {params.spec} --out {output} > {log} 2>&1"

    rule pca_pass_block:
        input:
            model=MODEL,
            data=f"{R}/data/id_train",
            stats=STATS,
            basis=lambda wc: pca_basis(wc.it),
            gv=pca_gv_parts,
        output:
            temp(directory(f"{PCA}/pass-{{it}}/group-{{group}}/part-{{part}}.zarr")),
        wildcard_constraints:
            group="|".join(BLOCK_GROUPS),
        params:
            code=code_version("subspace"),
            spec=jarg({**subspace_grad_params(), "method": SUB["method"]}),
            group=lambda wc: block_group_arg(wc.group),
            shards=lambda wc: part_shards(wc.part),
        log:
            f"{LOGS}/subspace/pca_pass_block/pass-{{it}}/group-{{group}}/part-{{part}}.log",
        benchmark:
            f"{BENCH}/pca_pass_block/pass-{{it}}/group-{{group}}/part-{{part}}.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=16000, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace pca-pass --model {input.model} --data-dir {input.data} "
            "--stats {input.stats} --basis {input.basis} --shards {params.shards} --gv {input.gv} "
            "--block-group {params.group} --params {params.spec} --out {output} > {log} 2>&1"


rule pca_reduce:
    input:
        parts=lambda wc: pca_pass_parts(wc.it),
        gv=lambda wc: pca_all_gv_parts(wc.it),
        krylov=lambda wc: [pca_krylov(s) for s in range(int(wc.it))],
        stats=STATS,
    output:
        basis=directory(f"{PCA}/pass-{{it}}/V-next.zarr"),
        krylov=directory(f"{PCA}/krylov/pass-{{it}}.zarr"),
    params:
        code=code_version("subspace"),
        spec=jarg({"solver": pca_iterative_solver()}),
        gv=lambda wc, input: f"--gv {' '.join(input.gv)}" if input.gv else "",
        krylov=lambda wc, input: f"--krylov {' '.join(input.krylov)}" if input.krylov else "",
        release=lambda wc: release_arg([pca_basis(wc.it)]),
    log:
        f"{LOGS}/subspace/pca_reduce/pass-{{it}}.log",
    benchmark:
        f"{BENCH}/pca_reduce/pass-{{it}}.tsv"
    resources:
        **attempt_scaled(mem_mb=16000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace pca-reduce --parts {input.parts} {params.gv} {params.krylov} --stats {input.stats} "
        "--params {params.spec} --out-basis {output.basis} --out-krylov {output.krylov} "
        "{params.release} > {log} 2>&1"


# The checkpoint of the iteration: its small output (kept) tells whether another pass is
# needed; the basis V_{t+1} is an output of pca_reduce, so releasing it never makes the
# checkpoint look unfinished.
checkpoint pca_diagnostics:
    input:
        lambda wc: pca_krylov(wc.it),
    output:
        f"{PCA}/diagnostics/pass-{{it}}.json",
    params:
        code=code_version("subspace"),
    log:
        f"{LOGS}/subspace/pca_diagnostics/pass-{{it}}.log",
    benchmark:
        f"{BENCH}/pca_diagnostics/pass-{{it}}.tsv"
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "gradspace pca-diagnostics --krylov {input} --out {output} > {log} 2>&1"


rule pca_settings:
    output:
        f"{PCA}/settings.json",
    params:
        code=code_version("subspace"),
        spec=jarg(pca_settings_params()),
    log:
        f"{LOGS}/subspace/pca_settings.log",
    benchmark:
        f"{BENCH}/pca_settings.tsv"
    localrule: True
    conda:
        CONDA_ENV
    shell:
        "gradspace pca-settings --params {params.spec} --out {output} > {log} 2>&1"


rule pca_lift:
    input:
        settings=f"{PCA}/settings.json",
        model=MODEL,
        data=f"{R}/data/id_train",
        stats=STATS,
        krylov=lambda wc: pca_krylov(pca_final_pass()),
    output:
        temp(directory(f"{PCA}/lift/group-{{group}}/part-{{part}}.zarr")),
    wildcard_constraints:
        group="|".join(LIFT_GROUPS),
    params:
        code=code_version("subspace"),
        spec=jarg({**subspace_grad_params(), "method": SUB["method"]}),
        group=lambda wc: f"--block-group {block_group_arg(wc.group)}" if SPLIT_BLOCKS else "",
        shards=lambda wc: part_shards(wc.part),
    log:
        f"{LOGS}/subspace/pca_lift/group-{{group}}/part-{{part}}.log",
    benchmark:
        f"{BENCH}/pca_lift/group-{{group}}/part-{{part}}.tsv"
    threads: THREADS
    resources:
        **attempt_scaled(mem_mb=16000, runtime=120),
    conda:
        CONDA_ENV
    shell:
        "GRADSPACE_THREADS={threads} gradspace pca-lift --model {input.model} --data-dir {input.data} "
        "--stats {input.stats} --krylov {input.krylov} --shards {params.shards} {params.group} "
        "--params {params.spec} --out {output} > {log} 2>&1"


# The exact in-memory PCA (subspace.solver exact, or auto when it fits): one job passes
# over every ID-train shard, holds the normalized gradients G (N x P float32) and the Gram
# matrix G G^T (N x N float64) in memory and takes its exact eigendecomposition; no
# iteration, no convergence question. Its memory grows with N x P, so auto takes it only
# when gradspace.subspace.exact.exact_pca_bytes(N, P, k) <= subspace.exact_max_gib.
if SUB["solver"] == "auto":

    checkpoint pca_solver:
        input:
            STATS,
        output:
            f"{PCA}/solver.json",
        params:
            code=code_version("subspace"),
            spec=jarg({"solver": SUB["solver"], "k": SUB["k"], "exact_max_gib": SUB["exact_max_gib"]}),
        log:
            f"{LOGS}/subspace/pca_solver.log",
        benchmark:
            f"{BENCH}/pca_solver.tsv"
        localrule: True
        conda:
            CONDA_ENV
        shell:
            "gradspace pca-solver --stats {input} --params {params.spec} --out {output} > {log} 2>&1"


if SUB["solver"] in ("auto", "exact"):

    rule pca_exact:
        input:
            model=MODEL,
            data=f"{R}/data/id_train",
            stats=STATS,
        output:
            temp(directory(f"{PCA}/exact.zarr")),
        params:
            code=code_version("subspace"),
            spec=jarg({**subspace_grad_params(), "k": SUB["k"], "exact_max_gib": SUB["exact_max_gib"],
                       "tol": SUB["tol"]}),
            shards=" ".join(str(s) for s in range(n_shards("id_train"))),
        log:
            f"{LOGS}/subspace/pca_exact.log",
        benchmark:
            f"{BENCH}/pca_exact.tsv"
        threads: THREADS
        resources:
            **attempt_scaled(mem_mb=EXACT_MEM_MB, runtime=120),
        conda:
            CONDA_ENV
        shell:
            "GRADSPACE_THREADS={threads} gradspace pca-exact --model {input.model} --data-dir {input.data} "
            "--stats {input.stats} --shards {params.shards} --params {params.spec} --out {output} "
            "> {log} 2>&1"


# The PCA subspace store: the lift parts summed (data passes), or the store of pca_exact
# moved into place (exact solver; with auto, whichever the checkpoint pca_solver chose).
rule pca_finalize:
    input:
        unpack(pca_finalize_inputs),
        # static, so a dry run can print the command while a checkpoint is pending
        settings=f"{PCA}/settings.json",
        stats=STATS,
    output:
        directory(f"{PCA}/subspace.zarr"),
    params:
        code=code_version("subspace"),
        spec=jarg({"tol": SUB["tol"]}),
        args=pca_finalize_args,
    log:
        f"{LOGS}/subspace/pca_finalize.log",
    benchmark:
        f"{BENCH}/pca_finalize.tsv"
    resources:
        **attempt_scaled(mem_mb=16000, runtime=60),
    conda:
        CONDA_ENV
    shell:
        "gradspace pca-finalize {params.args} --stats {input.stats} --params {params.spec} "
        "--out {output} > {log} 2>&1"
