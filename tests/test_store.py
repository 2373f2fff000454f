"""Zarr v3 shard stores: round trip, atomic write, validation, lazy multi-shard views."""

import json

import numpy as np
import pytest

from gradspace.errors import StoreError
from gradspace.store import ShardWriter, iter_chunks, load_arrays, open_store, verify_store


def write_store(path, start, n, chunk_rows=7):
    rng = np.random.default_rng(start)
    data = {"logits": rng.normal(size=(n, 5)).astype("f4"),
            "labels": np.arange(start, start + n, dtype="i8")}
    with ShardWriter(path, n, attrs={"dataset": "x", "shard": start}, chunk_rows=chunk_rows) as w:
        w.create("logits", (n, 5), "float32")
        w.create("labels", (n,), "int64")
        for s in range(0, n, 4):  # streamed in small batches
            w.write("logits", s, data["logits"][s:s + 4])
            w.write("labels", s, data["labels"][s:s + 4])
    return data


def test_round_trip_and_attrs(tmp_path):
    data = write_store(tmp_path / "a.zarr", 0, 23)
    g = open_store(tmp_path / "a.zarr", require=["logits"])
    np.testing.assert_array_equal(g["logits"][:], data["logits"])
    np.testing.assert_array_equal(g["labels"][:], data["labels"])
    assert g.attrs["dataset"] == "x"
    meta = g.attrs["gradspace"]
    assert meta["complete"] and meta["n"] == 23 and meta["arrays"]["logits"] == [23, 5]
    # a real Zarr v3 store
    assert json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())["zarr_format"] == 3
    verify_store(tmp_path / "a.zarr")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "b.zarr", 10) as w:
            w.create("x", (10,), "float32")
            w.write("x", 0, np.ones(5, "f4"))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_arrays_are_refused(tmp_path):
    with pytest.raises(StoreError, match="not fully written"):
        with ShardWriter(tmp_path / "c.zarr", 10) as w:
            w.create("x", (10,), "float32")
            w.write("x", 0, np.ones(5, "f4"))
    assert not (tmp_path / "c.zarr").exists()


def test_missing_completion_record_is_detected(tmp_path):
    import zarr

    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="w", zarr_format=3)
    g.create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(StoreError, match="incomplete"):
        open_store(tmp_path / "d.zarr")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")


def test_truncated_chunk_is_detected(tmp_path):
    write_store(tmp_path / "e.zarr", 0, 30)
    chunk_files = sorted(p for p in (tmp_path / "e.zarr" / "logits").rglob("*") if p.is_file()
                         and p.name != "zarr.json")
    victim = chunk_files[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    with pytest.raises(StoreError, match="corrupt"):
        verify_store(tmp_path / "e.zarr")


def test_lazy_concatenation_and_chunk_iteration(tmp_path):
    a = write_store(tmp_path / "s0.zarr", 0, 11)
    b = write_store(tmp_path / "s1.zarr", 11, 9)
    paths = [tmp_path / "s0.zarr", tmp_path / "s1.zarr"]
    arrs = load_arrays(paths, ["logits", "labels"])
    assert arrs["logits"].shape == (20, 5)
    np.testing.assert_array_equal(np.asarray(arrs["labels"]), np.arange(20))
    np.testing.assert_allclose(np.asarray(arrs["logits"].sum(axis=0)),
                               np.concatenate([a["logits"], b["logits"]]).sum(0), rtol=1e-6)
    chunks = list(iter_chunks(paths, ["labels"], rows=4))
    assert max(len(c["labels"]) for c in chunks) == 4
    np.testing.assert_array_equal(np.concatenate([c["labels"] for c in chunks]), np.arange(20))
    with pytest.raises(StoreError, match="no array 'features'"):
        load_arrays(paths, ["features"])
