"""``spot-ingest status -t PIPELINE [--json] [--broker-timeout S]``: whether
the ingest keeps up, what it ingested and what failed, read from the broker,
the store and the ingest reports only (no master, worker or streaming job
needs to be running). Gathering (``broker_view``, ``waiting_files``,
``gather``) and rendering (``render``) are separate; ``partition_rows``
turns offsets into the partition lines without a broker.

Exit code: 0 when the broker and the store both answered; 1
(``ExitCode.ERROR``) when either did not, after showing all the rest; 2 for
a configuration error. A broker that does not answer is given up after
``--broker-timeout`` seconds (5 by default; the client's own timeouts), or
``BROKER_GRACE`` (2) seconds later should the client library wait in a
call without one: the command never hangs on the broker. (A store that
hangs is bounded by the store's own timeouts, ``hdfs.timeout`` on HDFS.)

The JSON form (``--json``), version 1; every key is always present::

    {"v": 1, "pipeline": str, "type": str, "table": str,
     "delivery": "files" | "records",
     "time": str (ISO 8601, UTC), "ts": float (seconds since the epoch),
     "broker": {"available": bool, "error": str | null, "topic": str,
                "group": str,
                "offsets_in": "group" | "checkpoint",
                "partitions": [PARTITION, ...]},
     "collector": {"path": str, "exists": bool, "waiting": int | null},
     "store": {"available": bool, "error": str | null},
     "last_hour": WINDOW, "last_day": WINDOW,
     "newest_partition": {"partition": str, "rows": int, "files": int,
                          "unreadable": int} | null,
     "stream": {"batch": int, "time": str, "seconds_ago": float,
                "records": int, "messages": int, "rejects": int,
                "rejected_messages": int, "lag": int | null} | null}

``PARTITION`` is ``{"partition": int, "beginning": int, "end": int,
"committed": int | null, "lag": int | null, "seconds_since_commit": float |
null, "committed_by": str | null, "commit_time_from": "broker" | "reports" |
null}``:

* ``end``: the partition's end offset (the next announcement's offset);
  ``beginning``: its first offset still held.
* ``committed``: the worker group's (``group``) committed offset, i.e. the
  next announcement the worker will read; null if it never committed.
* ``lag``: ``end - committed`` (``end - beginning`` when never committed: a
  worker starts from the beginning), the announcements not yet finished.
* ``seconds_since_commit``: seconds since the worker last committed, from
  the metadata it commits with each offset (``commit_metadata``:
  ``{"t", "worker", "host"}``; ``commit_time_from: "broker"``), or, from a
  broker that does not keep commit metadata, since the worker's newest
  report on that partition (``"reports"``); ``committed_by``: ``"worker N on
  HOST"`` when the metadata says so.
* Record pipelines (proxy, squid; ``delivery: "records"``) keep their
  offsets in the streaming job's Spark checkpoint (``offsets_in:
  "checkpoint"``), not in the group: their partitions show ``beginning`` and
  ``end`` only (``committed``, ``lag`` and the commit fields are null) and
  ``stream`` tells how far the job is.
* The broker unavailable: ``available`` false, ``error`` why, ``partitions``
  empty. A topic that does not exist yet: ``available`` true, ``error`` says
  so, ``partitions`` empty.

``WINDOW`` (``last_hour``, ``last_day``: the reports of the pipeline in the
last 3,600 and 86,400 seconds) is ``{"staged": int, "loaded": int,
"set_aside": int, "records": int, "batches": int, "rejected_lines": int,
"failures": {outcome: int}, "reasons": [{"time", "outcome", "file",
"sha256", "reason"}]}``: ``staged`` files the master staged and announced
(or published, for a record pipeline), ``loaded`` files the workers loaded,
``set_aside`` files rejected (master), quarantined or refused (worker), by
outcome in ``failures`` and with their reasons (the newest 20) in
``reasons``; ``records`` rows the workers and the streaming job wrote;
``batches`` streaming micro-batches, ``rejected_lines`` the lines they set
aside.

``collector``: the files in the collector directory that the master would
take (names as ``spot_ingest.watcher`` decides: ``supported_files``, no
working names, no hidden folders); ``exists`` false (``waiting`` null) when
the directory is not on this host.

``store``: whether the reports and the table could be read;
``newest_partition`` is the table partition with the latest
``y=/m=/d=/h=`` values, its rows summed from the Parquet footers of its
files (``unreadable``: files whose footer could not be read, not counted);
null when the table has no file yet. ``stream`` is the streaming job's last
micro-batch report of the last day (null for file pipelines, or none yet).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from . import pipeline as registry
from .config import IngestConfig, PipelineConfig
from .logs import printable
from .policy import ExitCode
from .reports import iso, read_reports, rollup
from .store import Store, open_store
from .warehouse import read_footer

VERSION = 1
BROKER_TIMEOUT = 5.0      # seconds for the whole broker part
BROKER_GRACE = 2.0        # beyond it, before a client stuck in a call is given up
HOUR, DAY = 3600, 86400


def commit_metadata(worker_id: int, host: str) -> str:
    """What a worker commits with its offset: when, and who."""
    return json.dumps({"t": round(time.time(), 3), "worker": worker_id, "host": host},
                      separators=(",", ":"))


def is_record_pipeline(pcfg: PipelineConfig) -> bool:
    return isinstance(registry.load(pcfg.type), registry.RecordPipeline)


# -- the broker -----------------------------------------------------------------

def partition_rows(ends: dict[int, int], beginnings: dict[int, int],
                   committed: dict[int, tuple[int, str | None]] | None,
                   now: float) -> list[dict]:
    """The ``PARTITION`` entries (see the module) from offsets: ``ends`` and
    ``beginnings`` by partition; ``committed`` by partition: (offset, commit
    metadata), a partition missing if never committed; ``committed`` None
    for a record pipeline (the offsets are in Spark's checkpoint)."""
    rows = []
    for partition in sorted(ends):
        end, beginning = ends[partition], beginnings.get(partition, 0)
        row = {"partition": partition, "beginning": beginning, "end": end, "committed": None,
               "lag": None, "seconds_since_commit": None, "committed_by": None,
               "commit_time_from": None}
        if committed is not None:
            offset, metadata = committed.get(partition, (None, None))
            if offset is not None and offset < 0:
                offset = None
            row["committed"] = offset
            row["lag"] = max(0, end - (beginning if offset is None else offset))
            if offset is not None and metadata:
                try:
                    meta = json.loads(metadata)
                    row["seconds_since_commit"] = round(max(0.0, now - float(meta["t"])), 1)
                    row["commit_time_from"] = "broker"
                    if meta.get("worker") is not None:
                        row["committed_by"] = f"worker {meta['worker']} on {meta.get('host')}"
                except (ValueError, KeyError, TypeError, AttributeError):
                    pass      # metadata of another writer: the time is not known
        rows.append(row)
    return rows


def _ask_broker(cfg: IngestConfig, pcfg: PipelineConfig, records: bool, timeout: float,
                view: dict) -> None:
    """Fill ``view`` from the broker; every wait with a timeout ends within
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    from kafka import KafkaConsumer, TopicPartition

    from .kafka_security import client_kwargs

    def left_ms() -> int:
        left = int((deadline - time.monotonic()) * 1000)
        if left <= 0:
            raise TimeoutError("out of time")
        return left

    consumer = None
    try:
        budget = left_ms()
        consumer = KafkaConsumer(
            **client_kwargs(cfg.kafka), group_id=view["group"], enable_auto_commit=False,
            client_id=f"spot-status-{pcfg.name}", bootstrap_timeout_ms=budget,
            request_timeout_ms=max(budget, 1000))
        # partitions_for_topic takes no timeout: broker_view's deadline bounds it.
        found = consumer.partitions_for_topic(pcfg.topic)
        if not found:
            view.update(available=True, error=f"topic {pcfg.topic} does not exist (yet)")
            return
        tps = [TopicPartition(pcfg.topic, p) for p in sorted(found)]
        ends = consumer.end_offsets(tps, timeout_ms=left_ms())
        beginnings = consumer.beginning_offsets(tps, timeout_ms=left_ms())
        committed = None
        if not records:
            committed = {}
            for tp in tps:
                held = consumer.committed(tp, metadata=True, timeout_ms=left_ms())
                if held is not None:
                    committed[tp.partition] = (held.offset, held.metadata)
        view["partitions"] = partition_rows(
            {tp.partition: ends.get(tp, 0) for tp in tps},
            {tp.partition: beginnings.get(tp, 0) for tp in tps}, committed, time.time())
        view["available"] = True
    except Exception as exc:   # noqa: BLE001  (any client failure: shown, not fatal)
        from kafka.errors import KafkaTimeoutError
        what = str(exc).removeprefix(f"{type(exc).__name__}: ") or type(exc).__name__
        if isinstance(exc, (KafkaTimeoutError, TimeoutError)):
            view["error"] = (f"the broker at {cfg.kafka.bootstrap} did not answer within "
                             f"{timeout:g} s ({what})")
        else:
            view["error"] = (f"the broker at {cfg.kafka.bootstrap} could not be read "
                             f"({type(exc).__name__}: {what})")
    finally:
        if consumer is not None:
            try:
                consumer.close(autocommit=False, timeout_ms=1000)
            except Exception:   # noqa: BLE001  (closing a client of a broker that is away)
                pass


def broker_view(cfg: IngestConfig, pcfg: PipelineConfig,
                timeout: float = BROKER_TIMEOUT) -> dict:
    """The topic's partitions (``broker`` of the JSON form), asked of the
    broker within ``timeout`` seconds, whatever the client library does: the
    questions run in a daemon thread that is given up if it overruns."""
    from .bus import group_id
    records = is_record_pipeline(pcfg)
    view = {"available": False, "error": None, "topic": pcfg.topic, "group": group_id(pcfg.name),
            "offsets_in": "checkpoint" if records else "group", "partitions": []}
    answer = dict(view)
    asker = threading.Thread(target=_ask_broker, daemon=True, name="status-broker",
                             args=(cfg, pcfg, records, timeout, answer))
    asker.start()
    asker.join(timeout + BROKER_GRACE)
    if asker.is_alive():
        view["error"] = (f"the broker at {cfg.kafka.bootstrap} did not answer within "
                         f"{timeout + BROKER_GRACE:g} s")
        return view
    return answer


# -- the collector directory ------------------------------------------------------

def waiting_files(pcfg: PipelineConfig) -> dict:
    """Files in the collector directory that the master would take: the
    names ``watcher.CollectorWatcher`` notes (``is_candidate_name``, no
    hidden folder, no symlink leading outside the directory)."""
    from .watcher import is_candidate_name
    root = Path(pcfg.collector_path)
    if not root.is_dir():
        return {"path": str(root), "exists": False, "waiting": None}
    working = registry.load(pcfg.type).working_names
    inside = str(root.resolve()) + os.sep
    count = 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in files:
            if not is_candidate_name(name, pcfg.supported_files, working):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not os.path.realpath(path).startswith(inside):
                continue
            if os.path.isfile(path):
                count += 1
    return {"path": str(root), "exists": True, "waiting": count}


# -- the reports and the table ----------------------------------------------------

def window(reports: list[dict]) -> dict:
    """A ``WINDOW`` (see the module) of some reports of one pipeline."""
    rolled = rollup(reports)
    return {"staged": rolled["files_received"], "loaded": rolled["files_loaded"],
            "set_aside": sum(rolled["failures"].values()), "records": rolled["records"],
            "batches": rolled["batches"], "rejected_lines": rolled["rejected_lines"],
            "failures": rolled["failures"], "reasons": rolled["set_aside"][-20:]}


def _partition_key(partition: str) -> tuple:
    """y=2026/m=11/d=22/h=16 -> (2026, 11, 22, 16): numbers compared as numbers."""
    return tuple((0, int(v)) if v.isdigit() else (1, v)
                 for v in (part.partition("=")[2] for part in partition.split("/")))


def newest_partition(store: Store, table: str, attempts: int = 3) -> dict | None:
    """The table partition with the latest values and the rows of its files
    (from their Parquet footers). A file gone between the listing and its
    reading (a compaction swapped the partition) lists again."""
    area = f"{table}/hive"
    for attempt in range(attempts):
        by_partition: dict[str, list[str]] = {}
        for name in store.list(area, ".parquet"):
            by_partition.setdefault(name.rpartition("/")[0], []).append(name)
        if not by_partition:
            return None
        newest = max(by_partition, key=_partition_key)
        rows = unreadable = 0
        try:
            for name in by_partition[newest]:
                try:
                    rows += read_footer(store, area, name).num_rows
                except ValueError:      # not Parquet, or cut
                    unreadable += 1
        except FileNotFoundError:
            if attempt + 1 < attempts:
                continue
            raise
        return {"partition": newest, "rows": rows, "files": len(by_partition[newest]),
                "unreadable": unreadable}
    return None


def stream_view(batches: list[dict], now: float) -> dict | None:
    """The streaming job's last micro-batch report."""
    if not batches:
        return None
    last = batches[-1]
    return {"batch": last.get("batch"), "time": last.get("time"),
            "seconds_ago": round(max(0.0, now - float(last["ts"])), 1),
            "records": last.get("records"), "messages": last.get("messages"),
            "rejects": last.get("rejects"), "rejected_messages": last.get("rejected_messages"),
            "lag": last.get("lag")}


def gather(cfg: IngestConfig, pcfg: PipelineConfig, now: float | None = None,
           broker: dict | None = None, broker_timeout: float = BROKER_TIMEOUT) -> dict:
    """Everything ``status`` shows (the JSON form). ``broker`` (the broker
    part, e.g. from ``partition_rows``) may be given; else the broker is
    asked, at most ``broker_timeout`` seconds. Reading the store never stops
    the rest: a store that fails is said in ``store``."""
    from .store import StoreError
    now = time.time() if now is None else now
    plugin = registry.load(pcfg.type)
    records = isinstance(plugin, registry.RecordPipeline)
    broker = broker if broker is not None else broker_view(cfg, pcfg, broker_timeout)
    store_part = {"available": True, "error": None}
    mine: list[dict] = []
    newest = None
    try:
        store = open_store(cfg.store)
        found = read_reports(store, plugin.table, now - DAY, now + 1).reports
        mine = [r for r in found if r.get("pipeline") == pcfg.name]
        newest = newest_partition(store, plugin.table)
    except (StoreError, OSError) as exc:
        store_part = {"available": False, "error": f"the store could not be read "
                                                   f"({type(exc).__name__}: {exc})"}
    # A broker that keeps no commit metadata: a worker commits right after
    # it reports a file, so its newest report on the partition tells when.
    newest_report: dict[int, float] = {}
    for r in mine:
        if r.get("role") == "worker" and r.get("partition") is not None:
            newest_report[r["partition"]] = float(r["ts"])
    for p in broker["partitions"]:
        if p["seconds_since_commit"] is None and p["committed"] is not None \
                and p["partition"] in newest_report:
            p["seconds_since_commit"] = round(max(0.0, now - newest_report[p["partition"]]), 1)
            p["commit_time_from"] = "reports"
    return {
        "v": VERSION, "pipeline": pcfg.name, "type": pcfg.type, "table": plugin.table,
        "delivery": "records" if records else "files", "time": iso(now), "ts": round(now, 3),
        "broker": broker,
        "collector": waiting_files(pcfg),
        "store": store_part,
        "last_hour": window([r for r in mine if r["ts"] >= now - HOUR]),
        "last_day": window(mine),
        "newest_partition": newest,
        "stream": stream_view([r for r in mine if r.get("outcome") == "batch"], now),
    }


# -- rendering ----------------------------------------------------------------------

def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Columns right-aligned to their widest cell; the last one left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return [indent + "  ".join(cell.rjust(w) for cell, w in zip(r, widths)) + "  " + r[-1]
            for r in [header, *rows]]


def render(status: dict) -> str:
    """The human-readable form: a few lines an operator reads at a glance."""
    out = [f"{status['pipeline']} ({status['type']}, table {status['table']}) at {status['time']}"]
    broker = status["broker"]
    if not broker["available"]:
        out.append(f"broker: unavailable: {broker['error']}")
    elif broker["error"]:
        out.append(f"broker: {broker['error']}")
    if broker["partitions"]:
        parts = broker["partitions"]
        if broker["offsets_in"] == "checkpoint":
            out.append(f"topic {broker['topic']} (offsets in the streaming job's checkpoint):")
            out += _table(["partition", "end", ""],
                          [[str(p["partition"]), str(p["end"]), ""] for p in parts])
        else:
            total = sum(p["lag"] or 0 for p in parts)
            out.append(f"topic {broker['topic']}, group {broker['group']}: lag {total}")
            out += _table(
                ["partition", "committed", "end", "lag", "last commit"],
                [[str(p["partition"]), "-" if p["committed"] is None else str(p["committed"]),
                  str(p["end"]), "-" if p["lag"] is None else str(p["lag"]),
                  _ago(p["seconds_since_commit"]) + (
                      f" ({printable(p['committed_by'])})" if p["committed_by"] else
                      " (from reports)" if p["commit_time_from"] == "reports" else "")]
                 for p in parts])
    collector = status["collector"]
    out.append(f"collector {printable(collector['path'])}: "
               + (f"{collector['waiting']} file(s) waiting" if collector["exists"]
                  else "not on this host (run status on the collector host to see it)"))
    store = status["store"]
    if not store["available"]:
        out.append(f"store: unavailable: {store['error']}")
    for name, label in (("last_hour", "last hour:"), ("last_day", "last day: ")):
        w = status[name]
        failures = ", ".join(f"{n} {k}" for k, n in sorted(w["failures"].items()))
        line = (f"{label} {w['staged']} staged, {w['loaded']} loaded, {w['set_aside']} set aside"
                f"{f' ({failures})' if failures else ''}, {w['records']} records")
        if w["batches"]:
            line += f", {w['batches']} batch(es), {w['rejected_lines']} rejected line(s)"
        out.append(line)
    for r in status["last_day"]["reasons"][-5:]:      # in full: spot-ingest report
        reason = printable(str(r["reason"]))
        out.append(f"  {r['time']} {r['outcome']} {printable(str(r['file']))}: "
                   + (reason if len(reason) <= 160 else reason[:157] + "..."))
    newest = status["newest_partition"]
    if store["available"]:
        out.append("newest partition: " + (
            "none yet" if newest is None else
            f"{newest['partition']}, {newest['rows']} rows in {newest['files']} file(s)"
            + (f" ({newest['unreadable']} unreadable)" if newest["unreadable"] else "")))
    stream = status["stream"]
    if stream is not None:
        out.append(f"streaming job: batch {stream['batch']} at {stream['time']} "
                   f"({_ago(stream['seconds_ago'])}): {stream['records']} records, "
                   f"{stream['rejects']} rejected line(s), lag "
                   f"{'-' if stream['lag'] is None else stream['lag']}")
    elif status["delivery"] == "records":
        out.append("streaming job: no batch in the last day")
    return "\n".join(out)


def main(argv=None) -> int:
    from .cli import _common, _load
    from .logs import setup_logging
    parser = argparse.ArgumentParser(prog="spot-ingest status", description=
        "Show whether the pipeline keeps up, what it ingested and what failed (README: "
        "Operating it). Reads the broker, the store and the ingest reports; no master or "
        "worker needs to run. Exit code 0, or 1 when the broker or the store did not answer "
        "(the rest is still shown).")
    _common(parser)
    parser.add_argument("--json", action="store_true",
                        help="one JSON object (schema: spot_ingest/status.py)")
    parser.add_argument("--broker-timeout", type=float, default=BROKER_TIMEOUT, metavar="S",
                        help=f"give up on the broker after S seconds (default {BROKER_TIMEOUT:g})")
    args = parser.parse_args(argv)
    if args.broker_timeout <= 0:
        parser.error("--broker-timeout must be more than 0")
    setup_logging(args.log_level or "WARNING", args.log_format)
    cfg = _load(args, check_paths=False)
    status = gather(cfg, cfg.pipeline(args.type), broker_timeout=args.broker_timeout)
    print(json.dumps(status, indent=2) if args.json else render(status))
    ok = status["broker"]["available"] and status["store"]["available"]
    return ExitCode.OK if ok else ExitCode.ERROR
