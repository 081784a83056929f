"""The engine's parts in-process, in milliseconds: the table writer, the
watcher's name rules, the announcement format and the balancer's choice."""
from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spot_ingest.bus import END_OF_RUN, Announcement, BusError, PartitionBalancer
from spot_ingest.pipelines.flow import FLOW
from spot_ingest.store import LocalStore
from spot_ingest.warehouse import TableWriter, remove_stale_temporaries
from spot_ingest.watcher import is_candidate_name

SCHEMA = pa.schema([("v", pa.int64())])
PARTS = pa.schema([("y", pa.int16()), ("h", pa.int8())])


def batch(values, hours, year=2026):
    return pa.RecordBatch.from_arrays(
        [pa.array(values, pa.int64()), pa.array([year] * len(values), pa.int16()),
         pa.array(hours, pa.int8())], schema=pa.schema(list(SCHEMA) + list(PARTS)))


def area(tmp_path):
    """The test's folder as a table area of a store (the store is its parent)."""
    return LocalStore(str(tmp_path.parent)), tmp_path.name


def table_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_writer_routes_rows_to_their_partitions(tmp_path):
    w = TableWriter(*area(tmp_path), "part-abc", SCHEMA, PARTS, "w0")
    w.write(batch([1, 2, 3], [5, 6, 5]))
    w.write(batch([4], [7]))
    assert w.commit() == {"y=2026/h=5": 2, "y=2026/h=6": 1, "y=2026/h=7": 1}
    assert table_files(tmp_path) == ["hive/y=2026/h=5/part-abc.parquet",
                                     "hive/y=2026/h=6/part-abc.parquet",
                                     "hive/y=2026/h=7/part-abc.parquet"]
    assert pq.read_table(tmp_path / "hive/y=2026/h=5/part-abc.parquet").column("v").to_pylist() \
        == [1, 3]
    assert pq.read_schema(tmp_path / "hive/y=2026/h=5/part-abc.parquet").names == ["v"]


def test_aborted_writer_leaves_nothing_visible(tmp_path):
    w = TableWriter(*area(tmp_path), "part-abc", SCHEMA, PARTS, "w0")
    w.write(batch(list(range(1000)), [1] * 1000))
    w._flush(next(iter(w.partitions.values())))     # a temporary file exists on disk
    assert list((tmp_path / "_tmp").iterdir())
    w.abort()
    assert not (tmp_path / "hive").exists() and not list((tmp_path / "_tmp").iterdir())


def test_a_second_commit_of_the_same_input_replaces(tmp_path):
    for values in ([1, 2, 3], [1, 2, 3]):
        w = TableWriter(*area(tmp_path), "part-same", SCHEMA, PARTS, "w0")
        w.write(batch(values, [1] * len(values)))
        w.commit()
    files = table_files(tmp_path / "hive")
    assert files == ["y=2026/h=1/part-same.parquet"]
    assert pq.read_table(tmp_path / "hive" / files[0]).num_rows == 3


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "w0-x-0.parquet.tmp").write_bytes(b"half")
    (tmp_path / "_tmp" / "w1-x-0.parquet.tmp").write_bytes(b"another worker's")
    assert remove_stale_temporaries(*area(tmp_path), "w0") == 1
    assert [p.name for p in (tmp_path / "_tmp").iterdir()] == ["w1-x-0.parquet.tmp"]


@pytest.mark.parametrize("name, taken", [
    ("nfcapd.202611211200", True), ("nfcapd.current.1234", False), (".nfcapd.hidden", False),
    ("nfcapd.202611211200.tmp", False), ("capture.pcap", False), ("x.part", False),
])
def test_watcher_name_rules_for_flow(name, taken):
    assert is_candidate_name(name, ("nfcapd.*",), FLOW.working_names) is taken


def test_watcher_plain_entries_are_prefixes_or_suffixes():
    assert is_candidate_name("dns-1.pcap", (".pcap",))
    assert is_candidate_name("nfcapd.1", ("nfcapd",))
    assert not is_candidate_name("dns-1.pcap.swp", (".pcap",))


