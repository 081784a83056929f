"""``spot-ingest status -t PIPELINE [--json]``: whether the ingest keeps up,
what it ingested and what failed, from the broker, the store and the ingest
reports only (no master or worker needs to be running).

The JSON form (``--json``), version 1::

    {"v": 1, "pipeline": str, "type": str, "table": str, "time": ISO-8601 UTC,
     "broker": {"available": bool, "error": str | null, "topic": str,
                "partitions": [{"partition": int, "committed": int | null,
                                "end": int, "lag": int | null,
                                "seconds_since_commit": float | null,
                                "committed_by": str | null,
                                "commit_time_from": "broker" | "reports" | null}]},
     "collector": {"path": str, "exists": bool, "waiting": int | null},
     "last_hour": ROLLUP, "last_day": ROLLUP,
     "newest_partition": {"partition": str, "rows": int, "files": int} | null,
     "stream": {"batch": int, "time": str, "records": int, "rejects": int,
                "rejected_messages": int, "lag": int | null} | null}

``ROLLUP`` is ``{"staged": int, "loaded": int, "set_aside": int,
"records": int, "failures": {outcome: int}, "reasons": [{"time", "outcome",
"file", "sha256", "reason"}]}`` (``staged`` counts files the master staged or
published, ``loaded`` files the workers loaded, ``set_aside`` files
rejected, quarantined or refused). ``committed`` is the worker group's
committed offset (null: never committed); ``seconds_since_commit`` comes from
the metadata the worker commits with each offset, or, from a broker that
does not keep commit metadata, from the worker's newest report on that
partition (``commit_time_from`` says which). Record pipelines (proxy)
keep their offsets in Spark's checkpoint: their partitions show ``end`` and
``stream`` their last batch. Exit code 0, or 1 when the broker did not
answer (everything else is still shown).
"""
from __future__ import annotations

import argparse
import json
import time

from . import pipeline as registry
from .config import IngestConfig, PipelineConfig
from .logs import printable
from .policy import ExitCode
from .reports import iso, read_reports, rollup
from .store import Store, open_store
from .warehouse import read_footer

BROKER_TIMEOUT_MS = 5000
VERSION = 1


def commit_metadata(worker_id: int, host: str) -> str:
    """What a worker commits with its offset: when, and who."""
    return json.dumps({"t": round(time.time(), 3), "worker": worker_id, "host": host},
                      separators=(",", ":"))


def broker_view(cfg: IngestConfig, pcfg: PipelineConfig) -> dict:
    """The topic's partitions: end offsets and the worker group's commits."""
    from kafka import KafkaConsumer, TopicPartition

    from .bus import group_id
    from .kafka_security import client_kwargs
    view = {"available": False, "error": None, "topic": pcfg.topic, "partitions": []}
    consumer = None
    try:
        consumer = KafkaConsumer(**client_kwargs(cfg.kafka), group_id=group_id(pcfg.name),
                                 enable_auto_commit=False, request_timeout_ms=BROKER_TIMEOUT_MS + 1000,
                                 client_id=f"spot-status-{pcfg.name}")
        found = consumer.partitions_for_topic(pcfg.topic)
        if found is None:
            view.update(available=True, error=f"topic {pcfg.topic} does not exist (yet)")
            return view
        tps = [TopicPartition(pcfg.topic, p) for p in sorted(found)]
        ends = consumer.end_offsets(tps, timeout_ms=BROKER_TIMEOUT_MS)
        now = time.time()
        for tp in tps:
            held = consumer.committed(tp, metadata=True, timeout_ms=BROKER_TIMEOUT_MS)
            committed = held.offset if held is not None and held.offset >= 0 else None
            since, who = None, None
            if held is not None and held.metadata:
                try:
                    meta = json.loads(held.metadata)
                    since = round(now - float(meta["t"]), 1)
                    who = f"worker {meta.get('worker')} on {meta.get('host')}"
                except (ValueError, KeyError, TypeError):
                    pass
            end = ends.get(tp, 0)
            view["partitions"].append({
                "partition": tp.partition, "committed": committed, "end": end,
                # Never committed: a worker starts from the beginning.
                "lag": max(0, end - (committed or 0)),
                "seconds_since_commit": since, "committed_by": who,
                "commit_time_from": "broker" if since is not None else None})
        view["available"] = True
    except Exception as exc:   # noqa: BLE001  (any client failure: shown, not fatal)
        view["error"] = f"the broker at {cfg.kafka.bootstrap} did not answer ({type(exc).__name__}: {exc})"
    finally:
        if consumer is not None:
            consumer.close(autocommit=False)
    return view


def waiting_files(pcfg: PipelineConfig) -> dict:
    """Files in the collector directory that the master would take."""
    from .watcher import is_candidate_name
    root = pcfg.collector_path
    if not root.is_dir():
        return {"path": str(root), "exists": False, "waiting": None}
    working = registry.load(pcfg.type).working_names
    count = sum(1 for path in root.rglob("*")
                if path.is_file() and not path.is_symlink()
                and is_candidate_name(path.name, pcfg.supported_files, working))
    return {"path": str(root), "exists": True, "waiting": count}


def window(reports: list[dict]) -> dict:
    rolled = rollup(reports)
    return {"staged": rolled["files_received"], "loaded": rolled["files_loaded"],
            "set_aside": sum(rolled["failures"].values()), "records": rolled["records"],
            "failures": rolled["failures"], "reasons": rolled["set_aside"][-20:]}


