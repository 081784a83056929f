"""Compaction's parts, in-process: sizes and ages, grouping, the atomic swap,
the inputs a file holds and the writer's check of them, the lock, and
recovery from a compaction stopped at every step, with the atomic swap and
with three renames (fast; the real ingest runs and real kills are in
tests/test_compaction.py).

A stop is simulated by raising ``Stopped`` (a BaseException, which no
``except`` of the code catches) from the step hook: what is left on disk is
what a SIGKILL at that point leaves."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from spot_ingest import compaction, store as store_module, warehouse
from spot_ingest.compaction import (LOCK, STEPS, CompactionLocked, _bins, compact_table,
                                    needs_compaction, parse_duration, parse_size, settle_all,
                                    table_lock)
from spot_ingest.store import LocalStore
from spot_ingest.warehouse import INPUTS_KEY, TableWriter, held_inputs, read_footer

SCHEMA = pa.schema([("a", pa.int64()), ("s", pa.string())])
PARTS = pa.schema([("h", pa.int8())])


class Plugin:
    """What compaction needs of a pipeline."""
    table = "t"
    schema = SCHEMA
    partition_schema = PARTS
    sort_by = ("a",)


class Stopped(BaseException):
    """A simulated SIGKILL: nothing catches it."""


def batch(n: int, h: int = 1, start: int = 0) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({"a": list(range(start, start + n)),
                                       "s": [f"x{i}" for i in range(start, start + n)],
                                       "h": [h] * n},
                                      pa.schema(list(SCHEMA) + list(PARTS)))


def write(store, name: str, n: int, h: int = 1, start: int = 0, inputs=None) -> dict:
    with TableWriter(store, "t", name, SCHEMA, PARTS, "w", inputs=inputs) as w:
        w.write(batch(n, h, start))
        return w.commit()


def rows(root: Path) -> list[tuple]:
    """Every row of the table (partition column included), sorted: a multiset."""
    table = ds.dataset(root / "t" / "hive", format="parquet", partitioning="hive").to_table()
    return sorted(zip(table.column("h").to_pylist(), table.column("a").to_pylist(),
                      table.column("s").to_pylist()))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def ingested(tmp_path: Path, partitions=(1, 2), files=4) -> LocalStore:
    """``files`` inputs per hour, as the worker writes them."""
    store = LocalStore(str(tmp_path))
    for h in partitions:
        for i in range(files):
            write(store, f"part-{h}{i}", 50 + i, h=h, start=1000 * h + 100 * i)
    return store


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


@pytest.mark.parametrize("atomic", [True, False])
def test_exchange_swaps_two_folders(tmp_path, monkeypatch, atomic):
    monkeypatch.setattr(store_module, "_NO_EXCHANGE", not atomic)
    store = LocalStore(str(tmp_path))
    (tmp_path / "t" / "a").mkdir(parents=True)
    (tmp_path / "t" / "b").mkdir()
    (tmp_path / "t" / "a" / "new").write_text("new")
    (tmp_path / "t" / "b" / "old").write_text("old")
    steps = []
    assert store.exchange("t", "a", "b", step=steps.append) is atomic
    assert names(tmp_path / "t" / "b") == ["new"] and names(tmp_path / "t" / "a") == ["old"]
    assert names(tmp_path / "t") == ["a", "b"]
    assert steps == ([] if atomic else ["exchange-1", "exchange-2", "exchange-3"])


def test_create_is_exclusive(tmp_path):
    store = LocalStore(str(tmp_path))
    assert store.create("t", "_tmp/x", b"one") is True
    assert store.create("t", "_tmp/x", b"two") is False
    assert (tmp_path / "t" / "_tmp" / "x").read_bytes() == b"one"


def test_writer_lists_inputs_and_skips_an_input_a_merged_file_holds(tmp_path):
    store = LocalStore(str(tmp_path))
    assert write(store, "merged-abc", 5, inputs=["part-2", "part-1"]) == {"h=1": 5}
    meta = read_footer(store, "t/hive/h=1", "merged-abc.parquet")
    assert json.loads(meta.metadata[INPUTS_KEY]) == ["part-1", "part-2"] and meta.num_rows == 5
    assert held_inputs(store, "t", "h=1") == {"part-1": "merged-abc.parquet",
                                              "part-2": "merged-abc.parquet"}
    assert held_inputs(store, "t", "h=9") == {}
    # part-2 delivered again: not written beside the merged file; part-3 is new.
    again = TableWriter(store, "t", "part-2", SCHEMA, PARTS, "w")
    again.write(batch(5))
    assert again.commit() == {} and again.already_held == {"h=1": "merged-abc.parquet"}
    assert write(store, "part-3", 3) == {"h=1": 3}
    assert names(tmp_path / "t" / "hive" / "h=1") == ["merged-abc.parquet", "part-3.parquet"]
    assert names(tmp_path / "t" / "_tmp") == []
    # The same merged file written again (a streaming batch redone) replaces itself.
    assert write(store, "merged-abc", 5, inputs=["part-1", "part-2"]) == {"h=1": 5}
    assert names(tmp_path / "t" / "hive" / "h=1") == ["merged-abc.parquet", "part-3.parquet"]


def test_writer_removes_its_own_file_left_beside_a_merged_file_that_holds_it(tmp_path):
    """A writer killed between its rename and its second check left part-2
    beside the merged file holding it: the next delivery removes it."""
    store = LocalStore(str(tmp_path))
    write(store, "part-2", 5)
    write(store, "merged-abc", 5, inputs=["part-1", "part-2"])
    again = TableWriter(store, "t", "part-2", SCHEMA, PARTS, "w")
    again.write(batch(5))
    assert again.commit() == {}
    assert names(tmp_path / "t" / "hive" / "h=1") == ["merged-abc.parquet"]


def test_writer_checks_again_after_its_rename(tmp_path):
    """A compaction swapping the partition between the writer's first check
    and its rename: the second check sees the merged file and removes the
    writer's file."""
    store = LocalStore(str(tmp_path))
    real = store.make_visible

    def swap_first(area, name, final):
        store.make_visible = real
        write(store, "merged-abc", 5, inputs=["part-1", "part-2"])   # the compaction's swap
        real(area, name, final)

    store.make_visible = swap_first
    writer = TableWriter(store, "t", "part-2", SCHEMA, PARTS, "w")
    writer.write(batch(5))
    assert writer.commit() == {} and writer.already_held == {"h=1": "merged-abc.parquet"}
    assert names(tmp_path / "t" / "hive" / "h=1") == ["merged-abc.parquet"]


