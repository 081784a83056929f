"""The streaming runtime: a record pipeline's topic -> its table, with Spark
Structured Streaming.

    spot-ingest stream -t PIPELINE [-c CONF]                    (local Spark)
    spark-submit spot_ingest/streaming.py -t PIPELINE [-c CONF] (YARN, standalone, k8s)

A record pipeline gives only ``parse`` and its schemas; this module owns the
rest: the Spark session, shipping the code, the Kafka source, the checks of
the line protocol (``spot_ingest.lines``), the writer, the run loop, lag and
the end of a run.

Each micro-batch, in this order (the one place that performs it):

1. Spark reads the records between the offsets of its checkpoint and the
   partitions' ends, and writes those ends to the checkpoint's offset log.
2. ``check`` validates every header against the line protocol; a record that
   fails becomes one row of kind BAD with the reason (nothing in a record can
   fail the batch, which would fail the job again at the same batch after
   every restart).
3. The pipeline's ``parse`` makes one row per line; the engine adds the
   protocol's rejects (bad fields header, invalid UTF-8, NUL byte).
4. The writer, in each task, writes the task's rows as one Parquet file per
   table partition (table rows under ``<table>/hive/``, rejected lines under
   ``<table>/rejects/``), aside then renamed, named after the digests of the
   records it holds, which its metadata lists: a redone batch replaces its
   own files, and a record another file already holds (a message published
   twice) is not written again.
5. The batch's summary reaches the driver; end-of-run markers count only
   once their batch's rows are in place, and the partitions written are
   queued for the catalog (``spot_ingest.metastore.Registrar``), if any.
6. Spark records the batch as committed. A job killed before this step
   redoes the batch after a restart (step 4 makes that harmless).

The Kafka source is chosen by ``spark-streaming.kafka_source``: ``python``
(default; ``spot_ingest.spark_kafka``, over kafka-python, needs no jar) or
``spark`` (Spark's own ``format("kafka")``, which needs the
spark-sql-kafka-0-10 connector on the classpath: ``kafka_connector`` names
its jar or Maven coordinate, or spark-submit's ``--packages`` brings it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file (spark-submit spot_ingest/streaming.py): import the
    # package from the folder above and run the job from there.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from spot_ingest.streaming import main
    sys.exit(main())

from . import lines
from .metastore import Registrar, start_registrar
from . import pipeline as registry
from .config import IngestConfig, KafkaConfig, PipelineConfig, StoreLocation
from .policy import ExitCode
from .kafka_security import read_password
from .logs import printable
from .spark_env import DEFAULT_BIND_ADDRESS, CodeArchive, prepare_environment
from .metrics import Metrics
from .reports import ReportWriter
from .store import open_store

log = logging.getLogger("spot_ingest.streaming")

# The name of a record's output: must equal spot_ingest.lines.output_name.
OUTPUT_NAME = (
    "sha2(encode(concat(sha2(coalesce(value, X''), 256), concat_ws('', transform("
    "array_sort(map_entries(headers)), e -> concat(sha2(encode(e.key, 'UTF-8'), 256), "
    "sha2(encode(coalesce(e.value, ''), 'UTF-8'), 256))))), 'UTF-8'), 256)")

# A rejected line (line_no, line), or a rejected record (line_no and line
# NULL); both with the Kafka record they came in.
REJECT_COLUMNS = ("source", "line_no", "reject", "line", "kafka_partition", "kafka_offset")
SUMMARY = "msg_id string, kind string, rows long, rejects long, note string"


def rejects_schema():
    import pyarrow as pa
    return pa.schema([("source", pa.string()), ("line_no", pa.int64()),
                      ("reason", pa.string()), ("line", pa.string()),
                      ("kafka_partition", pa.int32()), ("kafka_offset", pa.int64())])


class StreamConfigError(Exception):
    """The streaming job cannot run as configured (exit code CONFIG)."""


# -- step 2: the line protocol's checks ---------------------------------------

def _anchored(pattern: str) -> str:
    """A Java regular expression that must match the whole value."""
    return f"^(?:{pattern})\\z"


def check(records):
    """Kafka records (partition, offset, value, headers) -> one row per
    record: ``name`` (OUTPUT_NAME), ``kind`` (LINES, END or BAD), ``error``
    (BAD: why), ``marker`` (END: ``END|<run>|<partition>``), the record's
    ``kafka_partition`` and ``kafka_offset``, ``source``, ``first_line``,
    ``fields_error``, ``bad_utf8`` (indexes of lines that are not UTF-8),
    and, for LINES only, ``value`` (the lines, as text) and ``fields``."""
    from pyspark.sql import functions as F

    h = F.col("headers")
    kind, run = h[lines.KIND], h[lines.RUN]
    mid, src, first, fields = h[lines.ID], h[lines.SOURCE], h[lines.FIRST_LINE], h[lines.FIELDS]
    fields_error, bad_utf8 = h[lines.FIELDS_ERROR], h[lines.INVALID_UTF8]
    names = F.split(fields, " ")
    name_re = lines.FIELD_NAME_PATTERN

    def shown(c):
        return F.concat(F.lit("'"), F.substring(c, 1, 100), F.lit("'"))

    def bad(what, c, why=""):
        return F.concat(F.lit(f"bad {what} "), shown(c), F.lit(why))

    lines_error = (
        F.when(mid.isNull(), f"missing {lines.ID} header")
        .when(~mid.rlike(_anchored(lines.MESSAGE_ID_PATTERN)),
              bad(lines.ID, mid, " (not 24 hex digits, '-' and 6 digits)"))
        .when(src.isNull(), f"missing {lines.SOURCE} header")
        .when(first.isNull(), f"missing {lines.FIRST_LINE} header")
        .when(~first.rlike(_anchored("[0-9]{1,15}")), bad(lines.FIRST_LINE, first))
        .when(bad_utf8.isNotNull() & ~bad_utf8.rlike(_anchored("[0-9]{1,7}(,[0-9]{1,7})*")),
              bad(lines.INVALID_UTF8, bad_utf8))
        .when(fields_error.isNotNull() & (F.length(fields_error) > lines.MAX_FIELDS_ERROR),
              f"bad {lines.FIELDS_ERROR} (longer than {lines.MAX_FIELDS_ERROR} characters)")
        .when(fields_error.isNull() & fields.isNull(), f"missing {lines.FIELDS} header")
        .when(fields_error.isNull() & ~fields.rlike(_anchored(f"({name_re}( {name_re})*)?")),
              bad(lines.FIELDS, fields, " (not field names separated by single spaces)"))
        .when(fields_error.isNull() & (F.size(names) > lines.MAX_FIELDS),
              f"bad {lines.FIELDS} (more than {lines.MAX_FIELDS} names)")
        .when(fields_error.isNull() & (F.size(F.array_distinct(names)) != F.size(names)),
              bad(lines.FIELDS, fields, " (a name appears twice)"))
        .when(F.col("value").isNull() | (F.length("value") == 0), "empty message"))
    marker_error = (
        F.when(run.isNull(), f"END_OF_RUN marker without {lines.RUN} header")
        # An empty run id: a master run without --run-id (no job waits for it).
        .when(~run.rlike(_anchored(f"(?:{lines.RUN_ID_PATTERN})?")),
              bad(f"END_OF_RUN marker: {lines.RUN}", run)))
    error = (F.when(kind.isNull(), f"missing {lines.KIND} header")
             .when(kind == lines.LINES, lines_error)
             .when(kind == lines.END_OF_RUN, marker_error)
             .otherwise(bad(lines.KIND, kind)))
    checked = records.select("partition", "offset", "value", "headers", error.alias("error"))
    kind_col = (F.when(F.col("error").isNotNull(), "BAD").when(kind == lines.END_OF_RUN, "END")
                .otherwise("LINES"))
    is_lines = kind_col == "LINES"
    return checked.select(
        F.expr(OUTPUT_NAME).alias("name"), kind_col.alias("kind"), "error",
        F.concat_ws("|", F.lit("END"), run, F.col("partition").cast("string")).alias("marker"),
        F.col("partition").alias("kafka_partition"), F.col("offset").alias("kafka_offset"),
        src.alias("source"),
        F.expr(f"try_cast(headers['{lines.FIRST_LINE}'] AS BIGINT)").alias("first_line"),
        fields_error.alias("fields_error"),
        F.split(F.coalesce(bad_utf8, F.lit("")), ",").alias("bad_utf8"),
        F.when(is_lines, F.col("value").cast("string")).alias("value"),
        F.when(is_lines, fields).alias("fields"))


ENGINE_COLUMNS = ("name", "kind", "error", "marker", "kafka_partition", "kafka_offset", "source",
                  "first_line", "fields_error", "bad_utf8")


def rows(records, plugin: registry.RecordPipeline):
    """Steps 2 and 3: records -> the writer's rows (engine columns, line_no,
    reject, line, the table's columns and partition columns)."""
    from pyspark.sql import functions as F

    parsed = plugin.parse(check(records))
    bad_line = F.array_contains("bad_utf8", F.col("pos").cast("string"))
    # The protocol's rejects come first; then the pipeline's own reason.
    reject = (F.when(F.col("kind") == "BAD", F.col("error"))
              .when(F.col("kind") == "END", F.lit(None).cast("string"))
              .when(F.col("fields_error").isNotNull(), F.col("fields_error"))
              .when(bad_line, F.lit("invalid UTF-8"))
              .when(F.expr("instr(line, char(0)) > 0"), F.lit("NUL byte in the line"))
              .otherwise(F.col("reject")))
    return parsed.select(
        "name", "kind", "marker", "kafka_partition", "kafka_offset", "source",
        F.when(F.col("kind") == "LINES", F.col("first_line") + F.col("pos")).alias("line_no"),
        reject.alias("reject"),
        F.when(reject.isNotNull() & (F.col("kind") == "LINES"), F.col("line")).alias("line"),
        *plugin.full_schema.names)


