"""Run a whole pipeline on one machine: broker (if embedded), master, workers.

    start_standalone_ingest.sh PIPELINE WORKERS [--once] [--demo] [-c FILE]

Each process logs to its own file in the configured ``log_dir``. Ctrl-C or
SIGTERM stops everything cleanly (workers finish the file they are on). A
child that dies is reported with its exit code and log file, and restarted.
With ``--once``: ingest what is in the collector directory, wait until the
workers have loaded all of it, print where the rows landed, and exit 0
(non-zero if any file failed). ``--demo`` runs in a sandbox of its own
(``<local_staging>/demo/<pipeline>/``: collector, store, tables, logs, a fresh
topic), emptied at each start, into which it first writes a sample capture
made with the real tools; it never touches the configured directories.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import pipeline as registry
from .broker import BrokerError, EmbeddedBroker, is_listening
from .bus import BusError, ensure_topic
from .config import (ENV_HOST_WORKERS, ConfigError, IngestConfig, StoreLocation,
                     default_config_path, load)
from .policy import ExitCode
from .logs import setup_logging
from .store import open_store

log = logging.getLogger("spot_ingest.standalone")

RESTART_LIMIT = 5
DEMO_MARKER = ".spot-ingest-demo"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the launcher dies, however it
    dies, so that no master or worker is left running on its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    role: str
    args: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    exit_code: int | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "spot_ingest.cli", *self.args],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)


def _signal_children(children, sig) -> None:
    for child in children:
        if child.proc and child.proc.poll() is None:
            try:
                child.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _stop_children(children, timeout: float = 60) -> None:
    _signal_children(children, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", child.role, timeout)
            child.proc.kill()
            child.proc.wait()


def table_summary(cfg: IngestConfig, table: str) -> tuple[str, dict[str, int]]:
    """Where a table's files are and its rows per partition, read from the
    Parquet footers (through the store: local disk or HDFS alike)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    store = open_store(cfg.store)
    area = f"{table}/hive"
    rows: dict[str, int] = {}
    for name in store.list(area, ".parquet"):
        part = name.rpartition("/")[0]
        footer = pq.ParquetFile(pa.BufferReader(store.read(area, name))).metadata
        rows[part] = rows.get(part, 0) + footer.num_rows
    where = StoreLocation(f"{cfg.hdfs_app_path}/{area}", cfg.hdfs)
    return str(where), rows


