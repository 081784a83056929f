"""The ingest summary picture, in-process: tables written with the real
TableWriter into a LocalStore, reports with the real ReportWriter; the
numbers of the JSON checked against DuckDB reading the same Parquet and
report files; the PNG decoded; the HTML self-contained."""
from __future__ import annotations

import base64
import calendar
import json
import re
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from spot_ingest import pipeline as registry
from spot_ingest import reports as reports_module
from spot_ingest import summary
from spot_ingest.reports import ReportWriter
from spot_ingest.store import LocalStore
from spot_ingest.warehouse import TableWriter, hourly_partitions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
T0 = calendar.timegm((2026, 11, 22, 16, 0, 0))     # 16:00 UTC
UNTIL = T0 + 3 * 3600                               # 19:00 UTC
SINCE = UNTIL - 2 * 3600                            # --since 2h: 17:00 UTC


def write_config(tmp_path: Path) -> Path:
    data = {"dbname": "spot", "hdfs_app_path": str(tmp_path / "w"),
            "kafka": {"kafka_server": "127.0.0.1", "kafka_port": "9092"},
            "pipelines": {"f": {"type": "flow", "collector_path": str(tmp_path)},
                          "g": {"type": "flow", "collector_path": str(tmp_path)}}}
    path = tmp_path / "ingest_conf.json"
    path.write_text(json.dumps(data))
    return path


def write_flow_file(store, name: str, stamps: list[int]) -> None:
    """A flow table file of ``stamps`` (unix_tstamp), through the real writer."""
    plugin = registry.load("flow")
    ts = pa.array([s * 1_000_000 for s in stamps], pa.timestamp("us", tz="UTC"))
    columns = {"unix_tstamp": pa.array(stamps, pa.int64())}
    columns.update(zip(plugin.partition_schema.names, hourly_partitions(ts)))
    arrays = [columns.get(f.name, pa.nulls(len(stamps), f.type)) for f in plugin.full_schema]
    arrays = [a.cast(f.type) for a, f in zip(arrays, plugin.full_schema)]
    with TableWriter(store, plugin.table, name, plugin.schema, plugin.partition_schema,
                     "test") as writer:
        writer.write(pa.RecordBatch.from_arrays(arrays, schema=plugin.full_schema))


def write_report_at(monkeypatch, writer: ReportWriter, ts: float, **fields) -> None:
    with monkeypatch.context() as m:
        m.setattr(reports_module.time, "time", lambda: ts)
        writer.write(**fields)


def flow_stamps() -> dict[str, list[int]]:
    # Rows from 16:10 (a partition wholly before the range: never read) to
    # 19:20 (after it), dense in some intervals, none in others; the edges
    # of the range exactly (SINCE counted, UNTIL not).
    return {
        "part-a": [T0 + 600 + i for i in range(40)],                          # 16:10, not read
        "part-b": [SINCE - 30 + i for i in range(60)]                         # 16:59:30..17:00:29
                  + [SINCE + 17 * 60 + 7 * i for i in range(100)],            # 17:17 .. 17:28
        "part-c": [SINCE + 3600 + 299, SINCE + 3600 + 300, UNTIL - 1, UNTIL, UNTIL + 1200]
                  + [SINCE + 5000 + i % 900 for i in range(3000)],
    }


@pytest.fixture
def flow_run(tmp_path, monkeypatch):
    config = write_config(tmp_path)
    store = LocalStore(str(tmp_path / "w"))
    stamps = flow_stamps()
    for name, values in stamps.items():
        write_flow_file(store, name, values)
    w0 = ReportWriter(store, "flow", "f", "flow", "worker", 0)
    w1 = ReportWriter(store, "flow", "f", "flow", "worker", 1)
    master = ReportWriter(store, "flow", "f", "flow", "master")
    other = ReportWriter(store, "flow", "g", "flow", "worker", 0)   # another pipeline, same table
    at = lambda writer, ts, **f: write_report_at(monkeypatch, writer, ts, **f)  # noqa: E731
    at(w0, SINCE - 100, outcome="loaded", partition=0, lag=9)                 # before the range
    at(master, SINCE + 10, outcome="staged", file="a")                        # not a load
    at(w0, SINCE + 20, outcome="loaded", file="a", partition=0, lag=3)
    at(w1, SINCE + 25, outcome="loaded", file="b", partition=1, lag=0)
    at(w0, SINCE + 299.9, outcome="loaded", file="c", partition=0, lag=2)
    at(w0, SINCE + 300, outcome="quarantined", file="d", partition=0, lag=1,
       reason="nfdump could not read it")
    at(master, SINCE + 1800, outcome="rejected", file="e", reason="empty file")
    at(w1, SINCE + 3605, outcome="refused", partition=1, lag=None, reason="not trusted")
    for i in range(12):
        at(w1, SINCE + 5000 + 60 * i, outcome="loaded", file=f"x{i}", partition=1, lag=11 - i)
    at(other, SINCE + 20, outcome="loaded", file="z", partition=0, lag=50)    # pipeline g
    at(w0, UNTIL, outcome="loaded", file="late", partition=0, lag=0)          # after the range
    return tmp_path, config, store, stamps


