"""``spot-ingest status`` after a known ``--once`` run (two real nfcapd files,
one master and two workers against the real broker): every number it gives
is the run's (offsets, commit times, reports, the table's newest partition);
then, with a broker that accepts connections but never answers, it still
shows the store's part, says the broker is unavailable and exits 1 within
its bounded time."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter

from conftest import REPO
from reference import flow_reference_rows, flow_table_rows
from test_end_to_end import drop


def status(env, *args: str, config=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spot_ingest.cli", "status", "-t", env.pipeline,
                           "-c", str(config or env.config), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


class SilentBroker:
    """A TCP listener that never answers: the kernel completes the
    handshakes and queues the connections, nothing reads them (a broker that
    is hung: paused, or its host overloaded)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]

    def connections(self) -> int:
        """The connections made to it so far (taken from the queue)."""
        self.sock.setblocking(False)
        taken = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return taken
            conn.close()
            taken += 1

    def close(self) -> None:
        self.sock.close()


def test_status_gives_the_numbers_of_a_known_once_run(env, nfcapd_files, tmp_path):
    files = [nfcapd_files[3], nfcapd_files[0]]          # 1,500 and 3,000 flows
    for f in files:
        drop(env, f, f.name)
    started = time.time()
    run = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                          "-c", str(env.config)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    finished = time.time()
    expected = flow_reference_rows(files)
    table = env.table()
    assert flow_table_rows(table) == expected

    done = status(env, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout)
    assert (found["v"], found["pipeline"], found["type"], found["table"], found["delivery"]) == \
        (1, env.pipeline, "flow", "flow", "files")

    # The broker: both partitions finished, committed by their own worker just now.
    broker = found["broker"]
    assert broker["available"] and broker["error"] is None
    assert (broker["topic"], broker["group"], broker["offsets_in"]) == \
        (env.topic, f"spot-ingest-{env.pipeline}", "group")
    parts = broker["partitions"]
    assert [p["partition"] for p in parts] == [0, 1]
    # Two announcements and one end-of-run marker per partition.
    assert sum(p["end"] for p in parts) == len(files) + 2
    host = socket.gethostname()
    for p in parts:
        assert p["beginning"] == 0 and p["end"] >= 1
        assert p["committed"] == p["end"] and p["lag"] == 0
        # The commit's metadata when the broker keeps it (Kafka does; the
        # embedded test broker does not), else the worker's newest report.
        assert p["commit_time_from"] in ("broker", "reports")
        if p["commit_time_from"] == "broker":
            assert p["committed_by"] == f"worker {p['partition']} on {host}"
        else:
            assert p["committed_by"] is None
        # Committed (and reported) during the run: between its start and its end.
        assert found["ts"] - finished - 0.2 <= p["seconds_since_commit"] \
            <= found["ts"] - started + 0.2

    # The reports: both files staged and loaded, with their rows, nothing set aside.
    for window in ("last_hour", "last_day"):
        w = found[window]
        assert (w["staged"], w["loaded"], w["set_aside"], w["records"]) == \
            (len(files), len(files), 0, len(expected))
        assert (w["failures"], w["reasons"], w["batches"], w["rejected_lines"]) == ({}, [], 0, 0)

    assert found["collector"] == {"path": str(env.collector), "exists": True, "waiting": 0}
    assert found["store"] == {"available": True, "error": None}
    assert found["stream"] is None

    # The newest partition and its rows: what the table holds there.
    per_hour = Counter(zip(*(table.column(k).to_pylist() for k in "ymdh")))
    newest_hour = max(per_hour)
    newest = found["newest_partition"]
    assert newest["partition"] == "y={}/m={}/d={}/h={}".format(*newest_hour)
    assert newest["rows"] == per_hour[newest_hour]
    assert newest["files"] == len(list((env.hive / newest["partition"]).glob("*.parquet")))
    assert newest["unreadable"] == 0

    # The same, for a human.
    text = status(env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert f"topic {env.topic}, group spot-ingest-{env.pipeline}: lag 0" in lines
    assert f"last hour: {len(files)} staged, {len(files)} loaded, 0 set aside, " \
           f"{len(expected)} records" in lines
    assert f"newest partition: {newest['partition']}, {newest['rows']} rows in " \
           f"{newest['files']} file(s)" in lines

    # A broker that never answers: the store's part still, exit 1, in bounded time.
    silent = SilentBroker()
    try:
        data = json.loads(env.config.read_text())
        data["kafka"]["kafka_port"] = str(silent.port)
        hung = tmp_path / "hung_broker.json"
        hung.write_text(json.dumps(data))
        t0 = time.monotonic()
        done = status(env, "--json", "--broker-timeout", "2", config=hung)
        took = time.monotonic() - t0
        connected = silent.connections()
    finally:
        silent.close()
    assert done.returncode == 1, done.stdout + done.stderr
    assert connected >= 1, "status never connected to the silent broker"
    assert took < 2 + 2 + 10        # the timeout, the grace, and the interpreter's start
    away = json.loads(done.stdout)
    assert away["broker"]["available"] is False and away["broker"]["partitions"] == []
    assert f"127.0.0.1:{silent.port} did not answer within" in away["broker"]["error"]
    assert away["newest_partition"] == newest
    assert away["last_hour"] == found["last_hour"]
