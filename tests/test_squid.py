"""Squid pipeline: access logs written by a real squid (pipelines/squid/sample.py
runs squid 5 on loopback as a forward proxy in front of a local web server),
parsed by the pipeline's Spark expressions in a real local Spark, compared
field for field with an independent reading of the same lines in plain
Python (``reference.squid_reference_row``: str.split and urllib.parse, no
regular expression).

The only lines not written by squid are the damaged ones of the reject
tests, and they are made from squid's lines by damaging them in code.
"""
from __future__ import annotations

import gzip
import os
import shutil
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from conftest import wait_for  # conftest also puts the repository on sys.path
from reference import squid_reference_row as reference_row
from spot_ingest.pipelines.squid import (NATIVE_FIELDS, PROXY_COLUMNS, STRING_PARTITIONS,
                                         TABLE_SCHEMA)
from spot_ingest.pipelines.squid import PIPELINE as SQUID
from spot_ingest.pipelines.squid.sample import SAMPLE_NAME, SquidSample, make_access_log

COLUMNS = TABLE_SCHEMA.names + STRING_PARTITIONS.names
def log_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# -- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> SquidSample:
    """120 requests through a real squid (about 5 s)."""
    return make_access_log(tmp_path_factory.mktemp("squid"), 120, seed=7)


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """A local Spark session on loopback, set up the way the streaming job sets up its own."""
    from pyspark.sql import SparkSession

    from spot_ingest.spark_env import DEFAULT_BIND_ADDRESS, prepare_environment

    prepare_environment(DEFAULT_BIND_ADDRESS)
    scratch = tmp_path_factory.mktemp("spark")
    session = (SparkSession.builder.master("local[2]").appName("test-squid-parse")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.bindAddress", DEFAULT_BIND_ADDRESS)
               .config("spark.driver.host", DEFAULT_BIND_ADDRESS)
               .config("spark.local.dir", str(scratch))
               .config("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={scratch}")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


MESSAGE_SCHEMA = pa.schema([("kafka_offset", pa.int64()), ("value", pa.string()),
                            ("fields", pa.string())])


def messages_of(spark, groups: list[list[str] | None], fields: str | None = None):
    """A DataFrame shaped like the engine's input: one row per Kafka record,
    ``value`` the lines joined with newlines (None: a record without lines,
    whose ``fields`` is NULL too), plus an engine column (``kafka_offset``).

    Made from an Arrow table, which the JVM reads itself: a DataFrame made
    from Python rows is read by a Python worker, which conftest stops after
    the test that started it, while the session serves the whole module."""
    fields = SQUID.default_fields if fields is None else fields
    table = pa.table({
        "kafka_offset": list(range(len(groups))),
        "value": [None if g is None else "\n".join(g) for g in groups],
        "fields": [None if g is None else fields for g in groups]}, schema=MESSAGE_SCHEMA)
    return spark.createDataFrame(table)


def parsed(spark, groups, fields=None) -> list[dict]:
    out = SQUID.parse(messages_of(spark, groups, fields)).collect()
    return sorted((r.asDict() for r in out),
                  key=lambda r: (r["kafka_offset"], -1 if r["pos"] is None else r["pos"]))


def chunks(lines: list[str], size: int) -> list[list[str]]:
    return [lines[i:i + size] for i in range(0, len(lines), size)]


# -- a. the sample is a real squid's log ----------------------------------------

def test_sample_is_squids_log_of_every_request_sent(sample):
    lines = log_lines(sample.path)
    assert sample.path.name == SAMPLE_NAME
    assert not list(sample.path.parent.glob(".*")), "no temporary file left beside the log"
    # squid logs the readiness probe (a connection closed before any request) first.
    probe, *requests = [reference_row(line) for line in lines]
    assert (probe["resultcode"], probe["respcode"], probe["reqmethod"]) == ("NONE_NONE", 0, "")
    assert probe["fulluri"].startswith("error:")
    assert len(requests) == len(sample.exchanges) == 120
    for row, ex in zip(requests, sample.exchanges):
        assert (row["reqmethod"], row["fulluri"], row["respcode"]) == (ex.method, ex.url, ex.status)
        # Proxy credentials are logged when squid asked for them and they came.
        assert row["username"] == (ex.user if ex.user and ex.status != 407 else "")
        assert row["clientip"] == "127.0.0.1"
    statuses = {r["respcode"] for r in requests}
    assert {200, 201, 204, 302, 404, 500, 403, 407, 503} <= statuses
    assert {r["reqmethod"] for r in requests} == {"GET", "HEAD", "POST", "CONNECT"}
    assert any(r["uriquery"].startswith("?id=") for r in requests), "query strings are kept"
    assert any(r["resultcode"] == "TCP_TUNNEL" and r["uriport"] for r in requests)
    assert any(r["hierarchy"] == "HIER_NONE" and r["serverip"] == "" for r in requests)
    assert max(r["scbytes"] for r in requests) > 300 * 1024
    assert max(r["duration"] for r in requests) >= 150, "the slow answers show in elapsed"
    # squid 5 writes a user name with a space as it is: such lines have 11 fields.
    spaced = [line for line in lines if " bob smith " in line]
    assert spaced and all(len(line.split()) == 11 for line in spaced)


# -- b. parse() in Spark equals the reference reader ---------------------------

def test_parse_gives_the_reference_readers_rows_field_for_field(spark, sample, capsys):
    lines = log_lines(sample.path)
    groups = chunks(lines, 17) + [None]         # several messages, and a record without lines
    rows = parsed(spark, groups)
    assert len(rows) == len(lines) + 1
    line_rows, [empty] = rows[:-1], rows[-1:]
    expected = [reference_row(line) for line in lines]
    for got, want, line in zip(line_rows, expected, lines):
        assert got["reject"] is None, (got["reject"], line)
        assert got["line"] == line
        assert {c: got[c] for c in COLUMNS} == want, line
    # Positions restart in each message; the engine's column is kept.
    assert [r["pos"] for r in line_rows[:20]] == list(range(17)) + [0, 1, 2]
    assert [r["kafka_offset"] for r in line_rows] == [i // 17 for i in range(len(lines))]
    # The record without lines: exactly one row, nothing in it, nothing rejected.
    assert empty["kafka_offset"] == len(groups) - 1
    assert empty["pos"] is None and empty["line"] is None and empty["reject"] is None
    assert all(empty[c] is None for c in COLUMNS)
    # The output has the engine's columns, then pos, line, reject, the table and its partitions.
    out = SQUID.parse(messages_of(spark, [lines[:1]]))
    assert out.columns == ["kafka_offset", "value", "fields", "pos", "line", "reject"] + COLUMNS
    # Each line is cut into fields once: the plan runs the tokenizer in one place.
    out.explain()
    plan = capsys.readouterr().out
    assert plan.count("regexp_extract_all(") == 1, plan


def test_dates_are_utc_whatever_the_sessions_time_zone(spark, sample):
    lines = log_lines(sample.path)[:30]
    spark.conf.set("spark.sql.session.timeZone", "Pacific/Kiritimati")    # UTC+14
    try:
        rows = parsed(spark, [lines])
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    assert [(r["p_date"], r["p_time"], r["h"]) for r in rows] == \
        [(e["p_date"], e["p_time"], e["h"]) for e in map(reference_row, lines)]


def damaged(lines: list[str]) -> list[tuple[str, str]]:
    """Real squid lines damaged in code, each with the reason it must be rejected for."""
    good = next(line for line in lines if " TCP_MISS/200 " in line and " GET " in line)
    t = good.split()
    stamp = t[0]

    def swap(i: int, value: str) -> str:
        return " ".join(t[:i] + [value] + t[i + 1:])
    return [
        (" ".join(t[:5]), "expected 10 fields, found 5"),                       # cut short
        ("", "expected 10 fields, found 0"),                                     # an empty line
        (swap(0, stamp.replace(".", ",")), f"bad timestamp '{stamp.replace('.', ',')}'"),
        (swap(0, stamp[:-4]), f"bad timestamp '{stamp[:-4]}'"),                 # no milliseconds
        (swap(0, "253402300800.000"), "bad timestamp '253402300800.000'"),      # year 10000
        (swap(1, "12x"), "bad elapsed time '12x'"),
        (swap(1, "-3"), "bad elapsed time '-3'"),
        (swap(3, "TCP_MISS/2O0"), "bad code/status 'TCP_MISS/2O0'"),
        (swap(3, "TCP_MISS"), "bad code/status 'TCP_MISS'"),
        (swap(4, "1.5e3"), "bad byte count '1.5e3'"),
        (swap(4, "99999999999999999999"), "bad byte count '99999999999999999999'"),
        # A field written twice shifts the others: caught by their checks.
        (" ".join(t[:5] + [t[4]] + t[5:]), f"bad method '{t[4]}'"),
        (swap(8, "HIER_DIRECT"), "bad peerstatus/peerhost 'HIER_DIRECT'"),
    ]


def test_damaged_lines_are_rejected_with_their_reason_and_no_exception(spark, sample):
    lines = log_lines(sample.path)
    cases = damaged(lines)
    good = lines[5]
    rows = parsed(spark, [[good] + [d for d, _ in cases] + [good]])
    assert [r["reject"] for r in rows] == [None] + [why for _, why in cases] + [None]
    assert [r["line"] for r in rows] == [good] + [d for d, _ in cases] + [good]
    for r in rows[1:-1]:
        assert all(r[c] is None for c in COLUMNS), "a rejected line loads nothing"
    assert {c: rows[0][c] for c in COLUMNS} == reference_row(good)


def test_the_last_second_of_year_9999_loads(spark, sample):
    line = next(x for x in log_lines(sample.path) if " GET " in x)
    last = " ".join(["253402300799.999"] + line.split()[1:])
    [row] = parsed(spark, [[last]])
    assert row["reject"] is None
    assert (row["p_date"], row["p_time"], row["unix_tstamp_ms"]) == \
        ("9999-12-31", "23:59:59", 253402300799999)
    assert {c: row[c] for c in COLUMNS} == reference_row(last)


def test_lines_under_other_field_names_are_rejected(spark, sample):
    """A record that did not come from this pipeline's master (its lines
    under a W3C #Fields: header, say) is not read as squid's format."""
    lines = log_lines(sample.path)[1:4]
    rows = parsed(spark, [lines], fields="date time c-ip sc-status")
    why = "not squid's native format: the lines come under the fields 'date time c-ip sc-status'"
    assert [r["reject"] for r in rows] == [why] * 3
    assert all(r["p_date"] is None for r in rows)


# -- the plug-in itself ----------------------------------------------------------

def test_the_folder_is_the_whole_plug_in():
    from spot_ingest import pipeline
    from spot_ingest.watcher import is_candidate_name

    assert "squid" in pipeline.known_types()
    loaded = pipeline.load("squid")
    assert isinstance(loaded, pipeline.RecordPipeline) and loaded.table == "squid"
    assert loaded.default_fields.split(" ") == list(NATIVE_FIELDS)
    # The columns said to mean what the proxy table's columns of that name mean exist there,
    # and the partitions are laid out alike.
    proxy = pipeline.load("proxy")
    assert set(PROXY_COLUMNS) <= set(proxy.schema.names) & set(loaded.schema.names)
    assert loaded.partition_schema == proxy.partition_schema
    names = {n: is_candidate_name(n, loaded.default_supported_files) for n in
             ("access.log.0", "access.log.1", "access.log.2.gz", "access.log-20261122",
              "access.log", "cache.log.0", ".access.log.0.part")}
    assert names == {"access.log.0": True, "access.log.1": True, "access.log.2.gz": True,
                     "access.log-20261122": True, "access.log": False, "cache.log.0": False,
                     ".access.log.0.part": False}


def test_a_missing_squid_is_named_with_its_package(monkeypatch, tmp_path):
    from spot_ingest.pipeline import ToolMissingError

    monkeypatch.setattr("spot_ingest.pipelines.squid.sample.SQUID_DIRS", (str(tmp_path),))
    monkeypatch.setenv("PATH", str(tmp_path))
    from spot_ingest.pipelines.squid import sample as squid_sample
    with pytest.raises(ToolMissingError, match="apt-get install squid"):
        squid_sample.find_squid(dirs=squid_sample.SQUID_DIRS)
    with pytest.raises(ToolMissingError, match="apt-get install squid"):
        squid_sample.make_access_log(tmp_path / "out", 1)
    assert not (tmp_path / "out").exists(), "nothing written when squid is missing"


# -- c. end to end: collector -> master -> broker -> streaming job -> table -----

def squid_table_rows(hive: Path) -> list[dict]:
    """The squid table read back by pyarrow, partition columns as strings."""
    partitioning = ds.partitioning(STRING_PARTITIONS, flavor="hive")
    return ds.dataset(hive, format="parquet", partitioning=partitioning).to_table().to_pylist()


def row_key(row: dict) -> tuple:
    return tuple(row[c] for c in COLUMNS)


def test_squid_logs_become_exactly_their_rows_end_to_end(make_env, tmp_path):
    """Three logs of a real squid in the collector directory, under the names
    squid's rotation gives them (one gzipped, one with lines damaged in code):
    the master publishes their lines, the streaming job parses them with the
    squid pipeline into the squid table, and the rows are the reference
    reader's, each once; the damaged lines are in the rejects with their
    reasons and line numbers."""
    env = make_env("squid", pipeline="squid_1", ptype="squid")     # default supported_files
    env.set(**{"spark-streaming.spark_batch_size": "1", "kafka.message_size": 4000})
    made = tmp_path / "made"
    logs = [make_access_log(made / str(i), n, seed=20 + i).path for i, n in enumerate((90, 60, 70))]
    expected: list[dict] = []
    # access.log.0 as squid wrote it.
    first = log_lines(logs[0])
    expected += [reference_row(line) for line in first]
    os.replace(logs[0], env.collector / "access.log.0")
    # access.log.1: some lines damaged in code (the rest as squid wrote them),
    # and one blank line, which the master does not publish (no row, no reject).
    lines = log_lines(logs[1])
    cases = [c for c in damaged(lines) if c[0].strip()][:5]
    at = (3, 10, 11, 40, 59)
    for i, (bad_line, _) in zip(at, cases):
        lines[i] = bad_line
    lines[20] = ""
    damaged_at = {i + 1: why for i, (_, why) in zip(at, cases)}   # 1-based line numbers
    expected += [reference_row(line) for n, line in enumerate(lines, 1)
                 if n not in damaged_at and line]
    part = tmp_path / "access.log.1"
    part.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(part, env.collector / "access.log.1")
    # access.log.2.gz: logrotate's compressed generation.
    expected += [reference_row(line) for line in log_lines(logs[2])]
    with open(logs[2], "rb") as src, gzip.open(tmp_path / "access.log.2.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp_path / "access.log.2.gz", env.collector / "access.log.2.gz")
    # The live log (squid still writes it) is not taken.
    (env.collector / "access.log").write_text(first[1] + "\n", encoding="utf-8")

    job = env.spawn("stream", "--partitions", "2", log_name="stream.log")
    env.master(2)
    total = f"totals: {len(expected)} rows, {len(damaged_at)} rejects"
    wait_for(lambda: total in env.log("stream.log"), 300, f"'{total}' in the job's log")
    rows = squid_table_rows(env.hive)
    assert len(rows) == len(expected) == 90 + 1 + 60 + 1 + 70 + 1 - len(damaged_at) - 1
    assert sorted(map(row_key, rows), key=repr) == sorted(map(row_key, expected), key=repr)
    assert any(r["username"] == "bob smith" for r in rows), "the 11-field lines are loaded"
    assert {(r["y"], r["m"], r["d"], r["h"]) for r in rows} == \
        {(e["y"], e["m"], e["d"], e["h"]) for e in expected}
    rejects = env.warehouse / "squid" / "rejects"
    stored = ds.dataset(rejects, format="parquet").to_table().to_pylist()
    assert sorted((r["source"], r["line_no"], r["reason"]) for r in stored) == \
        sorted(("access.log.1", n, why) for n, why in damaged_at.items())
    assert all(r["line"] == lines[r["line_no"] - 1] for r in stored)
    master_log = env.log("master.log")
    assert all(f"published {name} as" in master_log
               for name in ("access.log.0", "access.log.1", "access.log.2.gz"))
    assert "access.log:" not in master_log and "published access.log as" not in master_log, \
        "the live log is not taken"
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 0