# -- step 4: the writer -------------------------------------------------------

def writer(ptype: str, location: StoreLocation, prefix: str):
    """The function run by ``mapInArrow`` in each task, after the rows were
    shuffled so that each table partition is in one task (``process``). It
    makes one summary row per record (per task a record reaches) and writes
    all the task's rows at its end: one file per table partition (and one
    rejects file), named
    ``merged-<digest of the names of the records it holds>`` (a record's
    ``name`` digests its content and headers). Each file lists its records'
    names in its Parquet metadata (``warehouse.INPUTS_KEY``), and a record a
    file of the partition already holds under another name (a message
    published twice, or a batch redone in other tasks) is not written again;
    a batch redone alike makes the same names and replaces its files."""
    def write(batches):
        import pyarrow as pa
        import pyarrow.compute as pc

        from spot_ingest import pipeline as registry
        from spot_ingest.store import open_store
        from spot_ingest.warehouse import MERGED_PREFIX, TableWriter, held_inputs

        plugin = registry.load(ptype)
        store = open_store(location)
        full, rj_schema = plugin.full_schema, rejects_schema()
        part_names = plugin.partition_schema.names
        tag = f"{prefix}-{os.getpid()}"
        goods, rejecteds, summaries = [], [], []
        names_here: set[str] = set()
        out_schema = pa.schema([("msg_id", pa.string()), ("kind", pa.string()),
                                ("rows", pa.int64()), ("rejects", pa.int64()), ("note", pa.string())])

        def summary(msg_id, kind, rows=0, rejects=0, note=None):
            return {"msg_id": msg_id, "kind": kind, "rows": rows, "rejects": rejects, "note": note}

        def flush(record, parts):
            table = pa.Table.from_batches(parts)
            kind = table.column("kind")[0].as_py()
            name = table.column("name")[0].as_py()
            if kind == "END":      # an end-of-run marker: report, write nothing
                return summary(table.column("marker")[0].as_py(), kind)
            if kind == "LINES" and name in names_here:
                # The same message twice in this batch (published again): once.
                return summary(name, kind, note="already held")
            names_here.add(name)
            bad = pc.is_valid(table.column("reject"))
            good, rejected = table.filter(pc.invert(bad)), table.filter(bad)
            if good.num_rows:
                goods.append(good.select(["name", *full.names]))
            if rejected.num_rows:
                rejecteds.append(rejected.select(["name", *REJECT_COLUMNS]))
            if kind == "BAD":
                return summary(f"partition {record[0]} offset {record[1]}", kind, 0, 0,
                               rejected.column("reject")[0].as_py())
            return summary(name, kind, good.num_rows, rejected.num_rows)

        def not_held(table, area, keys, data_dir):
            """The rows of records that no other file of their partition holds,
            and the partition directory of each row."""
            names = table.column("name")
            if keys:
                dirs = pc.binary_join_element_wise(
                    *[pc.binary_join_element_wise(f"{k}=", pc.cast(table.column(k), pa.string()), "")
                      for k in keys], "/")
            else:
                dirs = pa.array(["."] * table.num_rows)
            keep = pa.array([True] * table.num_rows)
            for rel_dir in pc.unique(dirs).to_pylist():
                held = held_inputs(store, area, rel_dir, data_dir)
                if held:
                    dup = pc.and_(pc.equal(dirs, rel_dir),
                                  pc.is_in(pc.binary_join_element_wise("part-", names, ""),
                                           pa.array(list(held))))
                    keep = pc.and_(keep, pc.invert(dup))
            return table.filter(keep), dirs.filter(keep)

        def write_all():
            """One file per partition: every good row, then every rejected one."""
            dropped, written, nbytes = {}, {}, 0
            for rows_list, area, schema, keys, data_dir in (
                    (goods, plugin.table, plugin.schema, part_names, "hive"),
                    (rejecteds, f"{plugin.table}/rejects", rj_schema, [], ".")):
                if not rows_list:
                    continue
                table = pa.concat_tables(rows_list)
                inputs = sorted({f"part-{n}" for n in table.column("name").to_pylist()})
                name = f"{MERGED_PREFIX}{hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:32]}"
                kept, dirs = not_held(table, area, keys, data_dir)
                if keys:
                    for d, c in zip(*pc.value_counts(dirs).flatten()):
                        written[d.as_py()] = written.get(d.as_py(), 0) + c.as_py()
                if kept.num_rows < table.num_rows:
                    for n, c in zip(*pc.value_counts(pc.filter(
                            table.column("name"), pc.invert(pc.is_in(
                                table.column("name"), kept.column("name"))))).flatten()):
                        dropped[n.as_py()] = dropped.get(n.as_py(), 0) + c.as_py()
                if not kept.num_rows:
                    continue
                if keys:
                    data = kept.select(full.names).cast(full)
                    with TableWriter(store, area, name, schema, plugin.partition_schema, tag,
                                     inputs=inputs) as w:
                        for batch in data.to_batches():
                            w.write(batch)
                    nbytes += w.bytes_written
                else:
                    data = kept.select(list(REJECT_COLUMNS)).rename_columns(
                        schema.names).cast(schema)
                    with TableWriter(store, area, name, schema, pa.schema([]), tag,
                                     data_dir=".", inputs=inputs) as w:
                        for batch in data.to_batches():
                            w.write(batch)
                    nbytes += w.bytes_written
            return dropped, written, nbytes

        # A record's rows, gathered: the shuffle that gives each table
        # partition one task may interleave records.
        pieces: dict[tuple, list] = {}
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            parts, offsets = batch.column("kafka_partition"), batch.column("kafka_offset")
            # Split the batch where the record changes.
            edges = pc.indices_nonzero(pc.or_(
                pc.not_equal(offsets.slice(1), offsets.slice(0, n - 1)),
                pc.not_equal(parts.slice(1), parts.slice(0, n - 1)))).to_pylist() if n > 1 else []
            change = [0] + [i + 1 for i in edges] + [n]
            for lo, hi in zip(change, change[1:]):
                if hi > lo:
                    piece = batch.slice(lo, hi - lo)
                    record = (piece.column("kafka_partition")[0].as_py(),
                              piece.column("kafka_offset")[0].as_py())
                    pieces.setdefault(record, []).append(piece)
        for record, parts_of_record in pieces.items():
            summaries.append(flush(record, parts_of_record))
        dropped, written, nbytes = write_all()
        for item in summaries:
            if item["kind"] == "LINES" and item["msg_id"] in dropped:
                # Held by an earlier file already (published twice): not counted again.
                item["note"] = "already held"
                item["rows"] = item["rejects"] = 0
        # The table partitions written (rows each), for the catalog and the
        # report, and the bytes of Parquet written.
        summaries += [summary(d, "PARTITION", n) for d, n in sorted(written.items())]
        if nbytes:
            summaries.append(summary("", "BYTES", nbytes))
        if summaries:
            yield pa.RecordBatch.from_pylist(summaries, out_schema)
    return write