def run_summary(config: Path, out: Path, *extra: str) -> None:
    assert summary.main(["-t", "f", "-c", str(config), "--out", str(out), *extra]) == 0


def check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    height, width = imread(str(path)).shape[:2]
    assert (width, height) == (1100, 850)


def test_flow_numbers_equal_the_table_and_the_reports(flow_run, capsys):
    tmp_path, config, store, stamps = flow_run
    out = tmp_path / "out"
    run_summary(config, out, "--since", "2h", "--until", "2026-11-22T19:00")
    printed = capsys.readouterr().out.splitlines()
    paths = [out / f"ingest-summary-f.{ext}" for ext in ("png", "html", "json")]
    assert printed[-3:] == [str(p) for p in paths]
    check_png(paths[0])
    data = json.loads(paths[2].read_text())

    assert (data["v"], data["pipeline"], data["type"], data["table"]) == (1, "f", "flow", "flow")
    assert (data["since"], data["until"], data["interval_seconds"]) == (SINCE, UNTIL, 300)
    assert data["starts"] == list(range(SINCE, UNTIL, 300))
    n = len(data["starts"])
    assert all(len(data[k]) == n for k in ("records", "files", "batches", "failures"))

    # Records: DuckDB's group-by of the table's files by 5-minute bucket.
    hive = tmp_path / "w" / "flow" / "hive"
    in_table = dict(duckdb.sql(
        f"SELECT unix_tstamp // 300 * 300, count(*) FROM read_parquet('{hive}/**/*.parquet', "
        f"hive_partitioning=true) WHERE unix_tstamp >= {SINCE} AND unix_tstamp < {UNTIL} "
        f"GROUP BY 1").fetchall())
    assert {s: r for s, r in zip(data["starts"], data["records"]) if r} == in_table
    assert data["totals"]["records"] == sum(in_table.values()) == 30 + 100 + 2 + 1 + 3000
    # Only the partitions of 17:00 and 18:00 were read: the rows before and
    # after the range are in others (16:00, 19:00).
    assert data["outside_range"] == 0 and data["no_event_time"] == 0
    assert data["table_files_read"] == len(list(hive.glob("y=2026/m=11/d=22/h=1[78]/*.parquet")))
    assert data["table_files_read"] < len(list(hive.rglob("*.parquet")))
    # A range from 17:05 reads the 17:00 partition and leaves out its rows before 17:05.
    later = summary.series(store, registry.load("flow"), "f", SINCE + 300, UNTIL)
    assert later["outside_range"] == 30 + 100 * 0 and later["starts"][0] == SINCE + 300
    assert later["records"] == data["records"][1:]

    # Files and failures: DuckDB over the report files.
    def per_interval(where: str) -> dict:
        return dict(duckdb.sql(
            f"SELECT CAST(floor(ts / 300) * 300 AS BIGINT), count(*) FROM read_json_auto("
            f"'{tmp_path}/w/flow/_reports/**/*.jsonl') WHERE pipeline = 'f' AND ts >= {SINCE} "
            f"AND ts < {UNTIL} AND {where} GROUP BY 1").fetchall())
    loaded = per_interval("outcome = 'loaded' AND role = 'worker'")
    failed = per_interval("outcome IN ('quarantined', 'refused', 'rejected')")
    assert {s: f for s, f in zip(data["starts"], data["files"]) if f} == loaded
    assert {s: f for s, f in zip(data["starts"], data["failures"]) if f} == failed
    assert loaded[SINCE] == 3 and sum(loaded.values()) == 15 and sum(failed.values()) == 3
    assert not any(data["batches"])
    assert data["totals"]["failures_by_outcome"] == {"quarantined": 1, "refused": 1, "rejected": 1}

    # Lag: one series per worker partition, oldest first, nulls left out.
    assert list(data["lag"]) == ["partition 0", "partition 1"]
    assert [v for _, v in data["lag"]["partition 0"]] == [3, 2, 1]
    assert [v for _, v in data["lag"]["partition 1"]] == [0] + list(range(11, -1, -1))
    assert data["lag"]["partition 0"][0][0] == pytest.approx(SINCE + 20)

    # The page: self-contained, the same picture inline, the totals.
    page = paths[1].read_text()
    inline = re.search(r"src='data:image/png;base64,([^']+)'", page).group(1)
    assert base64.b64decode(inline) == paths[0].read_bytes()
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", page) and "<link" not in page
    assert "3,133" in page and "quarantined" in page


