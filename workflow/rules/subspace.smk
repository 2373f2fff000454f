# The gradient subspace of the low-dimensional gradient paper (Wu et al.):
# normalization statistics of the energy gradient over ID train (partial sums per data
# part, one reduce), the average-gradient (AG) subspace, the PCA subspace by block power
# iteration unrolled into one set of jobs per iteration (so an interrupted run resumes
# at the last finished iteration), projection of every shard onto each subspace, and the
# paper's detectors on the reduced gradients. Where the normalized gradients fit in memory
# (subspace.solver: exact, or auto), the PCA is one data pass instead (rule pca_exact).


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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/gradspace.yaml"
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
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace gradstats-reduce --partials {input} --params {params.spec} --out {output} > {log} 2>&1"


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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/gradspace.yaml"
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
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace ag-reduce --partials {input.partials} --stats {input.stats} --params {params.spec} "
        "{params.release} --out {output} > {log} 2>&1"


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
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        "../../envs/gradspace.yaml"
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
            mem_mb=lambda wc, attempt: 16000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/gradspace.yaml"
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
            mem_mb=lambda wc, attempt: 16000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/gradspace.yaml"
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
            mem_mb=lambda wc, attempt: 16000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/gradspace.yaml"
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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
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
        "../../envs/gradspace.yaml"
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
        "../../envs/gradspace.yaml"
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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 120 * attempt,
    conda:
        "../../envs/gradspace.yaml"
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
            "../../envs/gradspace.yaml"
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
            mem_mb=lambda wc, attempt: EXACT_MEM_MB * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/gradspace.yaml"
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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace pca-finalize {params.args} --stats {input.stats} --params {params.spec} "
        "--out {output} > {log} 2>&1"


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
            mem_mb=lambda wc, attempt: 16000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/gradspace.yaml"
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
            mem_mb=lambda wc, attempt: 16000 * attempt,
            runtime=lambda wc, attempt: 120 * attempt,
        conda:
            "../../envs/gradspace.yaml"
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
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=lambda wc, attempt: 15 * attempt,
        conda:
            "../../envs/gradspace.yaml"
        shell:
            "gradspace project-merge --parts {input.parts} --subspace {input.subspace} "
            "--out {output} > {log} 2>&1"


rule fit_grad_detector:
    input:
        lambda wc: shard_stores("id_train", kind=f"reduced/{wc.space}"),
    output:
        f"{R}/detectors/{{space}}/{{gdetector}}.npz",
    params:
        code=code_version("detectors"),
        method=lambda wc: GRAD_DETECTORS[wc.gdetector]["method"],
        hparams=lambda wc: jarg(GRAD_DETECTORS[wc.gdetector]["hparams"]),
        seed=config["seed"],
    log:
        f"{LOGS}/fit/{{space}}/{{gdetector}}.log",
    benchmark:
        f"{BENCH}/fit/{{space}}/{{gdetector}}.tsv"
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace fit --method {params.method} --name {wildcards.gdetector} --params {params.hparams} "
        "--space {wildcards.space} --embedding gradient --train {input} --seed {params.seed} "
        "--out {output} > {log} 2>&1"


rule score_grad_detector:
    input:
        fitted=f"{R}/detectors/{{space}}/{{gdetector}}.npz",
        shards=lambda wc: shard_stores(wc.dataset, kind=f"reduced/{wc.space}"),
    output:
        f"{R}/scores/{{space}}/{{gdetector}}/{{dataset}}.npy",
    params:
        code=code_version("detectors"),
    log:
        f"{LOGS}/score/{{space}}/{{gdetector}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/score/{{space}}/{{gdetector}}/{{dataset}}.tsv"
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace score --fitted {input.fitted} --shards {input.shards} --out {output} > {log} 2>&1"


rule ensemble:
    input:
        feature=f"{R}/scores/feature/{{gdetector}}/{{dataset}}.npy",
        gradient=f"{R}/scores/{{space}}/{{gdetector}}/{{dataset}}.npy",
    output:
        f"{R}/scores/ensemble_{{space}}/{{gdetector}}/{{dataset}}.npy",
    params:
        code=code_version("detectors"),
        alpha=config["subspace"]["ensemble"]["alpha"],
    log:
        f"{LOGS}/score/ensemble_{{space}}/{{gdetector}}/{{dataset}}.log",
    benchmark:
        f"{BENCH}/ensemble/{{space}}/{{gdetector}}/{{dataset}}.tsv"
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=lambda wc, attempt: 10 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace ensemble-scores --feature {input.feature} --gradient {input.gradient} "
        "--alpha {params.alpha} --out {output} > {log} 2>&1"


rule subspace_diagnostics:
    input:
        subspace=f"{R}/subspace/{{space}}/subspace.zarr",
        reduced=lambda wc: [s for ds in DATASETS for s in shard_stores(ds, kind=f"reduced/{wc.space}")],
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
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=lambda wc, attempt: 30 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace subspace-diagnostics --subspace {input.subspace} {params.reduced} "
        "--space {wildcards.space} --out-dir {output} > {log} 2>&1"


rule gradient_diagnostics:
    input:
        model=MODEL,
        stats=STATS,
        ag=f"{R}/subspace/ag/subspace.zarr" if "ag" in SPACES else [],
        data=expand(f"{R}/data/{{dataset}}", dataset=DATASETS),
        reduced=[s for sp in SPACES for ds in DATASETS for s in shard_stores(ds, kind=f"reduced/{sp}")],
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
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=lambda wc, attempt: 60 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "GRADSPACE_THREADS={threads} gradspace gradient-diagnostics --model {input.model} "
        "--stats {input.stats} {params.args} --params {params.spec} --out-dir {output} > {log} 2>&1"
