"""Workers joining and leaving, with a real broker, real nfcapd files and real
master, worker and ``spot-ingest reassign`` processes: a master started
again with more workers uses more partitions (grown where the broker can,
refused clearly where it cannot) and the new worker gets files; a worker
killed for good stops getting files once its partition lags, its backlog is
moved by ``spot-ingest reassign`` (value and headers: signatures stay valid)
and loaded by another worker, nothing lost or doubled, even after a
reassignment that died between copying and committing; it gets no new work
until it starts again, and then loads nothing twice."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from kafka import KafkaConsumer, TopicPartition

from conftest import REPO, wait_for
from reference import flow_reference_rows, flow_table_rows
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from test_end_to_end import drop


# -- helpers ------------------------------------------------------------------

def run_cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spot_ingest.cli", *args, "-t", env.pipeline,
                           "-c", str(env.config)], capture_output=True, text=True, timeout=180,
                          cwd=REPO)


def reassign(env, source: int, target: int) -> subprocess.CompletedProcess:
    done = run_cli(env, "reassign", "--from", str(source), "--to", str(target))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def bootstrap(env) -> str:
    kafka = env.data["kafka"]
    return f"{kafka['kafka_server']}:{kafka['kafka_port']}"


def consumer(env) -> KafkaConsumer:
    """A reader in the pipeline's group semantics (assigned, no group join)."""
    from spot_ingest.bus import group_id
    return KafkaConsumer(bootstrap_servers=bootstrap(env), group_id=group_id(env.pipeline),
                         enable_auto_commit=False, auto_offset_reset="earliest")


def offsets(env) -> dict[int, tuple[int, int | None]]:
    """Each partition's (end, committed) as the broker holds them."""
    c = consumer(env)
    try:
        tps = [TopicPartition(env.topic, p) for p in sorted(c.partitions_for_topic(env.topic))]
        ends = c.end_offsets(tps)
        return {tp.partition: (ends[tp], c.committed(tp)) for tp in tps}
    finally:
        c.close()


def ends(env) -> dict[int, int]:
    return {p: end for p, (end, _) in offsets(env).items()}


def records(env, partition: int) -> list:
    """Every record of a partition, in order."""
    c = consumer(env)
    try:
        tp = TopicPartition(env.topic, partition)
        c.assign([tp])
        end = c.end_offsets([tp])[tp]
        c.seek_to_beginning(tp)
        got = []
        while c.position(tp) < end:
            got += c.poll(timeout_ms=2000).get(tp, [])
        return got
    finally:
        c.close(autocommit=False)


def flows(tmp_path, name: str, count: int, seed: int):
    return make_nfcapd_file(tmp_path / "src" / name, count, seed=seed)


def sign_announcements(env, tmp_path) -> bytes:
    key = tmp_path / "signing.key"
    key.write_bytes(b"reassign-test-signing-key-0123456789abcdef")
    env.set(signing_key_file=str(key))
    return key.read_bytes()


def broker_grows_topics(env) -> bool:
    """Whether the test broker implements CreatePartitions (Apache Kafka does;
    the embedded Tansu does not): asked with validate_only on a topic of its own."""
    from kafka.admin import KafkaAdminClient, NewPartitions, NewTopic
    from kafka.errors import KafkaError
    admin = KafkaAdminClient(bootstrap_servers=bootstrap(env))
    try:
        probe = f"{env.topic}-probe"
        admin.create_topics([NewTopic(probe, 1, 1)])
        try:
            admin.create_partitions({probe: NewPartitions(2)}, validate_only=True)
            return True
        except KafkaError:
            return False
    finally:
        admin.close()


# -- workers joining ----------------------------------------------------------

def test_a_larger_master_uses_more_partitions_and_the_new_worker_gets_files(env, tmp_path):
    """Runs on any broker: the topic is made with room for three workers (as
    an operator planning to grow does, ``kafka-topics --partitions``), the
    master uses two (a smaller -w uses the first partitions), then three."""
    from spot_ingest.bus import ensure_topic
    from spot_ingest.config import load
    assert ensure_topic(load(env.config).kafka, env.topic, 3) == 3
    first = [flows(tmp_path, f"nfcapd.a{i}", 300 + i, 500 + i) for i in range(2)]
    master = env.master(2)
    env.worker(0), env.worker(1)
    for f in first:
        drop(env, f, f.name)
    wait_for(lambda: env.row_count() == len(flow_reference_rows(first)), 120, "the first files")
    assert "(3 partitions, 2 used)" in env.log("master.log")
    assert ends(env)[2] == 0, "a master of two workers uses partitions 0 and 1 only"
    master.terminate()
    master.wait(30)

    env.master(3)
    env.worker(2)
    more = [flows(tmp_path, f"nfcapd.b{i}", 400 + i, 600 + i) for i in range(3)]
    for f in more:
        drop(env, f, f.name)
    everything = flow_reference_rows(first + more)
    wait_for(lambda: env.row_count() == len(everything), 120, "every file")
    assert "(3 partitions, 3 used)" in env.log("master.log")
    assert flow_table_rows(env.table()) == everything
    assert ends(env)[2] > 0, "the new worker's partition got a file"
    # (the row count can match a moment before the worker logs the file)
    wait_for(lambda: "loaded nfcapd.b" in env.log("worker-2.log"), 30, "worker 2 to load it")