# -- the Kafka source ---------------------------------------------------------

def spark_kafka_options(kafka: KafkaConfig, topic: str) -> dict[str, str]:
    """Options of Spark's own Kafka source for the same settings every other
    client uses. TLS files are read as PEM by the Java client (Kafka 2.7+);
    a client certificate must hold its key in the same file. The SASL
    password goes into the JAAS option (Spark redacts option values that
    contain "password" in its UI and logs)."""
    opts = {"kafka.bootstrap.servers": kafka.bootstrap, "subscribe": topic,
            "startingOffsets": "earliest", "includeHeaders": "true",
            "kafka.security.protocol": kafka.security_protocol}
    if kafka.uses_tls:
        if kafka.ssl_cafile:
            opts.update({"kafka.ssl.truststore.type": "PEM",
                         "kafka.ssl.truststore.location": str(kafka.ssl_cafile)})
        if kafka.ssl_certfile:
            if kafka.ssl_keyfile and kafka.ssl_keyfile != kafka.ssl_certfile:
                raise StreamConfigError(
                    "kafka.ssl_keyfile: with spark-streaming.kafka_source \"spark\", the client "
                    "certificate and its key must be one PEM file (give it as ssl_certfile and "
                    "drop ssl_keyfile), because Spark's Kafka client reads one keystore file")
            opts.update({"kafka.ssl.keystore.type": "PEM",
                         "kafka.ssl.keystore.location": str(kafka.ssl_certfile)})
        if not kafka.ssl_check_hostname:
            opts["kafka.ssl.endpoint.identification.algorithm"] = ""
    if kafka.uses_sasl:
        opts["kafka.sasl.mechanism"] = kafka.sasl_mechanism or ""
        if kafka.sasl_mechanism == "GSSAPI":
            opts["kafka.sasl.kerberos.service.name"] = kafka.sasl_kerberos_service_name
            opts["kafka.sasl.jaas.config"] = ("com.sun.security.auth.module.Krb5LoginModule "
                                              "required useTicketCache=true;")
        else:
            module = ("org.apache.kafka.common.security.plain.PlainLoginModule"
                      if kafka.sasl_mechanism == "PLAIN"
                      else "org.apache.kafka.common.security.scram.ScramLoginModule")
            quote = lambda s: s.replace("\\", "\\\\").replace('"', '\\"')  # noqa: E731
            opts["kafka.sasl.jaas.config"] = (
                f'{module} required username="{quote(kafka.sasl_username or "")}" '
                f'password="{quote(read_password(kafka))}";')
    return opts


