"""Ingest reports: one JSON line per file (or streaming micro-batch) and
what became of it, kept beside the table through the store (so on HDFS too):

    <table>/_reports/y=YYYY/m=MM/d=DD/<role>-<host>-<pid>-<start>.jsonl

Each process appends to a file of its own, so no two writers share one; a
line cut by a crash is skipped (and counted) by readers. DuckDB or Spark read
them with one query (README: Operating it), ``spot-ingest report`` rolls
them up and ``spot-ingest status`` and ``summary`` read them.

A report (version 1) holds, besides ``v``:

* ``time`` (ISO 8601, UTC) and ``ts`` (seconds since the epoch) of the event,
* ``pipeline``, ``type``, ``table``; ``role`` (``master``, ``worker``,
  ``stream``), ``worker`` (its id, or null), ``host``, ``pid``,
* ``outcome``: master ``staged`` (a file in the store and announced) or
  ``published`` (a record pipeline's file, as messages), ``rejected`` (set
  aside on the collector host); worker ``loaded``, ``quarantined`` (set aside
  in the store) or ``refused`` (an announcement not trusted); stream
  ``batch``; ``reason`` for the three set aside,
* ``file`` (the name in the collector directory), ``sha256``, ``staged``
  (its path in the store), ``pieces``,
* ``records``, ``bytes_in``, ``bytes_out`` (Parquet written),
* ``fetch_seconds``, ``convert_seconds``, ``write_seconds``, ``seconds``,
* ``partitions`` (``{"y=2026/m=11/d=22/h=16": rows}``),
* ``topic``, ``partition``, ``offset``, ``lag`` (records behind on that
  partition when the report was made),
* stream batches also ``batch``, ``messages``, ``rejects`` (lines),
  ``rejected_messages``.

Fields that do not apply are null. Writing a report never holds ingest up: a
store that refuses is logged, and the lines wait in memory (at most
``MAX_WAITING``) for the next write.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from .store import Store, StoreError

log = logging.getLogger("spot_ingest.reports")

VERSION = 1
REPORTS_DIR = "_reports"
MAX_WAITING = 10_000
SET_ASIDE = ("rejected", "quarantined", "refused")
FIELDS = ("v", "time", "ts", "pipeline", "type", "table", "role", "worker", "host", "pid",
          "outcome", "reason", "file", "sha256", "staged", "pieces", "records", "bytes_in",
          "bytes_out", "fetch_seconds", "convert_seconds", "write_seconds", "seconds",
          "partitions", "topic", "partition", "offset", "lag", "batch", "messages", "rejects",
          "rejected_messages")


def day_folder(ts: float) -> str:
    t = time.gmtime(ts)
    return f"y={t.tm_year:04d}/m={t.tm_mon:02d}/d={t.tm_mday:02d}"


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


class ReportWriter:
    """Appends one process's reports (see the module). ``write(**fields)``
    fills in who and when, and returns the report."""

    def __init__(self, store: Store, table: str, pipeline: str, ptype: str, role: str,
                 worker: int | None = None):
        self.store, self.table = store, table
        self.common = {"pipeline": pipeline, "type": ptype, "table": table, "role": role,
                       "worker": worker, "host": socket.gethostname(), "pid": os.getpid()}
        who = f"{role}{'' if worker is None else worker}"
        self.stem = f"{who}-{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        self.file_name = f"{self.stem}.jsonl"
        self.rolls = 0
        self.waiting: list[tuple[str, bytes]] = []   # (day folder, lines) not yet written
        self.failing = False
        self.dropped = 0

    def write(self, **fields: Any) -> dict:
        now = time.time()
        report = dict.fromkeys(FIELDS)
        report.update(v=VERSION, time=iso(now), ts=round(now, 3), **self.common)
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown report field(s): {', '.join(sorted(unknown))}")
        report.update(fields)
        line = (json.dumps(report, separators=(",", ":"), default=str) + "\n").encode()
        self.waiting.append((day_folder(now), line))
        if len(self.waiting) > MAX_WAITING:
            self.dropped += len(self.waiting) - MAX_WAITING
            del self.waiting[:len(self.waiting) - MAX_WAITING]
        self.flush()
        return report

    def flush(self) -> bool:
        """Write what waits; True if nothing waits any more."""
        while self.waiting:
            day = self.waiting[0][0]
            count = 0
            for folder, _ in self.waiting:
                if folder != day:
                    break
                count += 1
            data = b"".join(line for _, line in self.waiting[:count])
            try:
                self.store.append(f"{self.table}/{REPORTS_DIR}", f"{day}/{self.file_name}", data)
            except (StoreError, OSError) as exc:
                # An append that failed may have left part of a line: go on in
                # a new file, so that no later line is glued to that part.
                self.rolls += 1
                self.file_name = f"{self.stem}.{self.rolls}.jsonl"
                if not self.failing:
                    log.warning("could not write ingest reports to %s/%s (%s); %d report(s) "
                                "wait in memory and are written with the next one (ingest goes "
                                "on)", self.table, REPORTS_DIR, exc, len(self.waiting))
                self.failing = True
                return False
            del self.waiting[:count]
        if self.failing:
            log.info("ingest reports written again%s", f"; {self.dropped} were dropped while the "
                     f"store refused them" if self.dropped else "")
            self.failing, self.dropped = False, 0
        return True


@dataclass
class ReadResult:
    reports: list[dict] = field(default_factory=list)
    broken_lines: int = 0
    files: int = 0


def read_reports(store: Store, table: str, since: float, until: float | None = None
                 ) -> ReadResult:
    """The reports of ``table`` made in [since, until), oldest first; only
    the day folders of that range are read."""
    until = time.time() + 1 if until is None else until
    first_day, last_day = day_folder(since), day_folder(until)
    result = ReadResult()
    area = f"{table}/{REPORTS_DIR}"
    for name in store.list(area, ".jsonl"):
        day = name.rsplit("/", 1)[0]
        if not first_day <= day <= last_day:
            continue
        try:
            data = store.read(area, name)
        except FileNotFoundError:
            continue
        result.files += 1
        for line in data.splitlines():
            try:
                report = json.loads(line)
                ts = float(report["ts"])
            except (ValueError, KeyError, TypeError):
                result.broken_lines += 1     # cut by a crash, or not a report
                continue
            if since <= ts < until:
                result.reports.append(report)
    result.reports.sort(key=lambda r: r["ts"])
    return result


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def rollup(reports: Iterable[dict]) -> dict:
    """Files, records, bytes, time per file and failures of some reports."""
    reports = list(reports)
    done = [r for r in reports if r.get("role") == "worker" and r.get("outcome") == "loaded"]
    batches = [r for r in reports if r.get("outcome") == "batch"]
    seconds = [float(r["seconds"]) for r in done + batches if r.get("seconds") is not None]
    failures: dict[str, int] = {}
    reasons: list[dict] = []
    for r in reports:
        if r.get("outcome") in SET_ASIDE:
            failures[r["outcome"]] = failures.get(r["outcome"], 0) + 1
            reasons.append({"time": r.get("time"), "outcome": r["outcome"], "file": r.get("file"),
                            "sha256": r.get("sha256"), "reason": r.get("reason")})
    received = [r for r in reports if r.get("role") == "master"
                and r.get("outcome") in ("staged", "published")]
    return {
        "files_received": len(received),
        "files_loaded": len(done),
        "batches": len(batches),
        "records": sum(int(r.get("records") or 0) for r in done + batches),
        "rejected_lines": sum(int(r.get("rejects") or 0) for r in batches),
        "bytes_in": sum(int(r.get("bytes_in") or 0) for r in received),
        "bytes_out": sum(int(r.get("bytes_out") or 0) for r in done + batches),
        "seconds_mean": round(sum(seconds) / len(seconds), 3) if seconds else None,
        "seconds_p95": percentile(seconds, 95),
        "failures": failures,
        "set_aside": reasons,
    }
