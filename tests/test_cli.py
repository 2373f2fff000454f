"""The CLI: lazy command table, runtime settings, error handling."""

import argparse
import json

import pytest

from gradspace import cli


def test_command_table_matches_registrations():
    registered = {}
    for mod in cli.COMMAND_MODULES:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        __import__(mod, fromlist=["register"]).register(sub)
        for name in sub.choices:
            registered[name] = mod
    assert registered == cli.COMMANDS


def test_runtime_settings_fill_only_missing_keys(monkeypatch):
    monkeypatch.setenv(cli.RUNTIME_ENV, json.dumps({"device": "cpu", "batch_size": 7, "num_workers": 0}))
    args = argparse.Namespace(params={"batch_size": 3}, compute={}, runtime_into=("params",))
    cli._merge_runtime_settings(args)
    assert args.params == {"batch_size": 3, "device": "cpu", "num_workers": 0}
    assert args.compute == {}  # only the options the command names receive them


def test_bad_input_exits_2_with_message(tmp_path, capsys):
    scores = tmp_path / "scores/feature/msp"
    rc = cli.main(["evaluate", "--scores", str(scores / "id_test.npy"), str(scores / "textures.npy"),
                   "--out-csv", str(tmp_path / "m.csv")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "id_test.npy" in err
    assert not (tmp_path / "m.csv").exists()


def test_params_must_be_json_object():
    with pytest.raises(argparse.ArgumentTypeError):
        cli.json_arg("[1, 2]")


def test_runtime_settings_round_trip_through_params():
    from gradspace import params

    env = {}
    params.export_runtime_settings({"device": "cpu", "num_workers": 2, "precision": "fp32"}, env)
    assert params.read_runtime_settings(env) == {"device": "cpu", "num_workers": 2}
    assert cli.RUNTIME_ENV == params.RUNTIME_ENV


def test_bad_runtime_env_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(cli.RUNTIME_ENV, "{not json")
    rc = cli.main(["evaluate", "--scores", str(tmp_path / "id_test.npy"), str(tmp_path / "t.npy"),
                   "--out-csv", str(tmp_path / "m.csv")])
    assert rc == 2
    assert "GRADSPACE_RUNTIME" in capsys.readouterr().err


def test_merge_params_is_the_one_merge_with_schema_defaults():
    """Unknown keys name the command and the known keys; required keys must be given;
    Schema defaults are the config schema's own; optional keys are kept only when given."""
    import yaml

    from gradspace.errors import ConfigError
    from gradspace.params import SCHEMA_PATH, Schema, merge_params, schema_default

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    want = schema["properties"]["compute"]["properties"]["batch_size"]["default"]
    defaults = {"batch_size": Schema("compute.batch_size"), "alpha": 0.5}
    assert merge_params({}, defaults, "x --params") == {"batch_size": want, "alpha": 0.5}
    assert merge_params({"alpha": 2, "k": 3}, defaults, "x", optional=("k",)) == {
        "batch_size": want, "alpha": 2, "k": 3}
    assert "k" not in merge_params({}, defaults, "x", optional=("k",))
    with pytest.raises(ConfigError, match=r"x --params: unknown key\(s\) \['bogus'\]; known: .*alpha"):
        merge_params({"bogus": 1}, defaults, "x --params")
    with pytest.raises(ConfigError, match="missing key.*'k'"):
        merge_params({}, defaults, "x --params", required=("k",))
    with pytest.raises(ConfigError, match="no key 'subspace.nope'"):
        schema_default("subspace.nope")
    assert schema_default("subspace.k") == schema["properties"]["subspace"]["properties"]["k"]["default"]


def test_unknown_key_checks_live_in_one_place():
    """Every command's options go through gradspace.params.merge_params: no module keeps
    its own unknown-key check (issue 11: one parameter-merging helper)."""
    from pathlib import Path

    import gradspace

    pkg = Path(gradspace.__file__).parent
    own = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
           if p.name != "params.py" and "unknown key" in p.read_text().replace("(unknown key,", "")]
    assert not own, own
