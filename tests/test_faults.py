"""Faults injected into real processes: every test ends by comparing the table
with its source, row for row.

SIGKILL for crashes, SIGSTOP/SIGCONT for a broker outage (its storage is in
memory, so it cannot be restarted without losing topics), a small tmpfs for
a full disk.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import STORES, Env, wait_for
from reference import (dns_reference_rows, dns_table_rows, flow_reference_rows,
                       flow_table_rows)
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from spot_ingest.broker import EmbeddedBroker


def drop(env: Env, src: Path, name: str | None = None) -> None:
    dest = env.collector / (name or src.name)
    tmp = env.collector / f".{dest.name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


class Reader(threading.Thread):
    """Reads every Parquet file of the table over and over, as an analyst's
    query would, and records anything partial or temporary it ever sees."""

    def __init__(self, hive: Path):
        super().__init__(daemon=True)
        self.hive, self.problems, self.reads = hive, [], 0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            if not self.hive.exists():
                time.sleep(0.05)
                continue
            for f in self.hive.rglob("*"):
                if f.is_file() and not f.name.endswith(".parquet"):
                    self.problems.append(f"non-Parquet file visible: {f}")
                elif f.is_file():
                    try:
                        pq.read_table(f)
                        self.reads += 1
                    except FileNotFoundError:
                        pass          # replaced by a re-run between listing and reading
                    except Exception as exc:
                        self.problems.append(f"{f}: {exc}")


@pytest.fixture
def flow_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-src")
    return [make_nfcapd_file(root / f"nfcapd.2026112113{i:02d}", 30_000, seed=900 + i)
            for i in range(12)]


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_worker_killed_ten_times_loses_and_doubles_nothing(env, flow_sources):
    for f in flow_sources:
        drop(env, f)
    reader = Reader(env.hive)
    reader.start()
    env.master(1)
    rnd = random.Random(4)
    kills = 0
    worker = env.worker(0)
    while kills < 10:
        # Kill at a random moment: converting, writing, renaming or committing.
        time.sleep(rnd.uniform(0.3, 1.5))
        env.kill(worker)
        kills += 1
        worker = env.worker(0)
    expected = flow_reference_rows(flow_sources)
    wait_for(lambda: env.row_count() == len(expected), 300, "all rows after 10 kills")
    reader.stop.set()
    reader.join()
    assert flow_table_rows(env.table()) == expected
    assert len(list(env.hive.rglob("*.parquet"))) == len(flow_sources)
    assert not reader.problems, reader.problems[:5]
    assert reader.reads > 0
    assert kills == 10


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_master_killed_while_staging_and_while_announcing(make_env, tmp_path, broker):
    env = make_env("m", settle_seconds=0.2)
    big = [make_nfcapd_file(tmp_path / f"nfcapd.20261121140{i}", 400_000, seed=70 + i)
           for i in range(3)]
    for f in big:
        drop(env, f)
    incoming = env.warehouse / "flow" / "_incoming"
    master = env.master(1)
    # While staging: a partial copy is in the store's _incoming folder.
    wait_for(lambda: incoming.exists() and any(incoming.iterdir()), 60, "a copy in progress",
             interval=0.001)
    env.kill(master)
    killed_while_staging = any(incoming.iterdir())
    # While announcing: the broker stops answering once the master is
    # connected, and the master waits for the acknowledgement of a staged file.
    binary = env.warehouse / "flow" / "binary"
    staged_before = set(binary.rglob("*nfcapd*")) if binary.exists() else set()
    master = env.master(1)
    wait_for(lambda: env.log("master.log").count("watching") == 2, 60, "the second master")
    broker_pid = _broker_pid(broker)
    os.kill(broker_pid, signal.SIGSTOP)
    try:
        wait_for(lambda: set(binary.rglob("*nfcapd*")) - staged_before, 120,
                 "a file staged while the broker is silent")
        env.kill(master)
        waiting = [p for p in env.collector.iterdir() if not p.name.startswith(".")]
    finally:
        os.kill(broker_pid, signal.SIGCONT)
    assert len(waiting) == 3, "no file was forgotten before its announcement was acknowledged"
    assert killed_while_staging
    env.master(1)
    env.worker(0)
    expected = flow_reference_rows(big)
    wait_for(lambda: env.row_count() == len(expected), 300, "every file once")
    assert flow_table_rows(env.table()) == expected
    assert not [p for p in env.collector.iterdir() if not p.name.startswith(".")]


def _broker_pid(broker) -> int:
    import psutil
    for c in psutil.net_connections("tcp"):
        if c.laddr and c.laddr.port == broker[1] and c.status == psutil.CONN_LISTEN:
            return c.pid
    raise AssertionError("broker process not found")


def test_broker_paused_for_30_seconds(make_env, tmp_path, flow_sources):
    with EmbeddedBroker() as own:   # a broker of this test's own, to pause
        env = make_env("pause", settle_seconds=0.2)
        env.data["kafka"]["kafka_port"] = str(own.port)
        import json
        env.config.write_text(json.dumps(env.data))
        env.worker(0)
        env.master(1)
        for f in flow_sources[:3]:
            drop(env, f)
        wait_for(lambda: env.row_count() > 0, 120, "the ingest to be running")
        own.proc.send_signal(signal.SIGSTOP)
        paused = time.monotonic()
        for f in flow_sources[3:8]:
            drop(env, f)
        wait_for(lambda: time.monotonic() - paused >= 30, 40, "30 s of outage")
        own.proc.send_signal(signal.SIGCONT)
        expected = flow_reference_rows(flow_sources[:8])
        wait_for(lambda: env.row_count() == len(expected), 300, "every row after the outage")
        assert flow_table_rows(env.table()) == expected
        assert "has not acknowledged the announcement" in env.log("master.log")
        worker_log = env.log("worker-0.log")
        assert "is not answering" in worker_log or "could not commit offset" in worker_log
        assert "the broker answers again" in worker_log


def test_full_disk_under_the_warehouse(make_env, flow_sources):
    env = make_env("disk", settle_seconds=0.2)
    table_dir = env.warehouse / "flow"
    table_dir.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(table_dir)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test needs root to mount a tmpfs: {mounted.stderr}"
    try:
        for f in flow_sources[:3]:
            drop(env, f)
        env.master(1)
        wait_for(lambda: "staged and announced" in env.log("master.log") and
                 env.log("master.log").count("staged and announced") == 3, 60, "staging")
        filler = table_dir / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"],
                       capture_output=True)
        env.worker(0)
        wait_for(lambda: "No space left on device" in env.log("worker-0.log"), 60,
                 "the worker to say why it cannot write")
        assert env.row_count() == 0
        log_text = env.log("worker-0.log")
        assert "not committed, retry" in log_text
        filler.unlink()
        expected = flow_reference_rows(flow_sources[:3])
        wait_for(lambda: env.row_count() == len(expected), 180, "the load once space is back")
        assert flow_table_rows(env.table()) == expected
    finally:
        env.stop_all()
        subprocess.run(["umount", "-l", str(table_dir)], capture_output=True)


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_dns_worker_killed_ten_times_loses_and_doubles_nothing(make_env, tmp_path):
    from spot_ingest.pipelines.dns.sample import make_dns_capture
    env = make_env("dns", pipeline="dns_faults", ptype="dns", pkt_num=400,
                   supported_files=[".pcap"], settle_seconds=0.2)
    capture, _ = make_dns_capture(tmp_path / "src" / "big.pcap", 4000, seed=21)
    drop(env, capture)
    reader = Reader(env.hive)
    reader.start()
    env.master(1)
    rnd = random.Random(8)
    worker = env.worker(0)
    for _ in range(10):
        time.sleep(rnd.uniform(0.3, 1.2))
        env.kill(worker)
        worker = env.worker(0)
    expected = dns_reference_rows([capture])
    wait_for(lambda: env.row_count() == len(expected), 300, "every response after 10 kills")
    reader.stop.set()
    reader.join()
    assert dns_table_rows(env.table()) == expected
    assert not reader.problems, reader.problems[:5]


def test_unreachable_namenode_is_waited_for_by_master_and_worker(make_env, flow_sources):
    """HDFS (the WebHDFS stand-in) stops answering twice: while the worker
    has announced files to load, and while the master has files to stage.
    Both wait, saying so with the namenode's URL, and nothing is lost."""
    env = make_env("nn", store="hdfs", settle_seconds=0.2)
    first, second = flow_sources[:3], flow_sources[3:5]
    for f in first:
        drop(env, f)
    env.master(1)
    wait_for(lambda: not [p for p in env.collector.iterdir() if not p.name.startswith(".")],
             120, "the first files staged and announced")
    env.webhdfs.pause()
    try:
        env.worker(0)
        wait_for(lambda: "is not reachable" in env.log("worker-0.log"), 120,
                 "the worker to find the namenode gone")
        for f in second:
            drop(env, f)
        wait_for(lambda: "is not reachable" in env.log("master.log"), 120,
                 "the master to find the namenode gone")
    finally:
        env.webhdfs.resume()
    assert env.webhdfs.url in env.log("worker-0.log") and env.webhdfs.url in env.log("master.log")
    assert env.row_count() == 0
    expected = flow_reference_rows(first + second)
    wait_for(lambda: env.row_count() == len(expected), 240, "every file after the outage")
    assert flow_table_rows(env.table()) == expected
    assert len(list(env.hive.rglob("*.parquet"))) == len(first + second)
