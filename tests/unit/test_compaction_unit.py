"""Compaction's parts, in-process: sizes and ages, grouping, the atomic swap,
the inputs a file holds, and the writer's check of them (fast; the real
ingest runs and the kills are in tests/test_compaction.py)."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spot_ingest.compaction import _bins, needs_compaction, parse_duration, parse_size, settle_all
from spot_ingest.store import LocalStore
from spot_ingest.warehouse import INPUTS_KEY, TableWriter, held_inputs, read_footer

SCHEMA = pa.schema([("a", pa.int64()), ("s", pa.string())])
PARTS = pa.schema([("h", pa.int8())])


def batch(n: int, h: int = 1) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"a": list(range(n)), "s": [f"x{i}" for i in range(n)],
                                       "h": [h] * n},
                                      pa.schema(list(SCHEMA) + list(PARTS)))


def test_durations_and_sizes():
    assert parse_duration("2h") == 7200 and parse_duration("30m") == 1800
    assert parse_duration("90") == 90 and parse_duration("1d") == 86400
    assert parse_size("256MB") == 256 << 20 and parse_size("1g") == 1 << 30
    assert parse_size("512KiB") == 512 << 10 and parse_size("1000") == 1000
    for bad in ("2 hours", "-1h", "h"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("0MB", "12 apples", ""):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_groups_hold_two_files_or_more_and_about_the_target():
    files = [(f"f{i}", 100) for i in range(7)]
    groups = _bins(files, 250)
    assert [len(g) for g in groups] == [2, 2, 3], "a last file alone joins the group before"
    assert [n for g in groups for n, _ in g] == [n for n, _ in files]
    assert needs_compaction([("a", 10), ("b", 10)], 100)
    assert not needs_compaction([("a", 300), ("b", 300)], 256)
    assert not needs_compaction([("a", 10)], 100)


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    store = LocalStore(str(tmp_path))
    (tmp_path / "t" / "a").mkdir(parents=True)
    (tmp_path / "t" / "b").mkdir()
    (tmp_path / "t" / "a" / "new").write_text("new")
    (tmp_path / "t" / "b" / "old").write_text("old")
    assert store.exchange("t", "a", "b") is True
    assert [p.name for p in (tmp_path / "t" / "b").iterdir()] == ["new"]
    assert [p.name for p in (tmp_path / "t" / "a").iterdir()] == ["old"]


def test_writer_lists_inputs_and_skips_an_input_a_merged_file_holds(tmp_path):
    store = LocalStore(str(tmp_path))
    with TableWriter(store, "t", "merged-abc", SCHEMA, PARTS, "w", inputs=["part-1", "part-2"]) as w:
        w.write(batch(5))
    meta = read_footer(store, "t/hive/h=1", "merged-abc.parquet")
    assert json.loads(meta.metadata[INPUTS_KEY]) == ["part-1", "part-2"] and meta.num_rows == 5
    assert held_inputs(store, "t", "h=1") == {"part-1": "merged-abc.parquet",
                                              "part-2": "merged-abc.parquet"}
    # part-2 delivered again: not written beside the merged file; part-3 is new.
    again = TableWriter(store, "t", "part-2", SCHEMA, PARTS, "w")
    again.write(batch(5))
    assert again.commit() == {} and again.already_held == {"h=1": "merged-abc.parquet"}
    new = TableWriter(store, "t", "part-3", SCHEMA, PARTS, "w")
    new.write(batch(3))
    assert new.commit() == {"h=1": 3}
    assert sorted(p.name for p in (tmp_path / "t" / "hive" / "h=1").iterdir()) == \
        ["merged-abc.parquet", "part-3.parquet"]
    assert not list((tmp_path / "t" / "_tmp").iterdir())


def test_footer_of_a_file_larger_than_the_first_read(tmp_path):
    store = LocalStore(str(tmp_path))
    (tmp_path / "t").mkdir()
    wide = pa.table({f"c{i}": [i] for i in range(3000)})   # a footer of several hundred KB
    pq.write_table(wide, tmp_path / "t" / "w.parquet")
    assert read_footer(store, "t", "w.parquet").num_columns == 3000
    (tmp_path / "t" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a Parquet file"):
        read_footer(store, "t", "x.parquet")


@pytest.mark.parametrize("swapped", [False, True])
def test_a_record_left_by_a_killed_compaction_is_settled_either_side_of_the_swap(tmp_path,
                                                                              swapped):
    store = LocalStore(str(tmp_path))
    part = tmp_path / "t" / "hive" / "h=1"
    work = tmp_path / "t" / "_tmp" / "compact-0123456789abcdef"
    part.mkdir(parents=True)
    work.mkdir(parents=True)
    for name in ("part-1.parquet", "part-2.parquet", "late.parquet"):
        (part / name).write_text(name)
    (work / "merged-x.parquet").write_text("merged")
    (work.parent / f"{work.name}.json").write_text(json.dumps({
        "partition": "h=1", "inputs": ["part-1.parquet", "part-2.parquet"],
        "merged": ["merged-x.parquet"]}))
    if swapped:
        store.exchange("t", f"_tmp/{work.name}", "hive/h=1")
    assert settle_all(store, "t") == 1
    expected = ["late.parquet", "merged-x.parquet"] if swapped else \
        ["late.parquet", "part-1.parquet", "part-2.parquet"]
    assert sorted(p.name for p in part.iterdir()) == expected
    assert not list((tmp_path / "t" / "_tmp").iterdir())
