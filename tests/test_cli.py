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
