"""The proxy Structured Streaming job: topic -> parse (Spark column functions) -> table.

    python -m spot_ingest.cli stream -t proxy_1 [-c CONF]          (local Spark)
    spark-submit pipelines/proxy/job.py -t proxy_1 [-c CONF]       (YARN, standalone, k8s)

Exactly once: Spark keeps the source offsets in the checkpoint
(``<hdfs_app_path>/proxy/_checkpoints/<pipeline>``) and re-runs an
unfinished micro-batch after a restart; the sink writes each message's rows
to files named after a digest of the message's content and headers
(``part-<digest>.parquet``), written aside and renamed, so a re-run, or the
same message published again, replaces what was written before, and a
message that claims another's id can only write a file of its own. Rejected
lines go, with their reason, to ``<hdfs_app_path>/proxy/rejects/`` under the
same rule.

No record can fail a batch (which would fail the job again at the same batch
after every restart): every header the job uses is checked against the
format the master makes, and a message that fails (missing or malformed
``spot.id``, ``spot.fields``, ..., an end-of-run marker with a bad run id,
an unknown kind) becomes one row in the rejects, with the reason and its
Kafka partition and offset.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

from spot_ingest.logs import printable
from spot_ingest.exitcodes import ExitCode
from spot_ingest.spark_env import DEFAULT_BIND_ADDRESS, CodeArchive, prepare_environment

log = logging.getLogger("spot_ingest.proxy_job")
REPO = Path(__file__).resolve().parent.parent.parent

# A token: a double-quoted value (may hold spaces) or a run of non-spaces.
TOKEN = r'"[^"]*"|[^ ]+'


# The name of a record's output: must equal pipelines.proxy.output_name.
OUTPUT_NAME = (
    "sha2(encode(concat(sha2(coalesce(value, X''), 256), concat_ws('', transform("
    "array_sort(map_entries(headers)), e -> concat(sha2(encode(e.key, 'UTF-8'), 256), "
    "sha2(encode(coalesce(e.value, ''), 'UTF-8'), 256))))), 'UTF-8'), 256)")


def _anchored(pattern: str) -> str:
    """A Java regular expression that must match the whole value."""
    return f"^(?:{pattern})\\z"


def parse(batch):
    """Kafka records (one message = many lines) -> one row per line, with a
    ``reject`` reason where the line cannot be parsed. Column functions only:
    where each field sits is worked out once per message (from its header),
    then every line is cut once with a regular expression.

    Nothing in a record can fail the batch: a record whose headers are
    missing or not in the master's format (a forged or damaged message, an
    end-of-run marker with a bad run id) becomes one row of kind ``BAD`` with
    the reason; end-of-run markers are rows of kind ``END``; lines are rows of
    kind ``LINES``. Every row carries its record's Kafka partition and offset
    and the record's ``name`` (OUTPUT_NAME)."""
    from pyspark.sql import functions as F

    from . import COLUMNS, INT_COLUMNS, MAX_FIELDS, MAX_FIELDS_ERROR, MESSAGE_ID_PATTERN, \
        RUN_ID_PATTERN

    h = F.col("headers")
    kind, run = h["spot.kind"], h["spot.run"]
    mid, src, first, fields = h["spot.id"], h["spot.source"], h["spot.first_line"], h["spot.fields"]
    fields_error, bad_utf8 = h["spot.fields_error"], h["spot.invalid_utf8"]
    names = F.split(fields, " ")
    field_re = "[^\\x00-\\x20\\x7f]+"     # a field name: no space, no control character

    def shown(c):
        return F.concat(F.lit("'"), F.substring(c, 1, 100), F.lit("'"))

    def bad(what, c, why=""):
        return F.concat(F.lit(f"bad {what} "), shown(c), F.lit(why))

    lines_error = (
        F.when(mid.isNull(), "missing spot.id header")
        .when(~mid.rlike(_anchored(MESSAGE_ID_PATTERN)),
              bad("spot.id", mid, " (not 24 hex digits, '-' and 6 digits)"))
        .when(src.isNull(), "missing spot.source header")
        .when(first.isNull(), "missing spot.first_line header")
        .when(~first.rlike(_anchored("[0-9]{1,15}")), bad("spot.first_line", first))
        .when(bad_utf8.isNotNull() & ~bad_utf8.rlike(_anchored("[0-9]{1,7}(,[0-9]{1,7})*")),
              bad("spot.invalid_utf8", bad_utf8))
        .when(fields_error.isNotNull() & (F.length(fields_error) > MAX_FIELDS_ERROR),
              f"bad spot.fields_error (longer than {MAX_FIELDS_ERROR} characters)")
        .when(fields_error.isNull() & fields.isNull(), "missing spot.fields header")
        .when(fields_error.isNull() & ~fields.rlike(_anchored(f"{field_re}( {field_re})*")),
              bad("spot.fields", fields, " (not field names separated by single spaces)"))
        .when(fields_error.isNull() & (F.size(names) > MAX_FIELDS),
              f"bad spot.fields (more than {MAX_FIELDS} names)")
        .when(fields_error.isNull() & (F.size(F.array_distinct(names)) != F.size(names)),
              bad("spot.fields", fields, " (a name appears twice)"))
        .when(F.col("value").isNull() | (F.length("value") == 0), "empty message"))
    marker_error = (
        F.when(run.isNull(), "END_OF_RUN marker without spot.run header")
        # An empty run id: a master run without --run-id (no job waits for it).
        .when(~run.rlike(_anchored(f"(?:{RUN_ID_PATTERN})?")), bad("END_OF_RUN marker: spot.run", run)))
    error = (F.when(kind.isNull(), "missing spot.kind header")
             .when(kind == "LINES", lines_error)
             .when(kind == "END_OF_RUN", marker_error)
             .otherwise(bad("spot.kind", kind)))
    checked = batch.select("partition", "offset", "value", "headers", error.alias("error"))
    recs = checked.select(
        F.col("partition").alias("kafka_partition"), F.col("offset").alias("kafka_offset"),
        F.expr(OUTPUT_NAME).alias("name"), "error", "value",
        F.when(F.col("error").isNotNull(), "BAD").when(kind == "END_OF_RUN", "END")
        .otherwise("LINES").alias("kind"),
        F.concat_ws("|", F.lit("END"), run, F.col("partition").cast("string")).alias("marker"),
        src.alias("source"), F.expr("try_cast(headers['spot.first_line'] AS BIGINT)").alias("first_line"),
        fields_error.alias("fields_error"), F.size(names).alias("n_fields"),
        F.split(F.coalesce(bad_utf8, F.lit("")), ",").alias("bad_utf8"),
        *[F.array_position(names, F.lit(name)).cast("int").alias(f"i_{col}")
          for col, name in COLUMNS if name])
    # One expression per message cuts each line into tokens once and picks the
    # fields out of them; separate projections per field made Spark's
    # optimizer re-run the tokenizer for every field (measured: 10x slower).
    cut = ("transform(split(cast(value AS STRING), '\\n'), l -> named_struct('line', l, "
           f"'tokens', transform(regexp_extract_all(l, '{TOKEN}', 0), "
           "t -> CASE WHEN t = '-' THEN '' "    # "-" means empty
           "WHEN startswith(t, '\"') AND length(t) > 1 THEN substr(t, 2, length(t) - 2) ELSE t END)))")
    picked = ", ".join(f"'{col}', if(i_{col} > 0, try_element_at(r.tokens, i_{col}), NULL)"
                       for col, name in COLUMNS if name)
    nothing = ", ".join(f"'{col}', CAST(NULL AS STRING)" for col, name in COLUMNS if name)
    # A marker or a rejected record is one row with no line.
    rows = (f"CASE WHEN kind = 'LINES' THEN transform({cut}, r -> named_struct('line', r.line, "
            f"'n_tokens', size(r.tokens), 'quotes', length(r.line) - length(replace(r.line, '\"', '')), "
            f"{picked})) ELSE array(named_struct('line', CAST(NULL AS STRING), 'n_tokens', 0, "
            f"'quotes', 0, {nothing})) END")
    values = recs.select("name", "kind", "marker", "kafka_partition", "kafka_offset", "source",
                         "n_fields", "error", "fields_error", "first_line", "bad_utf8",
                         F.posexplode(F.expr(rows)).alias("pos", "r")).select(
        "name", "kind", "marker", "kafka_partition", "kafka_offset", "source", "n_fields", "error",
        "fields_error", "r.*",
        F.when(F.col("kind") == "LINES", F.col("first_line") + F.col("pos")).alias("line_no"),
        F.array_contains("bad_utf8", F.col("pos").cast("string")).alias("bad_line"))
    moment = F.try_to_timestamp(F.concat_ws(" ", "p_date", "p_time"), F.lit("yyyy-MM-dd HH:mm:ss"))
    # The master names lines with invalid UTF-8 (Spark replaces the bad bytes
    # when it reads the text, after which they cannot be told apart); a bad
    # #Fields: header (spot.fields_error) rejects every line under it.
    reject = (F.when(F.col("kind") == "BAD", F.col("error"))
              .when(F.col("kind") == "END", F.lit(None).cast("string"))
              .when(F.col("fields_error").isNotNull(), F.col("fields_error"))
              .when(F.col("bad_line"), F.lit("invalid UTF-8"))
              .when(F.expr("instr(line, char(0)) > 0"), F.lit("NUL byte in the line"))
              .when(F.col("quotes") % 2 == 1, F.lit("unbalanced quotes"))
              .when(F.col("n_tokens") != F.col("n_fields"),
                    F.concat(F.lit("expected "), F.col("n_fields").cast("string"),
                             F.lit(" fields, found "), F.col("n_tokens").cast("string")))
              .when(moment.isNull() | (F.length("p_date") != 10) | (F.length("p_time") != 8),
                    F.lit("bad date or time")))
    out = []
    for col, name in COLUMNS:
        if name is None:     # fulluri = host + path + query
            out.append(F.concat_ws("", "host", "uripath", "uriquery").alias(col))
        elif col in INT_COLUMNS:
            out.append(F.expr(f"try_cast({col} AS INT)").alias(col))
        else:
            out.append(F.col(col))
    return values.select("*", reject.alias("reject")).select(
        "name", "kind", "marker", "kafka_partition", "kafka_offset", "source", "line_no", "reject",
        F.when(F.col("reject").isNotNull() & (F.col("kind") == "LINES"), F.col("line")).alias("line"),
        *out, F.substring("p_date", 1, 4).alias("y"), F.substring("p_date", 6, 2).alias("m"),
        F.substring("p_date", 9, 2).alias("d"), F.substring("p_time", 1, 2).alias("h"))


