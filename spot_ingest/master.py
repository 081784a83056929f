"""Master: watch a collector directory, stage finished files, announce them.

    master_collector.py -t PIPELINE -w WORKERS [-c CONF] [--once]

A file's journey here: found by the watcher -> split by the pipeline and
copied into the store by a staging process -> announced on the topic, one
record per piece, each acknowledged by the broker -> removed from the
collector directory (or, with ``delete_collected: false``, recorded in a
ledger). The file is forgotten only after that last step, and every step that
fails is retried with backoff and logged; a master killed at any point
repeats the unfinished steps after a restart, which the workers absorb
because staging and output are both named after the content's checksum.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from kafka.errors import KafkaError

from . import lines
from . import pipeline as registry
from .bus import (SECURITY_HINT, Announcement, Announcer, BusError, PartitionBalancer, await_ack,
                  check_message_size, ensure_topic, group_id, retry_kafka, security_problem)
from .config import IngestConfig, PipelineConfig, read_signing_key
from .kafka_security import client_kwargs
from .logs import about, checksum, printable
from .metrics import Metrics
from .reassign import retired_partitions
from .reports import ReportWriter
from .policy import Backoff, ExitCode, process_pool, until_done
from .store import SourceError, StagedFile, open_store, set_aside
from .watcher import CollectorWatcher

log = logging.getLogger("spot_ingest.master")

MAX_BACKOFF = 60.0
SOURCE_ATTEMPTS = 5     # a file that cannot be read this many times is set aside
RETENTION_EVERY = 3600.0


class MasterError(Exception):
    pass


class RejectedFile(Exception):
    """The file itself is unusable (too large, empty, unsplittable): set it aside."""


@dataclass
class _Work:
    path: Path
    relative: str
    collected_at: float
    backoff: Backoff = field(default_factory=lambda: Backoff(first=2.0, most=MAX_BACKOFF))
    retry_at: float = 0.0
    future: Future | None = None
    staged: list[StagedFile] = field(default_factory=list)
    damage: str | None = None
    sha256: str | None = None         # of the whole file (Taken.sha256)
    announced: int = 0
    taken: tuple | None = None        # the file's fingerprint when it was taken


def fingerprint(path: Path) -> tuple | None:
    """What tells whether a collector file changed: device, inode, size, mtime."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _check_size(path: Path, pcfg: PipelineConfig) -> None:
    size = path.stat().st_size
    if size == 0:
        raise RejectedFile("empty file")
    if pcfg.max_file_size and size > pcfg.max_file_size:
        raise RejectedFile(f"{size} bytes is above max_file_size ({pcfg.max_file_size})")


@dataclass
class Taken:
    """What a staging process did with one collector file."""
    pieces: list[StagedFile] = field(default_factory=list)   # staged, to be announced
    damage: str | None = None     # the readable part was taken; the original is kept
    announced: int = 0            # pieces staged and announced as they were split
    messages: int = 0             # messages published (and acknowledged)
    set_aside: int = 0            # lines set aside
    sha256: str | None = None     # of the whole file, when it was split or published


class Delivery(ABC):
    """How the files of a pipeline reach the topic, chosen once by the kind
    of pipeline. ``take`` runs in a staging process (the object is pickled
    there) and either stages the file for announcing or publishes it whole;
    it raises ``RejectedFile`` for a file to set aside, ``SourceError`` for
    one that cannot be read now, and anything else for a fault to retry."""

    def __init__(self, cfg: IngestConfig, pcfg: PipelineConfig, partitions: int,
                 run_id: str | None = None):
        self.cfg, self.pcfg, self.partitions = cfg, pcfg, partitions
        self.run_id, self.host = run_id, socket.gethostname()

    def check(self) -> None:
        """At start: what must hold before anything is taken."""

    @abstractmethod
    def take(self, path: Path, relative: str, collected_at: float) -> Taken: ...

    @abstractmethod
    def end_of_run(self, announcer: Announcer, partition: int, run_id: str, host: str) -> None: ...


