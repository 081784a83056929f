"""A worker on another host whose link to the broker fails.

The worker runs in a network namespace of its own (a second "host", joined
to this one by a veth pair, addresses from 198.18.0.0/15, which is reserved
for benchmarking); the broker and the master stay on this host, and the
store is the shared directory an NFS mount would give. Taking the worker's
interface down makes every Kafka call fail with ENETUNREACH, the way a cut
cable or a dead switch port does (a paused broker, by contrast, only times
out). Needs root, as CI has.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from conftest import REPO, Env, wait_for
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from spot_ingest.broker import EmbeddedBroker
from spot_ingest.bus import PartitionReader
from spot_ingest.config import load

HOST_IP, WORKER_IP = "198.18.0.1", "198.18.0.2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def worker_host():
    """A network namespace joined to this host by a veth pair."""
    tag = uuid.uuid4().hex[:6]
    ns, host_end, ns_end = f"spot-w-{tag}", f"vh{tag}", f"vn{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
        ip("link", "set", ns_end, "netns", ns)
        ip("addr", "add", f"{HOST_IP}/30", "dev", host_end)
        ip("link", "set", host_end, "up")
        in_ns(ns, "addr", "add", f"{WORKER_IP}/30", "dev", ns_end)
        in_ns(ns, "link", "set", ns_end, "up")
        in_ns(ns, "link", "set", "lo", "up")
        yield ns, ns_end
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)


def in_ns(ns: str, *args: str) -> None:
    """``ip ARGS`` inside the namespace. nsenter only enters it; ``ip netns
    exec`` and ``ip -n`` also remount / and /sys, which fails inside a chroot
    (the fresh-system check runs this suite in one)."""
    subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "--", "ip", *args], check=True,
                   capture_output=True)


def link(ns: str, dev: str, state: str) -> None:
    in_ns(ns, "link", "set", dev, state)


class OffsetWatch(threading.Thread):
    """Reads the committed offset over and over, with the time of each read."""

    def __init__(self, kafka, topic: str, pipeline: str):
        super().__init__(daemon=True)
        self.reader = PartitionReader(kafka, topic, 0, pipeline)
        self.seen: list[int] = []
        self.times: list[float] = []
        self.stop = threading.Event()

    def longest_regression(self) -> float:
        """Seconds the broker held an offset older than one it held before."""
        longest, since, best = 0.0, None, -1
        for value, at in zip(self.seen, self.times):
            if value < best:
                since = at if since is None else since
                longest = max(longest, at - since)
            else:
                since, best = None, value
        return longest

    def run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                value = self.reader.committed(timeout_ms=3000)
            except Exception:       # the watcher's own reads may time out: keep watching
                continue
            if value is not None:
                self.seen.append(value)
                self.times.append(time.monotonic())

    def close(self) -> None:
        self.stop.set()
        self.join()
        self.reader.close()


def test_worker_survives_a_cut_link_and_stops_when_told_during_one(tmp_path, worker_host):
    ns, dev = worker_host
    with EmbeddedBroker(host=HOST_IP) as broker:
        env = Env(tmp_path, (HOST_IP, broker.port))
        try:
            files = [make_nfcapd_file(tmp_path / "src" / f"nfcapd.20261121150{i}", 20_000,
                                      seed=80 + i) for i in range(8)]
            log_path = env.logs / "worker-0.log"
            out = open(log_path, "ab")
            worker = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "--", sys.executable, "-m", "spot_ingest.cli",
                 "worker",
                 "-t", env.pipeline, "-i", "0", "-c", str(env.config)],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            out.close()
            env.procs.append(worker)
            env.master(1)
            watch = OffsetWatch(load(env.config).kafka, env.topic, env.pipeline)
            watch.start()
            for f in files[:4]:
                shutil.copyfile(f, env.collector / f.name)
            wait_for(lambda: watch.seen and watch.seen[-1] > 0, 120, "a first commit")

            link(ns, dev, "down")
            cut = time.monotonic()
            for f in files[4:]:      # announced while the worker cannot hear
                shutil.copyfile(f, env.collector / f.name)
            wait_for(lambda: time.monotonic() - cut >= 20, 30, "20 s without a link")
            assert worker.poll() is None, "the worker survived the cut"
            link(ns, dev, "up")

            expected = flow_reference_rows(files)
            wait_for(lambda: env.row_count() == len(expected), 240, "every row after the cut")
            wait_for(lambda: watch.seen[-1] == len(files), 60, "the last offset committed")
            assert flow_table_rows(env.table()) == expected
            assert len(list(env.hive.rglob("*.parquet"))) == len(files)
            # A commit stuck in the cut connection may still reach the broker after the
            # link is back (no client can recall it): the worker must correct it at once.
            assert watch.longest_regression() < 5, f"the committed offset stayed back: {watch.seen}"
            text = env.log("worker-0.log")
            assert "is not answering" in text or "could not commit offset" in text
            assert "answers again" in text
            assert "Traceback" not in text

            # Told to stop while the link is down: it stops.
            link(ns, dev, "down")
            shutil.copyfile(make_nfcapd_file(tmp_path / "src" / "nfcapd.202611211600", 100,
                                             seed=99), env.collector / "nfcapd.202611211600")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=45) in (0, 3), "a stop request is honoured during a cut"
            watch.close()
        finally:
            env.stop_all()
