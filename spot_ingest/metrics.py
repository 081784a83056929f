"""Prometheus metrics of one process (master, worker or streaming job),
served over HTTP at ``/metrics`` on the port the ``metrics`` section (or
``--metrics-port``) gives it. Names follow Prometheus conventions: counters
end in ``_total``, times are ``_seconds``, sizes ``_bytes``. Every series
carries ``pipeline``; README "Operating it" lists them all.

Counters are driven by the ingest reports (``observe``): what a report says
happened is what the metrics count, in one place.
"""
from __future__ import annotations

import logging
import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("spot_ingest.metrics")

# Seconds per file (or batch): from a small file on a quiet host to a large
# capture on a busy one.
TIME_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class ProcessCollector:
    """CPU and memory of this process and its children (the conversion and
    staging pools, the tools they run), read with psutil at each scrape."""

    def __init__(self, pipeline: str, role: str):
        import psutil
        self.process = psutil.Process(os.getpid())
        self.labels = {"pipeline": pipeline, "role": role}
        self.gone_cpu = 0.0     # children that exited: counted once, kept
        self.seen: dict[int, tuple[float, float]] = {}

    def collect(self):
        import psutil
        cpu = sum(self.process.cpu_times()[:2])
        rss = self.process.memory_info().rss
        alive: dict[int, tuple[float, float]] = {}
        for child in self.process.children(recursive=True):
            try:
                times = child.cpu_times()
                alive[child.pid] = (child.create_time(), times.user + times.system)
                rss += child.memory_info().rss
            except psutil.Error:
                continue
        for pid, (created, used) in self.seen.items():
            if pid not in alive or alive[pid][0] != created:
                self.gone_cpu += used
        self.seen = alive
        cpu += self.gone_cpu + sum(used for _, used in alive.values())
        names, values = list(self.labels), list(self.labels.values())
        c = CounterMetricFamily("spot_ingest_process_cpu_seconds",
                                "CPU time of the process and its children (user + system)",
                                labels=names)
        c.add_metric(values, cpu)
        yield c
        g = GaugeMetricFamily("spot_ingest_process_memory_bytes",
                              "Resident memory of the process and its children", labels=names)
        g.add_metric(values, rss)
        yield g


class Metrics:
    """The metrics of one process; ``serve(address, port)`` starts the
    endpoint. Without a port, the same calls cost next to nothing."""

    def __init__(self, pipeline: str, role: str):
        self.pipeline, self.role = pipeline, role
        self.registry = CollectorRegistry(auto_describe=True)
        r, p = self.registry, ["pipeline"]
        self.files_seen = Counter("spot_ingest_files_seen", "Files found in the collector "
                                  "directory", p, registry=r)
        self.files_staged = Counter("spot_ingest_files_staged", "Files copied into the store "
                                    "(or published as messages)", p, registry=r)
        self.files_announced = Counter("spot_ingest_files_announced", "Staged pieces announced "
                                       "on the topic", p, registry=r)
        self.files_loaded = Counter("spot_ingest_files_loaded", "Files loaded into the table",
                                    p, registry=r)
        self.files_set_aside = Counter("spot_ingest_files_set_aside", "Files set aside: "
                                       "outcome rejected (master), quarantined or refused "
                                       "(worker)", p + ["outcome"], registry=r)
        self.records = Counter("spot_ingest_records_written", "Rows written into the table",
                               p + ["table"], registry=r)
        self.bytes_in = Counter("spot_ingest_input_bytes", "Bytes of input taken", p,
                                registry=r)
        self.bytes_out = Counter("spot_ingest_output_bytes", "Bytes of Parquet written",
                                 p + ["table"], registry=r)
        self.batches = Counter("spot_ingest_batches", "Streaming micro-batches written", p,
                               registry=r)
        self.rejected_lines = Counter("spot_ingest_rejected_lines", "Lines the streaming job "
                                      "set aside", p, registry=r)
        self.fetch_seconds = Histogram("spot_ingest_fetch_seconds", "Time to make a staged "
                                       "file readable on the worker", p, buckets=TIME_BUCKETS,
                                       registry=r)
        self.convert_seconds = Histogram("spot_ingest_convert_seconds", "Time converting one "
                                         "file (the tool and parsing)", p,
                                         buckets=TIME_BUCKETS, registry=r)
        self.write_seconds = Histogram("spot_ingest_write_seconds", "Time writing one file's "
                                       "(or batch's) Parquet", p, buckets=TIME_BUCKETS,
                                       registry=r)
        self.lag = Gauge("spot_ingest_partition_lag_records", "Records on the partition not "
                         "yet committed", p + ["partition"], registry=r)
        self.last_commit = Gauge("spot_ingest_last_commit_timestamp_seconds", "When the "
                                 "worker's offset was last committed (Unix time)",
                                 p + ["partition"], registry=r)
        self.broker_errors = Counter("spot_ingest_broker_errors", "Failed calls to the "
                                     "broker (each retried)", p, registry=r)
        self.store_errors = Counter("spot_ingest_store_errors", "Failed calls to the store "
                                    "(each retried)", p, registry=r)
        self.paused = Gauge("spot_ingest_paused", "1 while the resource guard holds new "
                            "files back", p, registry=r)
        self.registry.register(ProcessCollector(pipeline, role))

    def serve(self, address: str, port: int | None) -> int | None:
        """Start the endpoint (a daemon thread); the port, or None."""
        if port is None:
            return None
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        bound = server.server_address[1]
        log.info("metrics of %s %s at http://%s:%d/metrics", self.pipeline, self.role,
                 address, bound)
        return bound

    def observe(self, report: dict) -> None:
        """Count what one ingest report says happened."""
        p, outcome = self.pipeline, report.get("outcome")
        table = report.get("table") or ""
        if outcome in ("staged", "published"):
            self.files_staged.labels(p).inc()
            self.bytes_in.labels(p).inc(report.get("bytes_in") or 0)
        elif outcome in ("rejected", "quarantined", "refused"):
            self.files_set_aside.labels(p, outcome).inc()
        elif outcome in ("loaded", "batch"):
            if outcome == "loaded":
                self.files_loaded.labels(p).inc()
                self.fetch_seconds.labels(p).observe(report.get("fetch_seconds") or 0)
                self.convert_seconds.labels(p).observe(report.get("convert_seconds") or 0)
            else:
                self.batches.labels(p).inc()
                self.rejected_lines.labels(p).inc(report.get("rejects") or 0)
            self.write_seconds.labels(p).observe(report.get("write_seconds") or 0)
            self.records.labels(p, table).inc(report.get("records") or 0)
            self.bytes_out.labels(p, table).inc(report.get("bytes_out") or 0)
        if report.get("lag") is not None and report.get("partition") is not None:
            self.lag.labels(p, str(report["partition"])).set(report["lag"])

    def committed(self, partition: int) -> None:
        self.last_commit.labels(self.pipeline, str(partition)).set(time.time())