def newest_partition(store: Store, table: str) -> dict | None:
    area = f"{table}/hive"
    by_partition: dict[str, list[str]] = {}
    for name in store.list(area, ".parquet"):
        by_partition.setdefault(name.rpartition("/")[0], []).append(name)
    if not by_partition:
        return None

    def key(partition: str) -> tuple:
        return tuple(int(v) if v.isdigit() else v
                     for v in (part.partition("=")[2] for part in partition.split("/")))
    newest = max(by_partition, key=key)
    rows = sum(read_footer(store, area, name).num_rows for name in by_partition[newest])
    return {"partition": newest, "rows": rows, "files": len(by_partition[newest])}


def gather(cfg: IngestConfig, pcfg: PipelineConfig, now: float | None = None,
           broker: dict | None = None) -> dict:
    """Everything ``status`` shows (the JSON form); ``broker`` may be given
    (tests), else it is asked."""
    now = time.time() if now is None else now
    plugin = registry.load(pcfg.type)
    store = open_store(cfg.store)
    found = read_reports(store, plugin.table, now - 86400, now + 1).reports
    mine = [r for r in found if r.get("pipeline") == pcfg.name]
    batches = [r for r in mine if r.get("outcome") == "batch"]
    last = batches[-1] if batches else None
    broker = broker if broker is not None else broker_view(cfg, pcfg)
    # Brokers that do not keep commit metadata: a worker commits right after
    # it reports a file, so its newest report on the partition tells when.
    newest_report = {}
    for r in mine:
        if r.get("role") == "worker" and r.get("partition") is not None:
            newest_report[r["partition"]] = r["ts"]
    for p in broker["partitions"]:
        if p["seconds_since_commit"] is None and p["partition"] in newest_report \
                and p["committed"] is not None:
            p["seconds_since_commit"] = round(now - newest_report[p["partition"]], 1)
            p["commit_time_from"] = "reports"
    return {
        "v": VERSION, "pipeline": pcfg.name, "type": pcfg.type, "table": plugin.table,
        "time": iso(now),
        "broker": broker,
        "collector": waiting_files(pcfg),
        "last_hour": window([r for r in mine if r["ts"] >= now - 3600]),
        "last_day": window(mine),
        "newest_partition": newest_partition(store, plugin.table),
        "stream": None if last is None else {
            "batch": last.get("batch"), "time": last.get("time"), "records": last.get("records"),
            "rejects": last.get("rejects"), "rejected_messages": last.get("rejected_messages"),
            "lag": last.get("lag")},
    }


def render(status: dict) -> str:
    """The human-readable form."""
    out = [f"{status['pipeline']} ({status['type']}, table {status['table']}) at {status['time']}"]
    broker = status["broker"]
    if broker["error"]:
        out.append(f"broker: {broker['error']}")
    if broker["partitions"]:
        out.append(f"topic {broker['topic']}:")
        out.append("  partition  committed        end        lag  last commit")
        for p in broker["partitions"]:
            committed = "-" if p["committed"] is None else str(p["committed"])
            lag = "-" if p["lag"] is None else str(p["lag"])
            since = "never" if p["seconds_since_commit"] is None else \
                f"{p['seconds_since_commit']:.0f} s ago" + (f" ({p['committed_by']})"
                                                             if p["committed_by"] else "")
            out.append(f"  {p['partition']:>9}  {committed:>9}  {p['end']:>9}  {lag:>9}  {since}")
    collector = status["collector"]
    out.append(f"collector {collector['path']}: " + (
        f"{collector['waiting']} file(s) waiting" if collector["exists"]
        else "not on this host"))
    for name, label in (("last_hour", "last hour"), ("last_day", "last day")):
        w = status[name]
        failures = ", ".join(f"{n} {k}" for k, n in sorted(w["failures"].items()))
        out.append(f"{label}: {w['staged']} staged, {w['loaded']} loaded, {w['set_aside']} set "
                   f"aside{f' ({failures})' if failures else ''}, {w['records']} records")
    for r in status["last_day"]["reasons"][-5:]:
        out.append(f"  {r['time']} {r['outcome']} {printable(str(r['file']))}: "
                   f"{printable(str(r['reason']))[:300]}")
    newest = status["newest_partition"]
    out.append("newest partition: " + ("none yet" if newest is None else
                                       f"{newest['partition']}, {newest['rows']} rows in "
                                       f"{newest['files']} file(s)"))
    stream = status["stream"]
    if stream is not None:
        out.append(f"streaming job: batch {stream['batch']} at {stream['time']}: {stream['records']} "
                   f"records, {stream['rejects']} rejected line(s), lag "
                   f"{'-' if stream['lag'] is None else stream['lag']}")
    return "\n".join(out)


def main(argv=None) -> int:
    from .cli import _common, _load
    from .logs import setup_logging
    parser = argparse.ArgumentParser(prog="spot-ingest status", description=
        "Show whether the pipeline keeps up, what it ingested and what failed (README: "
        "Operating it). Reads the broker, the store and the ingest reports.")
    _common(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object (schema: README)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level or "WARNING", args.log_format)
    cfg = _load(args, check_paths=False)
    status = gather(cfg, cfg.pipeline(args.type))
    print(json.dumps(status, indent=2) if args.json else render(status))
    return ExitCode.OK if status["broker"]["available"] else ExitCode.ERROR