def piece_announcement(pcfg: PipelineConfig, piece: StagedFile, relative: str, index: int,
                       count: int, host: str, run_id: str | None, collected_at: float,
                       source_sha256: str | None) -> Announcement:
    """The announcement of one staged piece (``count`` 0: pieces announced
    as they are split, their number not known yet)."""
    single = count == 1
    return Announcement(
        pipeline=pcfg.name, pipeline_type=pcfg.type, staged_path=piece.location, size=piece.size,
        sha256=piece.sha256,
        original_name=relative if single else
        f"{relative} [{index + 1}/{count}]" if count else f"{relative} [{index + 1}]",
        collected_at=int(collected_at * 1000), collector_host=host, chunk_index=index,
        chunk_count=count, source_sha256=None if single else source_sha256, run_id=run_id)


class FileDelivery(Delivery):
    """Split (if the pipeline does), stage in the store; the master announces.
    A pipeline whose ``split`` yields its pieces one by one (a generator) has
    each staged and announced here, in the staging process, as soon as it is
    yielded, so that workers start on the first piece while the rest is being
    split (``Taken.announced``).

    What a kill at any point leaves, and why it is safe: the file stays in the
    collector directory until every piece is announced (the master forgets it
    only after ``take`` returned), so the next master splits it again; the
    pieces are the same bytes (``split`` is deterministic), staged under the
    same names (``<sha256 prefix>-<file>.<index>``), and a piece announced
    twice is loaded into the same output file, so no row is doubled. Partial
    copies in the store are removed at start (``Store.clean_incoming``), and
    so are the split folders a killed master left in its scratch directory
    (``check``)."""

    def check(self) -> None:
        """At start (under the pipeline's lock, so no other master of this
        pipeline splits here): remove the split folders a killed master left
        (named as ``take`` makes them: tempfile.mkdtemp's 8 characters after
        ``<pipeline>-split-``)."""
        import re
        scratch = registry.load(self.pcfg.type).scratch_dir(self.pcfg)
        prefix = f"{self.pcfg.name}-split-"
        left = [p for p in scratch.iterdir() if p.name.startswith(prefix) and p.is_dir()
                and re.fullmatch(r"[a-z0-9_]{8}", p.name[len(prefix):])] \
            if scratch.is_dir() else []
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        if left:
            log.info("removed %d split folder(s) left in %s by a killed master", len(left),
                     scratch)

    def take(self, path: Path, relative: str, collected_at: float) -> Taken:
        _check_size(path, self.pcfg)
        plugin = registry.load(self.pcfg.type)
        store = open_store(self.cfg.store)
        scratch = plugin.scratch_dir(self.pcfg)
        scratch.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.pcfg.name}-split-", dir=scratch))
        damage = None
        pieces = None
        try:
            try:
                pieces = plugin.split(path, workdir, self.pcfg)
                if not isinstance(pieces, (list, tuple)):
                    return self._stream(pieces, path, relative, collected_at, store)
            except registry.DamagedInputError as exc:
                pieces, damage = exc.pieces, str(exc)
            if not pieces:    # nothing readable at all
                raise RejectedFile(damage or "no data")
            staged = []
            for i, piece in enumerate(pieces):
                name = relative if len(pieces) == 1 else f"{relative}.{i:05d}"
                staged.append(store.stage(piece, self.pcfg.type, name, collected_at))
            # A split file's own checksum (each piece has its own): for its
            # announcements, log lines and report.
            whole = staged[0].sha256 if len(staged) == 1 and not damage else _sha256(path)
            return Taken(staged, damage, sha256=whole)
        except registry.BadInputError as exc:
            raise RejectedFile(str(exc)) from None
        finally:
            # A generator left early (a failed announcement) stops its tools
            # before their folder goes.
            if hasattr(pieces, "close"):
                pieces.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def _stream(self, pieces, path: Path, relative: str, collected_at: float, store) -> Taken:
        """Stage and announce each piece as it comes (see the class): piece k
        is in the store and acknowledged by the broker before the split is
        asked for piece k + 1."""
        announcer = self._announcer(store)
        whole = _sha256(path)
        taken = Taken(sha256=whole)
        try:
            for piece in pieces:
                staged = store.stage(piece, self.pcfg.type, f"{relative}.{taken.announced:05d}",
                                     collected_at)
                piece.unlink(missing_ok=True)      # its scratch space, at once
                record = piece_announcement(self.pcfg, staged, relative, taken.announced, 0,
                                            self.host, self.run_id, collected_at, whole)
                try:   # what cannot be decoded must never be sent (as Master._announce)
                    Announcement.decode(record.encode())
                except Exception as exc:
                    raise RejectedFile(f"cannot be announced: the record does not decode "
                                       f"({type(exc).__name__}: {exc}); collected_at "
                                       f"{record.collected_at} ms") from None
                partition, offset = announcer.announce(record)
                taken.announced += 1
                log.info("announced %s (%d bytes) at partition %d offset %d as it was split "
                         "[%s]", printable(record.original_name), staged.size, partition, offset,
                         checksum(staged.sha256), extra=about(record.original_name, staged.sha256))
        except registry.BadInputError as exc:
            if not taken.announced and not isinstance(exc, registry.DamagedInputError):
                raise       # nothing readable: the file is rejected
            taken.damage = str(exc)
        if not taken.announced:
            raise RejectedFile(taken.damage or "no data")
        return taken

    def _announcer(self, store) -> Announcer:
        """One announcer per staging process (made at first use), for this
        pipeline's topic and partitions; another is made if they differ."""
        global _piece_announcer
        key = (self.cfg.kafka.bootstrap, self.pcfg.topic, self.partitions)
        if _piece_announcer is None or _piece_announcer[0] != key:
            if _piece_announcer is not None:
                _piece_announcer[1].close()
            kafka = self.cfg.kafka
            _piece_announcer = key, Announcer(
                kafka, self.pcfg.topic, self.partitions, self.pcfg.name, kafka.message_size,
                signing_key=read_signing_key(self.cfg),
                retired=lambda: retired_partitions(store, self.pcfg))
        return _piece_announcer[1]

    def end_of_run(self, announcer: Announcer, partition: int, run_id: str, host: str) -> None:
        marker = Announcement.end_of_run(self.pcfg.name, self.pcfg.type, run_id, host)
        announcer.announce(marker, partition)


