"""Operability's parts, in-process: the configuration sections, ingest
reports (written through a local store and the WebHDFS stand-in, read back,
rolled up), metrics from reports in Prometheus's text format, JSON logs, and
the resource guard's decisions."""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from spot_ingest.config import ConfigError, ResourceGuardConfig, load
from spot_ingest.guard import ResourceGuard
from spot_ingest.logs import JsonFormatter, about
from spot_ingest.metrics import Metrics
from spot_ingest.reports import ReportWriter, read_reports, rollup
from spot_ingest.store import LocalStore, StoreError


def write_config(tmp_path: Path, **top) -> Path:
    data = {"dbname": "spot", "hdfs_app_path": str(tmp_path / "w"),
            "kafka": {"kafka_server": "127.0.0.1", "kafka_port": "9092"},
            "pipelines": {"f": {"type": "flow", "collector_path": str(tmp_path)}}, **top}
    path = tmp_path / "ingest_conf.json"
    path.write_text(json.dumps(data))
    return path


def test_sections_have_defaults_and_checked_values(tmp_path):
    cfg = load(write_config(tmp_path))
    assert cfg.metrics.port("master") is None and cfg.log_format == "text"
    assert cfg.resource_guard == ResourceGuardConfig()
    cfg = load(write_config(tmp_path, metrics={"worker_port": 9310, "master_port": "9300"},
                            resource_guard={"min_free_disk": "1GB", "min_free_memory": 0},
                            log_format="json"))
    assert (cfg.metrics.port("worker", 3), cfg.metrics.port("master")) == (9313, 9300)
    assert cfg.resource_guard.min_free_disk == 1 << 30 and cfg.resource_guard.min_free_memory == 0
    assert cfg.log_format == "json"
    for top, message in (({"metrics": {"worker_port": 70000}}, "metrics.worker_port: 70000 is not a port"),
                         ({"metrics": {"port": 1}}, "metrics.port: unknown key"),
                         ({"resource_guard": {"min_free_disk": "lots"}}, "resource_guard.min_free_disk: 'lots'"),
                         ({"log_format": "xml"}, "log_format: 'xml' is not one of text, json")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            load(write_config(tmp_path, **top))


def _reports(store, **common):
    writer = ReportWriter(store, "flow", "f", "flow", "worker", 0)
    writer.write(outcome="loaded", file="a", sha256="1" * 64, records=10, bytes_out=100,
                 seconds=1.0, partitions={"y=2026/m=11/d=22/h=16": 10})
    writer.write(outcome="loaded", file="b", records=5, bytes_out=50, seconds=3.0)
    writer.write(outcome="quarantined", file="c", reason="nfdump could not read it")
    master = ReportWriter(store, "flow", "f", "flow", "master")
    master.write(outcome="staged", file="a", bytes_in=7)
    master.write(outcome="rejected", file="d", reason="empty file")
    return writer, master


@pytest.fixture
def hdfs_store(tmp_path):
    from spot_ingest.config import HdfsConfig, StoreLocation
    from spot_ingest.hdfs_store import HdfsStore
    from tests.webhdfs import WebHdfsStandIn
    with WebHdfsStandIn(tmp_path / "hdfs") as server:
        cfg = HdfsConfig(urls=(server.url,), user="spot", timeout=10,
                         scratch_dir=tmp_path / "scratch")
        yield HdfsStore(StoreLocation("/user/spot", cfg)), tmp_path / "hdfs" / "user" / "spot"


@pytest.mark.parametrize("kind", ["local", "hdfs"])
def test_reports_are_written_read_and_rolled_up(tmp_path, kind, request):
    if kind == "local":
        store, root = LocalStore(str(tmp_path / "w")), tmp_path / "w"
    else:   # WebHDFS APPEND, through the stand-in (no HDFS can run here)
        store, root = request.getfixturevalue("hdfs_store")
    _reports(store)
    files = list((root / "flow" / "_reports").rglob("*.jsonl"))
    assert len(files) == 2 and all(f.parent.name.startswith("d=") for f in files)
    found = read_reports(store, "flow", 0)
    assert len(found.reports) == 5 and found.broken_lines == 0
    summary = rollup(found.reports)
    assert (summary["files_received"], summary["files_loaded"], summary["records"]) == (1, 2, 15)
    assert summary["bytes_out"] == 150 and summary["bytes_in"] == 7
    assert summary["seconds_mean"] == 2.0 and summary["seconds_p95"] == 3.0
    assert summary["failures"] == {"quarantined": 1, "rejected": 1}
    assert {r["reason"] for r in summary["set_aside"]} == {"nfdump could not read it", "empty file"}


def test_a_cut_line_is_skipped_and_a_refusing_store_holds_reports_in_memory(tmp_path):
    store = LocalStore(str(tmp_path / "w"))
    writer, _ = _reports(store)
    path = next(p for p in (tmp_path / "w").rglob("master-*.jsonl"))
    with open(path, "ab") as f:
        f.write(b'{"v":1,"ts":')             # its writer crashed in the middle of a line
    found = read_reports(store, "flow", 0)
    assert found.broken_lines == 1 and len(found.reports) == 5

    class Refusing:
        def append(self, area, relative, data):     # a part of the line, then an error
            store.append(area, relative, data[:5])
            raise StoreError("the store is away")
    writer.store = Refusing()
    writer.write(outcome="loaded", file="e", records=1)
    assert not writer.flush() and len(writer.waiting) == 1
    writer.store = store
    writer.write(outcome="loaded", file="f", records=1)
    assert not writer.waiting
    names = [r["file"] for r in read_reports(store, "flow", 0).reports if r["role"] == "worker"]
    assert names[-2:] == ["e", "f"]
    with pytest.raises(TypeError, match="unknown report field"):
        writer.write(outcome="loaded", colour="blue")


def test_metrics_count_what_reports_say(tmp_path):
    metrics = Metrics("f", "worker")
    store = LocalStore(str(tmp_path / "w"))
    _reports(store)
    for report in read_reports(store, "flow", 0).reports:
        metrics.observe(report)
    metrics.observe({"outcome": "batch", "table": "proxy", "records": 7, "rejects": 2,
                     "write_seconds": 0.5, "partition": None, "lag": 3})
    text = generate_latest(metrics.registry).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("spot_ingest_files_loaded_total", (("pipeline", "f"),))] == 2
    assert samples[("spot_ingest_records_written_total", (("pipeline", "f"), ("table", "flow")))] == 15
    assert samples[("spot_ingest_records_written_total", (("pipeline", "f"), ("table", "proxy")))] == 7
    assert samples[("spot_ingest_files_set_aside_total",
                    (("outcome", "quarantined"), ("pipeline", "f")))] == 1
    assert samples[("spot_ingest_rejected_lines_total", (("pipeline", "f"),))] == 2
    assert samples[("spot_ingest_convert_seconds_count", (("pipeline", "f"),))] == 2
    assert samples[("spot_ingest_process_memory_bytes", (("pipeline", "f"), ("role", "worker")))] > 0
    assert all(name.startswith("spot_ingest_") for name, _ in samples)


