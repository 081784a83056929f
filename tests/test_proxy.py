"""Proxy pipeline: Blue Coat logs -> master -> Kafka -> Spark Structured Streaming -> table.

No ProxySG appliance runs here, so the log lines are written by
pipelines/proxy/sample.py in the appliance's ELFF format (the one input in
this suite not made by a real tool). Broker, master and Spark are real. The
expected rows come from an independent reading of the same lines with
Python's csv module.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, STORES, wait_for
from reference import proxy_key, proxy_reference_rows, proxy_rejects, proxy_table_rows
from spot_ingest import lines as line_protocol
from spot_ingest.lines import Message, SetAside
from spot_ingest.pipelines.proxy import ORIGINAL_FIELDS, PROXY
from spot_ingest.pipelines.proxy.sample import LAYOUTS, header, log_lines

BAD_LINES = {
    "unbalanced quotes": '2026-11-21 08:00:00 5 10.0.0.1 "unclosed agent',
    "bad date or time": None,   # built from a good line below
    "invalid UTF-8": None,
    "wrong field count": "2026-11-21 08:00:01 too few fields",
}


# -- the master's side: messages -------------------------------------------

def test_messages_never_split_a_line_and_carry_their_header(tmp_path):
    path = tmp_path / "a.log"
    first = list(log_lines(300, LAYOUTS["main27"], seed=1))
    second = list(log_lines(200, LAYOUTS["extras"], seed=2))
    long_line = "2026-11-21 08:00:00 " + "x" * 5000
    with open(path, "w") as f:
        f.write("\n".join(header(LAYOUTS["main27"]) + first + [long_line] +
                          header(LAYOUTS["extras"]) + second) + "\n")
    items = list(line_protocol.cut(path, "a.log", 4096, PROXY))
    messages = [i for i in items if isinstance(i, Message)]
    aside = [i for i in items if isinstance(i, SetAside)]
    assert len(aside) == 1 and aside[0].data == long_line.encode()
    assert "longer than a message may be" in aside[0].reason and "a.log" in aside[0].reason
    assert len(messages) > 10
    published, fields_seen = [], []
    for m in messages:
        headers = dict(m.headers)
        assert len(m.value) + sum(len(k) + len(v) for k, v in m.headers) <= 4096
        published.extend(m.value.decode().split("\n"))
        fields_seen.append(headers["spot.fields"].decode())
    assert published == first + second, "every line whole, in order, once"
    assert set(fields_seen) == {LAYOUTS["main27"], LAYOUTS["extras"]}
    again = [i for i in line_protocol.cut(path, "a.log", 4096, PROXY) if isinstance(i, Message)]
    assert [dict(m.headers)["spot.id"] for m in again] == \
        [dict(m.headers)["spot.id"] for m in messages], "ids are deterministic"


def test_a_log_without_header_uses_the_original_field_order(tmp_path):
    path = tmp_path / "plain.log"
    path.write_text("\n".join(log_lines(5, ORIGINAL_FIELDS)) + "\n")
    [msg] = list(line_protocol.cut(path, "plain.log", 900_000, PROXY))
    assert dict(msg.headers)["spot.fields"].decode() == ORIGINAL_FIELDS


# -- end to end through Spark ------------------------------------------------

def make_logs(collector: Path, tmp_path: Path) -> tuple[list[dict], dict]:
    """Logs in several layouts plus bad lines; returns expected rows and rejects."""
    expected = []
    for i, layout in enumerate(("original", "main24", "main27", "extras")):
        lines = list(log_lines(400, LAYOUTS[layout], seed=10 + i, start=1795248000 + 1800 * i))
        expected += proxy_reference_rows(lines, LAYOUTS[layout])
        body = header(LAYOUTS[layout]) + lines
        if layout == "main27":
            good = lines[0]
            body += [BAD_LINES["unbalanced quotes"], BAD_LINES["wrong field count"],
                     good.replace(good[:10], "2026-13-45", 1)]
            (collector / f"{layout}.log").write_text("\n".join(body) + "\n")
            with open(collector / f"{layout}.log", "ab") as f:
                f.write(good.encode().replace(b"GET", b"G\xffT").replace(b"POST", b"P\xffST")
                        .replace(b"CONNECT", b"C\xffNNECT") + b"\n")
                f.write(b"2026-11-21 08:00:00 " + b"y" * 2_000_000 + b"\n")   # 2 MB line
        else:
            (collector / f"{layout}.log").write_text("\n".join(body) + "\n")
    rejects = {"unbalanced quotes": 1, "expected 27 fields, found 5": 1, "bad date or time": 1,
               "invalid UTF-8": 1}
    return expected, rejects


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_logs_become_exactly_their_rows_with_rejects_counted(make_env, tmp_path):
    env = make_env("proxy", pipeline="proxy_test", ptype="proxy", supported_files=[".log"])
    env.data["spark-streaming"] = {"spark_batch_size": "2"}
    env.config.write_text(json.dumps(env.data))
    expected, rejects = make_logs(env.collector, tmp_path)
    logs = len(list(env.collector.glob("*.log")))
    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                             "-c", str(env.config)], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, "a line was set aside by the master: the run reports it"
    rows = proxy_table_rows(env.hive)
    assert sorted(map(proxy_key, rows)) == sorted(map(proxy_key, expected))
    # Partitions: zero-padded strings from each line's date and time.
    parts = {(r["y"], r["m"], r["d"], r["h"]) for r in rows}
    assert parts == {(e["p_date"][:4], e["p_date"][5:7], e["p_date"][8:10], e["p_time"][:2])
                     for e in expected}
    assert all(len(p) == 2 for part in parts for p in part[1:])
    agents = {r["useragent"] for r in rows}
    assert any(" " in a for a in agents if a), "quoted values keep their spaces"
    assert any(r["webcat"] == "Web Ads/Analytics" for r in rows)
    # Rejects: stored with their reason and counted.
    stored = proxy_rejects(env.warehouse)
    assert sorted(r["reason"] for r in stored) == sorted(rejects)
    assert all(r["source"] == "main27.log" and r["line_no"] > 400 for r in stored)
    job_log = env.log(f"{env.pipeline}-stream.log")
    assert f"totals: {len(expected)} rows, {len(rejects)} rejects" in job_log
    # The 2 MB line was set aside by the master, with a clear message.
    master_log = env.log(f"{env.pipeline}-master.log")
    assert "main27.log is 2000020 bytes, longer than a message may be" in master_log
    assert list((env.staging / "quarantine" / env.pipeline).glob("main27.log.line*"))
    # The streaming job's reports, rolled up: the same rows and rejects.
    report = json.loads(subprocess.run(
        [sys.executable, "-m", "spot_ingest.cli", "report", "-t", env.pipeline, "-c",
         str(env.config), "--json"], capture_output=True, text=True, timeout=120,
        cwd=REPO, check=True).stdout)
    assert report["batches"] >= 1 and report["records"] == len(expected)
    assert report["rejected_lines"] == len(rejects)
    assert report["files_received"] == logs


def test_job_killed_mid_stream_restarts_from_its_checkpoint_exactly_once(make_env, tmp_path):
    env = make_env("proxy", pipeline="proxy_test", ptype="proxy", supported_files=[".log"])
    env.data["spark-streaming"] = {"spark_batch_size": "1"}
    env.data["kafka"]["message_size"] = 20000     # many small messages, many batches
    import json
    env.config.write_text(json.dumps(env.data))
    expected = []

    def drop(i):
        lines = list(log_lines(500, LAYOUTS["main27"], seed=40 + i, start=1795248000 + 600 * i))
        expected.extend(proxy_reference_rows(lines, LAYOUTS["main27"]))
        path = tmp_path / f"part{i}.log"
        path.write_text("\n".join(header(LAYOUTS["main27"]) + lines) + "\n")
        os.replace(path, env.collector / path.name)

    job = env.spawn("stream", "--partitions", "2", log_name="stream-1.log")
    master = env.master(2)
    for i in range(3):
        drop(i)
    wait_for(lambda: re.search(r"batch \d+: [1-9]\d* message", env.log("stream-1.log")), 240,
             "a first committed batch")
    for i in range(3, 8):
        drop(i)
    wait_for(lambda: "published part7.log" in env.log("master.log"), 60, "the second wave")
    env.kill(job)   # wherever it is: reading, parsing, writing or committing
    done_before = len(proxy_table_rows(env.hive))
    assert done_before < len(expected), "the kill came too late to test anything"
    import random
    rnd = random.Random(2)
    for attempt in range(2, 4):   # two more kills, at random moments of a restarted job
        job = env.spawn("stream", "--partitions", "2", log_name=f"stream-{attempt}.log")
        wait_for(lambda a=attempt: "streaming" in env.log(f"stream-{a}.log"), 120, "a restart")
        import time
        time.sleep(rnd.uniform(1, 6))
        env.kill(job)
    env.spawn("stream", "--partitions", "2", log_name="stream-4.log")
    wait_for(lambda: len(proxy_table_rows(env.hive)) >= len(expected), 300,
             "every row after the restart")
    rows = proxy_table_rows(env.hive)
    assert sorted(map(proxy_key, rows)) == sorted(map(proxy_key, expected)), \
        "no row lost, none doubled"
    assert master.poll() is None


def test_streaming_job_listens_on_loopback_only_and_cleans_up(make_env):
    """The Spark driver and its UI are not reachable from other hosts unless
    configured, its Python workers run the job's own interpreter, and it
    leaves no code archive behind."""
    import glob

    import psutil
    env = make_env("proxy", pipeline="proxy_test", ptype="proxy", supported_files=[".log"])
    (env.collector / "one.log").write_text(
        "\n".join(header(LAYOUTS["main27"]) + list(log_lines(50, LAYOUTS["main27"]))) + "\n")
    job = env.spawn("stream", "--partitions", "1", log_name="stream.log")
    env.master(1)
    wait_for(lambda: re.search(r"batch \d+: 1 message\(s\), 50 rows", env.log("stream.log")), 240,
             "the log's 50 rows, parsed by Spark's Python workers")
    listening = []
    for child in psutil.Process(job.pid).children(recursive=True):
        try:   # Spark's short-lived helper processes may be gone by now
            listening += [c.laddr for c in child.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
        except (psutil.Error, FileNotFoundError):
            continue
    assert listening, "the driver listens (block manager, UI)"
    assert {a.ip for a in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    ours = [d for d in glob.glob("/tmp/spot-ingest-code-*") if d.split("-")[3] == str(job.pid)]
    assert len(ours) == 1, "the job ships its code from a private directory"
    job.send_signal(15)
    assert job.wait(timeout=120) == 0
    assert not os.path.exists(ours[0]), "the code archive is removed when the job ends"


# -- the master's side: .gz, headers, a log that grows -----------------------

def _lines_of(messages) -> list[str]:
    return [line for m in messages for line in m.value.decode().split("\n")]


def test_log_gz_is_cut_into_its_lines_and_a_truncated_one_publishes_nothing(tmp_path):
    import gzip

    from spot_ingest.pipeline import BadInputError
    lines = list(log_lines(2000, LAYOUTS["main27"], seed=3))
    body = ("\n".join(header(LAYOUTS["main27"]) + lines) + "\n").encode()
    (tmp_path / "a.log.gz").write_bytes(gzip.compress(body))
    messages = list(line_protocol.cut(tmp_path / "a.log.gz", "a.log.gz", 50_000, PROXY))
    assert len(messages) > 5 and _lines_of(messages) == lines
    whole = gzip.compress(body)
    for cut in (whole[:len(whole) // 2], whole[:-3], whole[:-20] + b"\0" * 20):
        (tmp_path / "cut.log.gz").write_bytes(cut)
        items = line_protocol.cut(tmp_path / "cut.log.gz", "cut.log.gz", 50_000, PROXY)
        try:
            first = next(items)
        except BadInputError as exc:
            assert "cut.log.gz is not a readable gzip file" in str(exc)
        else:
            raise AssertionError(f"a damaged .gz yielded {type(first).__name__} before failing")


def test_duplicate_field_header_marks_every_message_under_it(tmp_path):
    path = tmp_path / "dup.log"
    lines = list(log_lines(30, LAYOUTS["main27"], seed=4))
    path.write_text("\n".join([f"#Fields: {LAYOUTS['main27']} cs-host"] + lines[:10] +
                              header(LAYOUTS["main27"]) + lines[10:]) + "\n")
    first, second = list(line_protocol.cut(path, "dup.log", 900_000, PROXY))
    assert dict(first.headers)["spot.fields_error"] == b"the #Fields: header names cs-host more than once"
    assert "spot.fields_error" not in dict(second.headers)
    assert _lines_of([first]) == lines[:10] and _lines_of([second]) == lines[10:]


def test_master_killed_mid_file_republishes_the_same_messages_then_only_new_lines(tmp_path):
    """A grown log loses no line and doubles none, on the master's side: a
    publication stopped half-way is cut again byte for byte (same ids, same
    output names), and a file offered again publishes only what follows."""
    from spot_ingest.lines import MESSAGE_ID_PATTERN, output_name
    state = tmp_path / "state"
    path = tmp_path / "grow.log"
    lines = list(log_lines(3000, LAYOUTS["main27"], seed=5))
    text = "\n".join(header(LAYOUTS["main27"]) + lines) + "\n"
    half = text.index(lines[1500]) + 40          # the writer stops in the middle of a line
    path.write_text(text[:half])
    items = line_protocol.cut(path, "grow.log", 20_000, PROXY, state_dir=state)
    sent = [next(items), next(items), next(items)]
    items.close()                                 # the master dies before the rest
    with open(path, "a") as f:                    # ... and the writer comes back
        f.write(text[half:])
    again = list(line_protocol.cut(path, "grow.log", 20_000, PROXY, state_dir=state))
    assert [(m.value, m.headers) for m in again[:3]] == [(m.value, m.headers) for m in sent]
    assert [output_name(m.value, m.headers) for m in again[:3]] == \
        [output_name(m.value, m.headers) for m in sent]
    assert _lines_of(again) == lines, "every line once, the cut one whole"
    assert all(re.fullmatch(MESSAGE_ID_PATTERN, dict(m.headers)["spot.id"].decode()) for m in again)
    assert len({dict(m.headers)["spot.id"] for m in again}) == len(again)
    assert list(line_protocol.cut(path, "grow.log", 20_000, PROXY, state_dir=state)) == []
    with open(path, "a") as f:
        f.write(lines[0] + "\n")
    [more] = list(line_protocol.cut(path, "grow.log", 20_000, PROXY, state_dir=state))
    assert more.value.decode() == lines[0]
    assert dict(more.headers)["spot.first_line"] == str(len(lines) + 5).encode()


def test_last_line_without_newline_waits_while_the_file_grows(tmp_path):
    state = tmp_path / "state"
    path = tmp_path / "tail.log"
    lines = list(log_lines(20, LAYOUTS["main27"], seed=6))
    path.write_text("\n".join(lines[:10]) + "\n" + lines[10][:50])
    items = line_protocol.cut(path, "tail.log", 900_000, PROXY, state_dir=state)
    first = next(items)
    with open(path, "a") as f:                    # the writer goes on during the read
        f.write(lines[10][50:] + "\n")
    assert list(items) == [], "the cut line is not published while the file grows"
    assert _lines_of([first]) == lines[:10]
    [rest] = list(line_protocol.cut(path, "tail.log", 900_000, PROXY, state_dir=state))
    assert _lines_of([rest]) == [lines[10]]
    with open(path, "a") as f:                    # a final line without newline
        f.write(lines[11])
    [last] = list(line_protocol.cut(path, "tail.log", 900_000, PROXY, state_dir=state))
    assert _lines_of([last]) == [lines[11]], "an unchanged file is final: its last line is published"


def test_new_file_reusing_the_inode_is_published_from_its_start(tmp_path):
    state = tmp_path / "state"
    path = tmp_path / "reuse.log"
    old = list(log_lines(50, LAYOUTS["main27"], seed=7))
    new = list(log_lines(80, LAYOUTS["main27"], seed=8))
    path.write_text("\n".join(old) + "\n")
    assert _lines_of(line_protocol.cut(path, "reuse.log", 900_000, PROXY, state_dir=state)) == old
    with open(path, "r+") as f:                   # same inode, other content (copytruncate)
        f.truncate(0)
        f.write("\n".join(new) + "\n")
    assert _lines_of(line_protocol.cut(path, "reuse.log", 900_000, PROXY, state_dir=state)) == new


def test_one_file_per_batch_and_partition_and_a_message_published_again_is_not_doubled(
        make_env, tmp_path):
    from kafka import KafkaProducer
    from spot_ingest.bus import ensure_topic
    from spot_ingest.config import KafkaConfig

    env = make_env("proxy", pipeline="proxy_test", ptype="proxy", supported_files=[".log"])
    kafka = KafkaConfig(env.data["kafka"]["kafka_server"], int(env.data["kafka"]["kafka_port"]))
    ensure_topic(kafka, env.topic, 2)
    lines = list(log_lines(3000, ORIGINAL_FIELDS, seed=21, start=1795248000))
    log = tmp_path / "a.log"
    log.write_text("\n".join(lines) + "\n")
    messages = [m for m in line_protocol.cut(log, "a.log", 40_000, PROXY) if isinstance(m, Message)]
    assert len(messages) >= 10
    expected = sorted(map(proxy_key, proxy_reference_rows(lines, ORIGINAL_FIELDS)))

    def publish(items, run):
        producer = KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", linger_ms=0)
        for i, m in enumerate(items):
            producer.send(env.topic, m.value, partition=i % 2, headers=m.headers).get(30)
        marker = line_protocol.end_of_run(run)
        for p in (0, 1):
            producer.send(env.topic, marker.value, partition=p, headers=marker.headers).get(30)
        producer.close()

    def job(run):
        done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "stream", "-t",
                               env.pipeline, "-c", str(env.config), "--partitions", "2",
                               "--run-id", run], capture_output=True, text=True, timeout=600,
                              cwd=REPO)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    # The first message twice in the first batch, and again in a later one.
    publish(messages + messages[:1], "0000000a")
    out = job("0000000a")
    assert sorted(map(proxy_key, proxy_table_rows(env.hive))) == expected
    batches = len(re.findall(r"spot_ingest.streaming: batch \d+: [1-9]", out))
    files = {}
    for f in env.hive.rglob("*.parquet"):
        files.setdefault(f.parent, []).append(f)
    assert files and all(len(v) <= batches for v in files.values()), (files, batches)
    assert sum(len(v) for v in files.values()) < len(messages)

    publish(messages[:1], "0000000b")
    out = job("0000000b")
    assert "1 message(s) already in the table (published again)" in out
    assert sorted(map(proxy_key, proxy_table_rows(env.hive))) == expected