_piece_announcer = None


class LineDelivery(Delivery):
    """Publish the file's lines (``spot_ingest.lines``), each message
    acknowledged before the next (so each is a batch of its own on the
    broker, which the streaming source relies on). How far each file was
    published is kept in ``<local_staging>/published/<pipeline>/``, so a file
    offered again after it grew is published from there on; a file that
    cannot be read (a corrupt .gz) is rejected before any of it is published."""

    def check(self) -> None:
        check_message_size(self.cfg.kafka, self.pcfg.topic)

    def take(self, path: Path, relative: str, collected_at: float) -> Taken:
        _check_size(path, self.pcfg)
        producer, balancer = self._clients()
        plugin = registry.load(self.pcfg.type)
        taken = Taken()
        items = lines.cut(path, relative, self.cfg.kafka.message_size, plugin,
                          state_dir=self.pcfg.local_staging / "published" / self.pcfg.name)
        while True:
            try:
                item = next(items, None)
            except registry.BadInputError as exc:
                if taken.messages:    # the contract: raised before anything is published
                    raise
                raise RejectedFile(str(exc)) from None
            if item is None:
                taken.sha256 = _sha256(path)
                return taken
            if isinstance(item, lines.Message):
                partition = balancer.choose()
                await_ack(producer.send(self.pcfg.topic, item.value, partition=partition,
                                        headers=item.headers),
                          f"message {taken.messages} of {relative}")
                balancer.sent(partition)
                taken.messages += 1
            else:
                taken.set_aside += 1
                where = quarantine_local(self.pcfg, f"{Path(relative).name}.line{item.line_no}",
                                         item.data, item.reason)
                log.error("%s (%s)", item.reason, where)

    def _clients(self):
        """One producer and one balancer per staging process, made at first use."""
        global _line_clients
        if _line_clients is None:
            from kafka import KafkaProducer
            kafka = self.cfg.kafka
            producer = KafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=0,
                                     max_request_size=max(kafka.message_size, 1_000_000),
                                     client_id=f"spot-master-{self.pcfg.name}")
            _line_clients = producer, PartitionBalancer(kafka, self.pcfg.topic, self.partitions,
                                                        group_id(self.pcfg.name))
        return _line_clients

    def end_of_run(self, announcer: Announcer, partition: int, run_id: str, host: str) -> None:
        marker = lines.end_of_run(run_id)
        announcer.send_raw(marker.value, marker.headers, partition)