def from_spark_kafka(df):
    """Spark's Kafka source rows -> the records ``check`` takes (as the
    Python source gives them): headers as a map of UTF-8 text."""
    from pyspark.sql import functions as F
    headers = F.expr("map_from_entries(transform(coalesce(headers, array()), "
                     "h -> struct(h.key, decode(h.value, 'UTF-8'))))")
    return df.select(F.col("partition"), F.col("offset"),
                     F.expr("unix_millis(timestamp)").alias("timestamp"), F.col("value"),
                     headers.alias("headers"))


def _kafka_stream(spark, cfg: IngestConfig, pcfg: PipelineConfig):
    source = _setting(cfg, "kafka_source") or "python"
    if source == "spark":
        reader = spark.readStream.format("kafka")
        for key, value in spark_kafka_options(cfg.kafka, pcfg.topic).items():
            reader = reader.option(key, value)
        try:
            return from_spark_kafka(reader.load())
        except Exception as exc:
            if "Failed to find data source: kafka" in str(exc):
                raise StreamConfigError(
                    "spark-streaming.kafka_source is \"spark\", but Spark's Kafka connector "
                    "(org.apache.spark:spark-sql-kafka-0-10) is not on the classpath: give its "
                    "jar or Maven coordinate in spark-streaming.kafka_connector (or spark-submit "
                    "--packages), or set kafka_source to \"python\"") from None
            raise
    from .bus import group_id
    from .spark_kafka import KafkaSource
    spark.dataSource.register(KafkaSource)
    # The Kafka settings (TLS, SASL) as JSON; the password is not among them:
    # each Python worker reads it from the file or variable they name.
    return (spark.readStream.format("spot_kafka").option("kafka", cfg.kafka.to_json())
            .option("topic", pcfg.topic).option("group", group_id(pcfg.name)).load())


