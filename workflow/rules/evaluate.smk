# metrics per (detector, OOD set) and the HTML report.


rule evaluate:
    input:
        scores=all_score_files(),
        card=f"{R}/model/card.json",
    output:
        csv=report(f"{R}/metrics.csv", caption="../report/metrics.rst", category="Metrics"),
        md=f"{R}/metrics.md",
    params:
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
    output:
        report(
            directory(f"{R}/report"),
            patterns=["{name}.html", "figures/{fig}.png"],
            caption="../report/report.rst",
            category="Report",
        ),
    params:
        title=shlex.quote(config["report"]["title"]),
        bench=BENCH,
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
        "--title {params.title} --out-dir {output} > {log} 2>&1"
