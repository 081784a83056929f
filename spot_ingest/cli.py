"""Command lines: ``spot-ingest SUBCOMMAND`` (master, worker, stream,
standalone, ddl), with the aliases ``spot-master``, ``spot-worker``, ``spot-stream``
and ``spot-standalone`` (also ``master_collector.py``, ``worker.py`` and
``start_standalone_ingest.sh`` at the top of the repository, with the
original's options)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, default_config_path, load
from .policy import ExitCode
from .logs import setup_logging

log = logging.getLogger("spot_ingest")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--type", required=True, metavar="PIPELINE",
                        help="the name of a pipeline in ingest_conf.json")
    parser.add_argument("-c", "--config", default=None, metavar="FILE",
                        help=f"configuration file (default: $SPOT_INGEST_CONF or {default_config_path()})")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    parser.add_argument("--log-format", choices=("text", "json"), default=None,
                        help="text (default) or json: one JSON object per line (also the "
                             "configuration's log_format)")


def _metrics_port(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics on this port (default: the metrics "
                             "section; 0: any free port)")


def _load(args, check_paths: bool):
    try:
        cfg = load(args.config)
        if getattr(args, "log_format", None) is None and cfg.log_format != "text":
            setup_logging(args.log_level, cfg.log_format)
        os.umask(cfg.umask)    # file_mode and dir_mode for all this process creates
        cfg.pipeline(args.type)
        if check_paths:
            cfg.check_collector_path(args.type)
        return cfg
    except ConfigError as exc:
        log.error("%s", exc)
        sys.exit(ExitCode.CONFIG)


def master_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="master_collector.py", description=
        "Watch the pipeline's collector directory, stage finished files and announce them.")
    _common(parser)
    parser.add_argument("-w", "--workers", type=int, required=True,
                        help="number of workers (= topic partitions)")
    parser.add_argument("--once", action="store_true",
                        help="ingest what is in the collector directory now, then exit")
    parser.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    _metrics_port(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.workers < 1:
        parser.error("-w/--workers must be at least 1")
    cfg = _load(args, check_paths=True)
    from . import master
    return master.run(cfg, args.type, args.workers, once=args.once, run_id=args.run_id,
                      metrics_port=args.metrics_port)


def worker_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="worker.py", description=
        "Load the files announced on one partition of the pipeline's topic into the warehouse.")
    _common(parser)
    parser.add_argument("-i", "--id", type=int, required=True,
                        help="worker id, from 0; the worker reads partition ID")
    parser.add_argument("--topic", default=None,
                        help="topic to read (default: the pipeline's topic, SPOT-INGEST-<pipeline>)")
    parser.add_argument("--run-id", default=None,
                        help="exit after the master's end-of-run marker of this --once run")
    _metrics_port(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.id < 0:
        parser.error("-i/--id must be 0 or more")
    cfg = _load(args, check_paths=False)
    from . import worker
    return worker.run(cfg, args.type, args.id, topic=args.topic, run_id=args.run_id,
                      metrics_port=args.metrics_port)


def stream_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spot-stream", description=
        "Run the streaming job that loads a record pipeline's topic into its table.")
    _common(parser)
    parser.add_argument("--partitions", type=int, default=None,
                        help="topic partitions (default: as the topic has, created with 1 if missing)")
    parser.add_argument("--run-id", default=None,
                        help="stop after the master's end-of-run marker of this --once run")
    _metrics_port(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    cfg = _load(args, check_paths=False)
    from . import pipeline as registry
    from .bus import BusError, ensure_topic
    pcfg = cfg.pipeline(args.type)
    try:
        partitions = ensure_topic(cfg.kafka, pcfg.topic, args.partitions or 1)
    except BusError as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
    from . import streaming
    try:
        return streaming.run(cfg, pcfg, partitions, args.run_id, args.metrics_port)
    except registry.ToolMissingError as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG


def standalone_main(argv=None) -> int:
    from .standalone import main
    return main(argv)


def ddl_main(argv=None) -> int:
    from .catalog import ENGINES, CatalogError, ddl_statements
    parser = argparse.ArgumentParser(prog="spot-ingest ddl", description=
        "Print the CREATE DATABASE and CREATE EXTERNAL TABLE statements of the tables the "
        "configured pipelines fill, then the statement that finds their partitions.")
    parser.add_argument("-c", "--config", default=None, metavar="FILE",
                        help=f"configuration file (default: $SPOT_INGEST_CONF or {default_config_path()})")
    parser.add_argument("--engine", choices=ENGINES, default="hive",
                        help="SQL dialect (default: hive)")
    parser.add_argument("--table", default=None, help="only this table (flow, dns, proxy ...)")
    args = parser.parse_args(argv)
    setup_logging(None)
    try:
        statements = ddl_statements(load(args.config), args.engine, args.table)
    except (ConfigError, CatalogError) as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    print(";\n\n".join(statements) + ";")
    return ExitCode.OK


def catalog_main(argv=None) -> int:
    from . import pipeline as registry
    from .catalog import CatalogError, table_specs
    from .metastore import CatalogUnavailable, open_catalog, sync
    from .store import StoreError
    parser = argparse.ArgumentParser(prog="spot-ingest catalog", description=
        "sync: create the pipeline's table in the configured catalog if missing and register "
        "every partition the store holds that the catalog lacks (after an outage, or for data "
        "written before the catalog was configured).")
    parser.add_argument("action", choices=("sync",))
    _common(parser)
    args = parser.parse_args(argv)
    setup_logging(None)
    try:
        cfg = load(args.config)
        pcfg = cfg.pipeline(args.type)
        if not cfg.catalog.enabled:
            raise ConfigError(f"{cfg.path}: no catalog section (or type \"none\"): nothing to "
                              f"register in; see README, Query the tables")
        spec = table_specs(cfg)[registry.load(pcfg.type).table]
        catalog = open_catalog(cfg.catalog)
    except (ConfigError, CatalogError) as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    try:
        added, before = sync(cfg, spec, catalog)
    except (CatalogUnavailable, CatalogError, StoreError) as exc:
        log.error("catalog sync of %s.%s: %s", cfg.dbname, spec.name, exc)
        return ExitCode.ERROR
    finally:
        catalog.close()
    print(f"{cfg.dbname}.{spec.name}: registered {added} partition(s); {before} were "
          f"registered already ({cfg.catalog.describe()})")
    return ExitCode.OK


def compact_main(argv=None) -> int:
    from .compaction import (CODECS, DEFAULT_TARGET_SIZE, CompactionLocked, compact,
                             parse_duration, parse_size)
    from .store import StoreError
    parser = argparse.ArgumentParser(prog="spot-ingest compact", description=
        "Rewrite the closed hours of the pipeline's table into few large files (README: "
        "Query the tables). Readers never see rows missing or doubled.")
    _common(parser)
    parser.add_argument("--older-than", default="2h", metavar="AGE",
                        help="a partition is closed when no file changed for this long "
                             "(2h, 30m, 1d; default 2h)")
    parser.add_argument("--target-size", default="256MB", metavar="SIZE",
                        help="size of the merged files (default 256MB)")
    parser.add_argument("--codec", choices=CODECS, default="zstd",
                        help="compression of the merged files (default zstd)")
    parser.add_argument("--no-sort", action="store_true",
                        help="keep the rows in their order instead of sorting them on the "
                             "table's sort columns (flow: sip, dns: dns_qry_name, proxy: host)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        older_than, target = parse_duration(args.older_than), parse_size(args.target_size)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = _load(args, check_paths=False)
    try:
        summary = compact(cfg, args.type, older_than or 0.0, target or DEFAULT_TARGET_SIZE,
                          args.codec, not args.no_sort)
    except CompactionLocked as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
    except (StoreError, OSError) as exc:
        log.error("compaction of %s stopped: %s (run it again; nothing is lost)", args.type, exc)
        return ExitCode.ERROR
    print(f"{args.type}: compacted {summary.partitions} partition(s): {summary.files_in} files "
          f"({summary.bytes_in} bytes) -> {summary.files_out} files ({summary.bytes_out} bytes), "
          f"{summary.rows} rows; {summary.skipped_open} partition(s) not closed yet"
          + (f"; settled {summary.settled} stopped compaction(s)" if summary.settled else "")
          + (f"; dropped {summary.duplicates} file(s) whose rows a merged file held"
             if summary.duplicates else "")
          + (f"; {len(summary.failed)} partition(s) failed" if summary.failed else ""))
    return ExitCode.ERROR if summary.failed else ExitCode.OK


def report_main(argv=None) -> int:
    import json
    import time

    from .logs import printable
    from .reports import read_reports, rollup
    from .store import StoreError, open_store
    from .units import parse_duration
    from . import pipeline as registry
    parser = argparse.ArgumentParser(prog="spot-ingest report", description=
        "Roll up the ingest reports of the pipeline's table over a time range: files, "
        "records, bytes, mean and p95 time per file, failures (README: Operating it).")
    _common(parser)
    parser.add_argument("--since", default="24h", metavar="AGE",
                        help="how far back (24h, 30m, 7d; default 24h)")
    parser.add_argument("--json", action="store_true", help="one JSON object (schema in README)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        since = parse_duration(args.since)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = _load(args, check_paths=False)
    pcfg = cfg.pipeline(args.type)
    table = registry.load(pcfg.type).table
    now = time.time()
    try:
        found = read_reports(open_store(cfg.store), table, now - since, now + 1)
    except (StoreError, OSError) as exc:
        log.error("cannot read the reports of %s: %s", table, exc)
        return ExitCode.ERROR
    mine = [r for r in found.reports if r.get("pipeline") == pcfg.name]
    summary = {"pipeline": pcfg.name, "table": table, "since": now - since, "until": now,
               **rollup(mine), "broken_lines": found.broken_lines}
    if args.json:
        print(json.dumps(summary, indent=2))
        return ExitCode.OK
    mean, p95 = summary["seconds_mean"], summary["seconds_p95"]
    print(f"{pcfg.name} ({table}), last {args.since}: {summary['files_received']} file(s) "
          f"received, {summary['files_loaded']} loaded"
          + (f", {summary['batches']} micro-batch(es)" if summary["batches"] else "")
          + f"; {summary['records']} records; {summary['bytes_in']} bytes in, "
            f"{summary['bytes_out']} bytes of Parquet out")
    if mean is not None:
        print(f"time per file: mean {mean:.2f} s, p95 {p95:.2f} s")
    failures = summary["failures"]
    print("set aside: " + (", ".join(f"{n} {k}" for k, n in sorted(failures.items()))
                           if failures else "none"))
    for item in summary["set_aside"][-20:]:
        print(f"  {item['time']} {item['outcome']} {printable(str(item['file']))}: "
              f"{printable(str(item['reason']))[:300]}")
    if found.broken_lines:
        print(f"({found.broken_lines} report line(s) could not be read: cut by a crash?)")
    return ExitCode.OK


def reassign_main(argv=None) -> int:
    from .reassign import main
    return main(argv)


def status_main(argv=None) -> int:
    from .status import main
    return main(argv)


def summary_main(argv=None) -> int:
    from .summary import main
    return main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"master": master_main, "worker": worker_main, "stream": stream_main,
                "standalone": standalone_main, "ddl": ddl_main,
                "catalog": catalog_main, "compact": compact_main, "status": status_main,
                "report": report_main, "summary": summary_main, "reassign": reassign_main}
    if not argv or argv[0] not in commands:
        print(f"usage: spot-ingest {{{','.join(commands)}}} ... (each takes --help)",
              file=sys.stderr)
        return ExitCode.OK if argv[:1] in (["-h"], ["--help"]) else ExitCode.CONFIG
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
