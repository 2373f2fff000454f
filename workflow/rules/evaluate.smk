# metrics per (detector, OOD set), the papers' claims tested on them, and the HTML report.
# metrics.groups goes to the CLI in config order (near before far), not jarg's sorted keys.


FINDINGS_SECTION = [
    {
        "title": "Findings: the papers' claims on this run",
        "csv": f"{R}/findings.csv",
        "caption": "Each qualitative claim of the papers that this run's detectors can test: the "
        "paper's figure (quoted, with its table), this run's figure and whether it holds, all "
        "computed from metrics.csv and the subspace diagnostics (gradspace.findings). Scope all: "
        "average over every OOD set; other scopes: the averages of metrics.groups. Margin: AUROC "
        "points (reconstruction claims: error difference) in favour of the claim.",
    }
]


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
        groups=shlex.quote(json.dumps(config["metrics"]["groups"])),
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCH}/evaluate.tsv"
    resources:
        **attempt_scaled(mem_mb=4000, runtime=15),
    conda:
        CONDA_ENV
    shell:
        "gradspace evaluate --scores {input.scores} --id-dataset id_test --ood-datasets {params.ood} "
        "--detectors {params.detectors} --card {input.card} --positive {params.positive} "
        "--groups {params.groups} --out-csv {output.csv} --out-md {output.md} > {log} 2>&1"


rule findings:
    input:
        metrics=f"{R}/metrics.csv",
        diagnostics=expand(f"{R}/diagnostics/{{space}}", space=SPACES),
        selected=[f"{SEL}/feature/{n}.json" for n in SELECTED],
    output:
        csv=f"{R}/findings.csv",
        md=f"{R}/findings.md",
    params:
        code=code_version("findings"),
        detectors=jarg({n: dict(c or {}) for n, c in config["detectors"].items()}),
        grad_scores=jarg(config["gradients"]["scores"]),
        groups=shlex.quote(json.dumps(config["metrics"]["groups"])),
        tolerance=config["metrics"]["findings"]["tolerance"],
        reconstruction=" ".join(f"{sp}={R}/diagnostics/{sp}/reconstruction.csv" for sp in SPACES),
    log:
        f"{LOGS}/findings.log",
    benchmark:
        f"{BENCH}/findings.tsv"
    resources:
        **attempt_scaled(mem_mb=2000, runtime=10),
    conda:
        CONDA_ENV
    shell:
        "gradspace findings --metrics {input.metrics} --detectors {params.detectors} "
        "--grad-scores {params.grad_scores} --groups {params.groups} --tolerance {params.tolerance} "
        "--reconstruction {params.reconstruction} --out-csv {output.csv} --out-md {output.md} "
        + ("--selected {input.selected} " if SELECTED else "")
        + "> {log} 2>&1"


rule report:
    input:
        metrics=f"{R}/metrics.csv",
        card=f"{R}/model/card.json",
        scores=all_score_files(),
        extra=report_extra_inputs(),
        findings=f"{R}/findings.csv",
        selection=[f"{R}/selection.csv"] if VAL_SETS else [],
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
        findings=jarg(FINDINGS_SECTION + SELECTION_SECTION),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCH}/report.tsv"
    resources:
        **attempt_scaled(mem_mb=4000, runtime=15),
    conda:
        CONDA_ENV
    shell:
        "gradspace report --metrics {input.metrics} --card {input.card} --scores {input.scores} "
        "--benchmarks $(find {params.bench} -name '*.tsv' 2>/dev/null | sort) "
        "--sections {params.sections} {params.findings} --title {params.title} --out-dir {output} "
        "> {log} 2>&1"


rule timing_tables:
    input:
        card=f"{R}/model/card.json",
        subspaces=expand(f"{R}/subspace/{{space}}/subspace.zarr", space=SPACES),
        reduced=[s for sp in SPACES for ds in TEST_DATASETS for s in shard_stores(ds, kind=f"reduced/{sp}")],
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
        stage_rules=lambda wc: jarg(stage_rules()),
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
        **attempt_scaled(mem_mb=4000, runtime=15),
    conda:
        CONDA_ENV
    shell:
        "gradspace timing-tables --bench-dir {params.bench} --card {input.card} {params.subspaces} "
        "{params.reduced} --fitted {input.fitted} --stage-rules {params.stage_rules} --out-dir {output} "
        "> {log} 2>&1"
