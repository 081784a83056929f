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

import hashlib
import hmac
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

from .config import KafkaConfig
from .kafka_security import PasswordError, client_kwargs, diagnose
from .policy import Backoff

log = logging.getLogger(__name__)

SCHEMA_PATH = Path(__file__).with_name("schemas") / "announcement.avsc"
SCHEMA = fastavro.parse_schema(json.loads(SCHEMA_PATH.read_text()))
FORMAT_VERSION = b"\x01"
FILE, END_OF_RUN = "FILE", "END_OF_RUN"


class BusError(Exception):
    pass


class KafkaSecurityError(BusError):
    """TLS or SASL refuses the connection: waiting will not help."""


SECURITY_HINT = ("this will not fix itself: check the kafka.ssl_*/sasl_* settings, the broker's "
                 "certificate and the credentials")


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


SIGNATURE_HEADER = "spot.sig"


def sign(key: bytes, value: bytes) -> bytes:
    """HMAC-SHA256 of a record's value, hex, for the ``spot.sig`` header."""
    return hmac.new(key, value, hashlib.sha256).hexdigest().encode()


def signature_problem(key: bytes | None, value: bytes, headers) -> str | None:
    """Why a record's signature is not acceptable (None: it is, or none is required)."""
    if key is None:
        return None
    given = [v for k, v in (headers or []) if k == SIGNATURE_HEADER]
    if not given:
        return "unsigned (this pipeline's announcements must carry an HMAC-SHA256 signature)"
    if len(given) > 1 or not hmac.compare_digest(given[0], sign(key, value or b"")):
        return "bad signature (not signed with this pipeline's signing key)"
    return None


def group_id(pipeline: str) -> str:
    return f"spot-ingest-{pipeline}"


KAFKA_DEFAULT_MESSAGE_LIMIT = 1_048_588


def topic_message_limit(kafka: KafkaConfig, topic: str) -> int | None:
    """The largest record the topic takes (its max.message.bytes, as the broker
    reports it through DescribeConfigs); None when the broker does not say."""
    from kafka.admin import ConfigResource, ConfigResourceType
    admin = KafkaAdminClient(**client_kwargs(kafka), client_id="spot-ingest-admin")
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    entries = described.get("topic", {}).get(topic, {}) if isinstance(described, dict) else {}
    value = entries.get("max.message.bytes")
    if isinstance(value, dict):
        value = value.get("value")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def check_message_size(kafka: KafkaConfig, topic: str) -> None:
    """kafka.message_size must fit the topic's limit: refuse at start, not at the first big file."""
    try:
        limit = topic_message_limit(kafka, topic)
    except KafkaError as exc:
        log.warning("could not read topic %s's max.message.bytes (%s); kafka.message_size %d "
                    "is not checked", topic, exc, kafka.message_size)
        return
    needed = kafka.message_size
    if limit is None:
        if needed > KAFKA_DEFAULT_MESSAGE_LIMIT:
            log.warning("the broker does not report topic %s's max.message.bytes; "
                        "kafka.message_size %d is above Kafka's default limit (%d): a broker with "
                        "that limit will refuse the larger messages", topic, needed,
                        KAFKA_DEFAULT_MESSAGE_LIMIT)
        return
    if needed > limit:
        raise BusError(f"kafka.message_size is {needed} bytes but topic {topic} takes records of "
                       f"at most {limit} bytes (max.message.bytes): lower kafka.message_size or "
                       f"raise the topic's max.message.bytes")


def ensure_topic(kafka: KafkaConfig, topic: str, partitions: int, timeout: float | None = None,
                 security_fatal: bool | None = None) -> int:
    """Create ``topic`` with ``partitions`` partitions, or check an existing one.

    A topic with fewer partitions than workers is grown when the broker allows
    it (``_grow``); otherwise this refuses with a message saying what to do. A
    topic with more is left as it is (Kafka cannot shrink one): the caller
    uses its first ``partitions``. Returns the topic's partition count. An unreachable
    broker is waited for (each retry logged), for ``timeout`` seconds or forever.
    A TLS or SASL refusal (see ``retry_kafka``) ends the wait at once when a
    timeout is given or ``security_fatal`` is true.
    """
    admin = retry_kafka(lambda: KafkaAdminClient(**client_kwargs(kafka),
                                                 client_id="spot-ingest-admin"),
                        f"connect to Kafka at {kafka.bootstrap}", timeout, kafka=kafka,
                        security_fatal=security_fatal)
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
            existing = _grow(admin, topic, existing, partitions)
        return existing
    finally:
        admin.close()


