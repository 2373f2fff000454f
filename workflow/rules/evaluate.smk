# metrics per (detector, OOD set) and the HTML report.


rule evaluate:
    input:
        scores=all_score_files(),
        card=f"{R}/model/card.json",
    output:
        csv=report(f"{R}/metrics.csv", caption="../report/metrics.rst", category="Metrics"),
        md=f"{R}/metrics.md",
    params:
        code=code_version("evaluate"),
        detectors=detector_table_json(),
        positive=config["metrics"]["positive"],
        ood=" ".join(OOD_SETS),
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 15 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace evaluate --scores {input.scores} --id-dataset id_test --ood-datasets {params.ood} "
        "--detectors {params.detectors} --card {input.card} --positive {params.positive} "
        "--out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule report:
    input:
        metrics=f"{R}/metrics.csv",
        card=f"{R}/model/card.json",
        scores=all_score_files(),
        extra=report_extra_inputs(),
    output:
        report(
            directory(f"{R}/report"),
            patterns=["{name}.html", "figures/{fig}.png"],
            caption="../report/report.rst",
            category="Report",
        ),
    params:
        code=code_version("report"),
        title=shlex.quote(config["report"]["title"]),
        bench=BENCH,
        sections=jarg(report_sections()),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 15 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace report --metrics {input.metrics} --card {input.card} --scores {input.scores} "
        "--benchmarks $(find {params.bench} -name '*.tsv' 2>/dev/null | sort) "
        "--sections {params.sections} --title {params.title} --out-dir {output} > {log} 2>&1"


rule timing_tables:
    input:
        card=f"{R}/model/card.json",
        subspaces=expand(f"{R}/subspace/{{space}}/subspace.zarr", space=SPACES),
        reduced=[s for sp in SPACES for ds in DATASETS for s in shard_stores(ds, kind=f"reduced/{sp}")],
        fitted=[f"{R}/detectors/{sp}/{n}.npz" for sp in SPACES for n in GRAD_DETECTORS],
    output:
        report(
            directory(f"{R}/timing"),
            patterns=["{name}.csv"],
            caption="../report/timing.rst",
            category="Timing",
        ),
    params:
        code=code_version("report"),
        bench=BENCH,
        subspaces=" ".join(f"--subspace {sp}={R}/subspace/{sp}/subspace.zarr" for sp in SPACES),
        reduced=" ".join(
            f"--reduced {sp}:{ds}=" + ",".join(shard_stores(ds, kind=f"reduced/{sp}"))
            for sp in SPACES
            for ds in ["id_test"] + OOD_SETS
        ),
    log:
        f"{LOGS}/timing_tables.log",
    benchmark:
        f"{BENCH}/timing_tables.tsv"
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=lambda wc, attempt: 15 * attempt,
    conda:
        "../../envs/gradspace.yaml"
    shell:
        "gradspace timing-tables --bench-dir {params.bench} --card {input.card} {params.subspaces} "
        "{params.reduced} --fitted {input.fitted} --out-dir {output} > {log} 2>&1"
