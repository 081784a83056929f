"""Worker: read one partition of the pipeline's topic and load each announced
file into the warehouse, several files at a time.

    worker.py -t PIPELINE -i N [--topic TOPIC] [-c CONF]

Commit rule: the offset committed is always that of the oldest announcement
whose output is not yet in place. Files finish out of order in the process
pool; the committed offset only moves over a contiguous run of finished
ones, so a crash at any moment repeats work (harmless: output is named after
the input's checksum) and never skips it.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from . import pipeline as registry
from kafka.errors import KafkaError

from .bus import END_OF_RUN, Announcement, BusError, PartitionReader, retry_kafka
from .config import IngestConfig, PipelineConfig
from .logs import setup_logging
from .pipeline import BadInputError
from .store import LocalStore
from .warehouse import TableWriter, remove_stale_temporaries

log = logging.getLogger("spot_ingest.worker")

PROGRESS_SECONDS = 10.0
IDLE_CHECK_SECONDS = 10.0
MAX_BACKOFF = 60.0
EXIT_OK, EXIT_FILES_FAILED, EXIT_ERROR = 0, 3, 1


@dataclass
class Job:
    announcement: Announcement
    pipeline: PipelineConfig
    store_location: str
    tmp_prefix: str


@dataclass
class Outcome:
    status: str                 # "loaded" or "quarantined"
    rows: int = 0
    partitions: dict = field(default_factory=dict)
    seconds: float = 0.0
    detail: str = ""


def output_name(ann: Announcement) -> str:
    return f"part-{ann.sha256[:32]}"


def load_file(job: Job) -> Outcome:
    """Convert one staged file and put its rows in the table (runs in a pool process)."""
    ann, pcfg = job.announcement, job.pipeline
    plugin = registry.load(pcfg.type)
    store = LocalStore(job.store_location)
    path = store.local_path(ann.staged_path)
    started = time.monotonic()
    writer = TableWriter(store.table_root(plugin.table), output_name(ann), plugin.schema,
                         plugin.partition_schema, f"{job.tmp_prefix}-{os.getpid()}")
    rows = 0
    try:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BadInputError(f"staged file {ann.staged_path} is missing from the store") from None
        if size != ann.size:
            raise BadInputError(f"staged file {ann.staged_path} has {size} bytes, "
                                f"the announcement says {ann.size}")
        last_report = started
        for batch in plugin.convert(path, pcfg):
            writer.write(batch)
            rows += batch.num_rows
            now = time.monotonic()
            if now - last_report > PROGRESS_SECONDS:
                log.info("%s: %d rows so far (%.0f rows/s)", ann.original_name, rows,
                         rows / (now - started))
                last_report = now
        partitions = writer.commit()
    except BadInputError as exc:
        writer.abort()
        where = store.quarantine(ann.staged_path, pcfg.type, str(exc)) if path.exists() else None
        return Outcome("quarantined", detail=f"{exc}" + (f" (set aside in {where})" if where else ""),
                       seconds=time.monotonic() - started)
    except BaseException:
        writer.abort()
        raise
    return Outcome("loaded", rows, partitions, time.monotonic() - started)


def _init_pool_process(level: int) -> None:
    # The parent handles Ctrl-C and SIGTERM and lets running files finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    setup_logging(level)


@dataclass
class _InFlight:
    announcement: Announcement
    future: Future | None = None
    attempts: int = 0
    retry_at: float = 0.0


class Worker:
    def __init__(self, cfg: IngestConfig, pipeline_name: str, worker_id: int,
                 topic: str | None = None, run_id: str | None = None):
        self.cfg = cfg
        self.pcfg = cfg.pipeline(pipeline_name)
        self.plugin = registry.load(self.pcfg.type)
        self.worker_id = worker_id
        self.topic = topic or self.pcfg.topic
        self.run_id = run_id
        self.tmp_prefix = f"{self.pcfg.name}-w{worker_id}"
        self.processes = self.pcfg.worker_processes
        self.max_in_flight = self.processes * 2
        self.stopping = False
        self.in_flight: dict[int, _InFlight] = {}
        self.highest_seen = -1
        self.committed = -1
        self.end_of_run_offset: int | None = None
        self.counts = {"loaded": 0, "quarantined": 0, "rows": 0}
        self.last_heard = time.monotonic()
        self.broker_lost = False

    # -- lifecycle ---------------------------------------------------------
    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.processes, mp_context=multiprocessing.get_context("forkserver"),
            initializer=_init_pool_process, initargs=(logging.getLogger().level,))

    def request_stop(self, signum=None, frame=None) -> None:
        if self.stopping:
            log.warning("second stop signal: exiting now; unfinished files will be redone")
            os._exit(EXIT_ERROR)
        log.info("stopping: finishing %d file(s) in progress (signal again to abort)",
                 sum(1 for f in self.in_flight.values() if f.future))
        self.stopping = True

    def run(self) -> int:
        self.plugin.check_tools()
        store = LocalStore(self.cfg.hdfs_app_path)
        removed = remove_stale_temporaries(store.table_root(self.plugin.table), self.tmp_prefix)
        if removed:
            log.info("removed %d temporary file(s) left by an earlier run", removed)
        self.reader = retry_kafka(
            lambda: PartitionReader(self.cfg.kafka.bootstrap, self.topic, self.worker_id,
                                    self.pcfg.name),
            f"connect to Kafka at {self.cfg.kafka.bootstrap}")
        start = self.reader.committed()
        log.info("worker %d of pipeline %s reading %s partition %d from %s, %d processes",
                 self.worker_id, self.pcfg.name, self.topic, self.worker_id,
                 f"offset {start}" if start is not None else "the beginning", self.processes)
        self.pool = self._new_pool()
        try:
            while not self._finished():
                self._step()
        finally:
            self.pool.shutdown(wait=not self.stopping, cancel_futures=True)
            self.reader.close()
        log.info("worker %d done: %d file(s) loaded (%d rows), %d quarantined", self.worker_id,
                 self.counts["loaded"], self.counts["rows"], self.counts["quarantined"])
        return EXIT_FILES_FAILED if self.counts["quarantined"] else EXIT_OK

    def _finished(self) -> bool:
        if self.stopping:
            return not any(f.future for f in self.in_flight.values())
        if self.end_of_run_offset is not None:
            return self.committed > self.end_of_run_offset
        return False

    # -- the loop ----------------------------------------------------------
    def _step(self) -> None:
        if not self.stopping and len(self.in_flight) < self.max_in_flight \
                and self.end_of_run_offset is None:
            records = self.reader.poll(timeout_ms=200 if self.in_flight else 1000)
            for record in records:
                self._accept(record)
            if records:
                self.last_heard = time.monotonic()
                if self.broker_lost:
                    log.info("the broker answers again")
                    self.broker_lost = False
            elif not self.in_flight and time.monotonic() - self.last_heard > IDLE_CHECK_SECONDS:
                self._check_broker()
        self._start_due()
        running = [f.future for f in self.in_flight.values() if f.future]
        if running:
            wait(running, timeout=0.2 if len(self.in_flight) < self.max_in_flight else 1.0,
                 return_when=FIRST_COMPLETED)
        self._collect()
        self._commit()

    def _check_broker(self) -> None:
        """When idle, make sure silence means "no work", not "no broker"."""
        try:
            self.reader.ping()
            if self.broker_lost:
                log.info("the broker answers again")
            self.broker_lost = False
        except KafkaError as exc:
            self.broker_lost = True
            log.warning("the broker at %s is not answering (%s: %s); waiting for it",
                        self.cfg.kafka.bootstrap, type(exc).__name__, exc)
        self.last_heard = time.monotonic()

    def _accept(self, record) -> None:
        self.highest_seen = max(self.highest_seen, record.offset)
        try:
            ann = Announcement.decode(record.value)
        except Exception as exc:  # a foreign or corrupt message: never blocks the partition
            log.error("offset %d of %s is not an announcement (%s); skipped", record.offset,
                      self.topic, exc)
            return
        if ann.kind == END_OF_RUN:
            if self.run_id and ann.run_id == self.run_id:
                log.info("end of run %s at offset %d", ann.run_id, record.offset)
                self.end_of_run_offset = record.offset
            return
        self.in_flight[record.offset] = _InFlight(ann)

    def _start_due(self) -> None:
        now = time.monotonic()
        if self.stopping:
            return
        for offset, item in sorted(self.in_flight.items()):
            if item.future is None and item.retry_at <= now:
                job = Job(item.announcement, self.pcfg, self.cfg.hdfs_app_path, self.tmp_prefix)
                try:
                    item.future = self.pool.submit(load_file, job)
                except BrokenProcessPool:
                    self._restart_pool()
                    return

    def _restart_pool(self) -> None:
        log.error("a conversion process died; restarting the process pool and redoing its files")
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()
        for item in self.in_flight.values():
            item.future = None

    def _collect(self) -> None:
        broken = False
        for offset, item in list(self.in_flight.items()):
            fut = item.future
            if fut is None or not fut.done():
                continue
            ann = item.announcement
            try:
                outcome: Outcome = fut.result()
            except BrokenProcessPool:
                broken = True
                continue
            except Exception as exc:
                item.attempts += 1
                delay = min(MAX_BACKOFF, 2 ** item.attempts)
                item.future, item.retry_at = None, time.monotonic() + delay
                log.warning("could not load %s (%s: %s); offset %d not committed, retry %d in %.0f s",
                            ann.original_name, type(exc).__name__, exc, offset, item.attempts, delay)
                continue
            del self.in_flight[offset]
            self.counts[outcome.status] += 1
            if outcome.status == "loaded":
                self.counts["rows"] += outcome.rows
                parts = ", ".join(f"{p} ({n})" for p, n in sorted(outcome.partitions.items()))
                log.info("loaded %s: %d rows in %.1f s into %s", ann.original_name, outcome.rows,
                         outcome.seconds, parts or "no partition (no rows)")
            else:
                log.error("quarantined %s: %s", ann.original_name, outcome.detail)
        if broken:
            self._restart_pool()

    def _commit(self) -> None:
        # Everything below the oldest unfinished announcement is finished.
        position = min(self.in_flight) if self.in_flight else self.highest_seen + 1
        if position > self.committed and position > 0:
            try:
                self.reader.commit(position)
            except KafkaError as exc:
                # Nothing is lost: the files stay loaded, and at worst are
                # loaded again (idempotently) after a restart.
                log.warning("could not commit offset %d (%s: %s); will retry", position,
                            type(exc).__name__, exc)
                self.broker_lost = True
                return
            self.committed = position
            if self.broker_lost:
                log.info("the broker answers again")
                self.broker_lost = False


def run(cfg: IngestConfig, pipeline_name: str, worker_id: int, topic: str | None = None,
        run_id: str | None = None) -> int:
    worker = Worker(cfg, pipeline_name, worker_id, topic, run_id)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        return worker.run()
    except (BusError, registry.ToolMissingError) as exc:
        log.error("%s", exc)
        return EXIT_ERROR
