"""Proxy benchmark: the Spark job against the original's per-line shlex parsing.

    python -m benchmarks.bench_proxy [--workdir DIR] [--lines 1000000] [--trigger 2]

(a) one Python process parsing every line of a 1,000,000-line log (the
    original Spot 27-field layout) with ``shlex.split`` and mapping it to the
    table's columns, as the original job's per-row function did;
(b) the Spark Structured Streaming job (local, all cores) ingesting the same
    lines from the topic into the table: lines per second from the query's
    start to the end-of-run marker, and without Spark's start-up;
(c) end-to-end latency under a steady feed: messages published at a fixed
    rate, each timed from its publication to the moment its Parquet file is in
    the table; p50 and p95 against the trigger interval.
Targets: (b) >= 3x (a); p95 <= 3 trigger intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pyarrow.parquet as pq
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spot_ingest import lines as line_protocol  # noqa: E402
from spot_ingest.lines import Message, output_name  # noqa: E402
from spot_ingest.warehouse import INPUTS_KEY  # noqa: E402
from spot_ingest.pipelines.proxy import COLUMNS, ORIGINAL_FIELDS, PROXY  # noqa: E402
from spot_ingest.pipelines.proxy.sample import log_lines, write_log  # noqa: E402
from spot_ingest.broker import EmbeddedBroker  # noqa: E402
from spot_ingest.bus import ensure_topic  # noqa: E402
from spot_ingest.config import KafkaConfig  # noqa: E402
from spot_ingest.kafka_security import client_kwargs  # noqa: E402


def shlex_baseline(path: Path) -> tuple[int, float]:
    names = ORIGINAL_FIELDS.split()
    index = {name: i for i, name in enumerate(names)}
    start = time.perf_counter()
    n = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("#"):
                continue
            tokens = shlex.split(line)
            row = [tokens[index[name]] if name else None for _, name in COLUMNS]
            row[-1] = tokens[index["cs-host"]] + tokens[index["cs-uri-path"]] + tokens[index["cs-uri-query"]]
            n += 1
    return n, time.perf_counter() - start


def write_conf(root: Path, bootstrap: str, topic: str, trigger: float) -> Path:
    host, port = bootstrap.split(":")
    conf = root / "ingest_conf.json"
    (root / "collector").mkdir(parents=True, exist_ok=True)
    conf.write_text(json.dumps({
        "dbname": "bench", "hdfs_app_path": str(root / "warehouse"), "collector_processes": 2,
        "ingestion_interval": 0.2, "log_dir": str(root / "logs"),
        "spark-streaming": {"spark_batch_size": str(trigger)},
        "kafka": {"kafka_server": host, "kafka_port": port, "message_size": 900000},
        "pipelines": {"bench_proxy": {"type": "proxy", "collector_path": str(root / "collector"),
                                      "local_staging": str(root / "staging"), "topic": topic,
                                      "supported_files": [".log"]}}}))
    return conf


def publish(kafka: KafkaConfig, topic: str, path: Path, partitions: int) -> int:
    from kafka import KafkaProducer
    producer = KafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=0,
                             max_request_size=1_000_000)
    n = 0
    for item in line_protocol.cut(path, path.name, 900_000, PROXY):
        if isinstance(item, Message):
            producer.send(topic, item.value, partition=n % partitions, headers=item.headers).get(60)
            n += 1
    producer.close()
    return n


def throughput(workdir: Path, log: Path, lines: int, trigger: float) -> None:
    run = uuid.uuid4().hex[:8]
    root = workdir / f"proxy-run-{run}"
    with EmbeddedBroker() as broker:
        topic = f"bench-proxy-{run}"
        kafka = KafkaConfig(broker.host, broker.port)
        ensure_topic(kafka, topic, 2)
        messages = publish(kafka, topic, log, 2)
        from kafka import KafkaProducer
        producer = KafkaProducer(**client_kwargs(kafka), acks="all")
        for p in range(2):
            producer.send(topic, b"", partition=p, headers=[("spot.kind", b"END_OF_RUN"),
                                                            ("spot.run", run.encode())]).get(30)
        producer.close()
        conf = write_conf(root, broker.bootstrap, topic, trigger)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "stream", "-t", "bench_proxy",
                               "-c", str(conf), "--partitions", "2", "--run-id", run],
                              capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or f"done: {lines} rows" not in out:
        raise SystemExit(f"job failed or incomplete:\n{out[-3000:]}")
    started = re.search(r"(\d\d:\d\d:\d\d,\d+) .* spot_ingest.streaming: streaming ", out).group(1)
    ended = re.findall(r"(\d\d:\d\d:\d\d,\d+) .* spot_ingest.streaming: batch \d+: ", out)[-1]
    to_s = lambda t: sum(float(x) * m for x, m in zip(t.replace(",", ".").split(":"), (3600, 60, 1)))  # noqa: E731
    streaming = to_s(ended) - to_s(started)
    hive = root / "warehouse" / "proxy" / "hive"
    files = list(hive.rglob("*.parquet"))
    partitions = {f.parent for f in files}
    batches = len(re.findall(r"spot_ingest.streaming: batch \d+: [1-9]", out))
    print(f"    {len(files)} Parquet files in {len(partitions)} partition(s) from {batches} "
          f"micro-batch(es) with messages")
    print(f"(b) Spark job, {messages} messages: {wall:6.1f} s with start-up "
          f"({lines / wall:,.0f} lines/s); {streaming:6.1f} s from query start to the last batch "
          f"({lines / streaming:,.0f} lines/s)")
    return lines / wall, lines / streaming


def latency(workdir: Path, trigger: float, rate: int, seconds: int) -> None:
    run = uuid.uuid4().hex[:8]
    root = workdir / f"proxy-lat-{run}"
    hive = root / "warehouse" / "proxy" / "hive"
    with EmbeddedBroker() as broker:
        topic = f"bench-lat-{run}"
        kafka = KafkaConfig(broker.host, broker.port)
        ensure_topic(kafka, topic, 2)
        conf = write_conf(root, broker.bootstrap, topic, trigger)
        log_dir = root / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        job = subprocess.Popen([sys.executable, "-m", "spot_ingest.cli", "stream", "-t",
                                "bench_proxy", "-c", str(conf), "--partitions", "2"],
                               stdout=open(log_dir / "job.log", "w"), stderr=subprocess.STDOUT,
                               cwd=REPO)
        try:
            deadline = time.monotonic() + 120
            while "streaming bench" not in (log_dir / "job.log").read_text():
                if time.monotonic() > deadline or job.poll() is not None:
                    raise SystemExit("the job did not start")
                time.sleep(0.2)
            # Steady state: the feed starts once the query ran its first batch.
            while "spot_ingest.streaming: batch 0:" not in (log_dir / "job.log").read_text():
                if time.monotonic() > deadline or job.poll() is not None:
                    raise SystemExit("the job ran no batch")
                time.sleep(0.2)
            sent: dict[str, float] = {}
            seen: dict[str, float] = {}
            read_files: set[Path] = set()
            stop = threading.Event()

            def watch():
                while not stop.is_set() or len(seen) < len(sent):
                    if hive.exists():
                        # A file holds a micro-batch: its metadata names its messages.
                        for f in hive.rglob("*.parquet"):
                            if f in read_files:
                                continue
                            now = time.time()
                            try:
                                meta = pq.read_metadata(f).metadata or {}
                            except OSError:
                                continue
                            read_files.add(f)
                            for name in json.loads(meta.get(INPUTS_KEY, b"[]")):
                                seen.setdefault(name[len("part-"):], now)
                    time.sleep(0.05)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            from kafka import KafkaProducer
            producer = KafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=0)
            per_msg = max(1, rate // 4)          # 4 messages a second
            t0 = time.time()
            for i in range(seconds * 4):
                lines = list(log_lines(per_msg, ORIGINAL_FIELDS, seed=i, start=time.time()))
                path = root / "feed.log"
                path.write_text("\n".join(lines) + "\n")
                [msg] = [m for m in line_protocol.cut(path, f"feed{i}.log", 900_000, PROXY)]
                mid = output_name(msg.value, msg.headers)   # the job names its output so
                sent[mid] = time.time()
                producer.send(topic, msg.value, partition=i % 2, headers=msg.headers).get(30)
                time.sleep(max(0.0, t0 + (i + 1) / 4 - time.time()))
            producer.close()
            stop.set()
            watcher.join(timeout=120)
        finally:
            job.terminate()
            job.wait(timeout=60)
    lat = sorted(seen[m] - sent[m] for m in sent if m in seen)
    if len(lat) < len(sent):
        print(f"warning: {len(sent) - len(lat)} message(s) not seen in time")
    p50, p95 = lat[len(lat) // 2], lat[int(len(lat) * 0.95) - 1]
    print(f"(c) latency at {rate} lines/s for {seconds} s, trigger {trigger:g} s: p50 {p50:.2f} s, "
          f"p95 {p95:.2f} s = {p95 / trigger:.1f} trigger intervals (target <= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--trigger", type=float, default=2.0)
    parser.add_argument("--rate", type=int, default=5000, help="lines/s for the latency feed")
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    log = args.workdir / f"proxy-{args.lines}.log"
    if not log.exists():
        print(f"writing {log} ...", flush=True)
        write_log(log, args.lines, seed=3, layout="original", start=1795248000)
    print(f"log: {log} ({args.lines} lines, {log.stat().st_size / 1e6:.0f} MB), {os.cpu_count()} cores")
    n, a = shlex_baseline(log)
    print(f"(a) one Python process, shlex per line: {a:6.1f} s ({n / a:,.0f} lines/s)")
    with_startup, steady = throughput(args.workdir, log, args.lines, args.trigger)
    print(f"ratio (b)/(a) in lines/s: {with_startup / (n / a):.1f}x with Spark's start-up, "
          f"{steady / (n / a):.1f}x without (target >= 3)")
    latency(args.workdir, args.trigger, args.rate, args.seconds)


if __name__ == "__main__":
    main()
