"""The engine's streaming runtime (spot_ingest/streaming.py), apart from any
one source: Spark's own Kafka source, and a topic re-created under a
checkpoint. Spark, the broker, master and job are real.

What cannot run here: Spark's Kafka connector jar (spark-sql-kafka-0-10) is
not installed with PySpark and Maven Central cannot be reached from this
machine, so ``format("kafka")`` itself never reads a broker in this suite.
What is tested instead: the job refuses that setting with a message saying
what to install; and rows in exactly the form that connector produces
(its documented schema: key, value, topic, partition, offset, timestamp,
timestampType, headers as an array of key/binary-value structs) go through
the same conversion, checks, parsing and writer as the Python source's rows
and give byte-identical tables.
"""
from __future__ import annotations

import json

import datetime as dt
import subprocess
import uuid

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from spot_ingest.warehouse import INPUTS_KEY

from conftest import Env
from spot_ingest import lines, streaming
from spot_ingest.broker import EmbeddedBroker
from spot_ingest.config import load
from spot_ingest.pipelines.proxy import PROXY
from spot_ingest.pipelines.proxy.sample import write_log
from spot_ingest.spark_env import CodeArchive
from spot_ingest.spark_kafka import SCHEMA as PYTHON_SOURCE_SCHEMA

# The schema of Spark's Kafka source with includeHeaders=true.
CONNECTOR_SCHEMA = ("key BINARY, value BINARY, topic STRING, partition INT, offset BIGINT, "
                    "timestamp TIMESTAMP, timestampType INT, "
                    "headers ARRAY<STRUCT<key: STRING, value: BINARY>>")


@pytest.fixture(scope="module")
def spark(tmp_path_factory, broker):
    """A local session made as the job makes it."""
    root = tmp_path_factory.mktemp("session")
    env = Env(root, broker, pipeline="proxy_test", ptype="proxy")
    cfg = load(env.config)
    with CodeArchive() as code:
        session = streaming.spark_session(cfg, cfg.pipeline("proxy_test"), 1, code)
        yield session
        session.stop()


def _tables(root) -> dict[str, list[dict]]:
    return {str(p.relative_to(root)): pq.read_table(p).to_pylist()
            for p in sorted(root.rglob("*.parquet"))}


def test_spark_kafka_source_rows_load_exactly_as_the_python_source_rows(spark, tmp_path):
    log = write_log(tmp_path / "a.log", 3000, seed=3)
    messages = [m for m in lines.cut(log, "a.log", 40_000, PROXY) if isinstance(m, lines.Message)]
    assert len(messages) > 5
    run_marker = lines.end_of_run("0123abcd")
    # A forged record: its kind header twice (a map cannot hold that without
    # the job's dedup setting), and an id in no valid form.
    forged = lines.Message(b"a b c", [("spot.kind", b"LINES"), ("spot.kind", b"LINES"),
                                      ("spot.id", b"nope")])
    records = [*messages, run_marker, forged]
    stamp = 1_795_248_000_000
    python_rows = [(0, i, stamp + i, bytearray(m.value),
                    {k: v.decode("utf-8", "replace") for k, v in m.headers})
                   for i, m in enumerate(records)]
    connector_rows = [(None, bytearray(m.value), "t", 0, i,
                       dt.datetime.fromtimestamp((stamp + i) / 1000, dt.timezone.utc), 0,
                       [(k, bytearray(v)) for k, v in m.headers])
                      for i, m in enumerate(records)]
    by_python = spark.createDataFrame(python_rows, PYTHON_SOURCE_SCHEMA)
    by_connector = streaming.from_spark_kafka(spark.createDataFrame(connector_rows,
                                                                    CONNECTOR_SCHEMA))

    summaries = {}
    for name, records_df in (("python", by_python), ("connector", by_connector)):
        summaries[name] = sorted(streaming.process(records_df, PROXY, str(tmp_path / name), "t"))
    assert summaries["python"] == summaries["connector"]
    kinds = [r.kind for r in summaries["python"]]
    assert kinds.count("LINES") == len(messages) and kinds.count("END") == 1
    assert kinds.count("BAD") == 1
    [bad] = [r for r in summaries["python"] if r.kind == "BAD"]
    assert "bad spot.id 'nope'" in bad.note

    python_tables = _tables(tmp_path / "python" / "proxy")
    connector_tables = _tables(tmp_path / "connector" / "proxy")
    assert python_tables == connector_tables
    rows = sum(len(t) for name, t in python_tables.items() if name.startswith("hive/"))
    rejects = sum(len(t) for name, t in python_tables.items() if name.startswith("rejects/"))
    assert rows + rejects - 1 == 3000 and rows > 2900, "every line once; one rejected record"
    # The files list the names the master side computes for each message.
    held = set()
    for f in (tmp_path / "python" / "proxy" / "hive").rglob("*.parquet"):
        held |= set(json.loads(pq.read_metadata(f).metadata[INPUTS_KEY]))
    assert held == {f"part-{lines.output_name(m.value, m.headers)}" for m in messages}


