"""The proxy Structured Streaming job: topic -> parse (Spark column functions) -> table.

    python -m spot_ingest.cli stream -t proxy_1 [-c CONF]          (local Spark)
    spark-submit pipelines/proxy/job.py -t proxy_1 [-c CONF]       (YARN, standalone, k8s)

Exactly once: Spark keeps the source offsets in the checkpoint
(``<hdfs_app_path>/proxy/_checkpoints/<pipeline>``) and re-runs an
unfinished micro-batch after a restart; the sink writes each message's rows
to files named after the message id, written aside and renamed, so a re-run
replaces what the killed run may have written. Rejected lines go, with their
reason, to ``<hdfs_app_path>/proxy/rejects/`` under the same rule.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

from spot_ingest.spark_env import DEFAULT_BIND_ADDRESS, CodeArchive, prepare_environment

log = logging.getLogger("spot_ingest.proxy_job")
REPO = Path(__file__).resolve().parent.parent.parent

# A token: a double-quoted value (may hold spaces) or a run of non-spaces.
TOKEN = r'"[^"]*"|[^ ]+'


def parse(batch):
    """Kafka records (one message = many lines) -> one row per line, with a
    ``reject`` reason where the line cannot be parsed. Column functions only:
    where each field sits is worked out once per message (from its header),
    then every line is cut once with a regular expression."""
    from pyspark.sql import functions as F

    from . import COLUMNS, INT_COLUMNS

    header = F.col("headers")
    markers = batch.where(header["spot.kind"] == "END_OF_RUN").select(
        F.concat_ws("|", F.lit("END"), header["spot.run"], F.col("partition").cast("string"))
        .alias("msg_id"))
    fields = F.split(header["spot.fields"], " ")
    msgs = batch.where(header["spot.kind"] == "LINES").select(
        header["spot.id"].alias("msg_id"), header["spot.source"].alias("source"),
        header["spot.first_line"].cast("long").alias("first_line"),
        F.size(fields).alias("n_fields"),
        F.split(F.coalesce(header["spot.invalid_utf8"], F.lit("")), ",").alias("bad_utf8"),
        *[F.array_position(fields, F.lit(name)).cast("int").alias(f"i_{col}")
          for col, name in COLUMNS if name],
        "value")
    # One expression per message cuts each line into tokens once and picks the
    # fields out of them; separate projections per field made Spark's
    # optimizer re-run the tokenizer for every field (measured: 10x slower).
    cut = ("transform(split(cast(value AS STRING), '\\n'), l -> named_struct('line', l, "
           f"'tokens', transform(regexp_extract_all(l, '{TOKEN}', 0), "
           "t -> CASE WHEN t = '-' THEN '' "    # "-" means empty
           "WHEN startswith(t, '\"') AND length(t) > 1 THEN substr(t, 2, length(t) - 2) ELSE t END)))")
    picked = ", ".join(f"'{col}', if(i_{col} > 0, try_element_at(r.tokens, i_{col}), NULL)"
                       for col, name in COLUMNS if name)
    rows = (f"transform({cut}, r -> named_struct('line', r.line, 'n_tokens', size(r.tokens), "
            f"'quotes', length(r.line) - length(replace(r.line, '\"', '')), {picked}))")
    values = msgs.select("msg_id", "source", "first_line", "n_fields", "bad_utf8",
                         F.posexplode(F.expr(rows)).alias("pos", "r")).select(
        "msg_id", "source", "n_fields", "r.*",
        (F.col("first_line") + F.col("pos")).alias("line_no"),
        F.array_contains("bad_utf8", F.col("pos").cast("string")).alias("bad_line"))
    moment = F.try_to_timestamp(F.concat_ws(" ", "p_date", "p_time"), F.lit("yyyy-MM-dd HH:mm:ss"))
    # The master names lines with invalid UTF-8 (Spark replaces the bad bytes
    # when it reads the text, after which they cannot be told apart).
    reject = (F.when(F.col("bad_line"), F.lit("invalid UTF-8"))
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
    parsed = values.select("*", reject.alias("reject")).select(
        "msg_id", "source", "line_no", "reject",
        F.when(F.col("reject").isNotNull(), F.col("line")).alias("line"), *out,
        F.substring("p_date", 1, 4).alias("y"), F.substring("p_date", 6, 2).alias("m"),
        F.substring("p_date", 9, 2).alias("d"), F.substring("p_time", 1, 2).alias("h"))
    return parsed.unionByName(markers, allowMissingColumns=True)


def _writer(table_root: str, rejects_root: str, prefix: str):
    """The writer run by ``mapInArrow`` in each task: the rows of one Kafka
    record (message) are contiguous in a task (no shuffle between source and
    writer), so each message is written, under its own name, when the next
    one begins."""
    def write(batches):
        import pyarrow as pa
        import pyarrow.compute as pc

        from pipelines.proxy import PROXY, REJECTS_SCHEMA
        from spot_ingest.warehouse import TableWriter

        tag = f"{prefix}-{os.getpid()}"
        done: set[str] = set()
        current, pending = None, []

        def flush(msg_id, parts):
            if msg_id in done:   # would overwrite this message's file with a part of it
                raise RuntimeError(f"rows of message {msg_id} are not contiguous")
            done.add(msg_id)
            table = pa.Table.from_batches(parts)
            bad = pc.is_valid(table.column("reject"))
            good, rejected = table.filter(pc.invert(bad)), table.filter(bad)
            if good.num_rows:
                w = TableWriter(Path(table_root), f"part-{msg_id}", PROXY.schema,
                                PROXY.partition_schema, tag)
                for batch in good.select(PROXY.full_schema.names).cast(PROXY.full_schema).to_batches():
                    w.write(batch)
                w.commit()
            if rejected.num_rows:
                w = TableWriter(Path(rejects_root), f"rejects-{msg_id}", REJECTS_SCHEMA,
                                pa.schema([]), tag, data_dir=".")
                rj = rejected.select(["source", "line_no", "reject", "line"]).rename_columns(
                    REJECTS_SCHEMA.names).cast(REJECTS_SCHEMA)
                for batch in rj.to_batches():
                    w.write(batch)
                w.commit()
            return pa.RecordBatch.from_pydict({"msg_id": [msg_id], "rows": [good.num_rows],
                                               "rejects": [rejected.num_rows]})

        for batch in batches:
            ids = batch.column("msg_id")
            # Split the batch where the message id changes.
            n = len(ids)
            edges = pc.indices_nonzero(pc.not_equal(ids.slice(1), ids.slice(0, n - 1))).to_pylist() \
                if n > 1 else []
            change = [0] + [i + 1 for i in edges] + [n]
            for lo, hi in zip(change, change[1:]):
                if hi <= lo:
                    continue
                piece = batch.slice(lo, hi - lo)
                msg_id = piece.column("msg_id")[0].as_py()
                if msg_id.startswith("END|"):     # an end-of-run marker: report, write nothing
                    yield pa.RecordBatch.from_pydict({"msg_id": [msg_id], "rows": [0], "rejects": [0]})
                    continue
                if msg_id != current and pending:
                    yield flush(current, pending)
                    pending = []
                current = msg_id
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
    stream = (spark.readStream.format("spot_kafka").option("bootstrap", cfg.kafka.bootstrap)
              .option("topic", pcfg.topic).option("group", group_id(pcfg.name)).load())
    writer = _writer(str(root), str(root / "rejects"), f"{pcfg.name}-spark")
    totals = {"rows": 0, "rejects": 0, "batches": 0, "markers": set()}

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
        summary = parse(batch).mapInArrow(
            writer, "msg_id string, rows long, rejects long").collect()
        markers = {int(r.msg_id.split("|")[2]) for r in summary
                   if r.msg_id.startswith(f"END|{run_id}|")} if run_id else set()
        written = [r for r in summary if not r.msg_id.startswith("END|")]
        rows, rejects, messages = (sum(r.rows for r in written), sum(r.rejects for r in written),
                                   len(written))
        totals["rows"] += rows
        totals["rejects"] += rejects
        totals["batches"] += 1
        totals["markers"].update(markers)   # only once this batch's rows are in place
        log.info("batch %d: %d message(s), %d rows, %d rejected line(s) in %.1f s; totals: %d rows, "
                 "%d rejects", batch_id, messages, rows, rejects, time.monotonic() - started,
                 totals["rows"], totals["rejects"])

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
            return 1
        if totals.get("failed"):
            return 1
    finally:
        query.stop()
        spark.stop()
    log.info("proxy job done: %d rows, %d rejected lines in %d batches", totals["rows"],
             totals["rejects"], totals["batches"])
    # A --once run reports rejected lines the way workers report quarantined files.
    return 3 if run_id and totals["rejects"] else 0


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