SUMMARY = "msg_id string, kind string, rows long, rejects long, note string"


def _writer(table_root: str, rejects_root: str, prefix: str):
    """The writer run by ``mapInArrow`` in each task: the rows of one Kafka
    record are contiguous in a task (no shuffle between source and writer),
    so each record is written when the next one begins, under the record's
    ``name`` (a digest of its content and headers): a batch redone or a
    message published again replaces its own files, and no other record,
    whatever its headers claim, can write over them."""
    def write(batches):
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipelines.proxy import PROXY, REJECTS_SCHEMA
        from spot_ingest.warehouse import TableWriter

        tag = f"{prefix}-{os.getpid()}"
        done: set[tuple] = set()
        current, pending = None, []
        reject_columns = ["source", "line_no", "reject", "line", "kafka_partition", "kafka_offset"]

        out_schema = pa.schema([("msg_id", pa.string()), ("kind", pa.string()),
                                ("rows", pa.int64()), ("rejects", pa.int64()), ("note", pa.string())])

        def summary(msg_id, kind, rows=0, rejects=0, note=None):
            return pa.RecordBatch.from_pydict({"msg_id": [msg_id], "kind": [kind], "rows": [rows],
                                               "rejects": [rejects], "note": [note]}, out_schema)

        def flush(record, parts):
            if record in done:   # would overwrite this record's file with a part of it
                raise RuntimeError(f"rows of the record at partition {record[0]} offset "
                                   f"{record[1]} are not contiguous")
            done.add(record)
            table = pa.Table.from_batches(parts)
            kind = table.column("kind")[0].as_py()
            name = table.column("name")[0].as_py()
            if kind == "END":      # an end-of-run marker: report, write nothing
                return summary(table.column("marker")[0].as_py(), kind)
            bad = pc.is_valid(table.column("reject"))
            good, rejected = table.filter(pc.invert(bad)), table.filter(bad)
            if good.num_rows:
                w = TableWriter(Path(table_root), f"part-{name}", PROXY.schema,
                                PROXY.partition_schema, tag)
                for batch in good.select(PROXY.full_schema.names).cast(PROXY.full_schema).to_batches():
                    w.write(batch)
                w.commit()
            if rejected.num_rows:
                w = TableWriter(Path(rejects_root), f"rejects-{name}", REJECTS_SCHEMA,
                                pa.schema([]), tag, data_dir=".")
                rj = rejected.select(reject_columns).rename_columns(REJECTS_SCHEMA.names).cast(
                    REJECTS_SCHEMA)
                for batch in rj.to_batches():
                    w.write(batch)
                w.commit()
            if kind == "BAD":
                return summary(f"partition {record[0]} offset {record[1]}", kind, 0, 0,
                               rejected.column("reject")[0].as_py())
            return summary(name, kind, good.num_rows, rejected.num_rows)

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
                if hi <= lo:
                    continue
                piece = batch.slice(lo, hi - lo)
                record = (piece.column("kafka_partition")[0].as_py(),
                          piece.column("kafka_offset")[0].as_py())
                if record != current and pending:
                    yield flush(current, pending)
                    pending = []
                current = record
                pending.append(piece)
        if pending:
            yield flush(current, pending)
    return write


