"""The proxy pipeline's edges, end to end: real broker, real master, real
Spark job (as tests/test_proxy.py). Each test is named after a finding that
used to lose or corrupt data:

* a ``.log.gz`` was published as raw gzip bytes (every line lost);
* a message's ``spot.id`` header became an output file name: a forged message
  overwrote real rows, and a bad one failed the batch after every restart;
* a line with a NUL byte, or a ``#Fields:`` header naming a field twice, was
  loaded as if it were fine;
* a log that grew after the master read it lost the appended lines.

The first three share one ``--once`` run (Spark starts are slow), followed by
one restart of the job over the whole topic with more forged messages.
"""
from __future__ import annotations

from collections import Counter

import gzip
import json
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO, Env, wait_for
from reference import (files_holding, proxy_key, proxy_reference_rows, proxy_rejects,
                       proxy_table_rows)
from spot_ingest.lines import output_name
from spot_ingest.pipelines.proxy.sample import LAYOUTS, header, log_lines
from spot_ingest.broker import EmbeddedBroker

MAIN27 = LAYOUTS["main27"]
DAY = 1795248000            # 2026-11-22T00:00:00Z


def topic_records(bootstrap: str, topic: str) -> list:
    """Every record of the topic, as kafka-python reads it."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        records = []
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            for batch in consumer.poll(timeout_ms=1000).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def send(bootstrap: str, topic: str, items: list[tuple[bytes | None, list, int]]) -> list:
    """Publish records straight to the topic (a forger); their metadata."""
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    try:
        return [producer.send(topic, value, partition=partition, headers=headers).get(30)
                for value, headers, partition in items]
    finally:
        producer.close()


def lines_message(lines: list[str], **headers: str) -> tuple[bytes, list]:
    names = {"kind": "spot.kind", "id": "spot.id", "source": "spot.source",
             "first": "spot.first_line", "fields": "spot.fields", "run": "spot.run"}
    return "\n".join(lines).encode(), [(names[k], v.encode()) for k, v in headers.items()]


# -- one --once run, then the job again over the whole topic ----------------

@pytest.fixture(scope="module")
def edges(tmp_path_factory, broker):
    from kafka.admin import KafkaAdminClient, NewTopic
    env = Env(tmp_path_factory.mktemp("edges"), broker, pipeline="proxy_edges", ptype="proxy",
              supported_files=[".log", ".log.gz"])
    env.data["spark-streaming"] = {"spark_batch_size": "1"}
    env.config.write_text(json.dumps(env.data))
    bootstrap = f"{broker[0]}:{broker[1]}"
    found: dict = {"env": env}

    # A .log.gz in two layouts, and a truncated one.
    zipped = list(log_lines(300, MAIN27, seed=61, start=DAY))
    extras = list(log_lines(200, LAYOUTS["extras"], seed=62, start=DAY + 3600))
    body = header(MAIN27) + zipped + header(LAYOUTS["extras"]) + extras
    (env.collector / "zipped.log.gz").write_bytes(gzip.compress(("\n".join(body) + "\n").encode()))
    cut_lines = list(log_lines(300, MAIN27, seed=63, start=DAY + 7200))
    whole = gzip.compress(("\n".join(header(MAIN27) + cut_lines) + "\n").encode())
    found["cut_bytes"] = whole[:len(whole) // 2]
    (env.collector / "cut.log.gz").write_bytes(found["cut_bytes"])
    # A NUL byte in a line; a header that names a field twice, over 3 lines.
    odd = list(log_lines(73, MAIN27, seed=64, start=DAY + 10800))
    nul = odd[40][:25] + "\0" + odd[40][26:]
    dup_header = f"#Fields: {MAIN27} cs-host"
    odd_body = header(MAIN27) + odd[:40] + [nul, dup_header] + odd[41:44] + header(MAIN27) + odd[44:]
    (env.collector / "odd.log").write_text("\n".join(odd_body) + "\n")
    found["nul_line_no"] = odd_body.index(nul) + 1
    found["dup_header_line_no"] = odd_body.index(dup_header) + 1
    found["dup_lines"] = odd[41:44]
    found["expected"] = (proxy_reference_rows(zipped, MAIN27) +
                         proxy_reference_rows(extras, LAYOUTS["extras"]) +
                         proxy_reference_rows(odd[:40] + odd[44:], MAIN27))
    found["cut_expected"] = proxy_reference_rows(cut_lines, MAIN27)

    # Forged records, already in the topic when the run starts.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(env.topic, 2, 1)])
    admin.close()
    forged_lines = list(log_lines(5, MAIN27, seed=65, start=DAY + 14400))
    slash = lines_message(forged_lines, kind="LINES", id="../../../../tmp/evil", source="x.log",
                          first="1", fields=MAIN27)
    no_id = lines_message(forged_lines, kind="LINES", source="x.log", first="1", fields=MAIN27)
    no_fields = lines_message(forged_lines, kind="LINES", id="a" * 24 + "-000001",
                              source="x.log", first="1")
    bad_end = lines_message([], kind="END_OF_RUN", run="x|1|../0")
    found["forged"] = dict(zip(
        ["slash", "no_id", "no_fields", "bad_end"],
        send(bootstrap, env.topic, [(*slash, 0), (*no_id, 1), (*no_fields, 0), (*bad_end, 1)])))
    found["forged_lines"] = proxy_reference_rows(forged_lines, MAIN27)

    # Run 1: master and job, --once.
    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                             "-c", str(env.config)], capture_output=True, text=True, timeout=600)
    found["run1"] = result
    found["rows1"] = proxy_table_rows(env.hive)
    found["rejects1"] = proxy_rejects(env.warehouse)
    found["master_log"] = env.log(f"{env.pipeline}-master.log")
    found["job_log1"] = env.log(f"{env.pipeline}-stream.log")
    run_id = re.search(r"announced the end of run ([0-9a-f]+)", found["master_log"]).group(1)

    # More forgeries: a real message's id over other content, and the message
    # with "/" in its id once more (identical: it replaces its own reject).
    records = topic_records(bootstrap, env.topic)
    # (the message of zipped.log.gz's first layout, wherever the balancer put it)
    real = next(r for r in records if dict(r.headers).get("spot.source") == b"zipped.log.gz"
                and dict(r.headers).get("spot.fields") == " ".join(MAIN27.split()).encode())
    other = list(log_lines(20, MAIN27, seed=66, start=DAY + 18000))
    same_id = ("\n".join(other).encode(), list(real.headers))
    [found["same_id"], found["slash_again"]] = send(bootstrap, env.topic,
                                                    [(*same_id, 1), (*slash, 0)])
    found["real"] = (real.value, real.headers)
    found["same_id_msg"] = same_id
    found["same_id_rows"] = proxy_reference_rows(other, MAIN27)

    # Run 2: the job alone, from scratch over the whole topic (its checkpoint
    # removed), as after any number of restarts.
    shutil.rmtree(env.warehouse / "proxy" / "_checkpoints" / env.pipeline)
    found["run2"] = subprocess.run(
        [sys.executable, "-m", "spot_ingest.cli", "stream", "-t", env.pipeline, "-c",
         str(env.config), "--partitions", "2", "--run-id", run_id],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    found["rows2"] = proxy_table_rows(env.hive)
    found["rejects2"] = proxy_rejects(env.warehouse)
    yield found
    env.stop_all()


def test_log_gz_is_published_as_its_lines_and_a_truncated_gz_is_set_aside(edges):
    env = edges["env"]
    assert sorted(map(proxy_key, edges["rows1"])) == sorted(map(proxy_key, edges["expected"]))
    assert not set(map(proxy_key, edges["cut_expected"])) & set(map(proxy_key, edges["rows1"]))
    aside = env.staging / "quarantine" / env.pipeline
    assert (aside / "cut.log.gz").read_bytes() == edges["cut_bytes"], "kept whole, set aside"
    reason = (aside / "cut.log.gz.reason.txt").read_text()
    assert "cut.log.gz is not a readable gzip file" in reason and "none of its lines" in reason
    assert re.search(r"rejected .*cut\.log\.gz: cut\.log\.gz is not a readable gzip file",
                     edges["master_log"])
    assert not list(env.collector.iterdir()), "the good files were let go"
    assert not [r for r in edges["rejects1"] if r["source"] == "zipped.log.gz"]


def test_forged_messages_are_rejected_not_a_failed_batch_and_never_replace_real_rows(edges):
    env = edges["env"]
    run1, run2 = edges["run1"], edges["run2"]
    # Neither run failed a batch; both report the rejected input (exit code 3).
    assert "streaming job: 3" in run1.stdout, run1.stdout + run1.stderr
    assert run2.returncode == 3, run2.stdout[-3000:] + run2.stderr[-3000:]
    for out in (edges["job_log1"], run2.stdout + run2.stderr):
        assert not re.search(r"batch \d+ failed|query failed", out) and "end of run" in out
    reasons = {
        "slash": "bad spot.id '../../../../tmp/evil' (not 24 hex digits, '-' and 6 digits)",
        "no_id": "missing spot.id header",
        "no_fields": "missing spot.fields header",
        "bad_end": "bad END_OF_RUN marker: spot.run 'x|1|../0'",
    }
    # The message with "/" in its id came twice, identical: its reject row is
    # kept once, from its first coming (the second is held already).
    assert edges["slash_again"].offset > edges["forged"]["slash"].offset
    for rejects in (edges["rejects1"], edges["rejects2"]):
        messages = {r["reason"]: r for r in rejects if r["line_no"] is None}
        assert sorted(messages) == sorted(reasons.values()), "one reject row per message"
        for name, reason in reasons.items():
            sent = edges["forged"][name]
            assert (messages[reason]["kafka_partition"], messages[reason]["kafka_offset"]) == \
                (sent.partition, sent.offset), name
    assert not set(map(proxy_key, edges["forged_lines"])) & set(map(proxy_key, edges["rows2"]))
    # A real message's id over other content writes a file of its own; the
    # real message's file keeps its rows, and re-reading the whole topic
    # doubles nothing.
    real_value, real_headers = edges["real"]
    assert files_holding(env.hive, f"part-{output_name(real_value, real_headers)}")
    real_lines = real_value.decode().split("\n")
    real_rows = Counter(map(proxy_key, proxy_reference_rows(
        real_lines, dict(real_headers)["spot.fields"].decode())))
    assert not real_rows - Counter(map(proxy_key, edges["rows2"]))
    assert files_holding(env.hive, f"part-{output_name(*edges['same_id_msg'])}")
    assert sorted(map(proxy_key, edges["rows2"])) == sorted(map(proxy_key, edges["expected"] +
                                                          edges["same_id_rows"]))
    line_rejects = [sorted((r["source"], r["line_no"], r["reason"]) for r in rejects
                           if r["line_no"] is not None)
                    for rejects in (edges["rejects1"], edges["rejects2"])]
    assert line_rejects[0] == line_rejects[1] and line_rejects[0]


def test_nul_line_and_duplicate_field_header_are_rejected_with_reasons(edges):
    dup = "the #Fields: header names cs-host more than once"
    odd = sorted(((r["line_no"], r["reason"], r["line"]) for r in edges["rejects1"]
                  if r["source"] == "odd.log"), key=lambda r: r[0])
    n, h = edges["nul_line_no"], edges["dup_header_line_no"]
    assert [(line_no, reason) for line_no, reason, _ in odd] == \
        [(n, "NUL byte in the line"), (h + 1, dup), (h + 2, dup), (h + 3, dup)]
    assert "\0" in odd[0][2] and [line for _, _, line in odd[1:]] == edges["dup_lines"]
    assert f"odd.log line {h}: {dup}; every line under it is rejected" in edges["master_log"]
    job_log = edges["job_log1"]
    assert re.search(rf"totals: {len(edges['expected'])} rows, 4 rejects, 4 rejected message",
                     job_log), job_log[-3000:]


# -- a log that grows after the master read it -------------------------------

def processed_everything(env: Env, bootstrap: str) -> bool:
    """The job committed a batch that ends at the topic's end: every record
    published so far is in the table (Spark's checkpoint says so)."""
    from kafka import KafkaConsumer, TopicPartition
    checkpoint = env.warehouse / "proxy" / "_checkpoints" / env.pipeline
    commits = [int(p.name) for p in (checkpoint / "commits").glob("[0-9]*")] \
        if (checkpoint / "commits").is_dir() else []
    if not commits:
        return False
    done = json.loads((checkpoint / "offsets" / str(max(commits))).read_text().splitlines()[-1])
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(env.topic, p) for p in consumer.partitions_for_topic(env.topic)]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    return all(int(done.get(str(tp.partition), 0)) >= end for tp, end in ends.items())