def test_proxy_like_table_bins_by_p_date_and_p_time(tmp_path, monkeypatch):
    store = LocalStore(str(tmp_path / "w"))
    plugin = registry.load("proxy")
    moments = ([SINCE + 13 * i for i in range(500)] + [SINCE - 1, UNTIL - 1, UNTIL]
               + [SINCE + 4000 + i for i in range(77)])
    dates = [time.strftime("%Y-%m-%d", time.gmtime(s)) for s in moments] + ["2026-11-22"]
    times = [time.strftime("%H:%M:%S", time.gmtime(s)) for s in moments] + ["25:61:00"]
    n = len(dates)
    columns = {"p_date": pa.array(dates), "p_time": pa.array(times),
               "y": pa.array([d[:4] for d in dates]), "m": pa.array([d[5:7] for d in dates]),
               "d": pa.array([d[8:10] for d in dates]), "h": pa.array([t[:2] for t in times])}
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in plugin.full_schema]
    half = n // 2
    for name, part in (("batch-1", slice(0, half)), ("batch-2", slice(half, n))):
        with TableWriter(store, plugin.table, name, plugin.schema, plugin.partition_schema,
                         "test") as writer:
            writer.write(pa.RecordBatch.from_arrays([a[part] for a in arrays],
                                                    schema=plugin.full_schema))
    stream = ReportWriter(store, "proxy", "p", "proxy", "stream")
    for i, ts in enumerate((SINCE + 700, SINCE + 710, SINCE + 4000)):
        write_report_at(monkeypatch, stream, ts, outcome="batch", batch=i, messages=3,
                        records=10, lag=5 - i)

    since = SINCE + 600     # 17:10: the 17:00 partition is read, its rows before 17:10 left out
    data = summary.series(store, plugin, "p", since, UNTIL)
    hive = tmp_path / "w" / "proxy" / "hive"
    assert (hive / "y=2026" / "m=11" / "d=22" / "h=17").is_dir()
    in_table = dict(duckdb.sql(
        f"SELECT CAST(epoch(try_strptime(p_date || ' ' || p_time, '%Y-%m-%d %H:%M:%S')) AS BIGINT)"
        f" // 300 * 300 AS s, count(*) FROM read_parquet('{hive}/**/*.parquet') "
        f"WHERE s >= {since} AND s < {UNTIL} GROUP BY 1").fetchall())
    assert {s: r for s, r in zip(data["starts"], data["records"]) if r} == in_table
    assert data["totals"]["records"] == sum(in_table.values()) == (500 - 47) + 1 + 77
    # 17:00-17:09 of the partition read; the unreadable time (its folder h=25
    # is no hour, so it is read whatever it holds).
    assert data["outside_range"] == 47 and data["no_event_time"] == 1
    # Micro-batches by the time of their reports; the stream's lag.
    assert {s: b for s, b in zip(data["starts"], data["batches"]) if b} == {
        SINCE + 600: 2, SINCE + 3900: 1}
    assert not any(data["files"]) and data["lag"] == {
        "stream": [[SINCE + 700, 5], [SINCE + 710, 4], [SINCE + 4000, 3]]}
    assert summary.draw(data)[:8] == PNG_SIGNATURE


def test_an_empty_range_still_draws_a_picture_saying_no_data(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "empty"
    run_summary(config, out, "--since", "24h")
    check_png(out / "ingest-summary-f.png")
    data = json.loads((out / "ingest-summary-f.json").read_text())
    assert len(data["starts"]) in (288, 289) and not any(data["records"] + data["files"])
    assert data["totals"]["records"] == 0 and data["lag"] == {}
    fig = summary.figure(data)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts] + [fig.get_suptitle()]
    summary._pyplot().close(fig)
    assert sum("no data" in t for t in texts) == 4
    assert "<p>no data</p>" in (out / "ingest-summary-f.html").read_text()


