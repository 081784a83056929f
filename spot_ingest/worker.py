"""Worker: read one partition of the pipeline's topic and load each announced
file into the warehouse, several files at a time.

    worker.py -t PIPELINE -i N [--topic TOPIC] [-c CONF]

Commit rule: the offset committed is always that of the oldest announcement
whose output is not yet in place. Files finish out of order in the process
pool; the committed offset only moves over a contiguous run of finished
ones, so a crash at any moment repeats work (harmless: output is named after
the input's checksum) and never skips it.

Trust: a record on the topic is input like any other. It is refused (logged
with its offset and reason, kept as a dead-letter record under
``<store>/<type>/refused/``, its offset committed, the file it names left
untouched) when it is not an announcement of this pipeline, when its
checksum is not a SHA-256, when its staged path is not a regular file under
the store's staging area (reached without following symlinks), or when the
file's size or SHA-256 (computed while it is converted) differ from the
announcement. Only a file that passed these checks and that the tool cannot
read is moved, within the store, to quarantine.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import pipeline as registry
from kafka.errors import KafkaError

from .bus import (END_OF_RUN, SECURITY_HINT, Announcement, BusError, KafkaSecurityError,
                  PartitionReader, retry_kafka, security_problem, signature_problem)
from .config import IngestConfig, PipelineConfig, StoreLocation, read_signing_key
from .guard import ResourceGuard
from .logs import about, checksum, printable
from .metrics import Metrics
from .reassign import rejoin
from .reports import ReportWriter
from .status import commit_metadata
from .metastore import Registrar, start_registrar
from .policy import Backoff, ExitCode, process_pool, until_done
from .pipeline import BadInputError
from .store import SHA256_RE, RefusedInput, StagedCopy, Store, StoreError, open_store
from .tools import ToolTimeout, time_limit
from .warehouse import TableWriter, remove_stale_temporaries

log = logging.getLogger("spot_ingest.worker")

PROGRESS_SECONDS = 10.0
IDLE_CHECK_SECONDS = 10.0
MAX_BACKOFF = 60.0
TIMEOUT_ATTEMPTS = 3      # a file whose conversion times out this often is set aside


@dataclass
class Job:
    announcement: Announcement
    staged: str                 # checked path relative to the store root
    pipeline: PipelineConfig
    store: StoreLocation
    tmp_prefix: str
    topic: str
    partition: int
    offset: int
    attempt: int = 1
    prefetched: Path | None = None   # a local copy made ahead (remote stores)


@dataclass
class Outcome:
    status: str                 # "loaded", "quarantined" or "refused"
    rows: int = 0
    partitions: dict = field(default_factory=dict)
    seconds: float = 0.0
    detail: str = ""
    reason: str = ""            # why it was set aside (without where to)
    fetch_seconds: float = 0.0  # making the staged file readable here
    convert_seconds: float = 0.0   # the tool and parsing
    write_seconds: float = 0.0  # Parquet: writing and making it visible
    bytes_out: int = 0


def output_name(ann: Announcement) -> str:
    return f"part-{ann.sha256[:32]}"


def check_announcement(ann: Announcement, pcfg: PipelineConfig, store: Store) -> str:
    """Every field that reaches a path or a file name, checked; returns the
    staged path relative to the store root. Raises ``RefusedInput``."""
    if ann.pipeline_type != pcfg.type or ann.pipeline != pcfg.name:
        raise RefusedInput(f"announced for pipeline {printable(ann.pipeline)!r} of type "
                           f"{printable(ann.pipeline_type)!r}, not {pcfg.name} ({pcfg.type})")
    if not SHA256_RE.fullmatch(ann.sha256 or ""):
        raise RefusedInput(f"sha256 {printable(ann.sha256 or '')[:80]!r} is not 64 hex digits")
    if ann.size < 0:
        raise RefusedInput(f"size {ann.size} is negative")
    return store.staged_relative(ann.staged_path, pcfg.type)


class _Hasher(threading.Thread):
    """SHA-256 of an open file, computed beside the conversion (the tool reads
    the same file from the page cache), so the file is read for hashing once."""

    def __init__(self, fd: int):
        super().__init__(daemon=True)
        self.fd, self.digest, self.size, self.error = fd, hashlib.sha256(), 0, None

    stop = False

    def run(self) -> None:
        try:
            while not self.stop and (chunk := os.pread(self.fd, 1 << 20, self.size)):
                self.digest.update(chunk)
                self.size += len(chunk)
        except OSError as exc:
            self.error = exc

    def matches(self, ann: Announcement) -> bool:
        """Wait for the whole file to be hashed; does it match the announcement?"""
        self.join()
        if self.error:
            raise self.error
        return self.digest.hexdigest() == ann.sha256 and self.size == ann.size


def load_file(job: Job) -> Outcome:
    """Check, convert and load one staged file (runs in a pool process)."""
    plugin = registry.load(job.pipeline.type)
    store = open_store(job.store)
    started = time.monotonic()
    with contextlib.ExitStack() as held:
        try:
            staged = held.enter_context(store.fetch(job.staged, job.prefetched))
        except RefusedInput as exc:
            return _refuse(job, store, str(exc), started)
        fetched = time.monotonic()
        outcome = _load(job, plugin, store, staged, fetched)
        outcome.fetch_seconds = fetched - started
        outcome.seconds += outcome.fetch_seconds
        return outcome


def _load(job: Job, plugin: registry.FilePipeline, store: Store, staged: StagedCopy,
          started: float) -> Outcome:
    ann, pcfg, fd = job.announcement, job.pipeline, staged.fd
    writer = TableWriter(store, plugin.table, output_name(ann), plugin.schema,
                         plugin.partition_schema, f"{job.tmp_prefix}-{os.getpid()}")
    rows = 0
    hasher = None
    writing = 0.0     # seconds in the writer; the rest of the loop is conversion
    try:
        size = os.fstat(fd).st_size
        if size != ann.size:
            return _refuse(job, store, f"staged file {job.staged} has {size} bytes, the "
                                       f"announcement says {ann.size}", started)
        hasher = _Hasher(fd)
        hasher.start()
        last_report = started
        with time_limit(pcfg.convert_timeout):
            for batch in plugin.convert(staged.path, pcfg):
                before = time.monotonic()
                writer.write(batch)
                writing += time.monotonic() - before
                rows += batch.num_rows
                now = time.monotonic()
                if now - last_report > PROGRESS_SECONDS:
                    log.info("%s: %d rows so far (%.0f rows/s)", printable(ann.original_name),
                             rows, rows / (now - started))
                    last_report = now
        if not hasher.matches(ann):
            writer.abort()
            return _refuse(job, store, f"staged file {job.staged} has SHA-256 "
                                       f"{hasher.digest.hexdigest()}, the announcement says "
                                       f"{ann.sha256}", started)
        converted = time.monotonic()
        partitions = writer.commit()
        writing += time.monotonic() - converted
        store.mark_loaded(pcfg.type, ann.sha256)
        if writer.already_held:    # delivered again after its hour was compacted
            rows = sum(partitions.values())
            log.info("%s: already held by %s; not written again", printable(ann.original_name),
                     ", ".join(f"{d}/{f}" for d, f in sorted(writer.already_held.items())))
    except (BadInputError, ToolTimeout) as exc:
        writer.abort()
        if not hasher.matches(ann):   # not the announced file: refuse, never move it
            return _refuse(job, store, f"staged file {job.staged} has SHA-256 "
                                       f"{hasher.digest.hexdigest()}, the announcement says "
                                       f"{ann.sha256}", started)
        if isinstance(exc, ToolTimeout) and job.attempt < TIMEOUT_ATTEMPTS:
            raise       # retried with backoff, then set aside
        reason = f"{exc}, {job.attempt} times" if isinstance(exc, ToolTimeout) else str(exc)
        where = store.quarantine(job.staged, pcfg.type, reason)
        return Outcome("quarantined", detail=f"{reason} (set aside in {where})", reason=reason,
                       seconds=time.monotonic() - started)
    except BaseException:
        writer.abort()
        raise
    finally:
        if hasher is not None:     # never leave it reading a descriptor that is closed
            hasher.stop = True
            hasher.join()
    seconds = time.monotonic() - started
    return Outcome("loaded", rows, partitions, seconds, write_seconds=writing,
                   convert_seconds=seconds - writing, bytes_out=writer.bytes_written)


def _refuse(job: Job, store: Store, reason: str, started: float) -> Outcome:
    where = store.refuse(job.pipeline.type, job.topic, job.partition, job.offset, reason,
                         _record_fields(job.announcement))
    return Outcome("refused", detail=f"{reason} (kept as {where}; the file is left as it is)",
                   reason=reason, seconds=time.monotonic() - started)


def _record_fields(ann: Announcement) -> dict:
    return asdict(ann)


def _raw_record(value: bytes | None) -> dict:
    """A record that is no announcement, as its dead letter keeps it."""
    return {"value_base64": base64.b64encode(value or b"").decode()}


@dataclass
class _InFlight:
    announcement: Announcement
    staged: str
    future: Future | None = None
    prefetch: Future | None = None   # the local copy being made ahead (remote stores)
    backoff: Backoff = field(default_factory=lambda: Backoff(first=2.0, most=MAX_BACKOFF))
    retry_at: float = 0.0


class Committer(threading.Thread):
    """Commits the worker's position from a thread and a Kafka client of its
    own, so that conversions go on while the broker is slow or unreachable.
    The commit order, in this one place:

    1. The worker loop only ever raises ``target`` (the offset of its oldest
       unfinished announcement); it never waits for a commit.
    2. This thread commits ``target`` synchronously, retrying with backoff
       (each failure logged) until the broker accepts it.
    3. It then reads the committed offset back. If the broker holds another
       value, a commit of an older position that timed out on a dropped
       connection arrived late and overwrote a newer one: commit again, so
       that the last word is always the newest position.
    4. ``confirmed`` is the newest position the broker was seen to hold; the
       read-back is repeated every ``VERIFY_SECONDS`` while idle, and every
       second for ``WATCH_AFTER_FAILURE`` seconds after a failed commit: a
       request stuck in a dropped connection can still reach the broker after
       the link returns (seen: minutes later), and no client can recall it,
       so the worker keeps correcting it until the old requests are gone.
    """

    VERIFY_SECONDS = 30.0
    WATCH_AFTER_FAILURE = 300.0

    def __init__(self, make_reader, describe: str, on_confirmed=None, on_error=None,
                 metadata=None):
        super().__init__(daemon=True, name="committer")
        self.make_reader, self.describe = make_reader, describe
        self.metadata = metadata     # () -> str committed with each offset (status reads it)
        self.on_confirmed, self.on_error = on_confirmed, on_error
        self.target = -1
        self.confirmed = -1
        self.failing = False
        self.lock = threading.Condition()
        self.closing = False
        self.reader = None
        self.verified_at = time.monotonic()
        self.failed_at = float("-inf")

    def _verify_due(self) -> bool:
        now = time.monotonic()
        every = 1.0 if now - self.failed_at < self.WATCH_AFTER_FAILURE else self.VERIFY_SECONDS
        return now - self.verified_at > every

    def advance(self, position: int) -> None:
        with self.lock:
            if position > self.target:
                self.target = position
                self.lock.notify()

    def run(self) -> None:
        backoff = Backoff(first=0.5, most=10.0)
        while True:
            with self.lock:
                due = self._verify_due()
                while not self.closing and self.target <= self.confirmed and not due:
                    self.lock.wait(timeout=0.5)
                    due = self._verify_due()
                if self.closing and self.target <= self.confirmed:
                    return
                target = self.target
            if target < 0:
                self.verified_at = time.monotonic()
                continue
            try:
                if self.reader is None:
                    self.reader = self.make_reader()
                if target > self.confirmed:
                    self.reader.commit(target, self.metadata() if self.metadata else "")
                held = self.reader.committed(timeout_ms=5000)
                self.verified_at = time.monotonic()
            except Exception as exc:   # KafkaError, or a connection error below it
                if self.on_error is not None:
                    self.on_error()
                delay = backoff.delay()
                if not self.failing or delay >= backoff.most:
                    log.warning("could not commit offset %d (%s: %s); will retry; the files "
                                "stay loaded", target, type(exc).__name__, exc)
                self.failing = True
                self.failed_at = time.monotonic()
                self._pause(delay)
                continue
            backoff.reset()
            if held is not None and held != target and held < self.target:
                log.warning("the broker holds offset %d for %s, not %d (a late commit of an "
                            "older position); committing %d again", held, self.describe, target,
                            self.target)
                self.confirmed = min(self.confirmed, held)
                continue
            if self.failing:
                log.info("the broker answers again: offset %d committed", target)
                self.failing = False
            self.confirmed = max(self.confirmed, target)
            if self.on_confirmed is not None:
                self.on_confirmed()

    def _pause(self, seconds: float) -> None:
        with self.lock:
            if not self.closing:
                self.lock.wait(timeout=seconds)

    def close(self, timeout: float) -> bool:
        """Try to confirm the last target for up to ``timeout`` seconds; True if it was."""
        deadline = time.monotonic() + timeout
        while self.is_alive() and self.target > self.confirmed and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.join(timeout=max(0.0, deadline - time.monotonic()) + 1)
        if self.reader is not None and not self.is_alive():
            self.reader.close()
        return self.target <= self.confirmed


class Worker:
    def __init__(self, cfg: IngestConfig, pipeline_name: str, worker_id: int,
                 topic: str | None = None, run_id: str | None = None,
                 metrics_port: int | None = None):
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
        self.unrecorded: int | None = None   # a refused record the store could not keep
        self.end_of_run_offset: int | None = None
        self.counts = {"loaded": 0, "quarantined": 0, "refused": 0, "rows": 0}
        self.last_heard = time.monotonic()
        self.broker_lost = False
        self.signing_key = read_signing_key(cfg)
        self.registrar: Registrar | None = None
        self.metrics = Metrics(self.pcfg.name, "worker")
        self.host = socket.gethostname()
        self.metrics_port = metrics_port if metrics_port is not None \
            else cfg.metrics.port("worker", worker_id)
        scratch = [self.pcfg.local_staging,
                   cfg.hdfs.scratch_dir if cfg.hdfs else Path(cfg.hdfs_app_path)]
        self.guard = ResourceGuard(cfg.resource_guard, scratch, f"worker {worker_id}",
                                   on_change=lambda held: self.metrics.paused
                                   .labels(self.pcfg.name).set(int(held)))

    # -- lifecycle ---------------------------------------------------------
    def _new_pool(self) -> ProcessPoolExecutor:
        return process_pool(self.processes, warm=(__name__, type(self.plugin).__module__))

    def request_stop(self, signum=None, frame=None) -> None:
        if self.stopping:
            log.warning("second stop signal: exiting now; unfinished files will be redone")
            os._exit(ExitCode.ERROR)
        log.info("stopping: finishing %d file(s) in progress (signal again to abort)",
                 sum(1 for f in self.in_flight.values() if f.future))
        self.stopping = True

    def run(self) -> int:
        if not isinstance(self.plugin, registry.FilePipeline):
            log.error("pipeline %s (type %s) is loaded by a streaming job (spot-ingest stream), "
                      "not by workers", self.pcfg.name, self.pcfg.type)
            return ExitCode.CONFIG
        self.plugin.check_tools()

        def open_and_clean():
            self.store = open_store(self.cfg.store)
            return remove_stale_temporaries(self.store, self.plugin.table, self.tmp_prefix)
        removed = until_done(open_and_clean, f"open the store {self.cfg.store}",
                             lambda: self.stopping, log)
        if removed is None:
            return ExitCode.OK    # stopped while waiting for the store
        if removed:
            log.info("removed %d temporary file(s) left by an earlier run", removed)
        self.metrics.serve(self.cfg.metrics.address, self.metrics_port)
        try:
            if rejoin(self.store, self.pcfg, self.worker_id):
                log.info("partition %d was retired (its backlog reassigned); worker %d is back "
                         "and takes new work again", self.worker_id, self.worker_id)
        except (StoreError, OSError) as exc:
            log.warning("could not clear partition %d's retired mark (%s); the master may send "
                        "it no new work", self.worker_id, exc)
        self.reports = ReportWriter(self.store, self.plugin.table, self.pcfg.name, self.pcfg.type,
                                    "worker", self.worker_id)
        self.reader = self._connect()
        if self.reader is None:
            return ExitCode.OK    # stopped before the broker answered: nothing was taken
        start = self._until_answered(lambda: self.reader.committed(timeout_ms=5000),
                                     "read the committed offset")
        if self.stopping:
            self.reader.close()
            return ExitCode.OK
        log.info("worker %d of pipeline %s reading %s partition %d from %s, %d processes",
                 self.worker_id, self.pcfg.name, self.topic, self.worker_id,
                 f"offset {start}" if start is not None else "the beginning", self.processes)
        self.committer = Committer(self._new_reader, f"{self.topic} partition {self.worker_id}",
                                   on_confirmed=lambda: self.metrics.committed(self.worker_id),
                                   on_error=self.metrics.broker_errors.labels(self.pcfg.name).inc,
                                   metadata=lambda: commit_metadata(self.worker_id, self.host))
        self.committer.confirmed = start if start is not None else -1
        self.committer.start()
        # Partitions are registered in the catalog (if any) by a thread: ingest never waits.
        self.registrar = start_registrar(self.cfg, self.plugin.table)
        self.pool = self._new_pool()
        # A remote store's files are copied to scratch by these threads while
        # the pool converts earlier ones (a mounted store is read in place).
        self.prefetcher = ThreadPoolExecutor(self.processes, thread_name_prefix="prefetch") \
            if self.store.prefetches else None
        try:
            while not self._finished():
                self._step()
        finally:
            self.pool.shutdown(wait=not self.stopping, cancel_futures=True)
            if self.prefetcher is not None:
                self.prefetcher.shutdown(wait=True, cancel_futures=True)
                for item in self.in_flight.values():
                    self._discard_prefetched(item)
            if not self.committer.close(timeout=10):
                log.warning("offset %d could not be committed before stopping; the files after "
                            "offset %d will be loaded again (idempotently) at the next start",
                            self.committer.target, self.committer.confirmed)
            self.reader.close()
            if self.registrar is not None:
                self.registrar.close()
            if not self.reports.flush():
                log.warning("%d ingest report(s) could not be written before stopping",
                            len(self.reports.waiting))
        log.info("worker %d done: %d file(s) loaded (%d rows), %d quarantined, %d announcement(s) "
                 "refused", self.worker_id, self.counts["loaded"], self.counts["rows"],
                 self.counts["quarantined"], self.counts["refused"])
        return (ExitCode.INPUT_SET_ASIDE if self.counts["quarantined"] or self.counts["refused"]
                else ExitCode.OK)

    def _new_reader(self) -> PartitionReader:
        return PartitionReader(self.cfg.kafka, self.topic, self.worker_id, self.pcfg.name)

    def _connect(self) -> PartitionReader | None:
        """Connect, waiting for the broker (each retry logged) until it answers
        or a stop is requested (then None). A TLS or SASL refusal ends it."""
        while not self.stopping:
            try:
                return retry_kafka(self._new_reader, f"connect to Kafka at {self.cfg.kafka.bootstrap}",
                                   timeout=10, kafka=self.cfg.kafka)
            except KafkaSecurityError:
                raise
            except BusError:
                continue   # logged by retry_kafka; look at the stop flag, then again
        return None

    def _until_answered(self, action, what: str):
        """``action()`` until the broker answers it, honouring a stop request."""
        backoff = Backoff(first=0.5, most=10.0)
        while not self.stopping:
            try:
                return action()
            except (KafkaError, OSError) as exc:
                delay = backoff.delay()
                log.warning("could not %s (%s: %s); retrying in %.1f s", what,
                            type(exc).__name__, exc, delay)
                self._sleep(delay)
        return None

    def _sleep(self, seconds: float) -> None:
        Backoff.sleep(seconds, lambda: self.stopping)

    def _finished(self) -> bool:
        if self.stopping:
            return not any(f.future for f in self.in_flight.values())
        if self.end_of_run_offset is not None:
            return self.committer.confirmed > self.end_of_run_offset
        return False

    # -- the loop ----------------------------------------------------------
    def _step(self) -> None:
        # The resource guard holds new files back (they wait on the topic);
        # those in flight finish.
        if not self.stopping and len(self.in_flight) < self.max_in_flight \
                and self.end_of_run_offset is None and not self.guard.short():
            try:
                records = self.reader.poll(timeout_ms=200 if self.in_flight else 1000)
            except (KafkaError, OSError) as exc:
                # A link that fails reaches kafka-python's metadata refresh and
                # coordinator inside poll(): wait and poll again, never die.
                self.metrics.broker_errors.labels(self.pcfg.name).inc()
                if not self.broker_lost:
                    log.warning("the broker at %s is not answering (%s: %s); waiting for it",
                                self.cfg.kafka.bootstrap, type(exc).__name__, exc)
                self.broker_lost = True
                records = []
                if not self.in_flight:
                    self._sleep(1.0)
            for record in records:
                self._accept(record)
            if records:
                self.last_heard = time.monotonic()
                if self.broker_lost:
                    log.info("the broker answers again")
                    self.broker_lost = False
            elif not self.in_flight and time.monotonic() - self.last_heard > IDLE_CHECK_SECONDS:
                self._check_broker()
        elif self.guard.reason and not self.in_flight:
            self._sleep(0.5)
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
            problem = security_problem(self.cfg.kafka)
            if problem:   # TLS or SASL refuses: it will not fix itself, say so loudly
                log.error("the broker at %s refuses the connection: %s; waiting for it; %s",
                          self.cfg.kafka.bootstrap, problem, SECURITY_HINT)
            else:
                log.warning("the broker at %s is not answering (%s: %s); waiting for it",
                            self.cfg.kafka.bootstrap, type(exc).__name__, exc)
        self.last_heard = time.monotonic()

    def _accept(self, record) -> None:
        self.highest_seen = max(self.highest_seen, record.offset)
        problem = signature_problem(self.signing_key, record.value, record.headers)
        if problem:
            self._refused(record.offset, problem, _raw_record(record.value))
            return
        try:
            ann = Announcement.decode(record.value)
        except Exception as exc:  # a foreign or corrupt message: never blocks the partition
            self._refused(record.offset, f"not an announcement ({exc})", _raw_record(record.value))
            return
        if ann.kind == END_OF_RUN:
            if self.run_id and ann.run_id == self.run_id:
                log.info("end of run %s at offset %d", printable(ann.run_id), record.offset)
                self.end_of_run_offset = record.offset
            return
        try:
            staged = check_announcement(ann, self.pcfg, self.store)
        except RefusedInput as exc:
            self._refused(record.offset, str(exc), _record_fields(ann))
            return
        self.in_flight[record.offset] = _InFlight(ann, staged)

    def _refused(self, offset: int, reason: str, record: dict) -> None:
        if self.unrecorded is not None:   # stopping: an earlier one could not be kept
            return
        where = until_done(lambda: self.store.refuse(self.pcfg.type, self.topic, self.worker_id,
                                                     offset, reason, record),
                           f"keep the refused record at offset {offset} in {self.cfg.store}",
                           lambda: self.stopping, log)
        if where is None:   # stopped while the store was away: read it again next time
            self.unrecorded = offset
            return
        self.counts["refused"] += 1
        name, sha256 = str(record.get("original_name") or ""), record.get("sha256")
        log.error("refused offset %d of %s%s: %s (kept as %s; offset committed, nothing moved)%s",
                  offset, self.topic, f" ({printable(name)})" if name else "", reason, where,
                  f" [{checksum(sha256 if isinstance(sha256, str) else None)}]" if name else "",
                  extra=about(name, sha256) if name else None)
        self._report(offset, "refused", reason=reason, file=name or None,
                     sha256=sha256 if isinstance(sha256, str) else None)

    def _position(self) -> int:
        """The offset to commit: everything below it is finished."""
        position = min(self.in_flight) if self.in_flight else self.highest_seen + 1
        if self.unrecorded is not None:   # a refusal not kept yet is not finished
            position = min(position, self.unrecorded)
        return position

    def _lag(self) -> int | None:
        """Records on the partition not finished yet (the last fetch's view
        of the partition's end: no request)."""
        try:
            end = self.reader.consumer.highwater(self.reader.tp)
        except Exception:   # no fetch answered yet
            return None
        return None if end is None else max(0, end - max(self._position(), 0))

    def _report(self, offset: int, outcome: str, **fields) -> None:
        report = self.reports.write(outcome=outcome, topic=self.topic, partition=self.worker_id,
                                    offset=offset, lag=self._lag(), **fields)
        self.metrics.observe(report)

    def _start_due(self) -> None:
        now = time.monotonic()
        if self.stopping:
            return
        for offset, item in sorted(self.in_flight.items()):
            if item.future is None and item.retry_at <= now:
                if self.prefetcher is not None:
                    if item.prefetch is None:
                        item.prefetch = self.prefetcher.submit(self.store.prefetch, item.staged)
                    if not item.prefetch.done():
                        continue
                job = Job(item.announcement, item.staged, self.pcfg, self.cfg.store,
                          self.tmp_prefix, self.topic, self.worker_id, offset,
                          item.backoff.attempts + 1,
                          item.prefetch.result() if item.prefetch else None)
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
                delay = item.backoff.delay(getattr(exc, "retry_after", None))
                item.future, item.retry_at = None, time.monotonic() + delay
                if isinstance(exc, StoreError):
                    self.metrics.store_errors.labels(self.pcfg.name).inc()
                log.warning("could not load %s (%s: %s); offset %d not committed, retry %d in "
                            "%.0f s [%s]", printable(ann.original_name), type(exc).__name__, exc,
                            offset, item.backoff.attempts, delay, checksum(ann.sha256),
                            extra=about(ann.original_name, ann.sha256))
                continue
            del self.in_flight[offset]
            self._discard_prefetched(item)
            self.counts[outcome.status] += 1
            name, tag = printable(ann.original_name), checksum(ann.sha256)
            extra = about(ann.original_name, ann.sha256)
            if outcome.status == "loaded":
                self.counts["rows"] += outcome.rows
                parts = ", ".join(f"{p} ({n})" for p, n in sorted(outcome.partitions.items()))
                log.info("loaded %s: %d rows in %.1f s into %s [%s]", name, outcome.rows,
                         outcome.seconds, parts or "no partition (no rows)", tag, extra=extra)
                if self.registrar is not None:
                    self.registrar.written(self.plugin.table, outcome.partitions)
            elif outcome.status == "refused":
                log.error("refused offset %d of %s (%s): %s [%s]", offset, self.topic, name,
                          outcome.detail, tag, extra=extra)
            else:
                log.error("quarantined %s: %s [%s]", name, outcome.detail, tag, extra=extra)
            self._report(offset, outcome.status, reason=outcome.reason or None,
                         file=ann.original_name, sha256=ann.sha256, staged=item.staged,
                         records=outcome.rows, bytes_in=ann.size, bytes_out=outcome.bytes_out,
                         fetch_seconds=round(outcome.fetch_seconds, 4),
                         convert_seconds=round(outcome.convert_seconds, 4),
                         write_seconds=round(outcome.write_seconds, 4),
                         seconds=round(outcome.seconds, 4), partitions=outcome.partitions)
        if broken:
            self._restart_pool()

    def _discard_prefetched(self, item: _InFlight) -> None:
        """Drop a prefetched copy that no conversion took (one that was
        taken is gone already)."""
        if item.prefetch is not None and item.prefetch.done() and not item.prefetch.cancelled():
            copy = item.prefetch.result()
            if copy is not None:
                self.store.discard_prefetched(copy)

    def _commit(self) -> None:
        # Everything below the oldest unfinished announcement is finished.
        position = self._position()
        if position > 0:
            self.committer.advance(position)
        lag = self._lag()
        if lag is not None:
            self.metrics.lag.labels(self.pcfg.name, str(self.worker_id)).set(lag)


def run(cfg: IngestConfig, pipeline_name: str, worker_id: int, topic: str | None = None,
        run_id: str | None = None, metrics_port: int | None = None) -> int:
    worker = Worker(cfg, pipeline_name, worker_id, topic, run_id, metrics_port)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    try:
        return worker.run()
    except (BusError, registry.ToolMissingError) as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
