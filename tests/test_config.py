"""ingest_conf.json: the original format loads; each mistake gets one clear message."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spot_ingest.config import ConfigError, load

REPO = Path(__file__).resolve().parent.parent


def original_file(tmp_path: Path) -> dict:
    """A configuration as written for Apache Spot's ingest (its README's example)."""
    collector = tmp_path / "flow_collector"
    collector.mkdir(exist_ok=True)
    return {
        "dbname": "spotdb",
        "hdfs_app_path": str(tmp_path / "spot"),
        "collector_processes": 5,
        "ingestion_interval": 1,
        "spark-streaming": {"driver_memory": "", "spark_exec": "", "spark_executor_memory": "",
                            "spark_executor_cores": "", "spark_batch_size": ""},
        "kafka": {"kafka_server": "kafka.example", "kafka_port": "9092",
                  "zookeper_server": "zk.example", "zookeper_port": "2181",
                  "message_size": 900000},
        "pipelines": {
            "flow_internals": {"type": "flow", "collector_path": str(collector),
                               "local_staging": "/tmp/", "process_opt": ""},
            "dns_server_1": {
                "type": "dns", "collector_path": "/path_to_dns_collector",
                "local_staging": "/tmp/", "pkt_num": "650000", "pcap_split_staging": "/tmp",
                "process_opt": "-E separator=, -E header=y -E occurrence=f -T fields -e frame.time "
                               "-e frame.time_epoch -e frame.len -e ip.src -e ip.dst -e dns.resp.name "
                               "-e dns.resp.type -e dns.resp.class -e dns.flags.rcode -e dns.a "
                               "'dns.flags.response == 1'"},
        },
    }


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "ingest_conf.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_original_file_loads(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = load(write(tmp_path, original_file(tmp_path)))
    assert cfg.kafka.bootstrap == "kafka.example:9092"
    assert cfg.collector_processes == 5
    flow = cfg.pipeline("flow_internals")
    assert flow.type == "flow" and flow.supported_files == ("nfcapd.*",)
    assert flow.topic == "SPOT-INGEST-flow_internals"
    assert "zookeper_server is ignored" in caplog.text


def test_repository_default_config_loads():
    cfg = load(REPO / "ingest_conf.json")
    assert cfg.kafka.embedded_broker
    assert cfg.pipeline("flow_internals").collector_path.is_relative_to(REPO)


def expect_error(tmp_path, data, *fragments):
    with pytest.raises(ConfigError) as info:
        cfg = load(write(tmp_path, data))
        cfg.pipeline("flow_internals")
        cfg.check_collector_path("flow_internals")
    message = str(info.value)
    assert str(tmp_path / "ingest_conf.json") in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_unknown_pipeline_lists_known_ones(tmp_path):
    cfg = load(write(tmp_path, original_file(tmp_path)))
    with pytest.raises(ConfigError, match=r"unknown pipeline 'flow_x'.*dns_server_1, flow_internals"):
        cfg.pipeline("flow_x")


def test_missing_key(tmp_path):
    data = original_file(tmp_path)
    del data["kafka"]["kafka_server"]
    expect_error(tmp_path, data, "kafka.kafka_server", "missing key")


def test_missing_pipeline_key(tmp_path):
    data = original_file(tmp_path)
    del data["pipelines"]["flow_internals"]["collector_path"]
    expect_error(tmp_path, data, "pipelines.flow_internals.collector_path", "missing key")


def test_wrong_type(tmp_path):
    data = original_file(tmp_path)
    data["collector_processes"] = "five"
    expect_error(tmp_path, data, "collector_processes", "expected a positive whole number", '"five"')


def test_unknown_pipeline_type(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["type"] = "netflow"
    expect_error(tmp_path, data, "pipelines.flow_internals.type", "unknown pipeline type 'netflow'",
                 "known types: dns, flow")


def test_collector_path_that_does_not_exist(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["collector_path"] = str(tmp_path / "nope")
    expect_error(tmp_path, data, "pipelines.flow_internals.collector_path", "does not exist",
                 str(tmp_path / "nope"))


def test_store_scheme_not_supported_yet(tmp_path):
    data = original_file(tmp_path)
    data["hdfs_app_path"] = "hdfs://namenode:8020/user/spot"
    expect_error(tmp_path, data, "hdfs_app_path", "only local paths")


def test_invalid_json(tmp_path):
    expect_error(tmp_path, '{"dbname": "x",\n  "kafka": }', "not valid JSON", "line 2")


def test_process_opt_that_breaks_parsing(tmp_path):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["process_opt"] = "-o csv"
    expect_error(tmp_path, data, "pipelines.flow_internals.process_opt", "-o", "remove it")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="configuration file not found"):
        load(tmp_path / "absent.json")


@pytest.mark.parametrize("program", ["master_collector.py", "worker.py"])
def test_command_line_reports_the_error_and_exits_2(tmp_path, program):
    data = original_file(tmp_path)
    data["pipelines"]["flow_internals"]["collector_path"] = str(tmp_path / "missing-dir")
    conf = write(tmp_path, data)
    args = ["-w", "2"] if program.startswith("master") else ["-i", "0"]
    result = subprocess.run([sys.executable, str(REPO / program), "-t", "flow_x", "-c", str(conf),
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown pipeline 'flow_x'" in result.stderr
    assert "Traceback" not in result.stderr
