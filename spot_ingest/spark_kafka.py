"""A Spark Structured Streaming source for Kafka, written with PySpark's
Python data source API over kafka-python.

Spark's own Kafka source needs the spark-sql-kafka connector jar; where that
jar is not on the classpath (it cannot be downloaded everywhere), this source
stands in. Offsets are a ``{"<partition>": next offset}`` dict kept in Spark's
checkpoint, so a restarted query resumes exactly where its last committed
micro-batch ended: with an idempotent sink, each record is applied once.

    spark.dataSource.register(KafkaSource)
    spark.readStream.format("spot_kafka").option("kafka", cfg.kafka.to_json())
         .option("topic", "t").option("group", "g").load()

``kafka`` is the pipeline's ``KafkaConfig`` as JSON: brokers, TLS and SASL
settings, and where the password is (a file or an environment variable),
never the password itself, so that no Spark option, plan or log holds it.
Each Python worker reads the password when it makes its consumer (with
``spot_ingest.kafka_security.client_kwargs``, as every other client): on a
cluster, the file must exist on the executors, or the variable be set there
(``spark.executorEnv.NAME``). ``bootstrap`` (host:port, PLAINTEXT) is still
accepted in its place.

Schema: partition INT, offset BIGINT, timestamp BIGINT (ms), value BINARY,
headers MAP<STRING, STRING>. ``group`` (optional) is a consumer group to which
processed offsets are committed, for lag monitoring only; Spark's checkpoint
stays the source of truth.

Each micro-batch's end offset is the partitions' high watermarks, so every
record must be a batch of its own on the broker side (send and wait for the
acknowledgement); the master publishes lines that way.
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition

SCHEMA = "partition INT, offset BIGINT, timestamp BIGINT, value BINARY, headers MAP<STRING, STRING>"
_ARROW_SCHEMA = pa.schema([("partition", pa.int32()), ("offset", pa.int64()),
                           ("timestamp", pa.int64()), ("value", pa.binary()),
                           ("headers", pa.map_(pa.string(), pa.string()))])
POLL_MS = 1000


@dataclass
class KafkaRange(InputPartition):
    topic: str
    partition: int
    start: int
    end: int


class KafkaStreamReader(DataSourceStreamReader):
    def __init__(self, options: dict):
        from spot_ingest.config import KafkaConfig
        if options.get("kafka"):
            self.kafka = KafkaConfig.from_json(options["kafka"])
        else:
            self.kafka = KafkaConfig(options["bootstrap"], 9092)
        self.topic = options["topic"]
        self.group = options.get("group")
        self._consumer = None
        self._last_ends: dict = {}

    def _consumer_for(self, **kwargs):
        """A KafkaConsumer with the configured TLS/SASL settings; a refusal
        that waiting will not cure is reported with its reason."""
        from kafka import KafkaConsumer
        from kafka.errors import KafkaError

        from spot_ingest.kafka_security import client_kwargs, diagnose
        try:
            return KafkaConsumer(**client_kwargs(self.kafka), **kwargs)
        except KafkaError as exc:
            problem = diagnose(self.kafka)
            raise RuntimeError(f"could not connect to Kafka at {self.kafka.bootstrap}: "
                               f"{problem or f'{type(exc).__name__}: {exc}'}") from None

    def _client(self):
        if self._consumer is None:
            self._consumer = self._consumer_for(enable_auto_commit=False, group_id=self.group,
                                                client_id="spot-spark-driver")
        return self._consumer

    def _ends(self) -> dict:
        from kafka import TopicPartition
        consumer = self._client()
        parts = consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        ends = consumer.end_offsets(tps) if tps else {}
        return {str(tp.partition): int(ends[tp]) for tp in tps}

    def initialOffset(self) -> dict:
        return {p: 0 for p in self._ends()}

    def latestOffset(self, start: dict | None = None, limit=None) -> dict:
        # A broker that does not answer must not stop the query: no new data
        # this micro-batch, the same question at the next trigger.
        try:
            self._last_ends = self._ends()
        except Exception as exc:
            if not self._last_ends:
                raise     # nothing known to stand on: the query fails and says why
            import logging
            logging.getLogger("spot_ingest.spark_kafka").warning(
                "the broker does not answer (%s: %s); no new data this micro-batch",
                type(exc).__name__, exc)
            if self._consumer is not None:
                self._consumer.close()
                self._consumer = None
        return dict(self._last_ends)

    def partitions(self, start: dict, end: dict):
        return [KafkaRange(self.topic, int(p), int(start.get(p, 0)), int(e))
                for p, e in sorted(end.items(), key=lambda kv: int(kv[0]))
                if int(e) > int(start.get(p, 0))]

    def read(self, partition: KafkaRange):
        from kafka import TopicPartition
        consumer = self._consumer_for(enable_auto_commit=False, group_id=None,
                                      client_id="spot-spark-reader",
                                      max_partition_fetch_bytes=8 << 20, fetch_max_bytes=64 << 20)
        tp = TopicPartition(partition.topic, partition.partition)
        consumer.assign([tp])
        consumer.seek(tp, partition.start)
        position = partition.start
        idle_polls = 0
        try:
            while position < partition.end:
                records = consumer.poll(timeout_ms=POLL_MS).get(tp, [])
                if not records:
                    idle_polls += 1
                    if idle_polls > 60:
                        raise RuntimeError(f"no records from {tp} offset {position} "
                                           f"for 60 s (expected up to {partition.end})")
                    continue
                idle_polls = 0
                rows = [r for r in records if partition.start <= r.offset < partition.end]
                if rows:
                    yield pa.RecordBatch.from_arrays([
                        pa.array([partition.partition] * len(rows), pa.int32()),
                        pa.array([r.offset for r in rows], pa.int64()),
                        pa.array([r.timestamp for r in rows], pa.int64()),
                        pa.array([r.value for r in rows], pa.binary()),
                        pa.array([[(k, (v or b"").decode("utf-8", "replace")) for k, v in (r.headers or [])]
                                  for r in rows], pa.map_(pa.string(), pa.string())),
                    ], schema=_ARROW_SCHEMA)
                position = records[-1].offset + 1
        finally:
            consumer.close()

    def commit(self, end: dict) -> None:
        if not self.group:
            return
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata
        try:
            self._client().commit({TopicPartition(self.topic, int(p)): OffsetAndMetadata(int(o), "", -1)
                                   for p, o in end.items()})
        except Exception:  # monitoring only; the checkpoint holds the truth
            pass

    def stop(self) -> None:
        if self._consumer is not None:
            self._consumer.close()


class KafkaSource(DataSource):
    @classmethod
    def name(cls) -> str:
        return "spot_kafka"

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema) -> KafkaStreamReader:
        return KafkaStreamReader(self.options)