def test_json_log_lines_carry_the_file_and_its_checksum():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("spot_ingest.test_json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("loaded %s: %d rows", "nfcapd.1\nforged", 3,
                       extra=about("nfcapd.1\nforged", "ab" * 32))
        logger.info("no file here")
    finally:
        logger.removeHandler(handler)
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["file"] == "nfcapd.1\\nforged" and first["sha256"] == "ab" * 32
    assert first["level"] == "WARNING" and first["message"] == "loaded nfcapd.1\nforged: 3 rows"
    assert "file" not in second and second["time"].endswith("Z")


def test_the_guard_holds_work_back_below_a_threshold_and_lets_it_go(tmp_path, caplog):
    changes = []
    guard = ResourceGuard(ResourceGuardConfig(min_free_memory=0, min_free_disk=1 << 60,
                                              check_seconds=0), [tmp_path / "not" / "made"],
                          "worker 0", on_change=changes.append)
    with caplog.at_level(logging.INFO, "spot_ingest.guard"):
        reason = guard.short()
        assert reason and "free space on" in reason and "min_free_disk" in reason
        assert guard.short() == reason
        guard.cfg = ResourceGuardConfig(min_free_memory=0, min_free_disk=1, check_seconds=0)
        assert guard.short() is None
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "takes no new file" in m]) == 1
    assert len([m for m in messages if "takes new files again" in m]) == 1
    assert changes == [True, False]
    memory = ResourceGuard(ResourceGuardConfig(min_free_memory=1 << 60, min_free_disk=0,
                                               check_seconds=0), [])
    assert "available memory" in memory.short()
