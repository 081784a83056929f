"""The Kafka topic between master and workers: the one place work waits.

Delivery guarantee: at least once. The master counts an announcement as sent
only when the broker acknowledged it (acks=all); a worker commits an offset
only after the output of that record and of every record before it is in
place. A crash on either side can therefore repeat an announcement but never
lose one; the warehouse's checksum-named output makes a repeat harmless.

Records are Avro (``schemas/announcement.avsc``), one record per Kafka
message, preceded by a one-byte format version.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import fastavro
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewPartitions, NewTopic
from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("schemas") / "announcement.avsc"
SCHEMA = fastavro.parse_schema(json.loads(SCHEMA_PATH.read_text()))
FORMAT_VERSION = b"\x01"
FILE, END_OF_RUN = "FILE", "END_OF_RUN"


class BusError(Exception):
    pass


@dataclass
class Announcement:
    pipeline: str
    pipeline_type: str
    staged_path: str
    size: int
    sha256: str
    original_name: str
    collected_at: int          # epoch milliseconds
    collector_host: str
    kind: str = FILE
    announced_at: int = 0      # epoch milliseconds, set when sent
    chunk_index: int = 0
    chunk_count: int = 1
    source_sha256: str | None = None
    run_id: str | None = None

    def encode(self) -> bytes:
        buf = io.BytesIO()
        buf.write(FORMAT_VERSION)
        fastavro.schemaless_writer(buf, SCHEMA, asdict(self))
        return buf.getvalue()

    @classmethod
    def decode(cls, data: bytes) -> "Announcement":
        if not data or data[:1] != FORMAT_VERSION:
            raise BusError(f"not an announcement of format {FORMAT_VERSION!r}")
        record = fastavro.schemaless_reader(io.BytesIO(data[1:]), SCHEMA, SCHEMA)
        for key in ("collected_at", "announced_at"):
            # fastavro turns timestamp-millis into datetimes; keep plain numbers.
            if hasattr(record[key], "timestamp"):
                record[key] = int(record[key].timestamp() * 1000)
        return cls(**record)

    @classmethod
    def end_of_run(cls, pipeline: str, pipeline_type: str, run_id: str, host: str) -> "Announcement":
        return cls(pipeline, pipeline_type, "", 0, "", "", 0, host, kind=END_OF_RUN, run_id=run_id)


def group_id(pipeline: str) -> str:
    return f"spot-ingest-{pipeline}"


def ensure_topic(bootstrap: str, topic: str, partitions: int, timeout: float | None = None) -> int:
    """Create ``topic`` with ``partitions`` partitions, or check an existing one.

    A topic with fewer partitions than workers is grown when the broker allows
    it; otherwise this refuses with a message saying what to do. An unreachable
    broker is waited for (each retry logged), for ``timeout`` seconds or forever.
    """
    admin = retry_kafka(lambda: KafkaAdminClient(bootstrap_servers=bootstrap,
                                            client_id="spot-ingest-admin"),
                   f"connect to Kafka at {bootstrap}", timeout)
    try:
        existing = _partition_count(admin, topic)
        if existing is None:
            try:
                admin.create_topics([NewTopic(topic, partitions, 1)])
                log.info("created topic %s with %d partitions", topic, partitions)
                existing = partitions
            except TopicAlreadyExistsError:
                existing = _partition_count(admin, topic)
        if existing < partitions:
            try:
                admin.create_partitions({topic: NewPartitions(partitions)})
                log.info("grew topic %s from %d to %d partitions", topic, existing, partitions)
                existing = partitions
            except KafkaError as exc:
                raise BusError(
                    f"topic {topic} has {existing} partitions but {partitions} workers need one "
                    f"each, and the broker refused to add partitions ({exc}). Start at most "
                    f"{existing} workers, or set pipelines.<name>.topic to a new topic name") from None
        return existing
    finally:
        admin.close()


def _partition_count(admin: KafkaAdminClient, topic: str) -> int | None:
    if topic not in admin.list_topics():
        return None
    return len(admin.describe_topics([topic])[0]["partitions"])


def retry_kafka(action, what: str, timeout: float | None = None):
    delay = 0.5
    deadline = time.monotonic() + timeout if timeout is not None else None
    while True:
        try:
            return action()
        except KafkaError as exc:
            if deadline is not None and time.monotonic() + delay > deadline:
                raise BusError(f"could not {what}: {exc}") from None
            log.warning("could not %s (%s); retrying in %.1f s", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)


def await_ack(future, what: str, timeout: float = 120, every: float = 5):
    """Wait for the broker's acknowledgement of a send, saying so while it is late."""
    waited = 0.0
    while True:
        try:
            return future.get(timeout=every)
        except KafkaTimeoutError:
            if future.is_done:
                raise
            waited += every
            if waited >= timeout:
                raise
            log.warning("the broker has not acknowledged the %s for %.0f s; waiting", what, waited)


