"""The resource guard with a real full disk: a worker whose scratch (a tmpfs
mounted by the test) is filled past ``resource_guard.min_free_disk`` takes
no new file, says so once, and when the space is freed takes them again;
every file's rows land once."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import wait_for
from reference import flow_reference_rows, flow_table_rows
from test_end_to_end import drop


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "scratch"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def committed(env, partition: int) -> int | None:
    from kafka import KafkaConsumer, TopicPartition

    from spot_ingest.bus import group_id
    consumer = KafkaConsumer(bootstrap_servers=f"{env.data['kafka']['kafka_server']}:"
                                               f"{env.data['kafka']['kafka_port']}",
                             group_id=group_id(env.pipeline), enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(env.topic, partition), timeout_ms=10_000)
    finally:
        consumer.close(autocommit=False)


def test_a_full_scratch_holds_new_files_back_and_freeing_it_resumes(env, nfcapd_files,
                                                                    small_tmpfs):
    files = nfcapd_files[:3]
    env.data["pipelines"][env.pipeline]["local_staging"] = str(small_tmpfs)
    env.data["resource_guard"] = {"min_free_disk": "32MB", "min_free_memory": 0,
                                  "check_seconds": 0.2}
    env.config.write_text(json.dumps(env.data, indent=2))
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:        # 40 of 64 MB: 24 MB free, below 32 MB
        f.write(os.urandom(1 << 20) * 40)
    worker = env.worker(0)
    wait_for(lambda: "takes no new file" in env.log("worker-0.log"), 60,
             "the worker to say it takes no new file")
    log = env.log("worker-0.log")
    assert f"free space on {small_tmpfs}" in log and "min_free_disk (32.0 MB)" in log

    # The master (whose own scratch is elsewhere) stages and announces all three.
    env.data["pipelines"][env.pipeline]["local_staging"] = str(env.staging)
    env.config.write_text(json.dumps(env.data, indent=2))
    master = env.master(1)
    for f in files:
        drop(env, f, f.name)
    wait_for(lambda: env.log("master.log").count("staged and announced") == 3, 120,
             "the master to announce three files")
    # The announcements wait on the topic: nothing loaded, nothing committed.
    assert env.row_count() == 0 and "loaded " not in env.log("worker-0.log")
    assert committed(env, 0) is None
    assert worker.poll() is None and master.poll() is None

    filler.unlink()
    wait_for(lambda: "takes new files again" in env.log("worker-0.log"), 60,
             "the worker to take files again")
    expected = flow_reference_rows(files)
    wait_for(lambda: env.row_count() == len(expected), 120, "all rows")
    assert flow_table_rows(env.table()) == expected
    wait_for(lambda: committed(env, 0) == 3, 60, "the offsets to be committed")
    log = env.log("worker-0.log")
    assert log.count("takes no new file") == 1 and log.count("takes new files again") == 1