def test_grown_log_loses_no_line_and_doubles_none(make_env):
    """The writer pauses longer than settle_seconds in the middle of a line;
    the master takes the file, and the writer finishes the line and appends
    the second half while the master publishes the first (the broker is
    paused so that this happens then). Every line lands exactly once."""
    with EmbeddedBroker() as own:
        env = make_env("grow", pipeline="proxy_grow", ptype="proxy", supported_files=[".log"])
        env.data["kafka"]["kafka_port"] = str(own.port)
        env.data["kafka"]["message_size"] = 20000       # several messages per half
        env.data["collector_processes"] = 1   # its producer is connected before the pause
        env.data["spark-streaming"] = {"spark_batch_size": "1"}
        env.config.write_text(json.dumps(env.data))
        bootstrap = f"127.0.0.1:{own.port}"
        warm = list(log_lines(20, MAIN27, seed=70, start=DAY))
        first = list(log_lines(300, MAIN27, seed=71, start=DAY + 3600))
        second = list(log_lines(300, MAIN27, seed=72, start=DAY + 7200))
        job = env.spawn("stream", "--partitions", "1", log_name="stream.log")
        master = env.master(1)
        (env.collector / "warm.log").write_text("\n".join(header(MAIN27) + warm) + "\n")
        wait_for(lambda: "published warm.log" in env.log("master.log"), 120, "a first log")
        grow = env.collector / "grow.log"
        head = "\n".join(header(MAIN27) + first) + "\n"
        own.proc.send_signal(signal.SIGSTOP)   # acknowledgements wait for the broker
        try:
            with open(grow, "w") as f:
                f.write(head + second[0][:30])     # the writer pauses mid-line
            wait_for(lambda: f"publishing grow.log: bytes 0-{len(head)}," in env.log("master.log"),
                     60, "the master to read the first half")
            with open(grow, "a") as f:
                f.write(second[0][30:] + "\n" + "\n".join(second[1:]) + "\n")
        finally:
            own.proc.send_signal(signal.SIGCONT)
        total = len(head) + len("\n".join(second)) + 1
        wait_for(lambda: not grow.exists(), 120, "the grown log to be published and let go")
        log = env.log("master.log")
        assert "grow.log changed while it was being ingested" in log
        assert f"publishing grow.log: bytes {len(head)}-{total}, from line {len(header(MAIN27)) + 301}" \
            in log, "the second time, only what follows the first half"
        wait_for(lambda: processed_everything(env, bootstrap), 240, "the job to load every message")
        rows = proxy_table_rows(env.hive)
        expected = proxy_reference_rows(warm + first + second, MAIN27)
        assert sorted(map(proxy_key, rows)) == sorted(map(proxy_key, expected)), "every line once"
        assert not proxy_rejects(env.warehouse)
        assert job.poll() is None and master.poll() is None