def spark_session(cfg, pcfg, partitions: int, code_zip: str):
    from pyspark.sql import SparkSession

    opts = cfg.spark_streaming
    bind = opts.get("bind_address") or DEFAULT_BIND_ADDRESS
    prepare_environment(bind)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # Spark's scratch (shuffle, broadcast, the JVM's temporary files) goes to
    # the pipeline's local staging area, not /tmp.
    scratch = pcfg.local_staging / "spark" / pcfg.name
    scratch.mkdir(parents=True, exist_ok=True)
    builder = (SparkSession.builder.appName(f"spot-ingest-{pcfg.name}")
               .config("spark.sql.shuffle.partitions", str(max(2, partitions)))
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.session.timeZone", "UTC")
               .config("spark.driver.bindAddress", bind)
               .config("spark.driver.host", bind)
               .config("spark.local.dir", str(scratch))
               .config("spark.driver.extraJavaOptions", f"-Djava.io.tmpdir={scratch}"))
    master = opts.get("master") or ""
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
        if str(opts.get(key, "")).strip():
            builder = builder.config(prop, str(opts[key]))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    spark.sparkContext.addPyFile(code_zip)
    return spark


def run(cfg, pcfg, partitions: int, run_id: str | None = None, fresh_topic: bool = False) -> int:
    from spot_ingest.store import local_root

    from . import RUN_ID_PATTERN
    if run_id is not None and not re.fullmatch(RUN_ID_PATTERN, run_id):
        log.error("--run-id %r is not a run id (%s)", run_id, RUN_ID_PATTERN)
        return ExitCode.CONFIG
    trigger = float(cfg.spark_streaming.get("spark_batch_size") or 5)
    root = local_root(cfg.hdfs_app_path) / "proxy"
    checkpoint = root / "_checkpoints" / pcfg.name
    if fresh_topic and checkpoint.exists():
        # The embedded broker starts empty: offsets of the last one are void.
        log.info("new embedded broker: removing the checkpoint of the previous one (%s)", checkpoint)
        shutil.rmtree(checkpoint)
    with CodeArchive() as code_zip:
        return _run(cfg, pcfg, partitions, run_id, spark_session(cfg, pcfg, partitions, code_zip),
                    checkpoint, root, trigger)


