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


# -- corruption: file records, checksums, verify-stores ------------------------------------------

def _chunk_files(store, array):
    return sorted(p for p in (store / array).rglob("*") if p.is_file() and p.name != "zarr.json")


def test_completion_record_lists_files_with_sizes_and_crc(tmp_path):
    write_store(tmp_path / "f.zarr", 0, 30)
    files = open_store(tmp_path / "f.zarr").attrs["gradspace"]["files"]
    chunks = _chunk_files(tmp_path / "f.zarr", "logits")
    assert len(chunks) == 5 and "logits/zarr.json" in files
    rel = chunks[0].relative_to(tmp_path / "f.zarr").as_posix()
    assert files[rel][0] == chunks[0].stat().st_size
    assert verify_store(tmp_path / "f.zarr") is True


def test_truncated_or_missing_chunk_file_is_refused_on_open(tmp_path):
    for name, damage in (("t.zarr", lambda p: p.write_bytes(p.read_bytes()[:3])),
                         ("m.zarr", lambda p: p.unlink())):
        write_store(tmp_path / name, 0, 30)
        damage(_chunk_files(tmp_path / name, "labels")[1])
        with pytest.raises(StoreError, match=rf"store .*{name} is corrupt: file labels/c/1 "
                                             r"(has 3 bytes|is missing).*verify-stores"):
            open_store(tmp_path / name)
        with pytest.raises(StoreError, match="corrupt"):
            list(iter_chunks([tmp_path / name], ["labels"]))


def test_flipped_bits_are_never_read_as_data(tmp_path):
    write_store(tmp_path / "b.zarr", 0, 30)
    victim = _chunk_files(tmp_path / "b.zarr", "logits")[2]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x5A  # same size: the cheap check cannot see it ...
    victim.write_bytes(bytes(raw))
    open_store(tmp_path / "b.zarr")
    with pytest.raises(StoreError, match=r"b.zarr is corrupt: rows .* cannot be decoded"):
        list(iter_chunks([tmp_path / "b.zarr"], ["logits"]))  # ... the chunk's CRC-32C does
    with pytest.raises(StoreError, match="CRC-32"):
        verify_store(tmp_path / "b.zarr")
    with pytest.raises(StoreError, match="cannot be decoded"):
        verify_store(tmp_path / "b.zarr", checksums=False)


def test_store_without_file_record_still_opens(tmp_path):
    import zarr

    write_store(tmp_path / "old.zarr", 0, 10)
    g = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    meta = dict(g.attrs["gradspace"])
    meta.pop("files")
    g.attrs["gradspace"] = meta  # as written before file records existed
    assert verify_store(tmp_path / "old.zarr") is False


def test_verify_stores_command_reports_and_removes(tmp_path, capsys):
    from gradspace import cli

    def main(argv):
        try:
            return cli.main(argv)
        except SystemExit as exc:  # exit status 1: broken stores left
            return exc.code

    root = tmp_path / "results" / "exp"
    for k in range(3):
        write_store(root / "embeddings" / "x" / f"shard-{k}.zarr", 10 * k, 10)
    (root / "embeddings" / "x" / ".shard-9.zarr.tmp-1-abc").mkdir()  # a killed job's leftover
    trunc = root / "embeddings" / "x" / "shard-1.zarr"
    _chunk_files(trunc, "logits")[0].write_bytes(b"\0")
    flip = root / "embeddings" / "x" / "shard-2.zarr"
    f = _chunk_files(flip, "labels")[0]
    f.write_bytes(bytes(b ^ 1 for b in f.read_bytes()))

    assert main(["verify-stores", str(root), "--quick"]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {trunc}" in out and str(flip) not in out  # sizes only
    assert main(["verify-stores", str(root)]) == 1
    out = capsys.readouterr().out
    assert "3 store(s)" in out and f"BROKEN {trunc}" in out and f"BROKEN {flip}" in out
    assert main(["verify-stores", str(root), "--remove"]) == 0
    assert not trunc.exists() and not flip.exists()
    assert (root / "embeddings" / "x" / "shard-0.zarr").exists()
    assert main(["verify-stores", str(root)]) == 0


# -- shard layouts -------------------------------------------------------------------------------

def _layout_stores(tmp_path, n, shards, dataset="textures", tag=""):
    from gradspace.data.manifest import shard_rows

    paths = []
    for k in range(shards):
        a, b = shard_rows(n, shards, k)
        p = tmp_path / f"{tag}shard-{k}.zarr"
        lay = {"dataset": dataset, "data_dir": f"results/e/data/{dataset}", "shard": k,
               "shards": shards, "n": n, "rows": [a, b]}
        with ShardWriter(p, b - a, layout=lay) as w:
            w.put("index", np.arange(a, b))
        paths.append(p)
    return paths


def test_consistent_shard_set_passes(tmp_path, monkeypatch):
    from gradspace.store import check_shard_set

    paths = _layout_stores(tmp_path, 100, 3)
    check_shard_set(paths)
    assert sum(len(c["index"]) for c in iter_chunks(paths, ["index"])) == 100
    monkeypatch.setenv("GRADSPACE_SHARDS", '{"textures": 3}')
    check_shard_set(paths)


def test_inconsistent_shard_counts_are_refused(tmp_path, monkeypatch):
    from gradspace.store import check_shard_set

    three = _layout_stores(tmp_path, 100, 3, tag="a")
    two = _layout_stores(tmp_path, 100, 2, tag="b")
    # two of three stores (config now says 2 shards, stores from the 3-shard manifest)
    with pytest.raises(StoreError, match=r"inconsistent shard counts for dataset 'textures': "
                                         r"expected 2 shard store\(s\), found 2 written for a "
                                         r"3-shard manifest"):
        check_shard_set(three[:2])
    # stores of two layouts mixed
    with pytest.raises(StoreError, match=r"'textures'.*3 shards of 100 rows.*2 shards of 100 rows"):
        check_shard_set([three[0], two[1]])
    # out of order
    with pytest.raises(StoreError, match="holds shard 1 but is given as shard 0"):
        check_shard_set([two[1], two[0]])
    # the workflow's expectation ($GRADSPACE_SHARDS) differs from the stores' layout
    monkeypatch.setenv("GRADSPACE_SHARDS", '{"textures": 4}')
    with pytest.raises(StoreError, match=r"expected 4 shard store\(s\), found 3 .*3-shard"):
        list(iter_chunks(three, ["index"]))
