"""Workers joining and leaving, in-process: how ``ensure_topic`` grows a topic
(Kafka's CreatePartitions, which the test broker lacks, so it is driven here
by a stand-in admin client that keeps a partition count as a broker would),
the retired marks of ``spot_ingest.reassign`` in a real local store, and the
command's summary line. The same paths against a real broker and real
processes: tests/test_reassign.py."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
from kafka.errors import IncompatibleBrokerVersion, InvalidPartitionsError

import spot_ingest.bus as bus
from spot_ingest.bus import BusError, ensure_topic
from spot_ingest.config import KafkaConfig
from spot_ingest.reassign import (Moved, ReassignError, reassign, rejoin, retire,
                                  retired_partitions, summary_line)
from spot_ingest.store import LocalStore

KAFKA = KafkaConfig("127.0.0.1", 9)


class Broker:
    """What ensure_topic asks of the broker, for one topic. ``refuse``: the
    error CreatePartitions answers with; ``grown_meanwhile``: another master
    grows the topic just before this one asks; ``visible_after``: how many
    describe calls the metadata lags behind a growth."""

    def __init__(self, partitions=None, refuse=None, grown_meanwhile=None, visible_after=0):
        self.partitions, self.refuse = partitions, refuse
        self.grown_meanwhile, self.visible_after = grown_meanwhile, visible_after
        self.asked: list[int] = []
        self.shown = partitions
        self.closed = False

    def admin(self, **kwargs):
        return self

    def list_topics(self):
        return ["t"] if self.partitions is not None else []

    def describe_topics(self, topics):
        if self.visible_after > 0:
            self.visible_after -= 1
        else:
            self.shown = self.partitions
        return [{"partitions": [{"partition": p} for p in range(self.shown)]}]

    def create_topics(self, topics):
        self.partitions = self.shown = topics[0].num_partitions

    def create_partitions(self, request):
        self.asked.append(request["t"].total_count)
        if self.grown_meanwhile:
            self.partitions = self.grown_meanwhile
        if self.refuse is not None:
            raise self.refuse
        self.partitions = request["t"].total_count

    def close(self):
        self.closed = True


@pytest.fixture
def broker(monkeypatch):
    made = {}

    def use(**keys) -> Broker:
        made["b"] = Broker(**keys)
        monkeypatch.setattr(bus, "KafkaAdminClient", made["b"].admin)
        return made["b"]
    # no real waiting between metadata reads (the module's own time, not the process's)
    monkeypatch.setattr(bus, "time", SimpleNamespace(monotonic=time.monotonic, time=time.time,
                                                     sleep=lambda seconds: None))
    return use


def test_a_new_topic_gets_one_partition_per_worker(broker):
    b = broker()
    assert ensure_topic(KAFKA, "t", 3) == 3
    assert b.partitions == 3 and b.asked == [] and b.closed


def test_more_workers_grow_the_topic_and_say_so(broker, caplog):
    b = broker(partitions=2, visible_after=2)
    with caplog.at_level(logging.INFO, "spot_ingest.bus"):
        assert ensure_topic(KAFKA, "t", 4) == 4
    assert b.asked == [4] and b.partitions == 4
    assert b.shown == 4, "it returned only once the metadata showed the new partitions"
    assert "grew topic t from 2 to 4 partitions: workers 2 to 3 can start" in caplog.text


def test_fewer_workers_never_shrink_the_topic(broker):
    b = broker(partitions=4)
    assert ensure_topic(KAFKA, "t", 2) == 4, "the caller uses the first 2 of 4"
    assert ensure_topic(KAFKA, "t", 4) == 4
    assert b.asked == [] and b.partitions == 4


def test_a_broker_that_cannot_grow_a_topic_is_named_with_what_to_do(broker):
    b = broker(partitions=2, refuse=IncompatibleBrokerVersion(
        "Kafka broker does not support the 'CreatePartitionsRequest' Kafka protocol."))
    with pytest.raises(BusError) as refused:
        ensure_topic(KAFKA, "t", 3)
    message = str(refused.value)
    assert "topic t has 2 partitions but 3 workers need one each" in message
    assert "does not support the 'CreatePartitionsRequest'" in message
    assert "Start at most 2 workers, or set pipelines.<name>.topic to a new topic name" in message
    assert b.partitions == 2 and b.closed


def test_a_topic_grown_by_another_master_meanwhile_counts_as_grown(broker):
    b = broker(partitions=2, grown_meanwhile=3,
               refuse=InvalidPartitionsError("Topic already has 3 partitions."))
    assert ensure_topic(KAFKA, "t", 3) == 3
    assert b.asked == [3]


def test_growth_the_metadata_does_not_show_is_warned_about(broker, caplog, monkeypatch):
    b = broker(partitions=1, visible_after=10**9)
    monkeypatch.setattr(bus, "GROWTH_VISIBLE_SECONDS", 0.0)
    with caplog.at_level(logging.WARNING, "spot_ingest.bus"):
        assert ensure_topic(KAFKA, "t", 2) == 2
    assert b.asked == [2]
    assert "still shows 1 after 0 s" in caplog.text


# -- retired partitions ---------------------------------------------------------

PCFG = SimpleNamespace(name="flow_a", type="flow", topic="t")


def test_retired_marks_live_in_the_store_per_pipeline(tmp_path):
    store = LocalStore(str(tmp_path))
    assert retired_partitions(store, PCFG) == set()
    retire(store, PCFG, 3, 1)
    retire(store, PCFG, 2, 0)
    retire(store, SimpleNamespace(name="flow_b", type="flow"), 5, 0)
    assert retired_partitions(store, PCFG) == {2, 3}
    assert (tmp_path / "flow" / "_workers" / "flow_a" / "retired-3.json").is_file()
    retire(store, PCFG, 3, 0)              # a second reassignment replaces the mark
    assert retired_partitions(store, PCFG) == {2, 3}
    assert rejoin(store, PCFG, 3) is True, "worker 3 started again"
    assert rejoin(store, PCFG, 3) is False
    assert retired_partitions(store, PCFG) == {2}


def test_refusals_before_anything_is_read(tmp_path):
    store = LocalStore(str(tmp_path))
    cfg = SimpleNamespace(kafka=KAFKA)
    proxy = SimpleNamespace(name="proxy_a", type="proxy", topic="t")
    with pytest.raises(ReassignError, match="read by one streaming job from every partition"):
        reassign(cfg, proxy, 1, 0, store)
    with pytest.raises(ReassignError, match="the same partition"):
        reassign(cfg, PCFG, 1, 1, store)
    retire(store, PCFG, 0, 2)
    with pytest.raises(ReassignError, match="partition 0 is retired itself"):
        reassign(cfg, PCFG, 1, 0, store)


def test_the_summary_names_records_offsets_and_markers():
    moved = Moved(records=14, markers=1, first=120, last=134, start=120, end=135,
                  to_first=40, to_last=53)
    assert summary_line("flow_internals", 3, 1, moved) == (
        "flow_internals: moved 14 record(s) of partition 3 (offsets 120 to 134) to partition 1 "
        "(offsets 40 to 53); 1 end-of-run marker(s) not moved (they belong to partition 3's "
        "reader); partition 3 committed at 135 and retired: the master sends it no new work "
        "until a worker 3 starts again")
    assert summary_line("f", 1, 0, Moved(start=7, end=7)) == (
        "f: moved 0 record(s) of partition 1 to partition 0; partition 1 committed at 7 and "
        "retired: the master sends it no new work until a worker 1 starts again")
