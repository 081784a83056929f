"""docker/: what can be checked without a container engine (none runs on
these machines; docker/README.md says what was not run). The compose file
against the Compose Specification's JSON schema (docker/compose-spec.schema.json),
every spot-ingest command in it against the real argument parsers and the
cluster configuration, its health checks against the configured ports, its
mounts and variables against the repository and the code, and the
Dockerfile against what scripts/setup.sh installs for running."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from spot_ingest import cli, logs
from spot_ingest.config import load

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def cluster_config():
    return load(DOCKER / "ingest_conf.cluster.json")


def spot_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items()
            if s.get("image", "").startswith("spot-ingest")}


def test_the_compose_file_follows_the_compose_specification(compose):
    # The schema names draft 07 (without the "#" jsonschema looks for).
    validator = jsonschema.Draft7Validator(
        json.loads((DOCKER / "compose-spec.schema.json").read_text()))
    validator.validate(compose)
    broken = {**compose, "services": {"x": {"image": "a", "restart": 5}}}
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(broken)
    services = compose["services"]
    for needed in ("kafka", "namenode", "datanode", "metastore"):
        assert needed in services
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["namenode"]["image"].startswith("apache/hadoop:")
    assert services["metastore"]["image"].startswith("apache/hive:")
    assert services["metastore"]["environment"]["SERVICE_NAME"] == "metastore"
    assert all("healthcheck" in s and "restart" in s for s in services.values())


class Parsed(Exception):
    pass


def parse(argv: list[str], monkeypatch):
    """The real parser of a spot-ingest command; stops where it would start."""
    def stop(*args, **kwargs):
        raise Parsed()
    monkeypatch.setattr(cli, "setup_logging", stop)
    monkeypatch.setattr(logs, "setup_logging", stop)
    assert argv[0] == "spot-ingest"
    with pytest.raises(Parsed):
        cli.main(argv[1:])


def test_every_command_parses_and_names_a_configured_pipeline(compose, cluster_config,
                                                               monkeypatch):
    services = spot_services(compose)
    assert {"flow-master", "flow-worker-0", "flow-worker-1", "proxy-master",
            "proxy-stream"} <= set(services)
    roles = set()
    for name, service in services.items():
        command = service["command"]
        parse(command, monkeypatch)
        roles.add(command[1])
        pipeline = command[command.index("-t") + 1]
        cluster_config.pipeline(pipeline)        # raises for an unknown pipeline
        assert service["configs"] == [{"source": "ingest_conf",
                                       "target": service["environment"]["SPOT_INGEST_CONF"]}]
    assert roles == {"master", "worker", "stream"}
    with pytest.raises(SystemExit):       # the check can fail
        cli.main(["worker", "-t", "flow_internals", "--bogus"])
    # One configuration file, mounted in every spot-ingest service.
    assert compose["configs"]["ingest_conf"]["file"] == "./ingest_conf.cluster.json"
    assert cluster_config.metrics.address == "0.0.0.0", "metrics reachable from other containers"
    assert cluster_config.catalog.uris == ("thrift://metastore:9083",)
    assert cluster_config.hdfs is not None and "namenode:9870" in cluster_config.hdfs.url
    assert cluster_config.kafka.bootstrap == "kafka:9092"


def test_health_checks_probe_each_process_s_own_metrics_port(compose, cluster_config):
    for name, service in spot_services(compose).items():
        command = service["command"]
        role = command[1]
        worker = int(command[command.index("-i") + 1]) if role == "worker" else 0
        probed = int(service["healthcheck"]["test"][-1])
        assert probed == cluster_config.metrics.port(role, worker), name


def test_mounts_and_variables_exist(compose):
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    assert (DOCKER / compose["configs"]["ingest_conf"]["file"]).is_file()
    read = set(re.findall(r"os\.environ(?:\.get)?[\[(]\s*[\"']([A-Z_]+)", "\n".join(
        p.read_text() for p in (REPO / "spot_ingest").glob("*.py"))))
    read |= {"SPOT_INGEST_CONF"}  # config.ENV_CONF
    for service in spot_services(compose).values():
        assert set(service["environment"]) <= read


def setup_packages() -> set[str]:
    """The apt packages scripts/setup.sh installs for running (not the test
    or Kerberos extras), and Java."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    running = text.split("if (( with_kerberos ))")[0]
    found = set(re.findall(r"\|\| missing\+=\(([a-z0-9.+-]+)\)", running))
    found.discard("python3-venv")          # the image's Python has venv and pip
    return found | {"openjdk-17-jre-headless"}


def test_the_image_installs_what_setup_installs_for_running():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    apt = set(re.search(r"apt-get install -y --no-install-recommends ([^\\&\n]+)",
                        dockerfile).group(1).split())
    assert apt == setup_packages()
    assert "openjdk-17-jre-headless" in (REPO / "scripts" / "setup.sh").read_text()
    extras = re.search(r'^extras="([^"]+)"', (REPO / "scripts" / "setup.sh").read_text(),
                       re.M).group(1)
    assert f'pip install --no-cache-dir ".[{extras}]"' in dockerfile
    assert setup_packages() - {"nfdump"} != setup_packages(), "the parse found packages"