GROWTH_VISIBLE_SECONDS = 30.0


def _grow(admin: KafkaAdminClient, topic: str, existing: int, partitions: int) -> int:
    """Add partitions up to ``partitions`` (Kafka's CreatePartitions; a topic
    never shrinks, so this is only ever asked for more). Refused by the
    broker, this raises a BusError saying what to do: the master stops
    rather than run workers that would never get a file (choice documented
    in README, "Workers joining"). Grown by another master at the same time
    counts as grown. Returns once the broker's metadata shows the new
    partitions (at most ``GROWTH_VISIBLE_SECONDS``): a producer made right
    after would otherwise refuse a send to a partition it does not know."""
    try:
        admin.create_partitions({topic: NewPartitions(partitions)})
    except KafkaError as exc:
        try:
            now = _partition_count(admin, topic) or existing
        except KafkaError:
            now = existing
        if now >= partitions:      # another master grew it meanwhile
            log.info("topic %s has %d partitions (grown by another master)", topic, now)
            return now
        raise BusError(
            f"topic {topic} has {existing} partitions but {partitions} workers need one each, "
            f"and the broker refused to add partitions ({exc}). Start at "
            f"most {existing} workers, or set pipelines.<name>.topic to a new topic name") from None
    deadline = time.monotonic() + GROWTH_VISIBLE_SECONDS
    now = existing
    while True:
        try:
            now = _partition_count(admin, topic) or now
        except KafkaError as exc:
            log.debug("could not read topic %s's partitions: %s", topic, exc)
        if now >= partitions or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if now < partitions:
        log.warning("grew topic %s from %d to %d partitions, but the broker's metadata still "
                    "shows %d after %.0f s; announcements to the new partitions may fail (and be "
                    "retried) until it does", topic, existing, partitions, now,
                    GROWTH_VISIBLE_SECONDS)
    else:
        log.info("grew topic %s from %d to %d partitions: workers %d to %d can start", topic,
                 existing, partitions, existing, partitions - 1)
    return partitions


def _partition_count(admin: KafkaAdminClient, topic: str) -> int | None:
    if topic not in admin.list_topics():
        return None
    return len(admin.describe_topics([topic])[0]["partitions"])


def security_problem(kafka: KafkaConfig | None) -> str | None:
    """Why TLS or SASL refuses the connection, if it does (see kafka_security.diagnose)."""
    if kafka is None:
        return None
    try:
        return diagnose(kafka)
    except Exception as exc:    # a diagnosis must never hide the original error
        log.debug("could not diagnose the connection: %s", exc)
        return None


