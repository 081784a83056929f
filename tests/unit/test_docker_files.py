"""docker/: what can be checked without a container engine (none runs on
these machines, so the image was never built and the cluster never started;
docker/README.md says so).

* The compose files validate against the Compose Specification's JSON schema
  (docker/compose-spec.schema.json, a copy from compose-spec/compose-spec).
* Every spot-ingest command in them is accepted by the real argument parsers,
  names a pipeline of docker/ingest_conf.cluster.json (loaded with
  spot_ingest.config.load) of the kind its role needs, and the workers of a
  pipeline are exactly the partitions its master announces to.
* Every health check probes the port the configuration gives the process
  (metrics ports) or the service's documented port; the probes themselves
  are run here against a real metrics endpoint and a real socket.
* Every bind mount exists in the repository, every named volume is declared
  and used, no two spot-ingest processes share local state, and every
  environment variable set for spot-ingest is one its code reads.
* docker/Dockerfile installs what scripts/setup.sh installs for running,
  with the exceptions listed here, and nothing for the tests.

Each check is a function that raises AssertionError; test_each_check_can_fail
breaks the real files in one place per check and sees it fail.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import re
import shlex
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from spot_ingest import cli, logs
from spot_ingest import pipeline as registry
from spot_ingest.config import ConfigError, IngestConfig, load

DOCKER = Path(__file__).resolve().parents[2] / "docker"
REPO = DOCKER.parent
OVERRIDE = "compose.workers-3.yaml"

# Ports the images document for what their health checks probe; the
# configuration must reach the services on the same ports.
DOCUMENTED_PORTS = {
    "namenode": 9870,      # Hadoop 3's dfs.namenode.http-address (WebHDFS)
    "datanode": 9864,      # Hadoop 3's dfs.datanode.http.address (WebHDFS redirects)
    "metastore": 9083,     # the apache/hive image's METASTORE_PORT, hive.metastore.port
    "hiveserver2": 10000,  # hive.server2.thrift.port
}

# Environment the other images read (their documentation), so that a typo
# is not silently ignored by them either.
HADOOP_ENV = re.compile(r"^(CORE|HDFS)-SITE\.XML_[A-Za-z0-9.\-]+$|^ENSURE_NAMENODE_(DIR|CLUSTERID)$")
KAFKA_ENV = re.compile(r"^KAFKA_[A-Z0-9_]+$|^CLUSTER_ID$")
HIVE_ENV = {"SERVICE_NAME", "SERVICE_OPTS", "IS_RESUME", "HIVE_CUSTOM_CONF_DIR", "DB_DRIVER",
            "VERBOSE", "SCHEMA_COMMAND"}

# What scripts/setup.sh may install for running that the image leaves out, and why.
NOT_IN_IMAGE = {
    "python3-venv": "setup.sh needs it to make .venv/; the image's Python "
                    "(python:3.11-slim-bookworm) has venv and pip, and installs into itself",
    "python$pyver-venv": "the same, for Python versions whose venv is a package of its own",
    "Java 17+": "not a package: setup.sh's label for Java in its message, replaced by the "
                "JRE package before apt-get runs",
    "default-jre-headless": "setup.sh's fallback where openjdk-17-jre-headless does not "
                            "exist; Debian 12 (the image) has it",
}


# -- reading the files --------------------------------------------------------

def read_compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def merge(base: dict, override: dict) -> dict:
    """``docker compose -f base -f override``, for what the override uses:
    a service's keys replace the base's (command, healthcheck ...), new
    services and volumes are added."""
    merged = copy.deepcopy(base)
    for name, service in override.get("services", {}).items():
        merged["services"].setdefault(name, {}).update(copy.deepcopy(service))
    for section in ("volumes", "configs"):
        if override.get(section):
            merged.setdefault(section, {}).update(copy.deepcopy(override[section]))
    return merged


@pytest.fixture(scope="module")
def compose() -> dict:
    return read_compose()


@pytest.fixture(scope="module")
def scaled(compose) -> dict:
    return merge(compose, read_compose(OVERRIDE))


@pytest.fixture(scope="module")
def cfg() -> IngestConfig:
    return load(DOCKER / "ingest_conf.cluster.json")


@pytest.fixture(scope="module")
def schema() -> jsonschema.Draft7Validator:
    # The schema names draft 07 (as "https://json-schema.org/draft-07/schema",
    # without the "#" jsonschema recognises it by).
    return jsonschema.Draft7Validator(json.loads((DOCKER / "compose-spec.schema.json").read_text()))


def spot_services(doc: dict) -> dict[str, dict]:
    return {n: s for n, s in doc["services"].items()
            if str(s.get("image", "")).startswith("spot-ingest")}


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def option(command: list[str], flag: str) -> str | None:
    return command[command.index(flag) + 1] if flag in command else None


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each short-syntax volume entry."""
    found = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"long-syntax volume {entry!r}: extend this test"
        source, target = entry.split(":")[:2]
        found.append((source, target))
    return found


