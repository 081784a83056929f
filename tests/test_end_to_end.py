"""Master, broker and workers as real processes, nfcapd files in, flow table out."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import REPO, STORES, wait_for
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from spot_ingest.bus import Announcement, Announcer, PartitionReader, ensure_topic
from spot_ingest.config import KafkaConfig


def drop(env, src: Path, relative: str) -> Path:
    """Put a file into the collector the way nfcapd does: write aside, then rename."""
    dest = env.collector / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_once_run_loads_exactly_the_files(env, nfcapd_files):
    files = nfcapd_files[:3]
    drop(env, files[0], files[0].name)
    drop(env, files[1], files[1].name)
    drop(env, files[2], f"router2/{files[2].name}")   # collectors write per-source subfolders
    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                             "-c", str(env.config)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = flow_reference_rows(files)
    table = env.table()
    assert flow_table_rows(table) == expected
    assert f"flow table: {len(expected)} rows" in result.stdout

    # Partitions: folders named after each row's own received time, Hive style.
    for f in env.hive.rglob("*.parquet"):
        rel = f.parent.relative_to(env.hive)
        y, m, d, h = (int(p.split("=")[1]) for p in rel.parts)
        assert [p.split("=")[0] for p in rel.parts] == ["y", "m", "d", "h"]
        assert [p.split("=")[1] for p in rel.parts] == [str(y), str(m), str(d), str(h)], \
            "integer partition values are not zero padded"
        rows = pq.read_table(f, columns=["tryear", "trmonth", "trday", "trhour"]).to_pylist()
        assert {(r["tryear"], r["trmonth"], r["trday"], r["trhour"]) for r in rows} == {(y, m, d, h)}
        assert pq.read_schema(f).names[0] == "treceived", "partition columns live in folders only"

    # DuckDB reads the table with Hive partitioning, without any help.
    con = duckdb.connect()
    n, parts = con.execute(
        f"SELECT count(*), count(DISTINCT (y, m, d, h)) FROM read_parquet('{env.hive}/**/*.parquet',"
        f" hive_partitioning = true)").fetchone()
    assert n == len(expected) and parts >= 1
    by_router = con.execute(f"SELECT rip, sum(ipkt) FROM read_parquet('{env.hive}/**/*.parquet', "
                            f"hive_partitioning = true) GROUP BY rip").fetchall()
    assert sum(p for _, p in by_router) == sum(r[6] for r in expected)

    # The collector is emptied; the originals are kept in the store, by day and hour.
    assert not [p for p in env.collector.rglob("*") if p.is_file()]
    staged = list((env.warehouse / "flow" / "binary").rglob("*nfcapd.*"))
    assert len(staged) == 3
    assert all(len(p.relative_to(env.warehouse / "flow" / "binary").parts[0]) == 8 for p in staged)
    # Nothing left aside: no table temporaries, no partial copies, no scratch.
    assert not [p for p in env.warehouse.rglob("*") if p.is_file() and
                ("_tmp" in p.parts or "_incoming" in p.parts)]
    assert not [p for p in (env.root / "scratch").rglob("*") if p.is_file()
                and "kerberos" not in p.parts]

    # The same captures collected again: a second run replaces, never doubles.
    files_before = sorted(env.hive.rglob("*.parquet"))
    drop(env, files[0], files[0].name)
    drop(env, files[2], f"router2/{files[2].name}")
    again = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                            "-c", str(env.config)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert flow_table_rows(env.table()) == expected
    assert sorted(env.hive.rglob("*.parquet")) == files_before


def test_live_ingest_and_a_file_still_being_written(env, nfcapd_files):
    workers = [env.worker(0), env.worker(1)]
    master = env.master(2)
    drop(env, nfcapd_files[0], nfcapd_files[0].name)   # arrives while master runs
    wait_for(lambda: env.row_count() == len(flow_reference_rows(nfcapd_files[:1])), 90,
             "the first file's rows")

    # A writer that pauses: half a file, still open for writing.
    partial_src = nfcapd_files[1].read_bytes()
    partial = env.collector / "nfcapd.202611219999"
    writer = open(partial, "wb")
    writer.write(partial_src[: len(partial_src) // 2])
    writer.flush()
    paused_at = time.monotonic()
    drop(env, nfcapd_files[2], nfcapd_files[2].name)
    wait_for(lambda: env.row_count()
             == len(flow_reference_rows([nfcapd_files[0], nfcapd_files[2]])),
             90, "the third file's rows")
    # Give the master several settle periods (0.5 s) to make the mistake.
    wait_for(lambda: time.monotonic() - paused_at > 3, 10, "3 s of pause")
    assert partial.exists(), "a file open for writing was taken"
    assert "nfcapd.202611219999" not in env.log("master.log")

    writer.write(partial_src[len(partial_src) // 2:])
    writer.close()
    wait_for(lambda: env.row_count() == len(flow_reference_rows(nfcapd_files[:3])), 90, "all rows")
    assert flow_table_rows(env.table()) == flow_reference_rows(nfcapd_files[:3])
    assert master.poll() is None and all(w.poll() is None for w in workers)


def test_files_present_before_the_master_starts(env, nfcapd_files):
    for f in nfcapd_files[:2]:
        drop(env, f, f.name)
    env.worker(0)
    env.master(1)
    wait_for(lambda: env.row_count() == len(flow_reference_rows(nfcapd_files[:2])), 90, "rows")
    assert flow_table_rows(env.table()) == flow_reference_rows(nfcapd_files[:2])
    assert "2 file(s) found at start" in env.log("master.log")


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_worker_killed_mid_stream_resumes_without_loss_or_duplicates(env, tmp_path, broker):
    files = [make_nfcapd_file(tmp_path / "src" / f"nfcapd.2026112112{i:02d}", 40_000, seed=500 + i)
             for i in range(6)]
    for f in files:
        drop(env, f, f.name)
    master = env.master(1)
    worker = env.spawn("worker", "-i", "0", log_name="worker-0.log")
    reader = PartitionReader(KafkaConfig(*broker), env.topic, 0, env.pipeline)
    try:
        wait_for(lambda: (reader.committed() or 0) > 0, 120, "a first committed offset")
    finally:
        reader.close()
    # Kill the worker and its conversion processes at once, as a crash would.
    env.kill(worker)
    loaded_before = env.log("worker-0.log").count("loaded nfcapd")
    assert loaded_before < len(files), "the kill came too late to test anything"

    env.spawn("worker", "-i", "0", log_name="worker-0-restarted.log")
    expected = flow_reference_rows(files)
    wait_for(lambda: env.row_count() == len(expected), 180, "all rows after the restart")
    assert flow_table_rows(env.table()) == expected
    restarted = env.log("worker-0-restarted.log")
    import re
    resumed_at = int(re.search(r"from offset (\d+)", restarted).group(1))
    assert 0 < resumed_at < len(files)
    assert len(list(env.hive.rglob("*.parquet"))) == len(files)
    assert not list((env.warehouse / "flow").rglob("*.tmp")), "no temporary file left visible"
    assert master.poll() is None


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_same_file_announced_twice_yields_rows_once(env, nfcapd_files, broker):
    drop(env, nfcapd_files[3], nfcapd_files[3].name)
    env.worker(0)
    env.master(1)
    expected = flow_reference_rows(nfcapd_files[3:4])
    wait_for(lambda: env.row_count() == len(expected), 90, "rows")
    staged = next((env.warehouse / "flow" / "binary").rglob("*nfcapd.*"))
    import hashlib
    sha = hashlib.sha256(staged.read_bytes()).hexdigest()
    kafka = KafkaConfig(*broker)
    announcer = Announcer(kafka, env.topic, 1, env.pipeline)
    ann = Announcement(env.pipeline, "flow", str(staged.relative_to(env.warehouse)),
                       staged.stat().st_size, sha,
                       "again/" + staged.name, int(time.time() * 1000), "test")
    _, offset = announcer.announce(ann, partition=0)
    announcer.close()
    reader = PartitionReader(kafka, env.topic, 0, env.pipeline)
    try:
        wait_for(lambda: (reader.committed() or 0) > offset, 90, "the worker to commit past it")
    finally:
        reader.close()
    assert env.log("worker-0.log").count("loaded ") == 2
    assert flow_table_rows(env.table()) == expected
    assert len(list(env.hive.rglob("*.parquet"))) == 1


def test_second_master_for_the_same_pipeline_is_refused(env):
    first = env.master(1)
    wait_for(lambda: "watching" in env.log("master.log"), 60, "the first master to start")
    second = subprocess.run([sys.executable, str(REPO / "master_collector.py"), "-t", env.pipeline,
                             "-w", "1", "-c", str(env.config)], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 1
    assert "another master is already running for pipeline flow_test" in second.stderr
    assert first.poll() is None


def test_topic_with_too_few_partitions(env, broker):
    kafka = KafkaConfig(*broker)
    ensure_topic(kafka, env.topic, 2)
    result = subprocess.run([sys.executable, str(REPO / "master_collector.py"), "-t", env.pipeline,
                             "-w", "4", "-c", str(env.config), "--once"], capture_output=True,
                            text=True, timeout=120)
    from kafka.admin import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=f"{broker[0]}:{broker[1]}")
    try:   # how many partitions the topic has now, read without growing it
        partitions = len(admin.describe_topics([env.topic])[0]["partitions"])
    finally:
        admin.close()
    if result.returncode == 0:   # a broker that can add partitions grew the topic
        assert partitions == 4
        assert f"grew topic {env.topic} from 2 to 4 partitions" in result.stderr
    else:                        # Tansu cannot: refused, and the topic is as it was
        assert result.returncode == 1 and partitions == 2
        assert f"topic {env.topic} has 2 partitions but 4 workers need one each" in result.stderr


def test_standalone_restarts_a_dead_worker_and_stops_cleanly(env, nfcapd_files):
    import psutil
    import re
    out = open(env.logs / "standalone.out", "wb")
    run = subprocess.Popen([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2",
                            "-c", str(env.config)], stdout=out, stderr=subprocess.STDOUT,
                           start_new_session=True)
    env.procs.append(run)
    worker_log = f"{env.pipeline}-worker-0.log"
    first = wait_for(lambda: re.search(r"\[(\d+)\] spot_ingest.worker: worker 0 .* reading",
                                       env.log(worker_log)), 60, "worker 0 to start")
    os.kill(int(first.group(1)), signal.SIGKILL)
    wait_for(lambda: "worker 0 died (exit code -9); restarting it" in env.log("standalone.out"),
             30, "the death to be reported")
    wait_for(lambda: env.log(worker_log).count("spot_ingest.worker: worker 0 of pipeline") == 2,
             60, "worker 0 to be restarted")
    drop(env, nfcapd_files[0], nfcapd_files[0].name)
    wait_for(lambda: env.row_count() == len(flow_reference_rows(nfcapd_files[:1])), 90, "rows")

    children = psutil.Process(run.pid).children(recursive=True)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=90) == 0
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {alive}"
    assert "stopping (signal 15)" in env.log("standalone.out")
