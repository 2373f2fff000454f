"""Rerun only what a change invalidated: for each kind of change, a dry run on top of a
finished run plans exactly the expected jobs (issue: invalidation table)."""

import json
from collections import Counter

import yaml

from conftest import TINY, planned_jobs

OOD = ["textures", "digits8x8"]
SCORED = ["id_test"] + OOD


def write_config(workdir, name, change):
    cfg = yaml.safe_load(TINY.read_text())
    change(cfg)
    (workdir / name).write_text(yaml.safe_dump(cfg, sort_keys=False))  # keep the OOD order
    return name


def rules(jobs):
    return Counter(rule for rule, _ in jobs)


def test_unchanged_config_plans_nothing(tiny_workdir):
    assert planned_jobs(tiny_workdir) == []


def test_detector_hyperparameter_reruns_only_that_detector(tiny_workdir):
    name = write_config(tiny_workdir, "c_det.yaml",
                        lambda c: c["detectors"]["energy"].update(temperature=2.0))
    jobs = planned_jobs(tiny_workdir, name)
    assert rules(jobs) == Counter({"fit_detector": 1, "score_detector": 3, "evaluate": 1, "findings": 1,
                                   "report": 1, "all": 1})
    assert {w.get("detector") for r, w in jobs if r in ("fit_detector", "score_detector")} == {"energy"}


def test_report_setting_reruns_only_the_report(tiny_workdir):
    name = write_config(tiny_workdir, "c_rep.yaml", lambda c: c["report"].update(title="another title"))
    assert rules(planned_jobs(tiny_workdir, name)) == Counter({"report": 1, "all": 1})


def test_new_ood_dataset_adds_only_its_jobs(tiny_workdir):
    name = write_config(tiny_workdir, "c_ood.yaml",
                        lambda c: c["data"]["ood"].update(photos={"kind": "skimage_photos", "n": 60}))
    jobs = planned_jobs(tiny_workdir, name)
    per_dataset = {"prepare", "extract", "grad_scores", "score_detector", "score_model_detector",
                   "project", "score_grad_detector", "ensemble"}
    for rule, wc in jobs:
        if rule in per_dataset:
            assert wc.get("dataset") == "photos", (rule, wc)
    # only aggregates over all datasets run again besides the new set's own jobs
    assert set(rules(jobs)) <= per_dataset | {"subspace_diagnostics", "gradient_diagnostics",
                                               "timing_tables", "evaluate", "findings", "report", "all"}
    n_feature = len(yaml.safe_load(TINY.read_text())["detectors"])
    counts = rules(jobs)
    assert counts["prepare"] == 1 and counts["extract"] == 1 and counts["project"] == 2
    assert counts["score_detector"] + counts["score_model_detector"] == n_feature
    for untouched in ("train", "fit_detector", "gradstats_partial", "pca_pass", "fit_grad_detector"):
        assert counts[untouched] == 0


def _subspace_change_plan(tiny_workdir, name, change):
    jobs = planned_jobs(tiny_workdir, write_config(tiny_workdir, name, change))
    counts = rules(jobs)
    for upstream in ("prepare", "train", "extract", "grad_scores", "fit_detector", "score_detector",
                     "score_model_detector", "gradstats_partial", "gradstats_reduce"):
        assert counts[upstream] == 0, upstream
    return jobs, counts


def test_subspace_k_reruns_pca_and_downstream_only(tiny_workdir):
    jobs, counts = _subspace_change_plan(tiny_workdir, "c_k.yaml", lambda c: c["subspace"].update(k=6))
    cfg = yaml.safe_load(TINY.read_text())
    iters = cfg["subspace"]["iterations"]
    assert counts["pca_init"] == 1 and counts["pca_finalize"] == 1
    # one job per data pass (data_parts = 1, whatever the shard count), passes 0..iters, the lift
    assert counts["pca_pass"] == iters + 1 and counts["pca_reduce"] == iters + 1
    assert counts["pca_lift"] == 1
    assert counts["ag_partial"] == 0 and counts["ag_reduce"] == 0  # k does not change AG
    assert {w["space"] for r, w in jobs if r in ("project", "fit_grad_detector", "score_grad_detector")} \
        == {"pca"}
    assert counts["evaluate"] == 1 and counts["report"] == 1


def test_subspace_method_reruns_subspaces_not_extraction(tiny_workdir):
    jobs, counts = _subspace_change_plan(tiny_workdir, "c_m.yaml",
                                         lambda c: c["subspace"].update(method="jvp_vjp"))
    assert counts["pca_pass"] > 0 and counts["project"] > 0 and counts["evaluate"] == 1


def test_model_change_reruns_everything_after_data_preparation(tiny_workdir):
    name = write_config(tiny_workdir, "c_model.yaml", lambda c: c["model"]["train"].update(epochs=3))
    counts = rules(planned_jobs(tiny_workdir, name))
    assert counts["prepare"] == 0  # data do not depend on the model
    for rule in ("train", "extract", "model_card", "fit_detector", "score_detector", "grad_scores",
                 "gradstats_partial", "pca_pass", "project", "fit_grad_detector", "evaluate", "report"):
        assert counts[rule] > 0, rule


def test_runtime_settings_do_not_rerun_anything(tiny_workdir):
    def change(c):
        c["compute"].update(batch_size=32, num_workers=1)

    assert planned_jobs(tiny_workdir, write_config(tiny_workdir, "c_rt.yaml", change)) == []


def test_code_version_bump_reruns_that_stage_and_downstream(tiny_workdir):
    jobs = planned_jobs(tiny_workdir, env={"GRADSPACE_CODE_VERSIONS": json.dumps({"evaluate": 2})})
    assert rules(jobs) == Counter({"evaluate": 1, "findings": 1, "report": 1, "all": 1})
    counts = rules(planned_jobs(tiny_workdir, env={"GRADSPACE_CODE_VERSIONS": json.dumps({"project": 2})}))
    assert counts["project"] > 0 and counts["extract"] == 0 and counts["pca_pass"] == 0


def test_gradients_strategy_reruns_the_gradient_pass_not_the_subspace(tiny_workdir):
    """gradients.strategy reaches grad_scores only; the subspace jobs take subspace.strategy."""
    name = write_config(tiny_workdir, "c_gs.yaml", lambda c: c["gradients"].update(strategy="loop"))
    counts = rules(planned_jobs(tiny_workdir, name))
    assert counts["grad_scores"] > 0
    for rule in ("gradstats_partial", "ag_partial", "pca_init", "pca_pass", "pca_lift", "project",
                 "gradient_diagnostics", "fit_grad_detector"):
        assert counts[rule] == 0, rule


def test_subspace_strategy_reruns_the_subspace_not_the_gradient_pass(tiny_workdir):
    name = write_config(tiny_workdir, "c_ss.yaml", lambda c: c["subspace"].update(strategy="loop"))
    counts = rules(planned_jobs(tiny_workdir, name))
    for rule in ("gradstats_partial", "ag_partial", "pca_pass", "project", "gradient_diagnostics"):
        assert counts[rule] > 0, rule
    for rule in ("grad_scores", "extract", "train", "fit_detector"):
        assert counts[rule] == 0, rule
