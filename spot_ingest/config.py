"""Read ``ingest_conf.json`` once, validate it, and hand typed objects down.

The file format is the original Apache Spot one (dbname, hdfs_app_path,
collector_processes, ingestion_interval, spark-streaming, kafka, pipelines);
keys this project added all have defaults, so a file written for the
original loads unchanged. Every mistake is reported as one ``ConfigError``
naming the file, the key and what is wrong.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_CONF = "SPOT_INGEST_CONF"


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


@dataclass(frozen=True)
class KafkaConfig:
    server: str
    port: int
    message_size: int = 900_000
    # New: start a local Kafka-protocol broker (standalone mode only).
    embedded_broker: bool = False

    @property
    def bootstrap(self) -> str:
        return f"{self.server}:{self.port}"


@dataclass(frozen=True)
class PipelineConfig:
    name: str
    type: str
    collector_path: Path
    local_staging: Path
    process_opt: str
    supported_files: tuple[str, ...]
    topic: str
    worker_processes: int
    settle_seconds: float
    max_file_size: int | None
    delete_collected: bool
    # Keys particular to the pipeline type, validated by the pipeline itself.
    options: Any = None


@dataclass(frozen=True)
class IngestConfig:
    path: Path
    dbname: str
    hdfs_app_path: str
    collector_processes: int
    ingestion_interval: float
    spark_streaming: dict
    kafka: KafkaConfig
    pipelines: dict[str, PipelineConfig] = field(default_factory=dict)
    log_dir: Path = Path("logs")
    unusable_pipelines: dict[str, ConfigError] = field(default_factory=dict)
    # The file's JSON as read, for writing a variant of it (the demo's sandbox).
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def pipeline(self, name: str) -> PipelineConfig:
        if name in self.unusable_pipelines:
            raise self.unusable_pipelines[name]
        try:
            return self.pipelines[name]
        except KeyError:
            known = ", ".join(sorted([*self.pipelines, *self.unusable_pipelines])) or "(none)"
            raise ConfigError(
                f"{self.path}: unknown pipeline '{name}'; pipelines in this file: {known}") from None

    def check_collector_path(self, name: str) -> None:
        """The master's host must have the pipeline's collector directory."""
        pcfg = self.pipeline(name)
        if not pcfg.collector_path.is_dir():
            raise ConfigError(f"{self.path}: pipelines.{name}.collector_path: directory "
                              f"'{pcfg.collector_path}' does not exist")


def default_config_path() -> Path:
    return Path(os.environ.get(ENV_CONF) or REPO_ROOT / "ingest_conf.json")


class _Reader:
    """Typed access to one JSON object, with errors that name file and key."""

    def __init__(self, path: Path, data: dict, prefix: str = ""):
        self.path, self.data, self.prefix = path, data, prefix

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.prefix}{key}: {problem}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, kind: str, default: Any = ..., *, empty_is_default=False) -> Any:
        if key not in self.data or (empty_is_default and self.data[key] in ("", None)):
            if default is ...:
                raise self.error(key, "missing key")
            return default
        value = self.data[key]
        try:
            return _coerce(value, kind)
        except (TypeError, ValueError):
            raise self.error(key, f"expected {_KIND_NAMES[kind]}, got {json.dumps(value)}") from None

    def section(self, key: str, required: bool = True) -> "_Reader":
        value = self.data.get(key, ... if required else {})
        if value is ...:
            raise self.error(key, "missing key")
        if not isinstance(value, dict):
            raise self.error(key, f"expected an object, got {json.dumps(value)}")
        return _Reader(self.path, value, f"{self.prefix}{key}.")


_KIND_NAMES = {
    "str": "a string", "int": "a whole number", "pos_int": "a positive whole number",
    "num": "a number", "pos_num": "a positive number", "bool": "true or false",
    "str_list": "a list of strings", "dict": "an object",
}


def _coerce(value: Any, kind: str) -> Any:
    # The original's example file writes ports and sizes as strings ("9092"),
    # so numbers given as strings of digits are accepted.
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError
        return value
    if kind in ("int", "pos_int"):
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int):
            raise TypeError
        if kind == "pos_int" and value <= 0:
            raise ValueError
        return value
    if kind in ("num", "pos_num"):
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, str):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise TypeError
        if kind == "pos_num" and value <= 0:
            raise ValueError
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise TypeError
        return value
    if kind == "str_list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError
        return tuple(value)
    if kind == "dict":
        if not isinstance(value, dict):
            raise TypeError
        return value
    raise AssertionError(kind)


def load(path: str | os.PathLike | None = None) -> IngestConfig:
    """Load and validate the configuration file (default: see ``default_config_path``)."""
    from . import pipeline as pipeline_registry  # late: pipelines import config types

    path = Path(path) if path else default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found "
                          f"(give one with -c FILE or ${ENV_CONF})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")

    top = _Reader(path, data)
    kafka = top.section("kafka")
    for zk_key in ("zookeper_server", "zookeper_port", "zookeeper_server", "zookeeper_port"):
        if kafka.data.get(zk_key) not in (None, ""):
            log.info("%s: kafka.%s is ignored: Kafka clients no longer need ZooKeeper", path, zk_key)
    kafka_cfg = KafkaConfig(
        server=kafka.get("kafka_server", "str"),
        port=kafka.get("kafka_port", "pos_int"),
        message_size=kafka.get("message_size", "pos_int", 900_000),
        embedded_broker=kafka.get("embedded_broker", "bool", False),
    )

    # Relative paths in the file are relative to the file, not to the cwd.
    base_dir = path.resolve().parent
    pipelines = top.section("pipelines")
    known_types = pipeline_registry.known_types()
    parsed, unusable = {}, {}
    for name in pipelines.data:
        section = pipelines.section(name)
        ptype = section.get("type", "str")
        if ptype not in known_types:
            # Reported when this pipeline is used, so that a file with a type
            # this version lacks still runs its other pipelines.
            unusable[name] = section.error("type", f"unknown pipeline type '{ptype}'; known "
                                           f"types: {', '.join(sorted(known_types))}")
            continue
        plugin = pipeline_registry.load(ptype)
        collector = _resolve(base_dir, section.get("collector_path", "str"))
        parsed[name] = PipelineConfig(
            name=name,
            type=ptype,
            collector_path=collector,
            local_staging=_resolve(base_dir, section.get("local_staging", "str", "/tmp/spot-ingest",
                                                         empty_is_default=True)),
            process_opt=section.get("process_opt", "str", ""),
            supported_files=section.get("supported_files", "str_list",
                                        tuple(plugin.default_supported_files)),
            topic=section.get("topic", "str", f"SPOT-INGEST-{name}"),
            worker_processes=section.get("worker_processes", "pos_int", os.cpu_count() or 1),
            settle_seconds=section.get("settle_seconds", "num", 2.0),
            max_file_size=section.get("max_file_size", "pos_int", None),
            delete_collected=section.get("delete_collected", "bool", True),
            options=plugin.parse_options(section.data, lambda key, problem, s=section: s.error(key, problem)),
        )
    log_dir = _resolve(base_dir, top.get("log_dir", "str", "logs"))
    app_path = top.get("hdfs_app_path", "str")
    if "://" in app_path and not app_path.startswith("file://"):
        raise top.error("hdfs_app_path", f"'{app_path}': only local paths, shared mounts and "
                        f"file:// URIs are supported in this version (mount HDFS through its "
                        f"NFS gateway, or give the mount point)")
    cfg = IngestConfig(
        path=path,
        dbname=top.get("dbname", "str"),
        hdfs_app_path=_resolve_location(base_dir, app_path),
        collector_processes=top.get("collector_processes", "pos_int", 2),
        ingestion_interval=top.get("ingestion_interval", "pos_num", 1.0),
        spark_streaming=_spark_options(top),
        kafka=kafka_cfg,
        pipelines=parsed,
        unusable_pipelines=unusable,
        log_dir=log_dir,
        raw=data,
    )

    return cfg



def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _resolve_location(base_dir: Path, value: str) -> str:
    """A store location: a URI (file://, hdfs://) as given, a local path resolved."""
    if "://" in value:
        return value
    return str(_resolve(base_dir, value))


def _spark_options(top: _Reader) -> dict:
    """The original's spark-streaming keys; empty values mean Spark's default."""
    section = top.section("spark-streaming", required=False)
    # bind_address (new): where the driver and its UI listen; loopback by default.
    for key, kind in (("spark_exec", "pos_int"), ("spark_executor_cores", "pos_int"),
                      ("spark_batch_size", "pos_num"), ("bind_address", "str")):
        if section.data.get(key) not in (None, ""):
            section.get(key, kind)   # raises with file, key and value if wrong
    return dict(section.data)