def test_a_master_started_with_more_workers_grows_the_topic_or_says_why_not(env, tmp_path):
    """Where the broker implements CreatePartitions (Apache Kafka: run the
    suite with SPOT_TEST_BROKER=host:port): -w 2, then -w 3 grows the topic
    and worker 2 loads files. Where it does not (the embedded Tansu), the
    master refuses in one line with the broker's reason and changes nothing.
    Either way the test asserts what that broker must give, and never skips."""
    if broker_grows_topics(env):
        topic_grown_for_a_new_worker(env, tmp_path)
    else:
        more_workers_than_an_ungrowable_topic_refused(env)


def topic_grown_for_a_new_worker(env, tmp_path):
    first = [flows(tmp_path, f"nfcapd.g{i}", 300 + i, 900 + i) for i in range(2)]
    master = env.master(2)
    env.worker(0), env.worker(1)
    for f in first:
        drop(env, f, f.name)
    wait_for(lambda: env.row_count() == len(flow_reference_rows(first)), 120, "the first files")
    assert len(ends(env)) == 2
    master.terminate()
    master.wait(30)

    env.master(3)
    wait_for(lambda: "(3 partitions, 3 used)" in env.log("master.log"), 60, "the grown topic")
    assert f"grew topic {env.topic} from 2 to 3 partitions" in env.log("master.log")
    assert len(ends(env)) == 3
    env.worker(2)
    more = [flows(tmp_path, f"nfcapd.h{i}", 400 + i, 950 + i) for i in range(3)]
    for f in more:
        drop(env, f, f.name)
    everything = flow_reference_rows(first + more)
    wait_for(lambda: env.row_count() == len(everything), 120, "every file")
    assert flow_table_rows(env.table()) == everything
    assert ends(env)[2] > 0, "the new worker's partition got a file"
    wait_for(lambda: "loaded nfcapd.h" in env.log("worker-2.log"), 30, "worker 2 to load it")


def more_workers_than_an_ungrowable_topic_refused(env):
    from spot_ingest.bus import ensure_topic
    from spot_ingest.config import load
    ensure_topic(load(env.config).kafka, env.topic, 2)
    done = run_cli(env, "master", "-w", "3", "--once")
    assert done.returncode == 1
    assert f"topic {env.topic} has 2 partitions but 3 workers need one each" in done.stderr
    assert "CreatePartitions" in done.stderr, "the broker's own reason is given"
    assert "Start at most 2 workers, or set pipelines.<name>.topic to a new topic" in done.stderr
    assert len(ends(env)) == 2, "nothing was changed"


# -- a worker leaving -----------------------------------------------------------