# -- the checks ---------------------------------------------------------------

def check_schema(doc: dict, schema: jsonschema.Draft7Validator) -> None:
    errors = sorted(schema.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    # Compose interpolates $VAR in every value; none is meant here.
    for text in strings(doc):
        assert "$" not in text.replace("$$", ""), f"{text!r} would be interpolated by Compose"


def check_cluster_services(doc: dict) -> None:
    services = doc["services"]
    for needed in ("kafka", "namenode", "datanode", "metastore"):
        assert needed in services, f"no {needed} service"
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft, combined"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert all(services[n]["image"].startswith("apache/hadoop:") for n in ("namenode", "datanode"))
    assert services["namenode"]["command"] == ["hdfs", "namenode"]
    assert services["datanode"]["command"] == ["hdfs", "datanode"]
    assert services["namenode"]["environment"]["HDFS-SITE.XML_dfs.webhdfs.enabled"] == "true", \
        "spot-ingest reaches HDFS over WebHDFS"
    assert services["metastore"]["image"].startswith("apache/hive:")
    assert services["metastore"]["environment"]["SERVICE_NAME"] == "metastore", \
        "the image's standalone metastore mode"
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            image = service.get("image", "")
            if image.startswith("apache/hadoop:"):
                assert HADOOP_ENV.match(key), f"{name}: {key} is not an apache/hadoop setting"
            elif image.startswith("apache/kafka:"):
                assert KAFKA_ENV.match(key), f"{name}: {key} is not an apache/kafka setting"
            elif image.startswith("apache/hive:"):
                assert key in HIVE_ENV, f"{name}: {key} is not an apache/hive setting"


def check_health_and_restart(doc: dict) -> None:
    services = doc["services"]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        assert service.get("restart") in ("unless-stopped", "on-failure"), \
            f"{name}: restart is {service.get('restart')!r}"
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services, f"{name} depends on unknown {needed}"
            assert how == {"condition": "service_healthy"}, f"{name} -> {needed}: {how}"
            assert "healthcheck" in services[needed], f"{needed} has no health check"


class Parsed(Exception):
    """Raised where a command would start: its options parsed."""


def parse(argv: list[str]) -> None:
    """Run spot-ingest's real command line up to where it would start."""
    assert isinstance(argv, list) and argv[0] == "spot-ingest", \
        f"{argv!r}: exec form, spot-ingest SUBCOMMAND ..."

    def stop(*args, **kwargs):
        raise Parsed()
    with mock.patch.object(cli, "setup_logging", stop), \
            mock.patch.object(logs, "setup_logging", stop):
        try:
            cli.main(argv[1:])
        except Parsed:
            return
        except SystemExit as exc:     # argparse refused it
            raise AssertionError(f"{argv}: the parser refused it (exit {exc.code})") from None
    raise AssertionError(f"{argv}: did not reach the start")


def check_commands(doc: dict, cfg: IngestConfig) -> None:
    services = spot_services(doc)
    roles = set()
    for name, service in services.items():
        command = service["command"]
        parse(command)
        role, pipeline = command[1], option(command, "-t")
        assert role in ("master", "worker", "stream"), f"{name}: {role}"
        roles.add(role)
        try:
            pcfg = cfg.pipeline(pipeline)
        except ConfigError as exc:
            raise AssertionError(f"{name}: {exc}") from None
        kind = registry.load(pcfg.type)
        if role == "worker":
            assert isinstance(kind, registry.FilePipeline), f"{name}: {pipeline} has no workers"
        if role == "stream":
            assert isinstance(kind, registry.RecordPipeline), f"{name}: {pipeline} has no stream"
    assert roles == {"master", "worker", "stream"}, roles


def check_topology(doc: dict, cfg: IngestConfig) -> None:
    """A pipeline's workers are exactly the partitions its master announces
    to (-i 0 ... -w - 1, each once); a record pipeline has one stream job."""
    masters, workers, streams = {}, {}, {}
    for name, service in spot_services(doc).items():
        command = service["command"]
        pipeline = option(command, "-t")
        if command[1] == "master":
            assert pipeline not in masters, f"two masters of {pipeline}"
            masters[pipeline] = int(option(command, "-w"))
        elif command[1] == "worker":
            workers.setdefault(pipeline, []).append(int(option(command, "-i")))
        else:
            streams.setdefault(pipeline, []).append(option(command, "--partitions"))
    for pipeline, ids in workers.items():
        assert pipeline in masters, f"workers of {pipeline}, but no master"
        assert sorted(ids) == list(range(masters[pipeline])), \
            f"{pipeline}: master -w {masters[pipeline]}, workers -i {sorted(ids)}"
    for pipeline, partitions in streams.items():
        assert len(partitions) == 1, f"{pipeline}: {len(partitions)} streaming jobs"
        if partitions[0] is not None and pipeline in masters:
            assert int(partitions[0]) == masters[pipeline], f"{pipeline}: --partitions"
    for pipeline in masters:
        kind = registry.load(cfg.pipeline(pipeline).type)
        readers = workers if isinstance(kind, registry.FilePipeline) else streams
        assert pipeline in readers, f"nothing reads what the {pipeline} master announces"


PROBE_PREFIX = ["CMD", "python", "-c"]


def check_metrics_health(doc: dict, cfg: IngestConfig) -> None:
    assert cfg.metrics.address == "0.0.0.0", "metrics must be reachable from other containers"
    for name, service in spot_services(doc).items():
        command, test = service["command"], service["healthcheck"]["test"]
        assert test[:3] == PROBE_PREFIX and len(test) == 5, f"{name}: {test}"
        url = urlparse(test[4])
        role = command[1]
        worker = int(option(command, "-i")) if role == "worker" else 0
        given = option(command, "--metrics-port")
        expected = int(given) if given else cfg.metrics.port(role, worker)
        assert expected is not None, f"{name}: the configuration gives {role} no metrics port"
        assert url.hostname in ("127.0.0.1", "localhost") and url.path == "/metrics", test[4]
        assert url.port == expected, f"{name}: probes {url.port}, listens on {expected}"


def probe_port(test: list[str]) -> tuple[str, int]:
    """(host, port) a non-spot-ingest health check connects to."""
    text = " ".join(test[1:])
    found = (re.search(r"/dev/tcp/([\w.\-]+)/(\d+)", text)
             or re.search(r"https?://([\w.\-]+):(\d+)/", text)
             or re.search(r"--bootstrap-server\s+([\w.\-]+):(\d+)", text))
    assert found, f"no port in {test}"
    return found.group(1), int(found.group(2))


def check_documented_ports(doc: dict, cfg: IngestConfig) -> None:
    services = doc["services"]
    # Kafka: the probe, the containers' listener and the configuration agree.
    kafka = services["kafka"]
    host, port = probe_port(kafka["healthcheck"]["test"])
    listeners = dict(re.findall(r"(\w+)://[\w.\-]*:(\d+)", kafka["environment"]["KAFKA_LISTENERS"]))
    advertised = dict(re.findall(r"(\w+)://([\w.\-]+:\d+)",
                                 kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]))
    assert host in ("localhost", "127.0.0.1") and port == int(listeners["PLAINTEXT"]), \
        f"kafka: probes {host}:{port}, listens on {listeners}"
    assert cfg.kafka.bootstrap == advertised["PLAINTEXT"] == f"kafka:{port}", \
        f"spot-ingest connects to {cfg.kafka.bootstrap}, the broker says {advertised}"
    # HDFS: WebHDFS of the configuration is the namenode's probed port.
    webhdfs = urlparse(cfg.hdfs.urls[0])
    host, port = probe_port(services["namenode"]["healthcheck"]["test"])
    assert port == webhdfs.port == DOCUMENTED_PORTS["namenode"] and webhdfs.hostname == "namenode", \
        f"namenode: probes {port}, hdfs.url is {cfg.hdfs.urls[0]}"
    host, port = probe_port(services["datanode"]["healthcheck"]["test"])
    assert (host, port) == ("namenode", DOCUMENTED_PORTS["namenode"]), f"datanode: {host}:{port}"
    assert f"{DOCUMENTED_PORTS['datanode']}:{DOCUMENTED_PORTS['datanode']}" in \
        services["datanode"]["ports"], "WebHDFS redirects clients to the datanode's 9864"
    # The metastore: the catalog's URI is the probed port.
    uri = urlparse(cfg.catalog.uris[0])
    host, port = probe_port(services["metastore"]["healthcheck"]["test"])
    assert port == uri.port == DOCUMENTED_PORTS["metastore"] and uri.hostname == "metastore", \
        f"metastore: probes {port}, catalog.uri is {cfg.catalog.uris[0]}"
    if "hiveserver2" in services:
        assert probe_port(services["hiveserver2"]["healthcheck"]["test"])[1] == \
            DOCUMENTED_PORTS["hiveserver2"], "hiveserver2: not its thrift port"
    # The Hive containers' file system is the namenode's.
    site = ET.parse(DOCKER / "hive-conf" / "core-site.xml").getroot()
    default_fs = {p.findtext("name"): p.findtext("value") for p in site.iter("property")}
    namenode_env = services["namenode"]["environment"]
    assert default_fs["fs.defaultFS"] == namenode_env["CORE-SITE.XML_fs.defaultFS"] \
        == f"hdfs://{namenode_env['HDFS-SITE.XML_dfs.namenode.rpc-address']}", \
        f"hive-conf/core-site.xml: fs.defaultFS {default_fs.get('fs.defaultFS')}"


