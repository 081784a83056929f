"""``spot-ingest status``'s parts, in-process: the partition lines from given
offsets and commit metadata (what the worker's Committer commits), the
collector backlog as the watcher counts it, the last hour and day from
reports written by ``ReportWriter`` into a LocalStore, the newest partition
and its rows from Parquet footers, the streaming job's last batch, the
rendering, and a broker that does not answer (closed port, silent listener,
a client stuck in a call) given up in bounded time."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spot_ingest import status as st
from spot_ingest.config import load
from spot_ingest.reports import ReportWriter
from spot_ingest.store import LocalStore
from spot_ingest.worker import Committer

NOW = time.time()


def make_config(tmp_path: Path, ptype: str = "flow", port: int = 9092, **pipe):
    data = {"dbname": "spot", "hdfs_app_path": str(tmp_path / "w"),
            "kafka": {"kafka_server": "127.0.0.1", "kafka_port": str(port)},
            "pipelines": {"p": {"type": ptype, "collector_path": str(tmp_path / "collector"),
                                "topic": "T", **pipe}}}
    path = tmp_path / "ingest_conf.json"
    path.write_text(json.dumps(data))
    cfg = load(path)
    return cfg, cfg.pipeline("p")


def write_parquet(root: Path, partition: str, name: str, rows: int) -> None:
    folder = root / "w" / "flow" / "hive" / partition
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"x": list(range(rows))}), folder / name)


def meta(t: float, worker: int = 0, host: str = "h1") -> str:
    return json.dumps({"t": t, "worker": worker, "host": host})


def broker(rows: list[dict], records: bool = False) -> dict:
    return {"available": True, "error": None, "topic": "T", "group": "spot-ingest-p",
            "offsets_in": "checkpoint" if records else "group", "partitions": rows}


# -- partitions from offsets ---------------------------------------------------------

def test_partition_lines_from_offsets_and_commit_metadata():
    rows = st.partition_rows(
        ends={0: 10, 1: 7, 2: 5, 3: 0}, beginnings={0: 0, 1: 0, 2: 2, 3: 0},
        committed={0: (10, meta(NOW - 12.34, 0, "h1")), 1: (4, meta(NOW - 300, 1, "h2")),
                   3: (-1, "")},
        now=NOW)
    assert rows == [
        {"partition": 0, "beginning": 0, "end": 10, "committed": 10, "lag": 0,
         "seconds_since_commit": 12.3, "committed_by": "worker 0 on h1",
         "commit_time_from": "broker"},
        {"partition": 1, "beginning": 0, "end": 7, "committed": 4, "lag": 3,
         "seconds_since_commit": 300.0, "committed_by": "worker 1 on h2",
         "commit_time_from": "broker"},
        # Never committed: a worker starts from the first offset still held.
        {"partition": 2, "beginning": 2, "end": 5, "committed": None, "lag": 3,
         "seconds_since_commit": None, "committed_by": None, "commit_time_from": None},
        # -1 is "no offset" in OffsetFetch.
        {"partition": 3, "beginning": 0, "end": 0, "committed": None, "lag": 0,
         "seconds_since_commit": None, "committed_by": None, "commit_time_from": None}]


def test_metadata_not_ours_or_missing_leaves_the_time_unknown():
    rows = st.partition_rows({0: 5, 1: 5, 2: 5}, {}, {0: (5, "not json"), 1: (5, None),
                                                     2: (5, json.dumps({"x": 1}))}, NOW)
    assert [(r["lag"], r["seconds_since_commit"], r["commit_time_from"]) for r in rows] == \
        [(0, None, None)] * 3


def test_record_pipelines_show_ends_only():
    [row] = st.partition_rows({0: 42}, {0: 2}, None, NOW)
    assert (row["beginning"], row["end"], row["committed"], row["lag"]) == (2, 42, None, None)


def test_the_workers_committer_commits_what_status_reads():
    """The worker side: each commit carries commit_metadata; status parses it."""
    commits = []
    confirmed = threading.Event()

    class Reader:
        def commit(self, offset, metadata=""):
            commits.append((offset, metadata))

        def committed(self, timeout_ms=None):
            return commits[-1][0] if commits else None

        def close(self):
            pass

    committer = Committer(Reader, "partition 3", on_confirmed=confirmed.set,
                          metadata=lambda: st.commit_metadata(3, "collector-7"))
    committer.start()
    try:
        before = time.time()
        committer.advance(17)
        assert confirmed.wait(10), "the committer never confirmed"
    finally:
        with committer.lock:
            committer.closing = True
            committer.lock.notify()
        committer.join(10)
    [(offset, metadata)] = commits
    assert offset == 17
    [row] = st.partition_rows({3: 20}, {3: 0}, {3: (offset, metadata)}, before + 5)
    assert row["lag"] == 3 and row["committed_by"] == "worker 3 on collector-7"
    assert row["commit_time_from"] == "broker" and 4.0 <= row["seconds_since_commit"] <= 5.0


# -- the collector, the reports, the table ---------------------------------------------

def test_waiting_files_as_the_watcher_counts_them(tmp_path):
    cfg, pcfg = make_config(tmp_path)
    assert st.waiting_files(pcfg) == {"path": str(tmp_path / "collector"), "exists": False,
                                      "waiting": None}
    c = tmp_path / "collector"
    (c / "router2").mkdir(parents=True)
    (c / ".hidden").mkdir()
    for name in ("nfcapd.202611220000", "router2/nfcapd.202611220005",     # taken
                 "nfcapd.current.1234", ".nfcapd.202611220010.tmp",         # working names
                 "nfcapd.202611220015.part", "notes.txt",                   # not supported
                 ".hidden/nfcapd.202611220020"):                            # hidden folder
        (c / name).write_bytes(b"x")
    outside = tmp_path / "nfcapd.202611229999"
    outside.write_bytes(b"x")
    os.symlink(outside, c / "nfcapd.202611220030")                          # leads outside
    os.symlink(c / "nfcapd.202611220000", c / "router2" / "nfcapd.202611220035")  # inside
    assert st.waiting_files(pcfg)["waiting"] == 3


def _write_reports(store):
    master = ReportWriter(store, "flow", "p", "flow", "master")
    other = ReportWriter(store, "flow", "other_pipeline", "flow", "master")
    w0 = ReportWriter(store, "flow", "p", "flow", "worker", 0)
    w1 = ReportWriter(store, "flow", "p", "flow", "worker", 1)
    for name in ("a", "b", "c"):
        master.write(outcome="staged", file=name, bytes_in=100)
    master.write(outcome="rejected", file="d", reason="empty file")
    other.write(outcome="staged", file="z")
    w0.write(outcome="loaded", file="a", records=10, partition=0, offset=0)
    w1.write(outcome="loaded", file="b", records=5, partition=1, offset=0)
    w1.write(outcome="quarantined", file="c", reason="nfdump could not read it",
             partition=1, offset=1)
    return time.time()


def test_windows_newest_partition_and_commit_time_from_reports(tmp_path):
    cfg, pcfg = make_config(tmp_path)
    store = LocalStore(str(tmp_path / "w"))
    written = _write_reports(store)
    write_parquet(tmp_path, "y=2026/m=11/d=22/h=9", "part-a.parquet", 7)
    write_parquet(tmp_path, "y=2026/m=11/d=22/h=10", "part-a.parquet", 3)
    write_parquet(tmp_path, "y=2026/m=11/d=22/h=10", "part-b.parquet", 2)
    write_parquet(tmp_path, "y=2026/m=9/d=30/h=23", "part-c.parquet", 50)   # 9 < 11, not "9" > "11"
    # A broker without commit metadata: the time comes from the worker's newest report.
    rows = st.partition_rows({0: 1, 1: 2, 2: 0}, {}, {0: (1, None), 1: (2, None)}, written)
    found = st.gather(cfg, pcfg, now=written + 30, broker=broker(rows))
    w = found["last_hour"]
    assert (w["staged"], w["loaded"], w["set_aside"], w["records"]) == (3, 2, 2, 15)
    assert w["failures"] == {"quarantined": 1, "rejected": 1}
    assert [(r["file"], r["reason"]) for r in w["reasons"]] == \
        [("d", "empty file"), ("c", "nfdump could not read it")]
    assert found["last_day"] == w
    assert found["newest_partition"] == {"partition": "y=2026/m=11/d=22/h=10", "rows": 5,
                                         "files": 2, "unreadable": 0}
    parts = found["broker"]["partitions"]
    assert [(p["commit_time_from"], p["seconds_since_commit"] is not None) for p in parts] == \
        [("reports", True), ("reports", True), (None, False)]
    assert all(30 <= p["seconds_since_commit"] <= 31 for p in parts[:2])
    lines = st.render(found).splitlines()
    at = lines.index("topic T, group spot-ingest-p: lag 0")
    assert [line.split()[-4:] for line in lines[at + 2:at + 5]] == \
        [["s", "ago", "(from", "reports)"]] * 2 + [["-", "0", "0", "never"]]
    assert found["store"] == {"available": True, "error": None}
    assert (found["delivery"], found["stream"]) == ("files", None)

    # Two hours later: out of the last hour, still in the last day.
    later = st.gather(cfg, pcfg, now=written + 7200, broker=broker([]))
    assert (later["last_hour"]["staged"], later["last_hour"]["loaded"]) == (0, 0)
    assert (later["last_day"]["staged"], later["last_day"]["loaded"]) == (3, 2)


def test_an_unreadable_table_file_is_counted_not_fatal(tmp_path):
    cfg, pcfg = make_config(tmp_path)
    write_parquet(tmp_path, "y=2026/m=11/d=22/h=10", "part-a.parquet", 4)
    (tmp_path / "w" / "flow" / "hive" / "y=2026/m=11/d=22/h=10" / "cut.parquet").write_bytes(b"PAR")
    found = st.gather(cfg, pcfg, broker=broker([]))
    assert found["newest_partition"] == {"partition": "y=2026/m=11/d=22/h=10", "rows": 4,
                                         "files": 2, "unreadable": 1}
    assert "(1 unreadable)" in st.render(found)


def test_an_empty_installation(tmp_path):
    cfg, pcfg = make_config(tmp_path)
    (tmp_path / "collector").mkdir()
    found = st.gather(cfg, pcfg, broker=broker([]))
    assert found["newest_partition"] is None and found["last_day"]["staged"] == 0
    assert found["collector"]["waiting"] == 0
    text = st.render(found)
    assert "newest partition: none yet" in text and "0 file(s) waiting" in text


def test_a_store_that_cannot_be_read_is_said_and_the_rest_shown(tmp_path):
    """HDFS (WebHDFS) on a port where nothing listens."""
    data = {"dbname": "spot", "hdfs_app_path": "/warehouse",
            "hdfs": {"url": f"http://127.0.0.1:{closed_port()}", "user": "spot",
                     "scratch_dir": str(tmp_path / "scratch")},
            "kafka": {"kafka_server": "127.0.0.1", "kafka_port": "9092"},
            "pipelines": {"p": {"type": "flow", "collector_path": str(tmp_path), "topic": "T"}}}
    (tmp_path / "ingest_conf.json").write_text(json.dumps(data))
    cfg = load(tmp_path / "ingest_conf.json")
    pcfg = cfg.pipeline("p")
    t0 = time.monotonic()
    found = st.gather(cfg, pcfg, broker=broker(st.partition_rows({0: 3}, {}, {0: (3, None)}, NOW)))
    assert time.monotonic() - t0 < 10
    assert found["store"]["available"] is False and "could not be read" in found["store"]["error"]
    assert (found["newest_partition"], found["last_day"]["staged"]) == (None, 0)
    assert found["collector"]["waiting"] == 0
    assert found["broker"]["partitions"][0]["lag"] == 0
    assert "store: unavailable" in st.render(found)


def test_the_streaming_jobs_last_batch(tmp_path):
    cfg, pcfg = make_config(tmp_path, ptype="proxy")
    store = LocalStore(str(tmp_path / "w"))
    master = ReportWriter(store, "proxy", "p", "proxy", "master")
    job = ReportWriter(store, "proxy", "p", "proxy", "stream")
    master.write(outcome="published", file="access.log", bytes_in=1000)
    job.write(outcome="batch", batch=6, messages=3, records=90, rejects=1, rejected_messages=0,
              lag=12)
    last = job.write(outcome="batch", batch=7, messages=2, records=40, rejects=2,
                     rejected_messages=1, lag=0)
    rows = st.partition_rows({0: 5}, {0: 0}, None, NOW)
    found = st.gather(cfg, pcfg, now=last["ts"] + 4, broker=broker(rows, records=True))
    assert found["delivery"] == "records" and found["table"] == "proxy"
    assert found["stream"] == {"batch": 7, "time": last["time"], "seconds_ago": 4.0,
                               "records": 40, "messages": 2, "rejects": 2,
                               "rejected_messages": 1, "lag": 0}
    w = found["last_hour"]
    assert (w["staged"], w["loaded"], w["records"], w["batches"], w["rejected_lines"]) == \
        (1, 0, 130, 2, 3)
    text = st.render(found)
    assert "topic T (offsets in the streaming job's checkpoint):" in text
    assert "streaming job: batch 7 at" in text and "2 rejected line(s), lag 0" in text


# -- rendering ---------------------------------------------------------------------

def test_human_form_is_aligned_and_says_what_is_missing(tmp_path):
    cfg, pcfg = make_config(tmp_path)
    rows = st.partition_rows({0: 8, 1: 1234567}, {},
                             {0: (8, meta(NOW - 14, 0, "h1")), 1: (1234560, None)}, NOW)
    found = st.gather(cfg, pcfg, now=NOW, broker=broker(rows))
    lines = st.render(found).splitlines()
    table = lines[lines.index("topic T, group spot-ingest-p: lag 7") + 1:][:3]
    assert table[0].split() == ["partition", "committed", "end", "lag", "last", "commit"]
    assert table[1].split() == ["0", "8", "8", "0", "14", "s", "ago", "(worker", "0", "on", "h1)"]
    assert table[2].split() == ["1", "1234560", "1234567", "7", "never"]
    # Right-aligned columns: each number ends where its header ends.
    for header in ("partition", "committed", "end", "lag"):
        end = table[0].index(header) + len(header)
        assert all(row[end - 1] != " " and row[end:end + 2] == "  " for row in table[1:])
    assert f"collector {tmp_path / 'collector'}: not on this host" in lines[-4]

    away = dict(found, broker={**broker([]), "available": False,
                                 "error": "the broker at 127.0.0.1:9092 did not answer within 5 s"})
    text = st.render(away)
    assert "broker: unavailable: the broker at 127.0.0.1:9092 did not answer within 5 s" in text
    assert "last hour:" in text and "newest partition:" in text


# -- a broker that does not answer ---------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["closed", "silent"])
def test_a_broker_that_does_not_answer_is_given_up_in_time(tmp_path, kind):
    listener = None
    if kind == "silent":     # accepts (the kernel does) and never answers
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
    else:
        port = closed_port()
    try:
        cfg, pcfg = make_config(tmp_path, port=port)
        t0 = time.monotonic()
        view = st.broker_view(cfg, pcfg, timeout=0.5)
        took = time.monotonic() - t0
    finally:
        if listener is not None:
            listener.close()
    assert view["available"] is False and view["partitions"] == []
    assert f"127.0.0.1:{port}" in view["error"]
    assert took < 0.5 + st.BROKER_GRACE


def test_a_client_stuck_in_a_call_is_given_up(tmp_path, monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(st, "_ask_broker", lambda *args: release.wait(30))
    monkeypatch.setattr(st, "BROKER_GRACE", 0.2)
    cfg, pcfg = make_config(tmp_path)
    t0 = time.monotonic()
    try:
        view = st.broker_view(cfg, pcfg, timeout=0.3)
    finally:
        release.set()
    assert time.monotonic() - t0 < 2.0
    assert view["available"] is False and "did not answer within 0.5 s" in view["error"]


def test_main_exits_1_and_prints_the_rest_when_the_broker_is_away(tmp_path, capsys):
    cfg, pcfg = make_config(tmp_path, port=closed_port())
    write_parquet(tmp_path, "y=2026/m=11/d=22/h=10", "part-a.parquet", 6)
    code = st.main(["-t", "p", "-c", str(cfg.path), "--json", "--broker-timeout", "0.5"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert out["broker"]["available"] is False
    assert out["newest_partition"]["rows"] == 6 and out["store"]["available"] is True