def test_a_lost_workers_backlog_is_reassigned_nothing_lost_or_doubled(env, tmp_path, monkeypatch):
    from spot_ingest.bus import SIGNATURE_HEADER, PartitionBalancer, group_id, sign
    from spot_ingest.config import load
    from spot_ingest.reassign import reassign as reassign_in_process
    from spot_ingest.store import open_store
    key = sign_announcements(env, tmp_path)
    files = [flows(tmp_path, f"nfcapd.c{i}", 300 + 10 * i, 700 + i) for i in range(6)]
    env.master(2)
    wait_for(lambda: "watching" in env.log("master.log"), 60, "the master to make the topic")
    env.worker(0)
    lost = env.worker(1)
    wait_for(lambda: "reading" in env.log("worker-1.log"), 60, "worker 1 to start")
    env.kill(lost)                       # its host is gone for good (SIGKILL)
    for f in files:
        drop(env, f, f.name)
    wait_for(lambda: env.log("master.log").count("staged and announced") == 6, 120,
             "six announcements")
    before = ends(env)
    assert before[1] > 0, "some files went to the lost worker's partition before it lagged"
    wait_for(lambda: offsets(env)[0][1] == before[0], 120, "worker 0's own files committed",
             interval=0.5)
    assert env.row_count() < len(flow_reference_rows(files)), "a backlog waits on partition 1"
    backlog = records(env, 1)
    assert len(backlog) == before[1]
    assert all(dict(r.headers)[SIGNATURE_HEADER] == sign(key, r.value) for r in backlog)

    # Once partition 1 lags, the balancer (the master's own class, on these
    # real offsets) sends it nothing while partition 0 has less to do.
    cfg = load(env.config)
    balancer = PartitionBalancer(cfg.kafka, env.topic, 2, group_id(env.pipeline))
    try:
        chosen = []
        for _ in range(before[1]):
            chosen.append(balancer.choose())
            balancer.sent(chosen[-1])
    finally:
        balancer.close()
    assert chosen == [0] * before[1], f"a lagging partition was chosen: {chosen}"

    # A reassignment that dies after copying, before committing: partition 0
    # gets the copies, partition 1 keeps its offset.
    class Crash(BaseException):
        pass

    def crash(self, *args, **kwargs):
        raise Crash()
    with monkeypatch.context() as m:
        m.setattr(KafkaConsumer, "commit", crash)
        with pytest.raises(Crash):
            reassign_in_process(cfg, cfg.pipeline(env.pipeline), 1, 0, open_store(cfg.store))
    assert offsets(env)[1] == (before[1], None), "nothing committed by the crashed run"
    assert not list(env.warehouse.rglob("retired-1.json"))

    # Run again: the same records copied again; worker 0 loads each file
    # twice onto the same output, so no row is doubled.
    done = reassign(env, 1, 0)
    assert f"moved {before[1]} record(s) of partition 1 (offsets 0 to {before[1] - 1})" \
        in done.stdout
    copies = records(env, 0)[before[0]:]
    assert len(copies) == 2 * before[1]
    for copy, original in zip(copies, backlog + backlog):
        assert (copy.value, copy.headers) == (original.value, original.headers), \
            "value and headers copied as they were"
    expected = flow_reference_rows(files)
    wait_for(lambda: offsets(env)[0][1] == before[0] + 2 * before[1], 120,
             "worker 0 through the copies", interval=0.5)
    assert flow_table_rows(env.table()) == expected, "every row, once"
    assert "refused offset" not in env.log("worker-0.log"), "the signatures held"
    end1, committed1 = offsets(env)[1]
    assert committed1 == end1 == before[1], "partition 1 committed at its end"
    c = consumer(env)
    try:
        note = c.committed(TopicPartition(env.topic, 1), metadata=True).metadata
    finally:
        c.close()
    if note is not None:     # Apache Kafka keeps commit metadata; the embedded Tansu drops it
        assert json.loads(note)["reassigned_to"] == 0
    assert json.loads(next(env.warehouse.rglob("retired-1.json")).read_text())["backlog_to"] == 0

    # Retired: new files all go to worker 0; a second run moves nothing.
    later = [flows(tmp_path, f"nfcapd.d{i}", 250 + i, 800 + i) for i in range(3)]
    for f in later:
        drop(env, f, f.name)
    expected = flow_reference_rows(files + later)
    wait_for(lambda: env.row_count() == len(expected), 120, "the later files")
    assert ends(env)[1] == before[1], "no new work for the retired partition"
    assert "partition(s) 1 retired" in env.log("master.log")
    again = reassign(env, 1, 0)
    assert "moved 0 record(s) of partition 1 to partition 0" in again.stdout
    assert ends(env)[0] == before[0] + 2 * before[1] + len(later)

    # Worker 1 comes back: it says so, starts at the committed end, and
    # loads only files announced after it came back.
    loaded = env.log("worker-1.log").count("loaded ")
    env.worker(1)
    wait_for(lambda: f"partition 1 from offset {before[1]}" in env.log("worker-1.log"), 60,
             "worker 1 back")
    assert "is back and takes new work again" in env.log("worker-1.log")
    assert not list(env.warehouse.rglob("retired-1.json"))
    fresh = [flows(tmp_path, f"nfcapd.e{i}", 200 + i, 850 + i) for i in range(10)]
    dropped = []
    for f in fresh:                       # until one lands on partition 1
        drop(env, f, f.name)
        dropped.append(f)
        expected = flow_reference_rows(files + later + dropped)
        wait_for(lambda: env.row_count() == len(expected), 120, f"{f.name} loaded")
        if ends(env)[1] > before[1]:
            break
    new_on_1 = ends(env)[1] - before[1]
    assert new_on_1 > 0, "worker 1 takes new work again"
    wait_for(lambda: offsets(env)[1][1] == before[1] + new_on_1, 60, "worker 1 committed",
             interval=0.5)
    assert env.log("worker-1.log").count("loaded ") == loaded + new_on_1, \
        "worker 1 loaded only the new files, none of its old backlog"
    assert flow_table_rows(env.table()) == expected