def test_announcement_round_trip_and_version_byte():
    ann = Announcement("flow_a", "flow", "flow/binary/20261121/12/abc-nfcapd.1", 123, "a" * 64,
                       "router/nfcapd.1", 1763700000123, "host", chunk_index=2, chunk_count=3,
                       run_id="r1")
    data = ann.encode()
    assert data[:1] == b"\x01"
    back = Announcement.decode(data)
    assert back == ann
    marker = Announcement.decode(Announcement.end_of_run("flow_a", "flow", "r1", "h").encode())
    assert marker.kind == END_OF_RUN and marker.run_id == "r1"
    with pytest.raises(BusError):
        Announcement.decode(b"\x02" + data[1:])


def balancer(lags, retired=None):
    b = PartitionBalancer.__new__(PartitionBalancer)
    b.tps = [SimpleNamespace(partition=p) for p in range(len(lags))]
    b.lag, b.next_rr, b.refreshed = list(lags), 0, float("inf")   # no refresh from a broker
    b.retired_source, b.retired = retired, set()
    return b


def picks(b, n: int) -> list[int]:
    """The partitions of ``n`` announcements in a row."""
    chosen = []
    for _ in range(n):
        chosen.append(b.choose())
        b.sent(chosen[-1])
    return chosen


def test_balancer_steers_away_from_a_backlog():
    assert picks(balancer([5, 0, 0]), 4) == [1, 2, 1, 2], \
        "the stopped worker's partition gets nothing new"


def test_balancer_is_round_robin_between_equals():
    assert picks(balancer([0, 0, 0]), 6) == [0, 1, 2, 0, 1, 2]


def test_balancer_gives_a_retired_partition_nothing_until_it_is_back():
    retired = {1}
    b = balancer([0, 0, 0], lambda: set(retired))
    assert picks(b, 4) == [0, 2, 0, 2], "a reassigned worker's partition gets nothing new"
    retired.clear()                       # its worker started again
    assert 1 in picks(b, 3)
    every = balancer([0, 0], lambda: {0, 1})
    assert sorted(set(picks(every, 4))) == [0, 1], "all retired: files still go somewhere"


def test_writer_as_a_block_commits_or_aborts(tmp_path):
    with TableWriter(*area(tmp_path), "part-ok", SCHEMA, PARTS, "w0") as w:
        w.write(batch([1, 2], [3, 3]))
    assert table_files(tmp_path / "hive") == ["y=2026/h=3/part-ok.parquet"]
    with pytest.raises(RuntimeError):
        with TableWriter(*area(tmp_path), "part-bad", SCHEMA, PARTS, "w0") as w:
            w.write(batch([1, 2], [4, 4]))
            raise RuntimeError("conversion failed half-way")
    assert table_files(tmp_path / "hive") == ["y=2026/h=3/part-ok.parquet"]
    assert not list((tmp_path / "_tmp").iterdir())



POOL_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from spot_ingest.policy import process_pool

def imported(module):
    return module in sys.modules

if __name__ == "__main__":
    pool = process_pool(2, warm=("spot_ingest.pipelines.flow",))
    started = len(pool._processes)
    answers = sorted({pool.submit(imported, "spot_ingest.pipelines.flow").result(60)
                      for _ in range(4)})
    print(json.dumps([started, answers, len(pool._processes)]))
    pool.shutdown()
"""


def test_pool_processes_start_with_the_pool_and_import_their_work(tmp_path):
    """The first file does not wait for the forkserver and the imports: every
    process exists, with the named modules imported, before any work is
    submitted. (In a process of its own: a pool's resource tracker lives as
    long as the process that made it.)"""
    import json
    import subprocess
    import sys
    from pathlib import Path
    probe = tmp_path / "probe.py"
    probe.write_text(POOL_PROBE)
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(probe), str(repo)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    started, answers, after = json.loads(out.splitlines()[-1])
    assert started == 2, "both processes started by the pool itself"
    assert answers == [True], "each has the flow pipeline imported"
    assert after == 2, "no process started for the work"