def _setting(cfg: IngestConfig, key: str) -> str:
    return str(cfg.spark_streaming.get(key) or "").strip()


# -- the session --------------------------------------------------------------

def _driver_host(cfg: IngestConfig, bind: str) -> str:
    """The address executors reach the driver at: ``driver_host``, else the
    bind address, else (bound to every address) this host's name."""
    host = _setting(cfg, "driver_host")
    if host:
        return host
    if bind in ("0.0.0.0", "::"):
        import socket
        return socket.getfqdn()
    return bind


def spark_session(cfg: IngestConfig, pcfg: PipelineConfig, partitions: int, code_zip: str):
    from pyspark.sql import SparkSession

    bind = _setting(cfg, "bind_address") or DEFAULT_BIND_ADDRESS
    prepare_environment(bind)
    # Spark's scratch (shuffle, broadcast, the JVM's temporary files) goes to
    # the pipeline's local staging area, not /tmp.
    scratch = pcfg.local_staging / "spark" / pcfg.name
    scratch.mkdir(parents=True, exist_ok=True)
    builder = (SparkSession.builder.appName(f"spot-ingest-{pcfg.name}")
               .config("spark.sql.shuffle.partitions", str(max(2, partitions)))
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.session.timeZone", "UTC")
               # A forged record with a header twice must not fail the batch.
               .config("spark.sql.mapKeyDedupPolicy", "LAST_WIN")
               .config("spark.driver.bindAddress", bind)
               .config("spark.driver.host", _driver_host(cfg, bind))
               .config("spark.local.dir", str(scratch))
               .config("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={scratch}"))
    if _setting(cfg, "ui_port"):
        builder = builder.config("spark.ui.port", _setting(cfg, "ui_port"))
    connector = _setting(cfg, "kafka_connector")
    if connector:
        builder = builder.config("spark.jars" if connector.endswith(".jar") else
                                 "spark.jars.packages", connector)
    master = _setting(cfg, "master")
    if master:
        builder = builder.master(master)
    elif "PYSPARK_GATEWAY_PORT" not in os.environ:
        # Not under spark-submit (which brings its own --master): run locally.
        master = f"local[{os.cpu_count() or 2}]"
        builder = builder.master(master)
    settings = {"driver_memory": "spark.driver.memory", "spark_exec": "spark.executor.instances",
                "spark_executor_memory": "spark.executor.memory",
                "spark_executor_cores": "spark.executor.cores"}
    for key, prop in settings.items():
        if master.startswith("local") and prop.startswith("spark.executor"):
            continue   # in local mode the driver is the executor
        if _setting(cfg, key):
            builder = builder.config(prop, _setting(cfg, key))
    if cfg.catalog.type == "spark":
        # The catalog registers through this session (spot_ingest.metastore).
        builder = builder.config("spark.sql.catalogImplementation", "hive")
        for key, value in cfg.catalog.conf:
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.sparkContext.addPyFile(code_zip)
    return spark