def _run(cfg, pcfg, partitions: int, run_id: str | None, spark, checkpoint: Path, root: Path,
         trigger: float) -> int:
    from spot_ingest.bus import group_id
    from spot_ingest.spark_kafka import KafkaSource

    spark.dataSource.register(KafkaSource)
    # The Kafka settings (TLS, SASL) as JSON; the password is not among them:
    # each Python worker reads it from the file or variable they name.
    stream = (spark.readStream.format("spot_kafka").option("kafka", cfg.kafka.to_json())
              .option("topic", pcfg.topic).option("group", group_id(pcfg.name)).load())
    writer = _writer(str(root), str(root / "rejects"), f"{pcfg.name}-spark")
    totals = {"rows": 0, "rejects": 0, "bad": 0, "batches": 0, "markers": set()}

    def sink(batch, batch_id):
        try:
            _sink(batch, batch_id)
        except Exception as exc:
            # Spark stops the query; say why in one line before its stack trace.
            log.error("batch %d failed (%s: %s); the query stops and, restarted, redoes "
                      "the batch", batch_id, type(exc).__name__, str(exc).splitlines()[0][:500])
            totals["failed"] = True
            raise

    def _sink(batch, batch_id):
        started = time.monotonic()
        # One pass over the batch: end-of-run markers ride along with the
        # lines to the writer, which reports them back (see _writer).
        summary = parse(batch).mapInArrow(writer, SUMMARY).collect()
        markers = {int(r.msg_id.split("|")[2]) for r in summary
                   if r.kind == "END" and r.msg_id.startswith(f"END|{run_id}|")} if run_id else set()
        written = [r for r in summary if r.kind == "LINES"]
        refused = [r for r in summary if r.kind == "BAD"]
        for r in refused[:20]:
            log.warning("rejected the message at %s: %s", r.msg_id, printable(r.note or ""))
        rows, rejects, messages = (sum(r.rows for r in written), sum(r.rejects for r in written),
                                   len(written))
        totals["rows"] += rows
        totals["rejects"] += rejects
        totals["bad"] += len(refused)
        totals["batches"] += 1
        totals["markers"].update(markers)   # only once this batch's rows are in place
        log.info("batch %d: %d message(s), %d rows, %d rejected line(s), %d rejected message(s) "
                 "in %.1f s; totals: %d rows, %d rejects, %d rejected message(s)", batch_id,
                 messages, rows, rejects, len(refused), time.monotonic() - started,
                 totals["rows"], totals["rejects"], totals["bad"])

    query = (stream.writeStream.foreachBatch(sink).queryName(f"spot-ingest-{pcfg.name}")
             .option("checkpointLocation", str(checkpoint))
             .trigger(processingTime=f"{trigger:g} seconds").start())
    log.info("streaming %s (%d partitions) into %s every %g s; checkpoint %s", pcfg.topic,
             partitions, root / "hive", trigger, checkpoint)
    stopping = {"now": False}

    import signal

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
                lag = _lag(progress)
                log.info("progress: batch %s, %s Kafka records, %.1f records/s%s", progress.get("batchId"),
                         progress.get("numInputRows"), progress.get("processedRowsPerSecond") or 0,
                         f", lag {lag} message(s)" if lag is not None else "")
            if run_id and len(totals["markers"]) >= partitions:
                log.info("end of run %s reached on all %d partition(s)", run_id, partitions)
                break
        if query.exception():
            log.error("streaming query failed: %s", query.exception())
            return ExitCode.ERROR
        if totals.get("failed"):
            return ExitCode.ERROR
    finally:
        query.stop()
        spark.stop()
    log.info("proxy job done: %d rows, %d rejected lines, %d rejected messages in %d batches",
             totals["rows"], totals["rejects"], totals["bad"], totals["batches"])
    # A --once run reports rejected input the way workers report quarantined files.
    return ExitCode.INPUT_SET_ASIDE if run_id and (totals["rejects"] or totals["bad"]) else ExitCode.OK


def _lag(progress) -> int | None:
    try:
        source = progress["sources"][0]
        latest, end = source.get("latestOffset"), source.get("endOffset")
        import json
        latest = json.loads(latest) if isinstance(latest, str) else latest
        end = json.loads(end) if isinstance(end, str) else end
        return sum(int(v) for v in latest.values()) - sum(int(v) for v in end.values())
    except Exception:
        return None


def main(argv=None) -> int:
    """Entry point for spark-submit."""
    sys.path.insert(0, str(REPO))
    from spot_ingest.cli import stream_main
    return stream_main(argv)


if __name__ == "__main__":
    sys.exit(main())