def metrics_ports(cfg: IngestConfig, roles: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """A port for each process's metrics: the metrics section's where it
    names one, else a port free now on the metrics address."""
    import socket
    ports = {}
    for role, index in roles:
        port = cfg.metrics.port(role, index)
        if port is None:
            with socket.socket() as s:
                s.bind((cfg.metrics.address, 0))
                port = s.getsockname()[1]
        ports[(role, index)] = port
    return ports


def demo_sandbox(cfg: IngestConfig, pipeline: str) -> Path:
    """Write the configuration of a demo sandbox for ``pipeline`` and return
    its path: the same settings, but every directory inside
    ``<local_staging>/demo/<pipeline>/`` (emptied first) and a topic of its
    own, so that a demo always starts clean and prints the same rows."""
    pcfg = cfg.pipeline(pipeline)
    root = pcfg.local_staging / "demo" / pipeline
    if root.exists():
        if not (root / DEMO_MARKER).exists():
            raise ConfigError(f"{root} exists but was not made by a demo; remove it or "
                              f"change pipelines.{pipeline}.local_staging")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / DEMO_MARKER).write_text("made by start_standalone_ingest.sh --demo; emptied at "
                                    "each demo\n")
    raw = json.loads(json.dumps(cfg.raw))
    section = dict(raw["pipelines"][pipeline])
    section.update(collector_path=str(root / "collector"), local_staging=str(root / "staging"),
                   topic=f"SPOT-INGEST-{pipeline}-demo-{uuid.uuid4().hex[:8]}")
    for key in registry.load(section["type"]).directory_keys:
        if section.get(key):
            section[key] = str(root / "staging" / key)
    raw.update(hdfs_app_path=str(root / "warehouse"), log_dir=str(root / "logs"),
               pipelines={pipeline: section})
    raw.pop("hdfs", None)   # a demo's store is its own local folder
    (root / "collector").mkdir()
    path = root / "ingest_conf.json"
    path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="start_standalone_ingest.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", help="the name of a pipeline in ingest_conf.json")
    parser.add_argument("workers", type=int, help="number of workers")
    parser.add_argument("-c", "--config", default=None,
                        help=f"configuration file (default: $SPOT_INGEST_CONF or {default_config_path()})")
    parser.add_argument("--once", action="store_true",
                        help="ingest what the collector directory holds now, wait for it to load, exit")
    parser.add_argument("--demo", action="store_true",
                        help="first write a sample capture (made with the real tools) into the "
                             "collector directory; implies --once")
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if args.workers < 1:
        parser.error("WORKERS must be at least 1")
    once = args.once or args.demo

    try:
        cfg = load(args.config)
        os.umask(cfg.umask)
        pcfg = cfg.pipeline(args.pipeline)
        plugin = registry.load(pcfg.type)
        plugin.check_tools()
        if args.demo:
            cfg = load(demo_sandbox(cfg, pcfg.name))
            pcfg = cfg.pipeline(pcfg.name)
            log.info("demo: sandbox %s; making a sample capture with the real tools",
                     cfg.path.parent)
            for path in plugin.make_sample(pcfg.collector_path):
                log.info("demo: wrote %s (%d bytes)", path, path.stat().st_size)
        cfg.check_collector_path(pcfg.name)
    except (ConfigError, registry.ToolMissingError) as exc:
        log.error("%s", exc)
        return ExitCode.CONFIG
    except (OSError, RuntimeError) as exc:   # the sample's tools failed
        log.error("demo: could not make the sample capture: %s", exc)
        return ExitCode.CONFIG

    conf = ["-c", str(cfg.path)]
    level = ["--log-level", args.log_level] if args.log_level else []
    broker = None
    children: list[Child] = []
    stop = {"requested": False}

    def on_signal(signum, frame):
        if stop["requested"]:
            return
        stop["requested"] = True
        log.info("stopping (signal %d): asking master and workers to finish", signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    try:
        # The embedded broker takes the first (or only) bootstrap address.
        host, port = cfg.kafka.brokers[0]
        if cfg.kafka.embedded_broker and not is_listening(host, port):
            broker = EmbeddedBroker(host, port, log_file=cfg.log_dir / "broker.log")
            cfg.log_dir.mkdir(parents=True, exist_ok=True)
            broker.start()
        # A TLS or SASL refusal ends the run here, with its reason, instead of
        # master and workers retrying it for ever.
        ensure_topic(cfg.kafka, pcfg.topic, args.workers, security_fatal=True)
        run_id = uuid.uuid4().hex if once else None
        extra = ["--run-id", run_id] if run_id else []
        streaming = isinstance(plugin, registry.RecordPipeline)
        if not streaming:   # the host's cores shared among its workers (config.py)
            os.environ[ENV_HOST_WORKERS] = str(args.workers)
        roles = [("master", 0)] + ([("stream", 0)] if streaming else
                                   [("worker", i) for i in range(args.workers)])
        ports = metrics_ports(cfg, roles)

        def metrics(role: str, index: int = 0) -> list[str]:
            return ["--metrics-port", str(ports[(role, index)])]
        if streaming:
            # One streaming job reads every partition; WORKERS sets how many.
            children.append(Child("streaming job", ["stream", "-t", pcfg.name, "--partitions",
                                                    str(args.workers), *conf, *extra, *level,
                                                    *metrics("stream")],
                                  cfg.log_dir / f"{pcfg.name}-stream.log"))
        else:
            for i in range(args.workers):
                children.append(Child(f"worker {i}", ["worker", "-t", pcfg.name, "-i", str(i),
                                                      *conf, *extra, *level, *metrics("worker", i)],
                                      cfg.log_dir / f"{pcfg.name}-worker-{i}.log"))
        master = Child("master", ["master", "-t", pcfg.name, "-w", str(args.workers), *conf,
                                  *(["--once"] if once else []), *extra, *level,
                                  *metrics("master")],
                       cfg.log_dir / f"{pcfg.name}-master.log")
        children.append(master)
        tracker = RunProgress(cfg, pcfg.name, plugin.table) if once else None
        for child in children:
            child.start()
        log.info("started master and %s for %s; logs in %s", ", ".join(c.role for c in children[:-1]),
                 pcfg.name, cfg.log_dir)
        log.info("metrics: %s", ", ".join(
            f"{'streaming job' if role == 'stream' else role}{f' {i}' if role == 'worker' else ''} "
            f"http://{cfg.metrics.address}:{port}/metrics" for (role, i), port in ports.items()))
        failed = _supervise(children, once, stop, tracker)
    except (BrokerError, BusError) as exc:
        log.error("%s", exc)
        failed = True
    finally:
        _stop_children(children)
        if broker:
            broker.stop()

    if once:
        hive, rows = table_summary(cfg, plugin.table)
        total = sum(rows.values())
        print(f"\n{plugin.table} table: {total} rows in {len(rows)} partition(s) under {hive}")
        for part, n in rows.items():
            print(f"  {part}: {n} rows")
        codes = ", ".join(f"{c.role}: {c.exit_code}" for c in children)
        print(f"exit codes: {codes}; logs in {cfg.log_dir}")
        if args.demo and total and cfg.hdfs is None:
            print(f"query it, e.g.: .venv/bin/python -c \"import duckdb; duckdb.sql(\\\"SELECT count(*) "
                  f"FROM read_parquet('{hive}/**/*.parquet', hive_partitioning=true)\\\").show()\"")
    return ExitCode.ERROR if failed else ExitCode.OK


class RunProgress:
    """Files and records of a ``--once`` run done so far, on a terminal: read
    from the ingest reports the run's processes write (about once a second).
    The benchmarks use it too, beside the processes they start."""

    def __init__(self, cfg: IngestConfig, pipeline: str, table: str, total: int | None = None):
        from .progress import on_terminal, progress
        from .status import waiting_files
        self.cfg, self.pipeline, self.table = cfg, pipeline, table
        self.started = time.time()
        if total is None:
            total = waiting_files(cfg.pipeline(pipeline))["waiting"]
        self.bar = progress(total, "file", f"{pipeline}")
        self.enabled = on_terminal()
        self.read_at = 0.0
        self.files = 0

    def poll(self) -> None:
        if not self.enabled or time.monotonic() - self.read_at < 1.0:
            return
        self.read_at = time.monotonic()
        from .reports import read_reports
        try:
            found = read_reports(open_store(self.cfg.store), self.table, self.started).reports
        except Exception:   # noqa: BLE001  (progress only: the run goes on)
            return
        mine = [r for r in found if r.get("pipeline") == self.pipeline]
        files = sum(1 for r in mine if r.get("outcome") in ("loaded", "quarantined", "refused",
                                                            "rejected", "published"))
        records = sum(int(r.get("records") or 0) for r in mine
                      if r.get("outcome") in ("loaded", "batch"))
        self.bar.update(files - self.files)
        self.files = files
        rate = records / max(1e-6, time.time() - self.started)
        self.bar.set_postfix_str(f"{records:,} records, {rate:,.0f}/s")

    def close(self) -> None:
        self.read_at = 0.0
        self.poll()
        self.bar.close()


def _supervise(children: list[Child], once: bool, stop: dict,
               tracker: RunProgress | None = None) -> bool:
    """Wait for the run to end; return True if anything failed."""
    failed = False
    while not stop["requested"]:
        if tracker is not None:
            tracker.poll()
        running = 0
        for child in children:
            code = child.proc.poll()
            if code is None:
                running += 1
            elif child.exit_code is None:
                failed |= _child_exited(child, code, once, stop)
                running += child.proc.poll() is None  # restarted
        if once and running == 0:
            break
        time.sleep(0.2)
    if tracker is not None:
        tracker.close()
    return failed


def _child_exited(child: Child, code: int, once: bool, stop: dict) -> bool:
    """Handle one child's exit; return True if it counts as a failure."""
    if once:
        child.exit_code = code
        if code == ExitCode.OK:
            return False
        if code == ExitCode.INPUT_SET_ASIDE:
            log.error("%s: some files failed and were set aside; see %s", child.role, child.log_path)
            return True
        log.error("%s exited with code %s; stopping the run; see %s", child.role, code,
                  child.log_path)
        stop["requested"] = True
        return True
    if code == ExitCode.CONFIG or child.restarts >= RESTART_LIMIT:
        child.exit_code = code
        log.error("%s exited with code %s; not restarting it; see %s", child.role, code,
                  child.log_path)
        return True
    child.restarts += 1
    log.error("%s died (exit code %s); restarting it (%d/%d); see %s", child.role, code,
              child.restarts, RESTART_LIMIT, child.log_path)
    child.start()
    return False