def retry_kafka(action, what: str, timeout: float | None = None, kafka: KafkaConfig | None = None,
                security_fatal: bool | None = None):
    """Run ``action`` (which makes a Kafka client) until it succeeds.

    Connection errors are retried with backoff, each logged, for ``timeout``
    seconds or forever. With ``kafka`` given, a TLS or SASL refusal (a
    certificate the CA does not vouch for, a refused mechanism or password)
    is found by a handshake of our own before the first attempt and after
    each failure, and logged at error level naming the broker, the file and
    the reason on every retry; with a timeout (or ``security_fatal``) it ends
    the wait at once with a KafkaSecurityError.
    """
    if security_fatal is None:
        security_fatal = timeout is not None
    backoff = Backoff(first=0.5, most=10.0)
    deadline = time.monotonic() + timeout if timeout is not None else None
    # A handshake of our own first: kafka-python would retry for its whole
    # bootstrap timeout (30 s) before failing without saying why.
    problem = security_problem(kafka) if kafka is not None and (kafka.uses_tls or kafka.uses_sasl) \
        else None
    while True:
        if problem is None:     # after a diagnosis, always try the real client again
            try:
                return action()
            except PasswordError as exc:
                problem = str(exc)
            except KafkaError as exc:
                problem = security_problem(kafka)
                reason = f"{type(exc).__name__}: {exc}"
        delay = backoff.delay()
        if problem is not None:
            if security_fatal or (deadline is not None and time.monotonic() + delay > deadline):
                raise KafkaSecurityError(f"could not {what}: {problem}; {SECURITY_HINT}")
            log.error("could not %s: %s; retrying in %.1f s; %s", what, problem, delay,
                      SECURITY_HINT)
            problem = None
        elif deadline is not None and time.monotonic() + delay > deadline:
            raise BusError(f"could not {what}: {reason}") from None
        else:
            log.warning("could not %s (%s); retrying in %.1f s", what, reason, delay)
        time.sleep(delay)


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

    def __init__(self, kafka: KafkaConfig, topic: str, partitions: int, pipeline: str,
                 max_request_size: int = 1_000_000, signing_key: bytes | None = None,
                 retired=None):
        self.topic = topic
        self.partitions = partitions
        self.signing_key = signing_key
        self.producer = KafkaProducer(
            **client_kwargs(kafka), acks="all", linger_ms=0, retries=5,
            max_request_size=max(max_request_size, 1_000_000), client_id=f"spot-master-{pipeline}")
        try:
            self.balancer = PartitionBalancer(kafka, topic, partitions, group_id(pipeline),
                                              retired)
        except BaseException:
            self.producer.close(timeout=5)
            raise

    def announce(self, record: Announcement, partition: int | None = None,
                 timeout: float = 120) -> tuple[int, int]:
        if partition is None:
            partition = self.balancer.choose()
        record.announced_at = int(time.time() * 1000)
        value = record.encode()
        headers = [(SIGNATURE_HEADER, sign(self.signing_key, value))] if self.signing_key else None
        future = self.producer.send(self.topic, value, partition=partition, headers=headers)
        meta = await_ack(future, f"announcement of {record.original_name or 'end of run'}", timeout)
        self.balancer.sent(partition)
        return meta.partition, meta.offset

    def send_raw(self, value: bytes, headers: list[tuple[str, bytes]], partition: int,
                 timeout: float = 30) -> tuple[int, int]:
        """A record that is not an announcement (a message of the line protocol)."""
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
    are idle, and equal workers share files round-robin. ``retired()`` (read
    at each choice) names partitions whose worker is gone for good (see
    ``spot_ingest.reassign``): they get nothing while another can take it.
    """

    REFRESH_SECONDS = 5.0

    def __init__(self, kafka: KafkaConfig, topic: str, partitions: int, group: str,
                 retired=None):
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.retired_source, self.retired = retired, set()
        self.consumer = KafkaConsumer(**client_kwargs(kafka), group_id=group,
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

    def _read_retired(self) -> None:
        """At every choice (a listing of a small folder in the store, cheap
        beside staging a file): a reassignment counts from the next file."""
        if self.retired_source is None:
            return
        try:
            retired = self.retired_source()
        except Exception as exc:   # noqa: BLE001  (the store away: keep the last view)
            log.debug("could not read retired partitions: %s", exc)
            return
        if retired != self.retired and retired:
            log.info("partition(s) %s retired (their worker is gone; see spot-ingest "
                     "reassign): no new work for them", ", ".join(map(str, sorted(retired))))
        self.retired = retired

    def choose(self) -> int:
        if time.monotonic() - self.refreshed > self.REFRESH_SECONDS:
            self._refresh()
        self._read_retired()
        n = len(self.tps)
        order = [(self.next_rr + i) % n for i in range(n)]
        order = [p for p in order if p not in self.retired] or order
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

    def __init__(self, kafka: KafkaConfig, topic: str, partition: int, pipeline: str):
        self.tp = TopicPartition(topic, partition)
        self.consumer = KafkaConsumer(
            **client_kwargs(kafka), group_id=group_id(pipeline), enable_auto_commit=False,
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