_line_clients = None


def delivery_for(cfg: IngestConfig, pcfg: PipelineConfig, partitions: int,
                 run_id: str | None = None) -> Delivery:
    plugin = registry.load(pcfg.type)
    kind = LineDelivery if isinstance(plugin, registry.RecordPipeline) else FileDelivery
    return kind(cfg, pcfg, partitions, run_id)


def quarantine_local(pcfg: PipelineConfig, name: str, data: bytes | Path, reason: str) -> Path:
    """Set input aside on the collector host, with a note saying why, under a
    name that no earlier item holds (two files of the same name from different
    subdirectories both survive)."""
    return set_aside(pcfg.local_staging / "quarantine" / pcfg.name, name, data, reason)


def _sha256(path: Path) -> str | None:
    """The checksum of a file set aside (for its log line and report)."""
    import hashlib
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


class PipelineLock:
    """One master per pipeline per host: a second one is refused, not raced."""

    def __init__(self, pcfg: PipelineConfig):
        pcfg.local_staging.mkdir(parents=True, exist_ok=True)
        self.path = pcfg.local_staging / f"spot-ingest-{pcfg.name}.master.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
            os.close(self.fd)
            raise MasterError(f"another master is already running for pipeline {pcfg.name} "
                              f"({holder or 'unknown process'}; lock {self.path})") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self.fd)


class Ledger:
    """Files already ingested, for ``delete_collected: false`` (keep the originals)."""

    def __init__(self, pcfg: PipelineConfig):
        self.path = pcfg.local_staging / f"spot-ingest-{pcfg.name}.ingested"
        self.entries: set[str] = set()
        if self.path.exists():
            self.entries = set(self.path.read_text(encoding="utf-8", errors="surrogateescape")
                               .splitlines())

    @staticmethod
    def key(path: Path, taken: tuple | None = None) -> str:
        size, mtime_ns = (taken[2], taken[3]) if taken else (path.stat().st_size,
                                                              path.stat().st_mtime_ns)
        return f"{os.fsencode(path).hex()} {size} {mtime_ns}"

    def __contains__(self, path: Path) -> bool:
        try:
            return self.key(path) in self.entries
        except FileNotFoundError:
            return False

    def add(self, path: Path, taken: tuple | None = None) -> None:
        """Record ``path`` as ingested in the state it had when it was taken."""
        key = self.key(path, taken)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.add(key)