def check_mounts(doc: dict) -> None:
    declared = set(doc.get("volumes") or {})
    used = set()
    for name, service in doc["services"].items():
        for source, target in mounts(service):
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert declared == used, f"declared but unused: {declared - used}"
    # One configuration file, mounted the same way in every spot-ingest service.
    assert list(doc["configs"]) == ["ingest_conf"]
    assert (DOCKER / doc["configs"]["ingest_conf"]["file"]).resolve() == \
        DOCKER / "ingest_conf.cluster.json"
    for name, service in spot_services(doc).items():
        target = service["environment"]["SPOT_INGEST_CONF"]
        assert service["configs"] == [{"source": "ingest_conf", "target": target}], \
            f"{name}: the configuration is not at {target} (SPOT_INGEST_CONF)"
        assert all(t != target for _, t in mounts(service)), f"{name}: the config twice"


def inside(path: Path, targets: list[str]) -> str | None:
    return next((t for t in targets if path.is_relative_to(t)), None)


def check_state(doc: dict, cfg: IngestConfig) -> None:
    """What each process writes locally is on a volume of its own (a worker
    clears scratch files of processes it cannot see, so none is shared);
    a master's collector folder is on the volume the collectors write to."""
    owner: dict[str, str] = {}
    for name, service in spot_services(doc).items():
        command = service["command"]
        pcfg = cfg.pipeline(option(command, "-t"))
        volumes = dict((t, s) for s, t in mounts(service))
        for path in (pcfg.local_staging, cfg.hdfs.scratch_dir):
            target = inside(path, list(volumes))
            assert target, f"{name}: {path} is not on a volume"
            source = volumes[target]
            assert owner.setdefault(source, name) == name, \
                f"{name} and {owner[source]} share {source} ({path})"
        target = inside(pcfg.collector_path, list(volumes))
        if command[1] == "master":
            assert target and volumes[target] == "collector", \
                f"{name}: {pcfg.collector_path} is not on the collector volume"
        else:
            assert target is None, f"{name} mounts the collector folder it does not read"