# -- the run ------------------------------------------------------------------

def _checkpoint_offsets(checkpoint: Path) -> dict[int, int]:
    """The offsets the newest entry of Spark's offset log read up to."""
    offsets = checkpoint / "offsets"
    done = [int(p.name) for p in offsets.iterdir() if p.name.isdigit()] if offsets.is_dir() else []
    if not done:
        return {}
    try:
        read = json.loads((offsets / str(max(done))).read_text(encoding="utf-8").splitlines()[2])
    except (OSError, ValueError, IndexError):
        return {}
    if read and all(isinstance(v, dict) for v in read.values()):   # Spark's source: {topic: {p: o}}
        read = next(iter(read.values()))
    return {int(p): int(o) for p, o in read.items()}


def _record_at(consumer, tp, offset: int) -> tuple[int, str] | None:
    """(timestamp, digest of the value) of the record at ``offset``, or None."""
    consumer.assign([tp])
    consumer.seek(tp, offset)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in consumer.poll(timeout_ms=1000).get(tp, []):
            if record.offset == offset:
                return record.timestamp, hashlib.sha256(record.value or b"").hexdigest()[:16]
            if record.offset > offset:
                return None
    return None


class TopicIdentity:
    """Tells whether a checkpoint belongs to the topic as it is now. A topic
    can be re-created under the same name (an embedded broker keeps its
    topics in memory; an operator deletes one): its offsets then start again
    from 0, and a checkpoint of the old one would make the job skip that
    many new records without a word. Beside the checkpoint the job keeps,
    per partition, one record it read (offset, timestamp, digest of the
    value); a topic that no longer holds that record at that offset, or
    ends before the checkpoint's offsets, is another topic."""

    def __init__(self, cfg: IngestConfig, topic: str, checkpoint: Path):
        self.kafka, self.topic, self.checkpoint = cfg.kafka, topic, checkpoint
        self.path = checkpoint.with_name(checkpoint.name + ".topic.json")

    def _consumer(self):
        from kafka import KafkaConsumer

        from .kafka_security import client_kwargs
        return KafkaConsumer(**client_kwargs(self.kafka), enable_auto_commit=False,
                             client_id="spot-ingest-topic-identity")

    def known(self) -> dict[int, list]:
        try:
            return {int(p): v for p, v in json.loads(self.path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def stale(self) -> str | None:
        """Why the checkpoint belongs to another topic, or None."""
        from kafka import TopicPartition
        known = self.known()
        read = _checkpoint_offsets(self.checkpoint)
        if not known and not read:
            return None
        consumer = self._consumer()
        try:
            parts = sorted(consumer.partitions_for_topic(self.topic) or set())
            tps = {p: TopicPartition(self.topic, p) for p in parts}
            ends = consumer.end_offsets(list(tps.values())) if tps else {}
            begins = consumer.beginning_offsets(list(tps.values())) if tps else {}
            for p, offset in read.items():
                end = ends.get(tps[p]) if p in tps else 0
                if offset > (end or 0):
                    return (f"the checkpoint read partition {p} up to offset {offset}, but the "
                            f"topic now ends at {end or 0}")
            for p, (offset, stamp, digest) in known.items():
                if p not in tps or offset >= ends[tps[p]]:
                    return f"partition {p} of the topic no longer reaches offset {offset}"
                if offset < begins[tps[p]]:
                    continue    # removed by retention: nothing to compare
                if _record_at(consumer, tps[p], offset) != (stamp, digest):
                    return f"partition {p} holds another record at offset {offset} than it did"
            return None
        finally:
            consumer.close()

    def remember(self) -> None:
        """Record one record of each partition that has one and is not known yet."""
        from kafka import TopicPartition
        known = self.known()
        consumer = self._consumer()
        try:
            parts = sorted(consumer.partitions_for_topic(self.topic) or set())
            tps = [TopicPartition(self.topic, p) for p in parts if p not in known]
            begins = consumer.beginning_offsets(tps) if tps else {}
            ends = consumer.end_offsets(tps) if tps else {}
            for tp in tps:
                if begins[tp] < ends[tp]:
                    found = _record_at(consumer, tp, begins[tp])
                    if found:
                        known[tp.partition] = [begins[tp], *found]
        finally:
            consumer.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        os.replace(tmp, self.path)

    def forget(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class _Totals:
    rows: int = 0
    rejects: int = 0
    bad: int = 0
    batches: int = 0
    failed: bool = False
    markers: set = field(default_factory=set)


def run(cfg: IngestConfig, pcfg: PipelineConfig, partitions: int,
        run_id: str | None = None, metrics_port: int | None = None) -> int:
    """Run the job until stopped (or, with ``run_id``, until the end-of-run
    marker of that run was seen on every partition); the exit code."""
    plugin = registry.load(pcfg.type)
    if not isinstance(plugin, registry.RecordPipeline):
        log.error("pipeline %s (type %s) is loaded by workers (worker.py), not by a streaming job",
                  pcfg.name, pcfg.type)
        return ExitCode.CONFIG
    if run_id is not None and not re.fullmatch(lines.RUN_ID_PATTERN, run_id):
        log.error("--run-id %r is not a run id (%s)", run_id, lines.RUN_ID_PATTERN)
        return ExitCode.CONFIG
    trigger = float(_setting(cfg, "spark_batch_size") or 5)
    root = open_store(cfg.store).table_root(plugin.table)
    checkpoint = root / "_checkpoints" / pcfg.name
    identity = TopicIdentity(cfg, pcfg.topic, checkpoint)
    stale = identity.stale()
    if stale:
        log.warning("%s: the checkpoint %s belongs to an earlier topic of that name; removing "
                    "it and reading the topic from its beginning", stale, checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)
        identity.forget()
    with CodeArchive() as code_zip:
        spark = spark_session(cfg, pcfg, partitions, code_zip)
        registrar = start_registrar(cfg, plugin.table, spark)
        try:
            return _run(cfg, pcfg, plugin, partitions, run_id, spark, checkpoint, root, trigger,
                        identity, registrar, metrics_port)
        except StreamConfigError as exc:
            log.error("%s", exc)
            return ExitCode.CONFIG
        finally:
            if registrar is not None:
                registrar.close()
            spark.stop()


def process(records, plugin: registry.RecordPipeline, store: StoreLocation,
            prefix: str) -> list:
    """Steps 2 to 5 on one batch of records: the writer's summary rows."""
    write = writer(plugin.type, store, prefix)
    # Each table partition's rows to one task: one file per partition per
    # batch, while different hours (a backlog) are still written in parallel.
    from pyspark.sql import functions as F
    parsed = rows(records, plugin)
    # A table partition's rows to one task; a message's rejected lines to one
    # task (the rejects table is one folder): each file is then written by
    # one task of the batch. More tasks than cores, so that fewer hours share
    # a task when a backlog spans several.
    route = F.when(F.col("reject").isNull(),
                   F.concat_ws("/", *[F.col(k).cast("string")
                                      for k in plugin.partition_schema.names])) \
        .otherwise(F.concat(F.lit("rejects|"), F.col("name")))
    tasks = 2 * records.sparkSession.sparkContext.defaultParallelism
    return parsed.repartition(tasks, route).mapInArrow(write, SUMMARY).collect()


def warm_up(spark, ptype: str, location: StoreLocation) -> None:
    """Start the Python workers and import what the writer needs, before the
    query: otherwise the first batches pay it (seconds) in their latency.
    It also opens the store from a task, as the writer will."""
    def warm(batches):
        import pyarrow as pa

        from spot_ingest import pipeline as registry
        from spot_ingest import warehouse  # noqa: F401  (imported for the writer)
        from spot_ingest.store import open_store
        registry.load(ptype)
        open_store(location)
        for _ in batches:
            pass
        yield pa.RecordBatch.from_pydict({"ok": [1]})
    slots = spark.sparkContext.defaultParallelism
    spark.range(slots, numPartitions=slots).mapInArrow(warm, "ok long").collect()


def _run(cfg: IngestConfig, pcfg: PipelineConfig, plugin: registry.RecordPipeline,
         partitions: int, run_id: str | None, spark, checkpoint: Path, root: Path,
         trigger: float, identity: TopicIdentity, registrar: Registrar | None = None,
         metrics_port: int | None = None) -> int:
    stream = _kafka_stream(spark, cfg, pcfg)
    prefix = f"{pcfg.name}-spark"
    warm_up(spark, plugin.type, cfg.store)
    totals = _Totals()
    reports = ReportWriter(open_store(cfg.store), plugin.table, pcfg.name, pcfg.type, "stream")
    metrics = Metrics(pcfg.name, "stream")
    metrics.serve(cfg.metrics.address, metrics_port if metrics_port is not None
                  else cfg.metrics.port("stream"))
    latest = {"lag": None}   # the lag in the last progress report (the main loop's view)

    def sink(batch, batch_id):
        try:
            _sink(batch, batch_id)
        except Exception as exc:
            # Spark stops the query; say why in one line before its stack trace.
            log.error("batch %d failed (%s: %s); the query stops and, restarted, redoes "
                      "the batch", batch_id, type(exc).__name__, str(exc).splitlines()[0][:500])
            totals.failed = True
            raise

    def _sink(batch, batch_id):
        started = time.monotonic()
        # One pass over the batch: end-of-run markers ride along with the
        # lines to the writer, which reports them back (see writer).
        summary = process(batch, plugin, cfg.store, prefix)
        markers = {int(r.msg_id.split("|")[2]) for r in summary
                   if r.kind == "END" and r.msg_id.startswith(f"END|{run_id}|")} if run_id else set()
        written = [r for r in summary if r.kind == "LINES"]
        messages = len({r.msg_id for r in written})   # a message over two hours: two rows
        if registrar is not None:   # the rows are in place: register their partitions
            registrar.written(plugin.table, {r.msg_id for r in summary if r.kind == "PARTITION"})
        refused = [r for r in summary if r.kind == "BAD"]
        held = sum(1 for r in written if r.note == "already held")
        if held:
            log.info("batch %d: %d message(s) already in the table (published again): not "
                     "written again", batch_id, held)
        for r in refused[:20]:
            log.warning("rejected the message at %s: %s", r.msg_id, printable(r.note or ""))
        n_rows, n_rejects = sum(r.rows for r in written), sum(r.rejects for r in written)
        totals.rows += n_rows
        totals.rejects += n_rejects
        totals.bad += len(refused)
        totals.batches += 1
        totals.markers.update(markers)   # only once this batch's rows are in place
        if len(identity.known()) < partitions:
            identity.remember()
        seconds = time.monotonic() - started
        log.info("batch %d: %d message(s), %d rows, %d rejected line(s), %d rejected message(s) "
                 "in %.1f s; totals: %d rows, %d rejects, %d rejected message(s)", batch_id,
                 messages, n_rows, n_rejects, len(refused), seconds,
                 totals.rows, totals.rejects, totals.bad)
        if messages or refused:
            report = reports.write(
                outcome="batch", batch=batch_id, messages=messages, records=n_rows,
                rejects=n_rejects, rejected_messages=len(refused), topic=pcfg.topic,
                partitions={r.msg_id: r.rows for r in summary if r.kind == "PARTITION"},
                bytes_out=sum(r.rows for r in summary if r.kind == "BYTES"),
                write_seconds=round(seconds, 4), seconds=round(seconds, 4),
                lag=latest["lag"])
            metrics.observe(report)

    query = (stream.writeStream.foreachBatch(sink).queryName(f"spot-ingest-{pcfg.name}")
             .option("checkpointLocation", str(checkpoint))
             .trigger(processingTime=f"{trigger:g} seconds").start())
    log.info("streaming %s (%d partitions) into %s every %g s; checkpoint %s", pcfg.topic,
             partitions, root / "hive", trigger, checkpoint)
    stopping = {"now": False}

    def on_signal(signum, frame):
        log.info("stopping the streaming query (signal %d)", signum)
        stopping["now"] = True
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    last_progress = None
    try:
        while query.isActive and not stopping["now"]:
            query.awaitTermination(0.5)
            progress = query.lastProgress
            if progress and progress.get("batchId") != last_progress:
                last_progress = progress.get("batchId")
                lag = latest["lag"] = _lag(progress)
                if lag is not None:
                    metrics.lag.labels(pcfg.name, "all").set(lag)
                log.info("progress: batch %s, %s Kafka records, %.1f records/s%s",
                         progress.get("batchId"), progress.get("numInputRows"),
                         progress.get("processedRowsPerSecond") or 0,
                         f", lag {lag} message(s)" if lag is not None else "")
            if run_id and len(totals.markers) >= partitions:
                log.info("end of run %s reached on all %d partition(s)", run_id, partitions)
                break
        if query.exception():
            log.error("streaming query failed: %s", query.exception())
            return ExitCode.ERROR
        if totals.failed:
            return ExitCode.ERROR
    finally:
        query.stop()
        reports.flush()
    log.info("%s job done: %d rows, %d rejected lines, %d rejected messages in %d batches",
             pcfg.name, totals.rows, totals.rejects, totals.bad, totals.batches)
    # A --once run reports rejected input the way workers report quarantined files.
    return ExitCode.INPUT_SET_ASIDE if run_id and (totals.rejects or totals.bad) else ExitCode.OK


def _offsets(value) -> list[int]:
    """Offsets in a progress report's source offset (either source's form)."""
    value = json.loads(value) if isinstance(value, str) else value
    if not isinstance(value, dict):
        return []
    out = []
    for v in value.values():
        out += _offsets(v) if isinstance(v, dict) else [int(v)]
    return out


def _lag(progress) -> int | None:
    try:
        source = progress["sources"][0]
        return sum(_offsets(source.get("latestOffset"))) - sum(_offsets(source.get("endOffset")))
    except Exception:
        return None


def main(argv=None) -> int:
    """Entry point for spark-submit."""
    from .cli import stream_main
    return stream_main(argv)


if __name__ == "__main__":
    sys.exit(main())