def test_reassign_copies_signed_records_leaves_markers_and_refuses_a_running_worker(
        env, tmp_path, monkeypatch):
    """The command's rules on records it reads from a real broker: what a
    worker committed is not copied, end-of-run markers stay, values and
    headers are copied byte for byte, a committed offset that moves during
    the run stops it without a commit, and it is safe to run again."""
    import spot_ingest.bus as bus
    from spot_ingest.bus import Announcement, Announcer, PartitionReader, ensure_topic
    from spot_ingest.config import load
    from spot_ingest.reassign import ReassignError, reassign as reassign_in_process
    from spot_ingest.store import open_store
    key = sign_announcements(env, tmp_path)
    cfg = load(env.config)
    pcfg, store = cfg.pipeline(env.pipeline), open_store(cfg.store)
    ensure_topic(cfg.kafka, env.topic, 3)

    def announcement(i: int) -> Announcement:
        return Announcement(env.pipeline, "flow", f"flow/binary/20261122/07/f{i}", 100 + i,
                            f"{i:064x}", f"nfcapd.{i}", 1_700_000_000_000, "collector")
    announcer = Announcer(cfg.kafka, env.topic, 3, env.pipeline, signing_key=key)
    try:
        for i in range(3):
            announcer.announce(announcement(i), partition=1)            # offsets 0-2
        announcer.announce(Announcement.end_of_run(env.pipeline, "flow", "run-1", "collector"),
                           partition=1)                                  # offset 3
        announcer.announce(announcement(3), partition=1)                # offset 4
        announcer.announce(announcement(9), partition=0)                # worker 0's own
    finally:
        announcer.close()
    worker1 = PartitionReader(cfg.kafka, env.topic, 1, env.pipeline)
    worker1.commit(1, "worker 1 did offset 0")

    # A worker 1 that commits while its backlog is copied: refused, nothing committed.
    real_ack, acks = bus.await_ack, []

    def ack_then_worker_commits(future, what, *args, **kwargs):
        meta = real_ack(future, what, *args, **kwargs)
        acks.append(meta.offset)
        if len(acks) == 1:                 # after the first copy
            worker1.commit(2, "worker 1 is alive")
        return meta
    with monkeypatch.context() as m:
        m.setattr(bus, "await_ack", ack_then_worker_commits)
        with pytest.raises(ReassignError, match="its worker is running"):
            reassign_in_process(cfg, pcfg, 1, 2, store)
    assert offsets(env)[1] == (5, 2), "the worker's own commit stands"
    assert not list(env.warehouse.rglob("retired-1.json"))
    worker1.close()

    assert acks == [0, 1, 2], "the refused run copied offsets 1, 2 and 4 (3 is a marker)"

    # The worker gone: offsets 2 and 4 moved (3 is the marker), to partition 2.
    moved = reassign_in_process(cfg, pcfg, 1, 2, store)
    assert (moved.records, moved.markers, moved.first, moved.last, moved.start, moved.end) == \
        (2, 1, 2, 4, 2, 5)
    source = records(env, 1)
    # Partition 2: the refused run's copies (offsets 1, 2, 4), then this run's (2, 4).
    assert [(r.value, r.headers) for r in records(env, 2)] == \
        [(source[i].value, source[i].headers) for i in (1, 2, 4, 2, 4)]
    assert all(dict(r.headers)[bus.SIGNATURE_HEADER] == bus.sign(key, r.value)
               for r in records(env, 2))
    assert (moved.to_first, moved.to_last) == (3, 4)
    assert offsets(env) == {0: (1, None), 1: (5, 5), 2: (5, None)}
    assert Announcement.decode(source[3].value).kind == bus.END_OF_RUN
    assert json.loads(next(env.warehouse.rglob("retired-1.json")).read_text())["backlog_to"] == 2

    # Nothing left: a second run copies nothing; a retired partition takes no backlog.
    again = reassign_in_process(cfg, pcfg, 1, 2, store)
    assert (again.records, again.markers) == (0, 0)
    assert ends(env)[2] == 5
    with pytest.raises(ReassignError, match="partition 1 is retired itself"):
        reassign_in_process(cfg, pcfg, 0, 1, store)
    assert offsets(env)[0] == (1, None)


def test_reassign_refuses_a_record_pipeline_and_unknown_partitions(make_env):
    proxy = make_env("proxy", pipeline="proxy_test", ptype="proxy", supported_files=[".log"])
    done = run_cli(proxy, "reassign", "--from", "1", "--to", "0")
    assert done.returncode == 1
    assert "read by one streaming job from every partition" in done.stderr
    assert "nothing to reassign" in done.stderr

    flow = make_env("flow")
    from spot_ingest.bus import ensure_topic
    from spot_ingest.config import load
    ensure_topic(load(flow.config).kafka, flow.topic, 2)
    done = run_cli(flow, "reassign", "--from", "3", "--to", "0")
    assert done.returncode == 1
    assert f"topic {flow.topic} has no partition 3 (partitions 0-1)" in done.stderr
    done = run_cli(flow, "reassign", "--from", "1", "--to", "1")
    assert done.returncode == 1 and "the same partition" in done.stderr
    assert not list(flow.warehouse.rglob("retired-*.json"))