class Announcer:
    """Sends announcements and returns only once the broker has them."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, pipeline: str,
                 max_request_size: int = 1_000_000):
        self.topic = topic
        self.partitions = partitions
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap, acks="all", linger_ms=0, retries=5,
            max_request_size=max(max_request_size, 1_000_000), client_id=f"spot-master-{pipeline}")
        self.balancer = PartitionBalancer(bootstrap, topic, partitions, group_id(pipeline))

    def announce(self, record: Announcement, partition: int | None = None,
                 timeout: float = 120) -> tuple[int, int]:
        if partition is None:
            partition = self.balancer.choose()
        record.announced_at = int(time.time() * 1000)
        future = self.producer.send(self.topic, record.encode(), partition=partition)
        meta = await_ack(future, f"announcement of {record.original_name or 'end of run'}", timeout)
        self.balancer.sent(partition)
        return meta.partition, meta.offset

    def send_raw(self, value: bytes, headers: list[tuple[str, bytes]], partition: int,
                 timeout: float = 30) -> tuple[int, int]:
        """A record that is not an announcement (the proxy pipeline's lines)."""
        future = self.producer.send(self.topic, value, partition=partition, headers=headers)
        meta = await_ack(future, "record", timeout)
        return meta.partition, meta.offset

    def close(self) -> None:
        self.producer.close(timeout=10)
        self.balancer.close()


class PartitionBalancer:
    """Chooses the partition with the least outstanding work.

    Outstanding work is the partition's end offset minus its worker's
    committed offset, refreshed every few seconds and counted up locally in
    between. So a slow or stopped worker gets no new files while the others
    are idle, and equal workers share files round-robin.
    """

    REFRESH_SECONDS = 5.0

    def __init__(self, bootstrap: str, topic: str, partitions: int, group: str):
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                      enable_auto_commit=False, client_id=f"{group}-balancer")
        self.lag = [0] * partitions
        self.next_rr = 0
        self.refreshed = 0.0

    def _refresh(self) -> None:
        try:
            ends = self.consumer.end_offsets(self.tps)
            for tp in self.tps:
                committed = self.consumer.committed(tp) or 0
                self.lag[tp.partition] = max(0, ends.get(tp, 0) - committed)
        except KafkaError as exc:  # balancing is best effort; round-robin meanwhile
            log.debug("could not read partition lag: %s", exc)
            self.lag = [0] * len(self.tps)
        self.refreshed = time.monotonic()

    def choose(self) -> int:
        if time.monotonic() - self.refreshed > self.REFRESH_SECONDS:
            self._refresh()
        n = len(self.tps)
        order = [(self.next_rr + i) % n for i in range(n)]
        best = min(order, key=lambda p: self.lag[p])
        self.next_rr = (best + 1) % n
        return best

    def sent(self, partition: int) -> None:
        self.lag[partition] += 1

    def close(self) -> None:
        self.consumer.close()


class PartitionReader:
    """A worker's view of its own partition: assign (no group rebalancing),
    resume from the committed offset, commit explicitly."""

    def __init__(self, bootstrap: str, topic: str, partition: int, pipeline: str):
        self.tp = TopicPartition(topic, partition)
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group_id(pipeline), enable_auto_commit=False,
            auto_offset_reset="earliest", client_id=f"spot-worker-{pipeline}-{partition}",
            max_poll_records=16, request_timeout_ms=15_000)
        self.consumer.assign([self.tp])

    def committed(self, timeout_ms: int | None = None) -> int | None:
        return self.consumer.committed(self.tp, timeout_ms=timeout_ms)

    def ping(self, timeout_ms: int = 5000) -> None:
        """A request the broker must answer (committed() may answer from a cache)."""
        self.consumer.end_offsets([self.tp], timeout_ms=timeout_ms)

    def poll(self, timeout_ms: int = 1000) -> list:
        return self.consumer.poll(timeout_ms=timeout_ms).get(self.tp, [])

    def pause(self) -> None:
        self.consumer.pause(self.tp)

    def resume(self) -> None:
        self.consumer.resume(self.tp)

    def commit(self, next_offset: int, metadata: str = "") -> None:
        self.consumer.commit({self.tp: OffsetAndMetadata(next_offset, metadata, -1)})

    def close(self) -> None:
        self.consumer.close(autocommit=False)