class Master:
    def __init__(self, cfg: IngestConfig, pipeline_name: str, workers: int, once: bool = False,
                 run_id: str | None = None, metrics_port: int | None = None):
        self.cfg = cfg
        self.pcfg = cfg.pipeline(pipeline_name)
        self.workers = workers
        self.once = once
        self.run_id = run_id
        self.host = socket.gethostname()
        self.stopping = False
        self.work: dict[str, _Work] = {}
        self.counts = {"announced": 0, "rejected": 0, "pieces": 0, "set_aside": 0, "changed": 0}
        self.last_waiting_note = time.monotonic()
        self.retention_run = float("-inf")
        self.metrics = Metrics(self.pcfg.name, "master")
        self.metrics_port = metrics_port if metrics_port is not None \
            else cfg.metrics.port("master")

    def request_stop(self, signum=None, frame=None) -> None:
        if self.stopping:
            os._exit(ExitCode.ERROR)
        log.info("stopping: files in progress stay in the collector directory and are "
                 "taken again at the next start")
        self.stopping = True

    def run(self) -> int:
        lock = PipelineLock(self.pcfg)
        try:
            return self._run()
        finally:
            lock.release()

    def _run(self) -> int:
        if not self.pcfg.collector_path.is_dir():
            raise MasterError(f"collector_path {self.pcfg.collector_path} of pipeline "
                              f"{self.pcfg.name} does not exist")
        def open_and_clean():
            self.store = open_store(self.cfg.store)
            self.store.mark()
            return self.store.clean_incoming(self.pcfg.type)
        removed = until_done(open_and_clean, f"open the store {self.cfg.store}",
                             lambda: self.stopping, log)
        if removed is None:
            return ExitCode.OK    # stopped while waiting for the store
        if removed:
            log.info("removed %d partial copy(ies) left in the store by a killed master", removed)
        self.metrics.serve(self.cfg.metrics.address, self.metrics_port)
        self.reports = ReportWriter(self.store, registry.load(self.pcfg.type).table,
                                    self.pcfg.name, self.pcfg.type, "master")
        kafka = self.cfg.kafka
        partitions = ensure_topic(kafka, self.pcfg.topic, self.workers)
        self.delivery = delivery_for(self.cfg, self.pcfg, self.workers, self.run_id)
        self.delivery.check()
        self.announcer = retry_kafka(
            lambda: Announcer(kafka, self.pcfg.topic, self.workers, self.pcfg.name,
                              kafka.message_size, signing_key=read_signing_key(self.cfg),
                              retired=lambda: retired_partitions(self.store, self.pcfg)),
            f"connect to Kafka at {kafka.bootstrap}", kafka=kafka)
        self.ledger = None if self.pcfg.delete_collected else Ledger(self.pcfg)
        self.watcher = CollectorWatcher(self.pcfg.collector_path, self.pcfg.supported_files,
                                        registry.load(self.pcfg.type).working_names,
                                        self.pcfg.settle_seconds, watch=not self.once)
        log.info("master of pipeline %s watching %s; announcing on topic %s (%d partitions, "
                 "%d used); staging into %s with %d processes; %d file(s) found at start",
                 self.pcfg.name, self.pcfg.collector_path, self.pcfg.topic, partitions,
                 self.workers, self.cfg.store, self.cfg.collector_processes,
                 self.watcher.pending())
        self.pool = process_pool(self.cfg.collector_processes,
                                 warm=(__name__, type(registry.load(self.pcfg.type)).__module__))
        try:
            while not self.stopping:
                self._step()
                if self.once and not self.watcher.pending() and not self.work:
                    self._end_run()
                    break
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.watcher.close()
            self.announcer.close()
            if not self.reports.flush():
                log.warning("%d ingest report(s) could not be written before stopping",
                            len(self.reports.waiting))
        log.info("master done: %d file(s) announced as %d piece(s), %d rejected",
                 self.counts["announced"], self.counts["pieces"], self.counts["rejected"])
        return (ExitCode.INPUT_SET_ASIDE if self.counts["rejected"] or self.counts["set_aside"]
                else ExitCode.OK)

    def _end_run(self) -> None:
        for partition in range(self.workers):
            self._with_retry(lambda p=partition: self.delivery.end_of_run(
                self.announcer, p, self.run_id or "", self.host),
                f"announce the end of run on partition {partition}")
        log.info("announced the end of run %s on %d partition(s)", self.run_id, self.workers)

    def _with_retry(self, action, what: str):
        """``action()`` until the broker takes it; gives up (None) on a stop request."""
        backoff = Backoff(first=1.0, most=MAX_BACKOFF)
        while not self.stopping:
            try:
                return action()
            except (KafkaError, BusError) as exc:
                delay = backoff.delay()
                problem = security_problem(self.cfg.kafka)
                if problem:   # will not fix itself: say so loudly, on every retry
                    log.error("could not %s: %s; retrying in %.0f s; %s", what, problem, delay,
                              SECURITY_HINT)
                else:
                    log.warning("could not %s (%s: %s); retrying in %.0f s", what,
                                type(exc).__name__, exc, delay)
                Backoff.sleep(delay, lambda: self.stopping)
        log.warning("stopped before the broker took it: could not %s", what)
        return None

    def _expire_staged(self) -> None:
        """binary_retention_days: once an hour, remove old staged files whose rows are in."""
        days = self.cfg.binary_retention_days
        if not days or time.monotonic() - self.retention_run < RETENTION_EVERY:
            return
        self.retention_run = time.monotonic()
        try:
            removed = self.store.expire_staged(self.pcfg.type, days)
        except OSError as exc:
            log.warning("could not remove staged files older than %g days: %s", days, exc)
            return
        if removed:
            log.info("removed %d staged file(s) older than %g days whose rows are in the table",
                     removed, days)

    def _step(self) -> None:
        now = time.monotonic()
        self._expire_staged()
        for path in self.watcher.ready():
            key = str(path)
            if key in self.work:
                continue
            if self.ledger is not None and path in self.ledger:
                self.watcher.forget(key)
                continue
            try:
                rel = str(path.resolve().relative_to(self.watcher.root))
            except ValueError:  # a symlink inside the tree pointing elsewhere inside it
                rel = path.name
            # Names are bytes on Linux: keep undecodable ones readable and valid UTF-8.
            rel = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            self.work[key] = _Work(path, rel, path.stat().st_mtime)
            self.metrics.files_seen.labels(self.pcfg.name).inc()
        in_progress = sum(1 for w in self.work.values() if w.future)
        for key, item in self.work.items():
            if item.future is None and not item.staged and item.retry_at <= now \
                    and in_progress < self.cfg.collector_processes * 2:
                item.taken = fingerprint(item.path)
                item.future = self.pool.submit(self.delivery.take, item.path, item.relative,
                                               item.collected_at)
                in_progress += 1
        for key, item in list(self.work.items()):
            if item.future is not None and item.future.done():
                self._staged(key, item)
            if item.staged and item.retry_at <= time.monotonic():
                self._announce(key, item)
        waiting = self.watcher.pending() - len(self.work)
        if waiting > 0 and time.monotonic() - self.last_waiting_note > 60:
            # Say why nothing happens: files still growing or held open by a writer.
            log.info("waiting for %d file(s) still being written", waiting)
            self.last_waiting_note = time.monotonic()
        time.sleep(min(self.cfg.ingestion_interval, 0.2) if self.work else self.cfg.ingestion_interval)

    def _staged(self, key: str, item: _Work) -> None:
        fut, item.future = item.future, None
        try:
            taken: Taken = fut.result()
            item.staged, item.damage, item.sha256 = taken.pieces, taken.damage, taken.sha256
            if taken.announced:     # staged and announced piece by piece as it was split
                self.counts["announced"] += 1
                self.counts["pieces"] += taken.announced
                self.metrics.files_announced.labels(self.pcfg.name).inc(taken.announced)
                log.info("staged and announced %s (%d pieces, each as it was split) [%s]",
                         printable(item.relative), taken.announced, checksum(taken.sha256),
                         extra=about(item.relative, taken.sha256))
                self._report("staged", item, sha256=taken.sha256, pieces=taken.announced,
                             bytes_in=(item.taken or (0, 0, 0))[2])
                self._done(key, item)
            elif not taken.pieces:    # published whole: nothing to announce
                self.counts["announced"] += 1
                self.counts["pieces"] += taken.messages
                self.counts["set_aside"] += taken.set_aside
                log.info("published %s as %d message(s)%s [%s]", printable(item.relative),
                         taken.messages,
                         f"; {taken.set_aside} line(s) set aside" if taken.set_aside else "",
                         checksum(taken.sha256), extra=about(item.relative, taken.sha256))
                self._report("published", item, sha256=taken.sha256, messages=taken.messages,
                             rejects=taken.set_aside, bytes_in=(item.taken or (0, 0, 0))[2])
                self._done(key, item)
        except RejectedFile as exc:
            self._reject(key, item, str(exc))
        except FileNotFoundError:
            log.info("%s disappeared before it was staged", printable(str(item.path)))
            self._forget(key)
        except SourceError as exc:
            if item.backoff.attempts + 1 >= SOURCE_ATTEMPTS:
                self._reject(key, item, f"{exc}, {SOURCE_ATTEMPTS} times")
            else:
                self._backoff(item, f"could not read {printable(str(item.path))}", exc)
        except Exception as exc:
            self._backoff(item, f"could not stage {printable(str(item.path))}", exc)

    def _announce(self, key: str, item: _Work) -> None:
        count = len(item.staged)
        while item.announced < count:
            record = piece_announcement(self.pcfg, item.staged[item.announced], item.relative,
                                        item.announced, count, self.host, self.run_id,
                                        item.collected_at, item.sha256)
            try:   # what cannot be decoded must never be sent (and its file forgotten)
                Announcement.decode(record.encode())
            except Exception as exc:
                self._reject(key, item, f"cannot be announced: the record does not decode "
                                        f"({type(exc).__name__}: {exc}); collected_at "
                                        f"{record.collected_at} ms")
                return
            try:
                partition, offset = self.announcer.announce(record)
            except (KafkaError, BusError) as exc:
                self._backoff(item, f"could not announce {printable(item.relative)}", exc)
                return
            log.debug("announced %s at partition %d offset %d", record.staged_path, partition,
                      offset)
            self.metrics.files_announced.labels(self.pcfg.name).inc()
            item.announced += 1
        self.counts["announced"] += 1
        self.counts["pieces"] += count
        sha256 = item.sha256 or (item.staged[0].sha256 if count == 1 else None)
        log.info("staged and announced %s (%d piece%s, %d bytes) [%s]", printable(item.relative),
                 count, "" if count == 1 else "s", sum(p.size for p in item.staged),
                 checksum(sha256), extra=about(item.relative, sha256))
        self._report("staged", item, sha256=sha256, pieces=count,
                     staged=item.staged[0].location if count == 1 else None,
                     bytes_in=item.taken[2] if item.taken else sum(p.size for p in item.staged))
        self._done(key, item)

    def _done(self, key: str, item: _Work) -> None:
        """The store and the broker hold the file: the collector may let it go,
        unless it changed since it was taken (a writer appended after a pause
        longer than settle_seconds): then it stays, to be taken again."""
        if item.damage:
            # The readable part is announced; the original is kept, with the reason.
            self._reject(key, item, item.damage, partly_loaded=True)
            return
        now = fingerprint(item.path)
        if now is not None and now != item.taken:
            self.counts["changed"] += 1
            log.warning("%s changed while it was being ingested (%d -> %d bytes); kept in the "
                        "collector directory and taken again once it settles", printable(item.relative),
                        item.taken[2] if item.taken else 0, now[2])
            self.work.pop(key, None)
            self.watcher.requeue(key)
            return
        try:
            if self.ledger is not None:
                self.ledger.add(item.path, item.taken)
            else:
                item.path.unlink()
        except FileNotFoundError:
            pass
        self._forget(key)

    def _backoff(self, item: _Work, what: str, exc: Exception) -> None:
        delay = item.backoff.delay(getattr(exc, "retry_after", None))
        item.retry_at = time.monotonic() + delay
        problem = security_problem(self.cfg.kafka) if isinstance(exc, KafkaError) else None
        if problem:   # TLS or SASL refuses: it will not fix itself, say so loudly
            log.error("%s: %s; retry %d in %.0f s; the file stays in the collector directory; %s",
                      what, problem, item.backoff.attempts, delay, SECURITY_HINT)
            return
        log.warning("%s (%s: %s); retry %d in %.0f s; the file stays in the collector directory",
                    what, type(exc).__name__, exc, item.backoff.attempts, delay)

    def _reject(self, key: str, item: _Work, reason: str, partly_loaded: bool = False) -> None:
        dest = None
        try:
            dest = quarantine_local(self.pcfg, item.path.name, item.path,
                                    f"collected as: {item.path}\n{reason}")
        except OSError as exc:
            log.error("could not set %s aside: %s", printable(str(item.path)), exc)
        what = "announced the readable part of" if partly_loaded else "rejected"
        sha256 = item.sha256 or (_sha256(dest) if dest is not None else None)
        log.error("%s %s: %s; moved to %s [%s]", what, printable(str(item.path)), reason, dest,
                  checksum(sha256), extra=about(item.relative, sha256))
        self.counts["set_aside" if partly_loaded else "rejected"] += 1
        self._report("rejected", item, reason=reason, staged=str(dest) if dest else None,
                     sha256=sha256, bytes_in=(item.taken or (0, 0, 0))[2])
        self._forget(key)

    def _report(self, outcome: str, item: _Work, **fields) -> None:
        self.metrics.observe(self.reports.write(outcome=outcome, file=item.relative, **fields))

    def _forget(self, key: str) -> None:
        self.work.pop(key, None)
        self.watcher.forget(key)


def run(cfg: IngestConfig, pipeline_name: str, workers: int, once: bool = False,
        run_id: str | None = None, metrics_port: int | None = None) -> int:
    master = Master(cfg, pipeline_name, workers, once, run_id, metrics_port)
    signal.signal(signal.SIGTERM, master.request_stop)
    signal.signal(signal.SIGINT, master.request_stop)
    try:
        return master.run()
    except (MasterError, BusError, registry.ToolMissingError) as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
