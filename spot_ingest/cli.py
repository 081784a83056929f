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


def _load(args, check_paths: bool):
    try:
        cfg = load(args.config)
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
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.workers < 1:
        parser.error("-w/--workers must be at least 1")
    cfg = _load(args, check_paths=True)
    from . import master
    return master.run(cfg, args.type, args.workers, once=args.once, run_id=args.run_id)


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
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.id < 0:
        parser.error("-i/--id must be 0 or more")
    cfg = _load(args, check_paths=False)
    from . import worker
    return worker.run(cfg, args.type, args.id, topic=args.topic, run_id=args.run_id)


def stream_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="spot-stream", description=
        "Run the streaming job that loads a record pipeline's topic into its table.")
    _common(parser)
    parser.add_argument("--partitions", type=int, default=None,
                        help="topic partitions (default: as the topic has, created with 1 if missing)")
    parser.add_argument("--run-id", default=None,
                        help="stop after the master's end-of-run marker of this --once run")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
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
        return streaming.run(cfg, pcfg, partitions, args.run_id)
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
    setup_logging(args.log_level)
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


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"master": master_main, "worker": worker_main, "stream": stream_main,
                "standalone": standalone_main, "ddl": ddl_main,
                "catalog": catalog_main, "compact": compact_main}
    if not argv or argv[0] not in commands:
        print(f"usage: spot-ingest {{{','.join(commands)}}} ... (each takes --help)",
              file=sys.stderr)
        return ExitCode.OK if argv[:1] in (["-h"], ["--help"]) else ExitCode.CONFIG
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