def test_long_ranges_are_drawn_as_an_outline_with_the_same_numbers(flow_run):
    tmp_path, config, store, stamps = flow_run
    out = tmp_path / "long"
    run_summary(config, out, "--since", "7d", "--at", str(UNTIL))
    check_png(out / "ingest-summary-f.png")
    data = json.loads((out / "ingest-summary-f.json").read_text())
    assert len(data["starts"]) == 7 * 288 > summary.MAX_BARS
    everything = [s for values in stamps.values() for s in values if s < UNTIL]
    assert data["totals"]["records"] == len(everything) and data["outside_range"] == 0


def test_a_partition_compacted_while_it_is_read_is_read_again(flow_run):
    """A compaction exchanges a partition between the listing and the
    reading: the partition is listed and read again, nothing counted twice."""
    tmp_path, config, store, stamps = flow_run
    write_flow_file(store, "part-d", [SINCE + 3600 + i for i in range(50)])
    plugin = registry.load("flow")
    expected = summary.series(store, plugin, "f", SINCE, UNTIL)
    folder = "y=2026/m=11/d=22/h=18"

    class CompactingStore(LocalStore):
        reads = 0

        def read(self, area, relative):
            if relative.startswith(folder + "/"):
                self.reads += 1
                if self.reads == 2:      # the first file of the partition was read
                    here = self.root / area / folder
                    old = sorted(here.glob("*.parquet"))
                    pq.write_table(pa.concat_tables([pq.read_table(p, partitioning=None)
                                                     for p in old]), here / "merged-1.new")
                    for p in old:
                        p.unlink()
                    (here / "merged-1.new").rename(here / "merged-1.parquet")
                    raise FileNotFoundError(relative)
            return super().read(area, relative)

    compacting = CompactingStore(str(tmp_path / "w"))
    again = summary.series(compacting, plugin, "f", SINCE, UNTIL)
    assert compacting.reads == 3 and expected["totals"]["records"] == 3133 + 50
    assert again["records"] == expected["records"]
    assert again["outside_range"] == expected["outside_range"]
    assert again["table_files_read"] == expected["table_files_read"] - 1


def test_an_unreadable_table_file_is_counted_and_the_rest_read(tmp_path, caplog):
    store = LocalStore(str(tmp_path / "w"))
    write_flow_file(store, "part-good", [SINCE + i for i in range(10)])
    bad = tmp_path / "w" / "flow" / "hive" / "y=2026" / "m=11" / "d=22" / "h=17" / "part-bad.parquet"
    bad.write_bytes(b"not parquet at all")
    data = summary.series(store, registry.load("flow"), "f", SINCE, UNTIL)
    assert data["records"][0] == 10 and data["totals"]["records"] == 10
    assert (data["table_files_read"], data["unreadable_table_files"]) == (1, 1)
    assert "part-bad.parquet is not a readable table file" in caplog.text
    assert summary.draw(data)[:8] == PNG_SIGNATURE
    assert "1 table file(s) unreadable" in summary.page(data, b"")


def test_until_and_partition_folders():
    assert summary.parse_time("2026-11-22T19:00") == UNTIL
    assert summary.parse_time("2026-11-22 19:00:00Z") == UNTIL
    assert summary.parse_time("2026-11-22T19:00+00:00") == UNTIL
    assert summary.parse_time(str(UNTIL)) == UNTIL
    with pytest.raises(ValueError, match="in UTC"):
        summary.parse_time("2026-11-22T19:00+01:00")
    with pytest.raises(ValueError, match="not a time"):
        summary.parse_time("yesterday")
    assert summary.partition_hour("y=2026/m=11/d=22/h=16") == T0
    assert summary.partition_hour("y=2026/m=11/d=22/h=16/") == T0
    assert summary.partition_hour("y=2026/m=11/d=22") is None
    assert summary.partition_hour("") is None


def test_bad_arguments_are_refused(tmp_path, capsys):
    config = write_config(tmp_path)
    for extra in (["--since", "soon"], ["--since", "0"], ["--until", "later"]):
        with pytest.raises(SystemExit) as stop:
            summary.main(["-t", "f", "-c", str(config), *extra])
        assert stop.value.code == 2
