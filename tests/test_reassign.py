"""Workers joining and leaving, with a real broker and real nfcapd files: a
master started again with more workers grows the topic and the new worker
gets files; a worker killed for good has its backlog moved by ``spot-ingest
reassign`` and loaded by another, nothing lost or doubled, and it gets no
new work until it starts again."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, wait_for
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from test_end_to_end import drop


def status(env) -> dict:
    done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "status", "-t", env.pipeline,
                           "-c", str(env.config), "--json"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    return json.loads(done.stdout)


def reassign(env, source: int, target: int) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "reassign", "-t",
                           env.pipeline, "-c", str(env.config), "--from", str(source), "--to",
                           str(target)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def ends(env) -> dict[int, int]:
    return {p["partition"]: p["end"] for p in status(env)["broker"]["partitions"]}


def flows(tmp_path, name: str, count: int, seed: int):
    return make_nfcapd_file(tmp_path / "src" / name, count, seed=seed)


def test_a_larger_master_uses_more_partitions_and_the_new_worker_gets_files(env, tmp_path):
    """Growing a topic needs CreatePartitions, which Apache Kafka has and the
    test broker (Tansu) lacks: here the topic is made with room for three
    workers (as an operator planning to grow does), the master uses two, then
    three; the refusal where the broker cannot grow a topic is checked below."""
    from spot_ingest.bus import ensure_topic
    from spot_ingest.config import load
    ensure_topic(load(env.config).kafka, env.topic, 3)
    first = [flows(tmp_path, f"nfcapd.a{i}", 300 + i, 500 + i) for i in range(2)]
    master = env.master(2)
    env.worker(0), env.worker(1)
    for f in first:
        drop(env, f, f.name)
    wait_for(lambda: env.row_count() == len(flow_reference_rows(first)), 120, "the first files")
    assert "(3 partitions, 2 used)" in env.log("master.log")
    assert ends(env)[2] == 0
    master.terminate()
    master.wait(30)

    env.master(3)
    env.worker(2)
    more = [flows(tmp_path, f"nfcapd.b{i}", 400 + i, 600 + i) for i in range(3)]
    for f in more:
        drop(env, f, f.name)
    everything = flow_reference_rows(first + more)
    wait_for(lambda: env.row_count() == len(everything), 120, "every file")
    assert flow_table_rows(env.table()) == everything
    assert ends(env)[2] > 0 and "loaded nfcapd.b" in env.log("worker-2.log"), \
        "the new worker got a file"


def test_more_workers_than_a_topic_the_broker_cannot_grow_is_refused_clearly(env):
    from spot_ingest.bus import ensure_topic
    from spot_ingest.config import load
    ensure_topic(load(env.config).kafka, env.topic, 2)
    done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "master", "-t", env.pipeline,
                           "-c", str(env.config), "-w", "3", "--once"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1
    assert f"topic {env.topic} has 2 partitions but 3 workers need one each" in done.stderr
    assert "Start at most 2 workers, or set pipelines.<name>.topic to a new topic" in done.stderr


def test_a_lost_workers_backlog_is_reassigned_and_it_gets_no_new_work(env, tmp_path):
    files = [flows(tmp_path, f"nfcapd.c{i}", 300 + 10 * i, 700 + i) for i in range(6)]
    env.master(2)
    wait_for(lambda: "watching" in env.log("master.log"), 60, "the master to make the topic")
    env.worker(0)
    lost = env.worker(1)
    wait_for(lambda: "reading" in env.log("worker-1.log"), 60, "worker 1 to start")
    env.kill(lost)                       # its host is gone for good
    for f in files:
        drop(env, f, f.name)
    wait_for(lambda: env.log("master.log").count("staged and announced") == 6, 120,
             "six announcements")
    before = ends(env)
    assert before[1] > 0, "some files went to the lost worker's partition"
    on_zero = before[0]
    wait_for(lambda: env.log("worker-0.log").count("loaded ") == on_zero, 120,
             "worker 0's own files")
    assert env.row_count() < len(flow_reference_rows(files)), "a backlog waits on partition 1"

    done = reassign(env, 1, 0)
    assert f"moved {before[1]} record(s) of partition 1" in done.stdout
    expected = flow_reference_rows(files)
    wait_for(lambda: env.row_count() == len(expected), 120, "the backlog loaded by worker 0")
    assert flow_table_rows(env.table()) == expected
    parts = {p["partition"]: p for p in status(env)["broker"]["partitions"]}
    assert parts[1]["committed"] == parts[1]["end"] == before[1]
    wait_for(lambda: status(env)["broker"]["partitions"][0]["lag"] == 0, 60, "worker 0 done")

    # Retired: new files all go to worker 0.
    later = [flows(tmp_path, f"nfcapd.d{i}", 250 + i, 800 + i) for i in range(3)]
    for f in later:
        drop(env, f, f.name)
    expected = flow_reference_rows(files + later)
    wait_for(lambda: env.row_count() == len(expected), 120, "the later files")
    assert ends(env)[1] == before[1], "no new work for the retired partition"
    assert "partition(s) 1 retired" in env.log("master.log")
    assert "moved 0 record(s)" in reassign(env, 1, 0).stdout

    # Worker 1 comes back: it says so, loads nothing twice.
    loaded = env.log("worker-1.log").count("loaded ")
    env.worker(1)
    wait_for(lambda: "is back and takes new work again" in env.log("worker-1.log"), 60,
             "worker 1 back")
    assert env.log("worker-1.log").count("loaded ") == loaded
    assert flow_table_rows(env.table()) == expected