def test_footer_of_a_file_larger_than_the_first_read(tmp_path):
    store = LocalStore(str(tmp_path))
    (tmp_path / "t").mkdir()
    wide = pa.table({f"c{i}": [i] for i in range(3000)})   # a footer of several hundred KB
    pq.write_table(wide, tmp_path / "t" / "w.parquet")
    assert read_footer(store, "t", "w.parquet").num_columns == 3000
    (tmp_path / "t" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a Parquet file"):
        read_footer(store, "t", "x.parquet")


def test_compaction_merges_each_hour_into_one_sorted_file_listing_its_inputs(tmp_path):
    store = ingested(tmp_path)
    before = rows(tmp_path)
    summary = compact_table(store, Plugin(), older_than=0, codec="snappy")
    assert (summary.partitions, summary.files_in, summary.files_out) == (2, 8, 2)
    assert summary.rows == len(before) and not summary.failed
    assert rows(tmp_path) == before
    for h in (1, 2):
        [merged] = names(tmp_path / "t" / "hive" / f"h={h}")
        path = tmp_path / "t" / "hive" / f"h={h}" / merged
        assert merged.startswith("merged-")
        meta = pq.read_metadata(path)
        assert json.loads(meta.metadata[INPUTS_KEY]) == [f"part-{h}{i}" for i in range(4)]
        assert meta.row_group(0).column(0).compression == "SNAPPY"
        a = pq.read_table(path).column("a").to_pylist()
        assert a == sorted(a)
    assert names(tmp_path / "t" / "_tmp") == []
    # Compacting again changes nothing; a merged file and a new input merge
    # into one file listing all five inputs (flattened).
    assert compact_table(store, Plugin(), older_than=0).partitions == 0
    write(store, "part-19", 7, h=1, start=1900)
    assert compact_table(store, Plugin(), older_than=0).partitions == 1
    [merged] = names(tmp_path / "t" / "hive" / "h=1")
    meta = pq.read_metadata(tmp_path / "t" / "hive" / "h=1" / merged)
    assert json.loads(meta.metadata[INPUTS_KEY]) == [f"part-1{i}" for i in (0, 1, 2, 3, 9)]
    assert len(rows(tmp_path)) == len(before) + 7


def test_open_partitions_wait(tmp_path):
    store = ingested(tmp_path)
    summary = compact_table(store, Plugin(), older_than=3600)
    assert summary.partitions == 0 and summary.skipped_open == 2
    assert len(names(tmp_path / "t" / "hive" / "h=1")) == 4


@pytest.mark.parametrize("damage", ["footer", "data"])
def test_an_unreadable_file_leaves_its_partition_and_the_others_go_on(tmp_path, damage):
    store = ingested(tmp_path)
    bad = tmp_path / "t" / "hive" / "h=1" / "part-12.parquet"
    content = bytearray(bad.read_bytes())
    if damage == "footer":
        content = content[:len(content) // 2]                 # truncated: no footer
    else:
        content[4:len(content) // 2] = b"\xab" * (len(content) // 2 - 4)   # pages garbled
    bad.write_bytes(bytes(content))
    h2 = [r for r in rows_of_hour(tmp_path, 2)]
    summary = compact_table(store, Plugin(), older_than=0)
    assert len(summary.failed) == 1 and "t/hive/h=1/part-12.parquet" in summary.failed[0]
    assert summary.partitions == 1
    assert names(tmp_path / "t" / "hive" / "h=1") == [f"part-1{i}.parquet" for i in range(4)]
    assert bad.read_bytes() == bytes(content)
    assert len(names(tmp_path / "t" / "hive" / "h=2")) == 1
    assert rows_of_hour(tmp_path, 2) == h2
    assert names(tmp_path / "t" / "_tmp") == [], "nothing left aside, lock released"


def rows_of_hour(root: Path, h: int) -> list[tuple]:
    folder = root / "t" / "hive" / f"h={h}"
    table = pa.concat_tables(pq.read_table(folder / n) for n in names(folder))
    return sorted(zip(table.column("a").to_pylist(), table.column("s").to_pylist()))


def test_a_file_whose_input_a_merged_file_holds_is_dropped_not_merged_twice(tmp_path):
    store = LocalStore(str(tmp_path))
    write(store, "merged-abc", 5, inputs=["part-1", "part-2"])
    before = rows(tmp_path)
    folder = tmp_path / "t" / "hive" / "h=1"
    # Left by a writer killed between its rename and its check (same rows).
    pq.write_table(pq.read_table(folder / "merged-abc.parquet").replace_schema_metadata(None),
                   folder / "part-2.parquet")
    write(store, "part-3", 3, start=300)
    summary = compact_table(store, Plugin(), older_than=0)
    assert summary.duplicates == 1 and summary.partitions == 1
    [merged] = names(folder)
    assert json.loads(pq.read_metadata(folder / merged).metadata[INPUTS_KEY]) == \
        ["part-1", "part-2", "part-3"]
    assert rows(tmp_path) == sorted(before + [(1, a, f"x{a}") for a in range(300, 303)])


def test_the_lock_refuses_a_second_compaction_and_is_taken_over_when_its_process_is_gone(
        tmp_path):
    store = LocalStore(str(tmp_path))
    lock = tmp_path / "t" / LOCK
    with table_lock(store, "t"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(CompactionLocked, match=f"pid {os.getpid()}"):
            with table_lock(store, "t"):
                pass
    assert not lock.exists()
    done = subprocess.run(["true"])          # a pid that is gone now
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert done.returncode == 0
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": 1.0,
                                "since": 0}))
    with table_lock(store, "t"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": dead.pid, "start": 1.0, "since": 0}))
    with pytest.raises(CompactionLocked, match="on elsewhere"):
        compact_table(store, Plugin(), older_than=0)
    assert lock.exists(), "another host's lock is not ours to remove"


def _stop_at(monkeypatch, name: str, nth: int) -> None:
    seen = {}

    def step(step_name):
        seen[step_name] = seen.get(step_name, 0) + 1
        if step_name == name and seen[step_name] == nth:
            raise Stopped(f"stopped at {name} #{nth}")
    monkeypatch.setattr(compaction, "_step", step)


STOPS = [(s, n) for s in STEPS for n in (1, 2) if not (s == "locked" and n == 2)]


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2", "three-renames"])
@pytest.mark.parametrize("stop", STOPS, ids=[f"{s}-{n}" for s, n in STOPS])
def test_stopped_at_any_step_the_next_run_finishes_and_the_table_is_right(
        tmp_path, monkeypatch, stop, atomic):
    monkeypatch.setattr(store_module, "_NO_EXCHANGE", not atomic)
    # Two groups per hour (target size), so "merged" happens twice per partition.
    store = ingested(tmp_path, files=4)
    target = 2 * (tmp_path / "t" / "hive" / "h=1" / "part-10.parquet").stat().st_size + 1
    before = rows(tmp_path)
    _stop_at(monkeypatch, *stop)
    try:
        compact_table(store, Plugin(), older_than=0, target_size=target)
        stopped = False
    except Stopped:
        stopped = True
    monkeypatch.setattr(compaction, "_step", lambda name: None)
    assert stopped is not (stop[0].startswith("exchange") and atomic), \
        "stopped where the step is (the atomic swap has no steps inside)"
    # Whatever the stop left: the next run settles and finishes.
    compact_table(store, Plugin(), older_than=0, target_size=target)
    assert rows(tmp_path) == before
    for h in (1, 2):
        assert [n[:7] for n in names(tmp_path / "t" / "hive" / f"h={h}")] == ["merged-"] * 2
    assert names(tmp_path / "t" / "_tmp") == []


@pytest.mark.parametrize("atomic", [True, False], ids=["renameat2", "three-renames"])
def test_a_file_written_during_the_compaction_is_kept(tmp_path, monkeypatch, atomic):
    """A late input written into the hour after compaction listed it, before
    the swap (and, with three renames, between the first two, when the
    writer re-creates the missing folder): it ends beside the merged file."""
    monkeypatch.setattr(store_module, "_NO_EXCHANGE", not atomic)
    store = ingested(tmp_path, partitions=(1,))
    before = rows(tmp_path)
    at = "merged" if atomic else "exchange-1"

    def step(name):
        if name == at:
            assert write(store, "part-19", 7, start=1900) == {"h=1": 7}
    monkeypatch.setattr(compaction, "_step", step)
    summary = compact_table(store, Plugin(), older_than=0)
    assert summary.partitions == 1 and not summary.failed
    folder = tmp_path / "t" / "hive" / "h=1"
    assert [n[:7] for n in names(folder)] == ["merged-", "part-19"]
    assert rows(tmp_path) == sorted(before + [(1, a, f"x{a}") for a in range(1900, 1907)])
    assert names(tmp_path / "t" / "_tmp") == []


def test_leftovers_without_a_record_are_removed(tmp_path):
    store = ingested(tmp_path, partitions=(1,))
    aside = tmp_path / "t" / "_tmp"
    (aside / "compact-0123456789abcdef.json.tmp").write_text("{")
    (aside / f"compact-0123456789abcdef-merged-{'0' * 32}.parquet.tmp").write_text("x")
    (aside / "compact-fedcba9876543210").mkdir()
    (aside / "compact-fedcba9876543210" / f"merged-{'1' * 32}.parquet").write_text("x")
    (aside / "w-part-1-0.parquet.tmp").write_text("a writer's: not compaction's to remove")
    assert settle_all(store, "t") == 0
    assert names(aside) == ["w-part-1-0.parquet.tmp"]


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
    assert names(part) == expected
    assert names(tmp_path / "t" / "_tmp") == []


# -- the same through WebHDFS (the stand-in of tests/webhdfs.py) --------------

@pytest.fixture
def hdfs(tmp_path):
    from spot_ingest.config import HdfsConfig, StoreLocation
    from spot_ingest.hdfs_store import HdfsStore
    from tests.webhdfs import WebHdfsStandIn
    with WebHdfsStandIn(tmp_path / "hdfs") as server:
        cfg = HdfsConfig(urls=(server.url,), user="spot", timeout=10,
                         scratch_dir=tmp_path / "scratch")
        store = HdfsStore(StoreLocation("/user/spot", cfg))
        store.mark()
        yield store, tmp_path / "hdfs" / "user" / "spot"


def test_hdfs_footers_are_read_by_their_tail_only(hdfs):
    store, root = hdfs
    big = pa.RecordBatch.from_pydict(
        {"a": list(range(200_000)), "s": [os.urandom(8).hex() for _ in range(200_000)],
         "h": [1] * 200_000}, pa.schema(list(SCHEMA) + list(PARTS)))
    with TableWriter(store, "t", "merged-big", SCHEMA, PARTS, "w", inputs=["part-1"]) as w:
        w.write(big)
    size = (root / "t" / "hive" / "h=1" / "merged-big.parquet").stat().st_size
    assert size > 2 << 20
    reads, real = [], store.client.read

    def read(path, **kw):
        reads.append(kw)
        return real(path, **kw)
    store.client.read = read
    warehouse._footers.clear()      # the writer's own check cached it
    assert held_inputs(store, "t", "h=1") == {"part-1": "merged-big.parquet"}
    assert reads and sum(kw["length"] for kw in reads) <= 64 << 10
    assert all(kw["offset"] + kw["length"] == size for kw in reads)


def test_hdfs_create_is_exclusive_and_exchange_takes_three_renames(hdfs):
    store, root = hdfs
    assert store.create("t", "_tmp/x", b"one") is True
    assert store.create("t", "_tmp/x", b"two") is False
    assert (root / "t" / "_tmp" / "x").read_bytes() == b"one"
    (root / "t" / "a").mkdir()
    (root / "t" / "b").mkdir()
    (root / "t" / "a" / "new").write_text("new")
    (root / "t" / "b" / "old").write_text("old")
    steps = []
    assert store.exchange("t", "a", "b", step=steps.append) is False
    assert names(root / "t" / "b") == ["new"] and names(root / "t" / "a") == ["old"]
    assert steps == ["exchange-1", "exchange-2", "exchange-3"]


@pytest.mark.parametrize("stop", [("exchange-1", 1), ("exchange-2", 1), ("settling", 2)])
def test_hdfs_compaction_stopped_between_renames_is_finished_by_the_next_run(hdfs, monkeypatch,
                                                                            stop):
    store, root = hdfs
    for i in range(4):
        write(store, f"part-1{i}", 50 + i, start=100 * i)
    before = rows(root)
    _stop_at(monkeypatch, *stop)
    with pytest.raises(Stopped):
        compact_table(store, Plugin(), older_than=0)
    assert (root / "t" / "hive" / "h=1").exists() is (stop[0] != "exchange-1")
    monkeypatch.setattr(compaction, "_step", lambda name: None)
    assert compact_table(store, Plugin(), older_than=0).settled == 1
    assert rows(root) == before
    assert [n[:7] for n in names(root / "t" / "hive" / "h=1")] == ["merged-"]
    assert names(root / "t" / "_tmp") == []


def test_hdfs_a_writer_recreating_the_partition_between_renames_loses_nothing(hdfs,
                                                                              monkeypatch):
    """Between the first two renames the partition is missing; a writer
    making its file visible then re-creates the folder, so the second rename
    fails: the merged files join the writer's file."""
    store, root = hdfs
    for i in range(4):
        write(store, f"part-1{i}", 50 + i, start=100 * i)
    before = rows(root)

    def step(name):
        if name == "exchange-1":
            assert write(store, "part-19", 7, start=1900) == {"h=1": 7}
    monkeypatch.setattr(compaction, "_step", step)
    summary = compact_table(store, Plugin(), older_than=0)
    assert summary.partitions == 1 and not summary.failed
    assert [n[:7] for n in names(root / "t" / "hive" / "h=1")] == ["merged-", "part-19"]
    assert rows(root) == sorted(before + [(1, a, f"x{a}") for a in range(1900, 1907)])
    assert names(root / "t" / "_tmp") == []
