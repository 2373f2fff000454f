"""Progress logging of the model-running jobs (samples done / total, samples/s, ETA in the
job log): the ``runtime.progress`` helper and its ``$GRADSPACE_PROGRESS_INTERVAL``
override, ``grad-scores``, ODIN's model pass (``gradspace score``) and the gradient pass
of ``gradient-diagnostics``, each on tiny inputs with the interval forced to 0."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from gradspace import runtime

# a tqdm line: "<name>: ...| 12.0/40.0 [00:01<00:02, 9.87sample/s]" (unit_scale: 1.2k etc.)
NUM = r"[\d.]+[kMG]?"
LINE = re.compile(rf"(?P<desc>[^\r\n]*?): .*?(?P<done>{NUM})/(?P<total>{NUM}) "
                  rf"\[\d+:\d\d<(?:\d+:\d\d|\?), +(?P<rate>{NUM}|\?)sample/s\]")


def progress_lines(text: str, name: str) -> list[re.Match]:
    return [m for m in LINE.finditer(text) if name in m.group("desc")]


def assert_logged(text: str, name: str, total: int) -> None:
    assert "\r" not in text  # one status per line in a log file, not carriage returns
    lines = progress_lines(text, name)
    assert lines, f"no progress line for {name!r} in:\n{text[-2000:]}"
    assert all(float(m.group("total")) == total for m in lines)
    last = lines[-1]
    assert float(last.group("done")) == total
    assert last.group("rate") != "?" and float(last.group("rate").rstrip("kMG")) > 0
    # intermediate lines too: done < total, with a rate and an ETA
    assert any(float(m.group("done")) < total for m in lines)


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("GRADSPACE_PROGRESS_INTERVAL", "0")


def test_interval_env(monkeypatch):
    monkeypatch.setenv("GRADSPACE_PROGRESS_INTERVAL", "2.5")
    assert runtime.progress_interval() == 2.5
    monkeypatch.setenv("GRADSPACE_PROGRESS_INTERVAL", "soon")
    assert runtime.progress_interval() in (1.0, 30.0)
    monkeypatch.delenv("GRADSPACE_PROGRESS_INTERVAL")
    assert runtime.progress_interval() == 30.0  # stderr is not a terminal under pytest


def test_progress_helper_logs_done_total_and_rate(capfd, every_update):
    batches = [(torch.zeros(4, 3), None) for _ in range(5)]
    assert len(list(runtime.progress("job x", iter(batches), 20))) == 5
    assert_logged(capfd.readouterr().err, "job x", 20)


def test_default_interval_bounds_the_rate(capfd, monkeypatch):
    monkeypatch.delenv("GRADSPACE_PROGRESS_INTERVAL", raising=False)
    list(runtime.progress("quiet job", iter([(torch.zeros(1),)] * 200), 200))
    # 30 s interval on a non-terminal: the first line and the final one only
    assert len(progress_lines(capfd.readouterr().err, "quiet job")) <= 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gradspace.data import prepare_dataset
    from gradspace.models import save_model
    from gradspace.models.architectures import build_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("progress")
    data = root / "id_train"
    prepare_dataset("id_train", {"role": "id_train", "source": {"kind": "mnist_demo"}, "num_classes": 10,
                                 "test_fraction": 0.2, "train_subsample": 24, "shards": 1,
                                 "image_size": 12, "channels": 1}, seed=0, out=data)
    torch.manual_seed(0)
    save_model(root / "model.pt", build_model("small_cnn", 10, 1, widths=(4, 6, 8)))
    return root, data


MEAN, STD = [0.1307], [0.3081]


def test_grad_scores_logs_progress(tiny, capfd, every_update):
    from gradspace.cli import main
    from gradspace.data.loader import num_samples

    root, data = tiny
    params = {"mean": MEAN, "std": STD, "batch_size": 5, "device": "cpu",
              "scores": {"gradnorm_all": {"kind": "gradnorm", "p": 1}}}
    rc = main(["grad-scores", "--model", str(root / "model.pt"), "--data-dir", str(data), "--shard", "0",
               "--params", json.dumps(params), "--out", str(root / "gs.zarr")])
    assert rc == 0
    assert_logged(capfd.readouterr().err, "grad-scores", num_samples(data, 0))


def test_odin_model_pass_logs_progress(tiny, capfd, every_update):
    from gradspace.cli import main
    from gradspace.data.loader import num_samples

    root, data = tiny
    fitted = root / "odin.npz"
    assert main(["fit", "--method", "odin", "--params", '{"temperature": 2.0, "epsilon": 0.001}',
                 "--out", str(fitted)]) == 0
    params = {"batch_size": 5, "device": "cpu", "mean": MEAN, "std": STD}
    assert main(["score", "--fitted", str(fitted), "--model", str(root / "model.pt"), "--data-dir",
                 str(data), "--params", json.dumps(params), "--out", str(root / "odin.npy")]) == 0
    assert_logged(capfd.readouterr().err, "score odin", num_samples(data))


def test_gradient_diagnostics_logs_progress(capfd, every_update):
    from gradspace.subspace.diagnostics import gradient_pass_diagnostics, sample_rows
    from gradspace.subspace.operators import PerSampleOperator
    from test_subspace import batches, layout_of, make_data, make_model, stats_of

    torch.set_num_threads(1)
    model = make_model()
    layout = layout_of(model)
    x, y = make_data(40)
    st, _ = stats_of(model, x, layout)
    xo = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(9))
    sets = {"id_train": (x, y), "ood": (xo, torch.full((20,), -1))}
    rows = {ds: sample_rows(len(v[0]), 12, 0, salt) for salt, (ds, v) in enumerate(sorted(sets.items()))}
    fns = {ds: (lambda v=v: iter(batches(v[0], v[1], 4))) for ds, v in sets.items()}
    # the reference in 2 pieces: 12 reference gradients + 2 passes over 12 query rows
    gradient_pass_diagnostics(PerSampleOperator(model, layout, st), fns, rows, "id_train",
                              max_bytes=6 * 4 * layout.num_params + 1)
    assert_logged(capfd.readouterr().err, "gradient-diagnostics", 12 + 2 * 12)


def test_every_job_logs_its_own_peak_memory(tmp_path):
    """The last stderr line of a successful command is its peak resident memory (VmHWM),
    which gradspace.plan.measure_run and the rehearsal read from the job logs."""
    import subprocess
    import sys

    from gradspace.runtime import PEAK_MEMORY_LINE, read_peak_memory

    cli = "import sys; from gradspace.cli import main; sys.exit(main())"
    out = subprocess.run([sys.executable, "-c", cli, "plan", "--configfile",
                          str(Path(__file__).resolve().parents[1] / "config" / "config.yaml"), "--json"],
                         capture_output=True, text=True, check=True)
    assert out.stderr.strip().splitlines()[-1].startswith(PEAK_MEMORY_LINE)
    log = tmp_path / "job.log"
    log.write_text(out.stderr)
    peak = read_peak_memory(log)
    assert 20e6 < peak < 4e9  # a Python process with numpy and torch's model facts
    assert read_peak_memory(tmp_path / "missing.log") is None