def test_spark_kafka_source_without_its_connector_says_what_to_install(env):
    env.set(type="proxy", supported_files=[".log"],
            **{"spark-streaming.kafka_source": "spark"})
    job = env.spawn("stream", "--partitions", "1", log_name="stream.log")
    assert job.wait(timeout=300) == 2
    text = env.log("stream.log")
    assert "Spark's Kafka connector (org.apache.spark:spark-sql-kafka-0-10) is not on the " \
           "classpath" in text
    assert "kafka_connector" in text and "Traceback" not in text


def _once(env: Env, run_id: str) -> None:
    master = env.master(1, "--once", "--run-id", run_id)
    assert master.wait(timeout=120) == 0, env.log("master.log")
    job = env.spawn("stream", "--partitions", "1", "--run-id", run_id,
                    log_name=f"stream-{run_id}.log")
    assert job.wait(timeout=300) == 0, env.log(f"stream-{run_id}.log")


def test_a_topic_recreated_under_the_checkpoint_is_read_from_its_start(tmp_path):
    """An embedded broker keeps its topics in memory: after a restart the
    topic starts again at offset 0. The master of the second run publishes
    more messages than the first run's checkpoint had read before the job
    starts, so the offsets alone do not show it: the job must still see that
    its checkpoint belongs to the earlier topic, and read the new one whole."""
    first = EmbeddedBroker().start()
    env = Env(tmp_path, (first.host, first.port), pipeline="proxy_test", ptype="proxy",
              supported_files=[".log"])
    env.set(**{"kafka.message_size": 20_000, "spark-streaming.spark_batch_size": "1"})
    try:
        write_log(env.collector / "one.log", 600, seed=1)
        _once(env, uuid.uuid4().hex)
        after_one = ds.dataset(env.hive, format="parquet").count_rows()
        assert after_one == 600
    finally:
        first.stop()
    second = EmbeddedBroker(first.host, first.port).start()
    try:
        write_log(env.collector / "two.log", 1800, seed=2)
        _once(env, uuid.uuid4().hex)
        assert ds.dataset(env.hive, format="parquet").count_rows() == 600 + 1800
        log = "\n".join(env.log(p.name) for p in env.logs.glob("stream-*.log"))
        assert "belongs to an earlier topic of that name" in log
    finally:
        env.stop_all()
        second.stop()


def test_spark_submit_entry_point_runs_the_job_as_a_file(env):
    """``spark-submit spot_ingest/streaming.py`` runs the module as a plain
    file: it must find its package without being installed as one."""
    out = subprocess.run([env_python(), streaming.__file__, "--help"], capture_output=True,
                         text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "Run the streaming job" in out.stdout


def env_python() -> str:
    import sys
    return sys.executable
