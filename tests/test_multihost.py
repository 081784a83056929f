"""Four hosts on one machine (network namespaces on a switch, addresses from
198.18.0.0/15: tests/netns.py): the broker, the master with the collector
directory, and two workers, sharing the store directory as an NFS mount
would. Files dropped on the master's host are loaded by both workers; a
worker whose link is cut for 20 s and restored loses and doubles nothing,
and its log says what happened; a worker host that never comes back has its
backlog moved by ``spot-ingest reassign`` and finished by the other."""
from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import REPO, wait_for
from netns import Lan
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.broker import broker_binary
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from test_end_to_end import drop

PORT = 9092


@pytest.fixture
def cluster(tmp_path):
    with Lan(["broker", "master", "worker0", "worker1"]) as lan:
        address = lan.addresses["broker"]
        lan.popen("broker", [broker_binary(), "broker", "--listener-url",
                             f"tcp://{address}:{PORT}", "--advertised-listener-url",
                             f"tcp://{address}:{PORT}"], log=tmp_path / "broker.log")
        for d in ("collector", "store", "staging", "logs"):
            (tmp_path / d).mkdir()
        config = tmp_path / "ingest_conf.json"
        config.write_text(json.dumps({
            "dbname": "spot", "hdfs_app_path": str(tmp_path / "store"), "collector_processes": 2,
            "ingestion_interval": 0.2, "log_dir": str(tmp_path / "logs"),
            "kafka": {"kafka_server": address, "kafka_port": str(PORT)},
            "pipelines": {"flow_hosts": {"type": "flow",
                                         "collector_path": str(tmp_path / "collector"),
                                         "local_staging": str(tmp_path / "staging"),
                                         "topic": "SPOT-INGEST-hosts", "settle_seconds": 0.5,
                                         "worker_processes": 1}}}))
        lan.root, lan.config = tmp_path, config
        wait_for(lambda: lan.run("master", [sys.executable, "-c",
                                            f"import socket; socket.create_connection(('{address}', "
                                            f"{PORT}), timeout=1)"],
                                 capture_output=True).returncode == 0, 30, "the broker")
        yield lan


def spot(lan: Lan, host: str, *args: str):
    return lan.popen(host, [sys.executable, "-m", "spot_ingest.cli", *args, "-t", "flow_hosts",
                            "-c", str(lan.config)], log=lan.root / "logs" / f"{host}.log",
                     cwd=REPO)


def log(lan: Lan, host: str) -> str:
    path = lan.root / "logs" / f"{host}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def table(lan: Lan):
    import pyarrow.dataset as ds
    hive = lan.root / "store" / "flow" / "hive"
    if not hive.exists():
        return None
    return ds.dataset(hive, format="parquet", partitioning="hive").to_table()


def rows(lan: Lan) -> int:
    t = table(lan)
    return 0 if t is None else t.num_rows


class Collector:
    def __init__(self, lan: Lan, tmp_path):
        self.lan, self.tmp, self.made = lan, tmp_path, []

    def drop(self, count: int) -> list:
        files = []
        for _ in range(count):
            i = len(self.made)
            src = make_nfcapd_file(self.tmp / "src" / f"nfcapd.2026112212{i:02d}", 400 + 37 * i,
                                   seed=900 + i)
            drop(self, src, src.name)
            self.made.append(src)
            files.append(src)
        return files

    @property
    def collector(self):
        return self.lan.root / "collector"


def test_hosts_share_the_work_survive_a_cut_link_and_a_lost_host(cluster, tmp_path):
    lan = cluster
    spot(lan, "master", "master", "-w", "2")
    wait_for(lambda: "watching" in log(lan, "master"), 60, "the master on its host")
    spot(lan, "worker0", "worker", "-i", "0")
    spot(lan, "worker1", "worker", "-i", "1")
    files = Collector(lan, tmp_path)

    # Both workers, on their own hosts, load files dropped on the master's host.
    files.drop(6)
    wait_for(lambda: rows(lan) == len(flow_reference_rows(files.made)), 180, "the first files")
    assert "loaded nfcapd" in log(lan, "worker0") and "loaded nfcapd" in log(lan, "worker1")

    # Worker 1's link is cut for 20 s while files keep coming.
    lan.cut("worker1")
    cut_at = time.monotonic()
    files.drop(4)
    wait_for(lambda: log(lan, "master").count("staged and announced") == 10, 120,
             "the master to announce during the cut")
    wait_for(lambda: "is not answering" in log(lan, "worker1")
             or "could not commit" in log(lan, "worker1"), 60,
             "worker 1 to notice its link is down")
    time.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))   # the cut lasts 20 s (the scenario)
    lan.restore("worker1")
    expected = flow_reference_rows(files.made)
    wait_for(lambda: rows(lan) == len(expected), 180, "every file after the link returned")
    assert flow_table_rows(table(lan)) == expected, "nothing lost, nothing doubled"
    wait_for(lambda: "answers again" in log(lan, "worker1"), 120,
             "worker 1 to say the broker answers again")

    # Worker 1's host goes for good: its link down and never back.
    lan.cut("worker1")
    before = log(lan, "master").count("staged and announced")
    late = files.drop(6)
    wait_for(lambda: log(lan, "master").count("staged and announced") == before + 6, 120,
             "the master to announce the late files")
    status = json.loads(lan.run("master", [sys.executable, "-m", "spot_ingest.cli", "status",
                                           "-t", "flow_hosts", "-c", str(lan.config), "--json"],
                                capture_output=True, text=True, cwd=REPO, timeout=120).stdout)
    waiting = {p["partition"]: p["lag"] for p in status["broker"]["partitions"]}
    done = lan.run("master", [sys.executable, "-m", "spot_ingest.cli", "reassign", "-t",
                              "flow_hosts", "-c", str(lan.config), "--from", "1", "--to", "0"],
                   capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"moved {waiting[1]} record(s) of partition 1" in done.stdout
    expected = flow_reference_rows(files.made)
    wait_for(lambda: rows(lan) == len(expected), 180, "worker 0 to finish worker 1's backlog")
    assert flow_table_rows(table(lan)) == expected
    assert late, "files arrived after the host was lost"