def env_read_by_code() -> set[str]:
    """Every environment variable name spot-ingest's code reads (os.environ,
    os.getenv), literal or through a module-level constant."""
    files = {p.resolve() for root in ("spot_ingest", "pipelines")
             for p in (REPO / root).rglob("*.py")}
    trees = [ast.parse(p.read_text()) for p in sorted(files)]
    constants = {}
    for tree in trees:
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                constants[node.targets[0].id] = node.value.value

    def name_of(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        if isinstance(node, ast.Attribute):
            return constants.get(node.attr)
        return None

    def is_environ(node) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    found = set()
    for tree in trees:
        for node in ast.walk(tree):
            key = None
            if isinstance(node, ast.Subscript) and is_environ(node.value) \
                    and isinstance(node.ctx, ast.Load):
                key = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                if node.func.attr in ("get", "setdefault", "pop") and is_environ(node.func.value):
                    key = node.args[0]
                elif node.func.attr == "getenv":
                    key = node.args[0]
            elif isinstance(node, ast.Compare) and len(node.ops) == 1 \
                    and isinstance(node.ops[0], (ast.In, ast.NotIn)) \
                    and is_environ(node.comparators[0]):
                key = node.left
            name = name_of(key) if key is not None else None
            if name:
                found.add(name)
    return found


def check_environment(doc: dict, read: set[str]) -> None:
    for name, service in spot_services(doc).items():
        unknown = set(service.get("environment", {})) - read
        assert not unknown, f"{name}: spot-ingest reads no {sorted(unknown)}"


# -- the Dockerfile and scripts/setup.sh --------------------------------------

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def image_apt_packages(text: str) -> set[str]:
    runs = [a for i, a in dockerfile_instructions(text) if i == "RUN" and "apt-get install" in a]
    assert len(runs) == 1, "one apt-get install"
    words = shlex.split(runs[0].split("apt-get install", 1)[1].split("&&")[0])
    return {w for w in words if not w.startswith("-")}


def image_extras(text: str) -> set[str]:
    found = re.findall(r'pip install [^"\n]*"\.\[([a-z,]+)\]"', text)
    assert len(found) == 1, "one pip install of the package with extras"
    return set(found[0].split(","))


def setup_sh() -> tuple[set[str], set[str], set[str]]:
    """setup.sh's apt packages for running, its packages for Kerberos and the
    tests, and its pip extras for running."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    optional = re.compile(r"^if \(\( with_(?:kerberos|tests) \)\); then\n.*?^fi\n", re.S | re.M)
    blocks = optional.findall(text)
    assert len(blocks) == 2, "the --kerberos and --test blocks of setup.sh"

    def packages(part: str) -> set[str]:
        return {w for m in re.findall(r"missing\+=\(([^)]*)\)", part) for w in shlex.split(m)}
    extras = re.search(r'^extras="([a-z,]+)"$', text, re.M).group(1)
    return packages(optional.sub("", text)), packages("".join(blocks)), set(extras.split(","))


def check_dockerfile(text: str) -> None:
    instructions = dockerfile_instructions(text)
    base = [a for i, a in instructions if i == "FROM"]
    assert len(base) == 1 and "bookworm" in base[0], f"Debian 12 (bookworm): {base}"
    running, optional, extras = setup_sh()
    assert {"nfdump", "tshark", "openjdk-17-jre-headless"} <= running, "setup.sh parsed"
    assert {"softflowd", "krb5-user"} <= optional, "setup.sh parsed"
    apt = image_apt_packages(text)
    assert not apt & optional, f"test or Kerberos packages in the image: {apt & optional}"
    assert apt == running - set(NOT_IN_IMAGE), \
        f"image {sorted(apt)} vs setup.sh {sorted(running - set(NOT_IN_IMAGE))}"
    assert image_extras(text) == extras, f"pip extras {image_extras(text)} vs setup.sh {extras}"
    # tshark's install question answered, as setup.sh does (editcap comes with it).
    assert "wireshark-common/install-setuid boolean false" in text
    # Every COPY source is in the repository and in the build context.
    ignored = [ln.strip() for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    assert {".venv", ".git"} <= set(ignored)
    for instruction, args in instructions:
        if instruction == "COPY":
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert source.rstrip("/") not in ignored, f"COPY {source}: ignored"


def check_image_folders(text: str, cfg: IngestConfig) -> None:
    """The folders the cluster's processes write exist in the image, owned by
    its user, so that a new named volume takes them over."""
    made = {Path(p) for i, a in dockerfile_instructions(text) if i == "RUN"
            for m in re.findall(r"mkdir -p ([^&]+)", a) for p in m.split() if p.startswith("/")}
    owned = {Path(p) for i, a in dockerfile_instructions(text) if i == "RUN"
             for m in re.findall(r"chown -R spot ([^&]+)", a) for p in m.split()}
    user = [a for i, a in dockerfile_instructions(text) if i == "USER"]
    assert user == ["spot"], user
    for pcfg in cfg.pipelines.values():
        assert pcfg.collector_path in made, f"{pcfg.collector_path} is not made in the image"
        for path in (pcfg.collector_path, pcfg.local_staging, cfg.hdfs.scratch_dir):
            assert inside(path, [str(p) for p in owned]), f"{path} is not the user's"


# -- tests --------------------------------------------------------------------

def test_the_compose_files_follow_the_compose_specification(compose, scaled, schema):
    check_schema(compose, schema)
    check_schema(read_compose(OVERRIDE), schema)
    check_schema(scaled, schema)
    check_cluster_services(compose)
    check_health_and_restart(compose)
    check_health_and_restart(scaled)


def test_every_command_parses_and_names_a_configured_pipeline(compose, scaled, cfg):
    assert {"flow-master", "flow-worker-0", "flow-worker-1", "proxy-master",
            "proxy-stream"} <= set(spot_services(compose))
    check_commands(compose, cfg)
    check_topology(compose, cfg)
    assert "flow-worker-2" in spot_services(scaled)
    check_commands(scaled, cfg)
    check_topology(scaled, cfg)
    assert cfg.catalog.type == "hive-metastore" and cfg.hdfs.user == "spot"


def test_health_checks_probe_the_configured_and_documented_ports(compose, scaled, cfg):
    check_metrics_health(compose, cfg)
    check_metrics_health(scaled, cfg)
    check_documented_ports(compose, cfg)


def test_mounts_state_and_environment(compose, scaled, cfg):
    read = env_read_by_code()
    assert {"SPOT_INGEST_CONF", "SPOT_INGEST_HOST_WORKERS", "SPOT_INGEST_LOG_LEVEL"} <= read, \
        "the code's environment variables were found"
    for doc in (compose, scaled):
        check_mounts(doc)
        check_state(doc, cfg)
        check_environment(doc, read)


def test_the_image_installs_what_setup_installs_for_running(compose, cfg):
    text = (DOCKER / "Dockerfile").read_text()
    check_dockerfile(text)
    check_image_folders(text, cfg)
    for service in spot_services(compose).values():
        build = service["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


def run_probe(test: list[str]) -> int:
    """Run a health check's command here (python is this interpreter)."""
    argv = [sys.executable if w == "python" else w for w in test[1:]]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_health_probes_tell_a_live_endpoint_from_a_dead_one(compose):
    """The spot-ingest probe against a real metrics endpoint (spot-ingest's
    own, as a worker serves it) and against a closed port; the metastore's
    TCP probe against a listening and a closed socket."""
    from spot_ingest.metrics import Metrics
    port = Metrics("flow_internals", "worker").serve("127.0.0.1", 0)
    test = compose["services"]["flow-worker-1"]["healthcheck"]["test"]
    assert run_probe([*test[:4], f"http://127.0.0.1:{port}/metrics"]) == 0
    assert run_probe([*test[:4], f"http://127.0.0.1:{free_port()}/metrics"]) != 0

    tcp = compose["services"]["metastore"]["healthcheck"]["test"]
    assert any("/dev/tcp/127.0.0.1/9083" in w for w in tcp), tcp
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        live = listening.getsockname()[1]
        assert run_probe([w.replace("/9083", f"/{live}") for w in tcp]) == 0
    assert run_probe([w.replace("/9083", f"/{free_port()}") for w in tcp]) != 0


def _set_command(doc, service, command):
    doc["services"][service]["command"] = command


def _set_probe(doc, service, url):
    doc["services"][service]["healthcheck"]["test"][-1] = url


BREAKAGES = {
    # name: (what is changed, the check that must then fail)
    "schema: restart as a number": (
        lambda d: d["services"]["kafka"].update(restart=5), "schema"),
    "schema: a $VARIABLE": (
        lambda d: d["services"]["kafka"]["environment"].update(KAFKA_NODE_ID="$ID"), "schema"),
    "kafka without the controller role": (
        lambda d: d["services"]["kafka"]["environment"].update(KAFKA_PROCESS_ROLES="broker"),
        "services"),
    "a misspelt Hadoop setting": (
        lambda d: d["services"]["namenode"]["environment"].update({"HDFS_SITE_dfs.x": "1"}),
        "services"),
    "the metastore in another mode": (
        lambda d: d["services"]["metastore"]["environment"].update(SERVICE_NAME="hiveserver2"),
        "services"),
    "WebHDFS off": (
        lambda d: d["services"]["namenode"]["environment"].update(
            {"HDFS-SITE.XML_dfs.webhdfs.enabled": "false"}), "services"),
    "a variable the Kafka image does not read": (
        lambda d: d["services"]["kafka"]["environment"].update(KAFKA_log_dirs="/x"), "services"),
    "a variable the Hive image does not read": (
        lambda d: d["services"]["metastore"]["environment"].update(HIVE_SERVICE="metastore"),
        "services"),
    "a dependency on an unknown service": (
        lambda d: d["services"]["proxy-stream"].update(
            depends_on={"zookeeper": {"condition": "service_healthy"}}), "health"),
    "a service without a health check": (
        lambda d: d["services"]["datanode"].pop("healthcheck"), "health"),
    "no restart policy": (
        lambda d: d["services"]["flow-worker-0"].pop("restart"), "health"),
    "depends on a started, not healthy, service": (
        lambda d: d["services"]["flow-worker-0"]["depends_on"].update(
            kafka={"condition": "service_started"}), "health"),
    "an option the parser does not know": (
        lambda d: _set_command(d, "flow-worker-0", ["spot-ingest", "worker", "-t",
                                                    "flow_internals", "-i", "0", "--bogus"]),
        "commands"),
    "a pipeline the configuration lacks": (
        lambda d: _set_command(d, "flow-worker-0", ["spot-ingest", "worker", "-t", "flow_x",
                                                    "-i", "0"]), "commands"),
    "a worker for a record pipeline": (
        lambda d: _set_command(d, "flow-worker-0", ["spot-ingest", "worker", "-t", "proxy_1",
                                                    "-i", "0"]), "commands"),
    "a stream job for a file pipeline": (
        lambda d: _set_command(d, "proxy-stream", ["spot-ingest", "stream", "-t",
                                                   "flow_internals"]), "commands"),
    "no streaming job": (
        lambda d: d["services"].pop("proxy-stream"), "commands"),
    "a stream job on fewer partitions than announced": (
        lambda d: _set_command(d, "proxy-stream", ["spot-ingest", "stream", "-t", "proxy_1",
                                                   "--partitions", "1"]), "topology"),
    "two workers with one id": (
        lambda d: _set_command(d, "flow-worker-1", ["spot-ingest", "worker", "-t",
                                                    "flow_internals", "-i", "0"]), "topology"),
    "a master announcing to 3 partitions, 2 workers": (
        lambda d: _set_command(d, "flow-master", ["spot-ingest", "master", "-t",
                                                  "flow_internals", "-w", "3"]), "topology"),
    "a worker's probe on another worker's port": (
        lambda d: _set_probe(d, "flow-worker-1", "http://127.0.0.1:9310/metrics"), "metrics"),
    "a probe of another path": (
        lambda d: _set_probe(d, "proxy-stream", "http://127.0.0.1:9305/"), "metrics"),
    "the broker advertising another port": (
        lambda d: d["services"]["kafka"]["environment"].update(
            KAFKA_ADVERTISED_LISTENERS="PLAINTEXT://kafka:9094,HOST://localhost:29092"), "ports"),
    "the metastore probed on another port": (
        lambda d: d["services"]["metastore"]["healthcheck"].update(
            test=["CMD", "bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9084"]), "ports"),
    "a bind mount missing from the repository": (
        lambda d: d["services"]["metastore"]["volumes"].append("./nothing.xml:/etc/x.xml"),
        "mounts"),
    "a declared volume nobody mounts": (
        lambda d: d["volumes"].update({"spare": None}), "mounts"),
    "the Hive containers on another file system": (
        lambda d: d["services"]["namenode"]["environment"].update(
            {"CORE-SITE.XML_fs.defaultFS": "hdfs://namenode:9000"}), "ports"),
    "an undeclared volume": (
        lambda d: d["services"]["flow-worker-0"]["volumes"].append("undeclared:/x"), "mounts"),
    "the configuration mounted elsewhere": (
        lambda d: d["services"]["proxy-stream"].update(
            configs=[{"source": "ingest_conf", "target": "/etc/other.json"}]), "mounts"),
    "two workers sharing local state": (
        lambda d: d["services"]["flow-worker-1"].update(
            volumes=["flow-worker-0-state:/var/lib/spot-ingest", "flow-worker-1-state:/unused"]),
        "state"),
    "a master without the collector volume": (
        lambda d: d["services"]["flow-master"].update(
            volumes=["flow-master-state:/var/lib/spot-ingest", "collector:/elsewhere"]), "state"),
    "a variable spot-ingest does not read": (
        lambda d: d["services"]["flow-master"]["environment"].update(SPOT_INGEST_CONFIG="/x"),
        "environment"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_check_can_fail(breakage, compose, cfg, schema):
    change, check = BREAKAGES[breakage]
    broken = copy.deepcopy(compose)
    change(broken)
    run = {"schema": lambda d: check_schema(d, schema),
           "services": check_cluster_services,
           "health": check_health_and_restart,
           "commands": lambda d: check_commands(d, cfg),
           "topology": lambda d: check_topology(d, cfg),
           "metrics": lambda d: check_metrics_health(d, cfg),
           "ports": lambda d: check_documented_ports(d, cfg),
           "mounts": check_mounts,
           "state": lambda d: check_state(d, cfg),
           "environment": lambda d: check_environment(d, env_read_by_code())}[check]
    run(copy.deepcopy(compose))          # the real file passes ...
    with pytest.raises(AssertionError):  # ... and the broken one does not
        run(broken)


def _replace(cfg, section: str, **changes):
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                    **changes)})


