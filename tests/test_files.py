"""gradspace.files: the one atomic-write helper (unique temporary siblings, rename on
success, nothing left behind on failure) and the checked JSON reader."""

from __future__ import annotations

import json
import os

import pytest

from gradspace.errors import DataError
from gradspace.files import (
    atomic_path,
    read_json,
    tmp_sibling,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_temporary_names_are_unique_hidden_siblings(tmp_path):
    names = {tmp_sibling(tmp_path / "out.json").name for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(".out.json.tmp-") for n in names)
    assert all(f"-{os.getpid()}-" in n for n in names)


def test_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    out = tmp_path / "a" / "b.txt"
    write_text_atomic(out, "first\r\n")
    assert out.read_bytes() == b"first\r\n"  # newlines as given

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_bytes_atomic(out, boom)
    assert out.read_bytes() == b"first\r\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.txt"]


def test_directory_outputs_are_swapped_whole(tmp_path):
    out = tmp_path / "report"
    with atomic_path(out, directory=True) as tmp:
        (tmp / "index.html").write_text("v1")
    with atomic_path(out, directory=True) as tmp:
        (tmp / "index.html").write_text("v2")
        (tmp / "figures").mkdir()
    assert (out / "index.html").read_text() == "v2" and (out / "figures").is_dir()
    with pytest.raises(ValueError), atomic_path(out, directory=True) as tmp:
        (tmp / "index.html").write_text("v3")
        raise ValueError("half-written")
    assert (out / "index.html").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_json_round_trip_and_errors_name_the_file(tmp_path):
    p = tmp_path / "card.json"
    write_json_atomic(p, {"a": 1}, indent=2)
    assert p.read_text() == '{\n  "a": 1\n}\n'
    assert read_json(p, "model card", dict) == {"a": 1}
    with pytest.raises(DataError, match=r"model card '.*missing.json' does not exist"):
        read_json(tmp_path / "missing.json", "model card")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DataError, match=r"timing file '.*bad.json' is not valid JSON"):
        read_json(tmp_path / "bad.json", "timing file")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(DataError, match="expected a JSON object"):
        read_json(tmp_path / "list.json", "model card", dict)


HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def test_benchmark_rows_as_numbers_and_bad_files_named(tmp_path):
    from gradspace.files import read_benchmark

    p = tmp_path / "job.tsv"
    p.write_text(HEADER + "1.5\t0:00:01\t12.5\t-\tNA\t1\t0\t0\t40\t1.2\n")
    (row,) = read_benchmark(p)
    assert row["s"] == 1.5 and row["h:m:s"] == "0:00:01" and row["max_rss"] == 12.5
    assert row["max_vms"] != row["max_vms"] and row["max_uss"] != row["max_uss"]  # NaN
    (tmp_path / "empty.tsv").write_text("")
    (tmp_path / "header.tsv").write_text(HEADER)
    assert read_benchmark(tmp_path / "empty.tsv") == [] == read_benchmark(tmp_path / "header.tsv")
    (tmp_path / "foreign.tsv").write_text("x\ty\n1\t2\n")
    with pytest.raises(DataError, match="foreign.tsv.*'s' column"):
        read_benchmark(tmp_path / "foreign.tsv")
    (tmp_path / "short.tsv").write_text(HEADER + "1.0\t0:00:01\n")
    with pytest.raises(DataError, match="short.tsv', line 2: 2 fields"):
        read_benchmark(tmp_path / "short.tsv")
    with pytest.raises(DataError, match="does not exist"):
        read_benchmark(tmp_path / "missing.tsv")