CONFIG_BREAKAGES = {
    # name: (a change of ingest_conf.cluster.json, the check that must then fail)
    "metrics on loopback only": (
        lambda c: _replace(c, "metrics", address="127.0.0.1"), check_metrics_health),
    "no metrics port for workers": (
        lambda c: _replace(c, "metrics", worker_port=None), check_metrics_health),
    "another broker port": (
        lambda c: _replace(c, "kafka", port=9094, server="kafka:9094"), check_documented_ports),
    "WebHDFS on another port": (
        lambda c: _replace(c, "hdfs", urls=("http://namenode:50070",)), check_documented_ports),
    "another metastore": (
        lambda c: _replace(c, "catalog", uris=("thrift://hive:9083",)), check_documented_ports),
    "scratch outside the state volume": (
        lambda c: _replace(c, "hdfs", scratch_dir=Path("/var/tmp/spot-ingest")), check_state),
}


@pytest.mark.parametrize("breakage", sorted(CONFIG_BREAKAGES))
def test_each_configuration_check_can_fail(breakage, compose, cfg):
    change, check = CONFIG_BREAKAGES[breakage]
    check(compose, cfg)
    with pytest.raises(AssertionError):
        check(compose, change(cfg))


DOCKERFILE_BREAKAGES = {
    "a package setup.sh does not install": lambda t: t.replace("dnsmasq-base", "dnsmasq-base vim"),
    "a package missing": lambda t: t.replace(" nfdump tshark", " tshark"),
    "a test-only package": lambda t: t.replace("dnsmasq-base", "dnsmasq-base softflowd"),
    "the test extra": lambda t: t.replace(".[broker,query]", ".[broker,query,test]"),
    "another Debian": lambda t: t.replace("slim-bookworm", "slim-bullseye"),
    "a COPY of a missing file": lambda t: t.replace("COPY setup.cfg", "COPY setup.py setup.cfg"),
}


@pytest.mark.parametrize("breakage", sorted(DOCKERFILE_BREAKAGES))
def test_the_dockerfile_check_can_fail(breakage):
    text = (DOCKER / "Dockerfile").read_text()
    broken = DOCKERFILE_BREAKAGES[breakage](text)
    assert broken != text, "the breakage applies to the real file"
    check_dockerfile(text)
    with pytest.raises(AssertionError):
        check_dockerfile(broken)


def test_the_folder_check_can_fail(cfg):
    text = (DOCKER / "Dockerfile").read_text()
    check_image_folders(text, cfg)
    for broken in (text.replace(" /data/collector/proxy", ""),
                   text.replace("chown -R spot /data", "chown -R spot /srv")):
        assert broken != text
        with pytest.raises(AssertionError):
            check_image_folders(broken, cfg)
