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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_CONF = "SPOT_INGEST_CONF"


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI")
KAFKA_KEYS = (
    "kafka_server", "kafka_port", "message_size", "embedded_broker",
    "zookeper_server", "zookeper_port", "zookeeper_server", "zookeeper_port",
    "security_protocol", "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname",
    "sasl_mechanism", "sasl_username", "sasl_password_file", "sasl_password_env",
    "sasl_kerberos_service_name",
)
# Keys under which someone might try to write the password itself.
_PASSWORD_KEYS = ("password", "sasl_password", "sasl_plain_password", "ssl_password")


def parse_brokers(server: str, default_port: int | None) -> tuple[tuple[str, int], ...]:
    """``host1,host2:9093,[::1]:9092`` -> ((host, port), ...); an entry
    without a port takes ``default_port``. ValueError says what is wrong."""
    brokers = []
    for entry in (e.strip() for e in server.split(",")):
        if not entry:
            raise ValueError(f"'{server}' has an empty entry; give host, host:port or a "
                             f"comma-separated list of them")
        if "://" in entry or "/" in entry or any(c.isspace() for c in entry):
            raise ValueError(f"'{entry}' is not host or host:port")
        if entry.startswith("["):                  # [IPv6] or [IPv6]:port
            if "]" not in entry:
                raise ValueError(f"'{entry}' lacks the closing ] of an [IPv6 address]")
            host, _, rest = entry[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"'{entry}' is not [IPv6 address]:port")
            port = rest[1:] if rest else None
        elif entry.count(":") == 1:
            host, port = entry.split(":")
        else:                                       # a name, or a bare IPv6 address
            host, port = entry, None
        if not host:
            raise ValueError(f"'{entry}' has no host name")
        if port is None:
            if default_port is None:
                raise ValueError(f"'{entry}' has no port and kafka.kafka_port is not set")
            number = default_port
        elif port.isdigit() and 0 < int(port) < 65536:
            number = int(port)
        else:
            raise ValueError(f"'{entry}': port '{port}' is not a number from 1 to 65535")
        brokers.append((host, number))
    return tuple(brokers)


@dataclass(frozen=True)
class KafkaConfig:
    """How to reach the broker(s). Never holds a password: only where to read
    it (``sasl_password_file`` or ``sasl_password_env``), read when a client is
    made (``spot_ingest.kafka_security.client_kwargs``)."""
    server: str                 # one host, or a comma-separated list of host[:port]
    port: int                   # the port of entries that name none
    message_size: int = 900_000
    # New: start a local Kafka-protocol broker (standalone mode only).
    embedded_broker: bool = False
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password_file: Path | None = field(default=None, repr=False)
    sasl_password_env: str | None = field(default=None, repr=False)
    sasl_kerberos_service_name: str = "kafka"

    @property
    def brokers(self) -> tuple[tuple[str, int], ...]:
        return parse_brokers(self.server, self.port)

    @property
    def bootstrap(self) -> str:
        """The bootstrap list as kafka-python takes it: ``host1:9092,host2:9093``."""
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.brokers)

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def password_source(self) -> str:
        """Where the password comes from, for messages (never the password)."""
        if self.sasl_password_file:
            return f"the file {self.sasl_password_file} (kafka.sasl_password_file)"
        if self.sasl_password_env:
            return f"the environment variable {self.sasl_password_env} (kafka.sasl_password_env)"
        return "nowhere (no kafka.sasl_password_file or kafka.sasl_password_env)"

    def to_json(self) -> str:
        """The settings, for a process that cannot load the configuration file
        (the streaming job's Spark workers). Holds no password."""
        return json.dumps({k: (str(v) if isinstance(v, Path) else v)
                           for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> "KafkaConfig":
        data = json.loads(text)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_password_file"):
            if data.get(key):
                data[key] = Path(data[key])
        return cls(**data)


HDFS_KEYS = ("url", "user", "root", "timeout", "verify", "kerberos", "scratch_dir",
             "scratch_max_bytes")
KERBEROS_KEYS = ("principal", "keytab", "ccache", "mutual_auth", "service")
MUTUAL_AUTH = ("REQUIRED", "OPTIONAL", "DISABLED")


@dataclass(frozen=True)
class HdfsConfig:
    """How to reach HDFS through WebHDFS (or HttpFS, which speaks the same
    REST protocol on one host). With this section, ``hdfs_app_path`` is an
    HDFS path, as in the original Spot."""
    urls: tuple[str, ...]           # namenode (or HttpFS) base URLs; more than one: HA
    user: str | None = None         # user.name for simple authentication
    root: str = "/"                 # what a relative hdfs_app_path is relative to
    timeout: float = 60.0           # seconds for one request to answer
    verify: bool | str = True       # https: check the certificate (or: a CA bundle file)
    kerberos: Any = None            # spot_ingest.kerberos.KerberosSettings, or None
    # Local room for captures fetched for the tools and table files before upload.
    scratch_dir: Path = Path("/var/tmp/spot-ingest")
    scratch_max_bytes: int | None = None

    @property
    def url(self) -> str:
        """The URL list as HdfsCLI takes it (semicolon-separated for HA)."""
        return ";".join(self.urls)

    def describe(self, path: str = "") -> str:
        """``hdfs <url><path>`` for messages."""
        return f"{self.urls[0]}{path}" if len(self.urls) == 1 else f"{self.url} {path}".rstrip()


@dataclass(frozen=True)
class StoreLocation:
    """Where the store is: ``hdfs_app_path``, and how to reach HDFS when it is
    there. Picklable: worker processes and Spark tasks open the store from it."""
    path: str
    hdfs: HdfsConfig | None = None

    def __str__(self) -> str:
        return self.hdfs.describe(self.path) if self.hdfs else self.path


CATALOG_TYPES = ("none", "hive-metastore", "spark", "hiveserver2")
CATALOG_KEYS = ("type", "uri", "url", "user", "password_file", "beeline", "conf", "timeout",
                "batch_seconds", "kerberos_principal")


@dataclass(frozen=True)
class CatalogConfig:
    """The optional ``catalog`` section: where tables and partitions are
    registered so that Hive, Impala and Spark see them (README: Query the
    tables). ``type`` "none" (the default) registers nothing."""
    type: str = "none"
    uris: tuple[str, ...] = ()       # hive-metastore: thrift://host:port, tried in order
    url: str | None = None           # hiveserver2: jdbc:hive2://host:port/...
    user: str | None = None          # hiveserver2: beeline -n
    password_file: Path | None = None   # hiveserver2: beeline -w (the password stays in a file)
    beeline: str | None = None       # hiveserver2: the beeline program (default: from PATH, else PySpark's jars)
    conf: tuple[tuple[str, str], ...] = ()   # spark: session settings (e.g. the metastore URIs)
    timeout: float = 30.0            # seconds for one catalog call
    batch_seconds: float = 5.0       # partitions written within this time are registered together
    # hive-metastore with Kerberos (SASL GSSAPI): the metastore's service
    # principal, as hive.metastore.kerberos.principal ("hive/_HOST@REALM";
    # _HOST is the host of the URI connected to). The ticket is that of the
    # hdfs section's keytab login: ``kerberos`` is its KerberosSettings and
    # ``kerberos_state_dir`` where the HDFS store keeps its credential cache
    # (the same file, so one login serves both), copied here so that the
    # catalog opens from this section alone.
    kerberos_principal: str | None = None
    kerberos: Any = None
    kerberos_state_dir: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.type != "none"

    def describe(self) -> str:
        where = ", ".join(self.uris) if self.uris else (self.url or "a Spark session")
        return f"{self.type} catalog at {where}"


METRICS_KEYS = ("address", "master_port", "worker_port", "stream_port")


@dataclass(frozen=True)
class MetricsConfig:
    """The optional ``metrics`` section: where each process serves its
    Prometheus metrics (README: Operating it). A port of None serves none;
    worker N listens on ``worker_port + N``. ``--metrics-port`` on a command
    line overrides (the launcher gives each process its own)."""
    address: str = "127.0.0.1"
    master_port: int | None = None
    worker_port: int | None = None
    stream_port: int | None = None

    def port(self, role: str, worker_id: int = 0) -> int | None:
        base = {"master": self.master_port, "worker": self.worker_port,
                "stream": self.stream_port}[role]
        return None if base is None else base + (worker_id if role == "worker" else 0)


GUARD_KEYS = ("min_free_memory", "min_free_disk", "check_seconds")


@dataclass(frozen=True)
class ResourceGuardConfig:
    """The optional ``resource_guard`` section: a worker takes no new file
    while the host's available memory, or the free space where it writes
    (its scratch folder, a local store), is below these (bytes; 0: never)."""
    min_free_memory: int = 256 << 20
    min_free_disk: int = 512 << 20
    check_seconds: float = 5.0


LOG_FORMATS = ("text", "json")


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
    # Seconds a tool may spend on one file before it is killed and the file
    # retried (then set aside): a hung tool must not hold a worker forever.
    convert_timeout: float | None = 3600.0


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
    # The process umask that gives the configured file_mode and dir_mode to
    # everything spot-ingest creates (staged files, tables, quarantine, logs).
    umask: int = 0o027
    # Staged captures older than this are removed once their rows are in the
    # table (None: kept forever, as the original did).
    binary_retention_days: float | None = None
    # A file holding the HMAC-SHA256 key that signs announcements; workers
    # then refuse unsigned or badly signed records (None: no signing).
    signing_key_file: Path | None = None
    # The "hdfs" section: with it, hdfs_app_path is a path on HDFS.
    hdfs: HdfsConfig | None = None
    # The "catalog" section: where tables and partitions are registered.
    catalog: CatalogConfig = CatalogConfig()
    metrics: MetricsConfig = MetricsConfig()
    resource_guard: ResourceGuardConfig = ResourceGuardConfig()
    log_format: str = "text"      # "json": one JSON object per log line

    @property
    def store(self) -> StoreLocation:
        return StoreLocation(self.hdfs_app_path, self.hdfs)

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


ENV_HOST_WORKERS = "SPOT_INGEST_HOST_WORKERS"


def default_worker_processes() -> int:
    """Conversion processes per worker when the configuration sets none: the
    host's cores shared among the workers it runs (``$SPOT_INGEST_HOST_WORKERS``,
    which the standalone launcher sets; 1 if unset), so that a host never
    runs more conversions (nfdump, tshark) than it has cores."""
    try:
        workers = max(1, int(os.environ.get(ENV_HOST_WORKERS, "1")))
    except ValueError:
        workers = 1
    return max(1, (os.cpu_count() or 1) // workers)


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
    "num": "a number", "pos_num": "a positive number", "nonneg_num": "a number of 0 or more",
    "bool": "true or false",
    "str_list": "a list of strings", "dict": "an object",
}


def _finite(value: int | float) -> bool:
    """False for NaN, +/-Infinity and integers too large to be a float."""
    import math
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


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
    if kind in ("num", "pos_num", "nonneg_num"):
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, str):
            value = float(value)
        if not isinstance(value, (int, float)):
            raise TypeError
        # "nan", "inf" (as strings) and JSON's NaN and Infinity, which
        # Python's json accepts: never a usable interval or size.
        if not _finite(value):
            raise ValueError
        if kind == "pos_num" and value <= 0:
            raise ValueError
        if kind == "nonneg_num" and value < 0:
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
    # Relative paths in the file are relative to the file, not to the cwd.
    base_dir = path.resolve().parent
    kafka_cfg = _kafka_config(top.section("kafka"), base_dir)
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
        try:
            options = plugin.parse_options(section.data,
                                           lambda key, problem, s=section: s.error(key, problem))
        except ConfigError as exc:
            # Like an unknown type: a bad process_opt (or other option of the
            # type) is reported when this pipeline is used; the others run.
            unusable[name] = exc
            continue
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
            worker_processes=section.get("worker_processes", "pos_int",
                                         default_worker_processes()),
            settle_seconds=section.get("settle_seconds", "nonneg_num", 2.0),
            max_file_size=section.get("max_file_size", "pos_int", None),
            delete_collected=section.get("delete_collected", "bool", True),
            options=options,
            convert_timeout=section.get("convert_timeout", "pos_num", 3600.0),
        )
    log_dir = _resolve(base_dir, top.get("log_dir", "str", "logs"))
    hdfs = _hdfs_config(top, base_dir)
    app_path = _app_path(top, base_dir, hdfs)
    cfg = IngestConfig(
        path=path,
        dbname=top.get("dbname", "str"),
        hdfs_app_path=app_path,
        collector_processes=top.get("collector_processes", "pos_int", 2),
        ingestion_interval=top.get("ingestion_interval", "pos_num", 1.0),
        spark_streaming=_spark_options(top),
        kafka=kafka_cfg,
        pipelines=parsed,
        unusable_pipelines=unusable,
        log_dir=log_dir,
        raw=data,
        umask=_umask(top),
        binary_retention_days=top.get("binary_retention_days", "pos_num", None,
                                      empty_is_default=True),
        signing_key_file=_signing_key_file(top, base_dir),
        hdfs=hdfs,
        catalog=_catalog_config(top, base_dir, hdfs),
        metrics=_metrics_config(top),
        resource_guard=_guard_config(top),
        log_format=_log_format(top),
    )

    return cfg



def _kafka_config(kafka: _Reader, base_dir: Path) -> KafkaConfig:
    """The ``kafka`` section: brokers, TLS and SASL, each mistake one line."""
    for key in kafka.data:
        if key in _PASSWORD_KEYS:
            # The value is not repeated: it is a password.
            raise kafka.error(key, "a password is never written in this file; put it in a file "
                                   "named by sasl_password_file, or in an environment variable "
                                   "named by sasl_password_env")
        if key not in KAFKA_KEYS:
            raise kafka.error(key, f"unknown key; known keys: {', '.join(sorted(KAFKA_KEYS))}")
    for zk_key in ("zookeper_server", "zookeper_port", "zookeeper_server", "zookeeper_port"):
        if kafka.data.get(zk_key) not in (None, ""):
            log.info("%s: kafka.%s is ignored: Kafka clients no longer need ZooKeeper",
                     kafka.path, zk_key)

    server = kafka.get("kafka_server", "str")
    port = kafka.get("kafka_port", "pos_int", None)
    if port is not None and port > 65535:
        raise kafka.error("kafka_port", f"{port} is not a port number (1 to 65535)")
    try:
        brokers = parse_brokers(server, port)
    except ValueError as exc:
        if port is None and "kafka_port is not set" in str(exc):
            raise kafka.error("kafka_port", "missing key") from None
        raise kafka.error("kafka_server", str(exc)) from None

    protocol = kafka.get("security_protocol", "str", "PLAINTEXT").upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise kafka.error("security_protocol", f"'{kafka.data['security_protocol']}' is not one "
                                               f"of {', '.join(SECURITY_PROTOCOLS)}")
    tls, sasl = protocol in ("SSL", "SASL_SSL"), protocol.startswith("SASL_")
    given = {k for k, v in kafka.data.items() if v is not None}

    # TLS or SASL settings with a protocol that does not use them are refused,
    # not ignored: whoever wrote ssl_cafile expects encryption, and whoever
    # wrote sasl_* expects to authenticate; warning and going on would send
    # the data (and with SASL_PLAINTEXT, the credentials) in the clear.
    for key in sorted(given):
        if key.startswith("ssl_") and not tls:
            raise kafka.error(key, f"set, but security_protocol is {protocol}, which does not use "
                                   f"TLS; set security_protocol to SSL or SASL_SSL, or remove {key}")
        if key.startswith("sasl_") and not sasl:
            raise kafka.error(key, f"set, but security_protocol is {protocol}, which does not "
                                   f"authenticate with SASL; set security_protocol to SASL_SSL "
                                   f"or SASL_PLAINTEXT, or remove {key}")
    if protocol != "PLAINTEXT" and kafka.get("embedded_broker", "bool", False):
        raise kafka.error("embedded_broker", f"the embedded broker speaks PLAINTEXT only, but "
                                             f"security_protocol is {protocol}; set "
                                             f"embedded_broker to false and run a broker that "
                                             f"speaks {protocol}")

    def readable_file(key: str) -> Path | None:
        if not kafka.has(key) or kafka.data[key] is None:
            return None
        p = _resolve(base_dir, kafka.get(key, "str"))
        if not p.exists():
            raise kafka.error(key, f"file '{p}' does not exist")
        if not p.is_file():
            raise kafka.error(key, f"'{p}' is not a file")
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise kafka.error(key, f"file '{p}' cannot be read: {exc.strerror}") from None
        return p

    cafile, certfile, keyfile = (readable_file(k) for k in ("ssl_cafile", "ssl_certfile",
                                                              "ssl_keyfile"))
    if keyfile and not certfile:
        raise kafka.error("ssl_keyfile", "set without ssl_certfile (the client certificate the "
                                         "key belongs to)")
    if tls:
        _check_tls_files(kafka, cafile, certfile, keyfile)

    mechanism = username = password_file = password_env = None
    service = "kafka"
    if sasl:
        if not kafka.has("sasl_mechanism"):
            raise kafka.error("sasl_mechanism", f"missing key (security_protocol {protocol} needs "
                                                f"one of {', '.join(SASL_MECHANISMS)})")
        mechanism = kafka.get("sasl_mechanism", "str").upper()
        if mechanism not in SASL_MECHANISMS:
            raise kafka.error("sasl_mechanism", f"'{kafka.data['sasl_mechanism']}' is not one of "
                                                f"{', '.join(SASL_MECHANISMS)}")
        username = kafka.get("sasl_username", "str", None)
        password_file = readable_file("sasl_password_file")
        if kafka.has("sasl_password_env"):
            password_env = kafka.get("sasl_password_env", "str")
        if mechanism == "GSSAPI":
            for key in ("sasl_username", "sasl_password_file", "sasl_password_env"):
                if key in given:
                    raise kafka.error(key, "not used with GSSAPI (Kerberos authenticates with the "
                                           "process's ticket or keytab); remove it")
            service = kafka.get("sasl_kerberos_service_name", "str", "kafka")
            import importlib.util
            if importlib.util.find_spec("gssapi") is None:
                raise kafka.error("sasl_mechanism", "GSSAPI needs the Python package gssapi "
                                                    "(pip install gssapi; it needs libkrb5-dev)")
        else:
            if "sasl_kerberos_service_name" in given:
                raise kafka.error("sasl_kerberos_service_name", f"only used with GSSAPI, but "
                                                                f"sasl_mechanism is {mechanism}")
            if not username:
                raise kafka.error("sasl_username", f"missing key (sasl_mechanism {mechanism} "
                                                   f"needs a user name)")
            if password_file and password_env:
                raise kafka.error("sasl_password_env", "set together with sasl_password_file; "
                                                       "give one of them")
            if not (password_file or password_env):
                raise kafka.error("sasl_password_file", f"missing key (sasl_mechanism {mechanism} "
                                                        f"needs a password: give "
                                                        f"sasl_password_file or sasl_password_env)")
            if password_file:
                mode = password_file.stat().st_mode
                if password_file.stat().st_size == 0:
                    raise kafka.error("sasl_password_file", f"file '{password_file}' is empty")
                if mode & 0o077:
                    log.warning("%s: kafka.sasl_password_file: '%s' can be read by other users "
                                "(mode %o); chmod 600 it", kafka.path, password_file, mode & 0o777)
            if password_env:
                # The value is shown only if it looks like a variable's name:
                # a password written here by mistake must not reach a log.
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
                    raise kafka.error("sasl_password_env", "is not the name of an environment "
                                                           "variable (the value is not shown: it "
                                                           "may be a password)")
                if not os.environ.get(password_env):
                    raise kafka.error("sasl_password_env", f"the environment variable "
                                                           f"{password_env} is not set or empty")

    return KafkaConfig(
        server=server,
        port=port if port is not None else brokers[0][1],
        message_size=_message_size(kafka),
        embedded_broker=kafka.get("embedded_broker", "bool", False),
        security_protocol=protocol,
        ssl_cafile=cafile, ssl_certfile=certfile, ssl_keyfile=keyfile,
        ssl_check_hostname=kafka.get("ssl_check_hostname", "bool", True),
        sasl_mechanism=mechanism, sasl_username=username,
        sasl_password_file=password_file, sasl_password_env=password_env,
        sasl_kerberos_service_name=service,
    )


def _check_tls_files(kafka: _Reader, cafile: Path | None, certfile: Path | None,
                     keyfile: Path | None) -> None:
    """Load the files as the client will, so that a wrong file is named now."""
    import ssl

    def no_password():
        raise ssl.SSLError("the key is encrypted")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        try:
            ctx.load_verify_locations(str(cafile))
        except ssl.SSLError as exc:
            raise kafka.error("ssl_cafile", f"'{cafile}' holds no PEM certificate "
                                            f"({exc.reason or exc})") from None
    if certfile:
        try:
            # A password callback, so that an encrypted key never makes
            # OpenSSL prompt on a terminal that a daemon does not have.
            ctx.load_cert_chain(str(certfile), str(keyfile) if keyfile else None, no_password)
        except ssl.SSLError as exc:
            what = "ssl_keyfile" if keyfile else "ssl_certfile"
            reason = str(exc) if "encrypted" in str(exc) else (exc.reason or str(exc))
            raise kafka.error(what, f"cannot use '{certfile}'"
                                    + (f" with '{keyfile}'" if keyfile else "")
                                    + f" as the client certificate and key: {reason}"
                                    + ("; decrypt the key (openssl pkey -in KEY -out KEY.plain) "
                                       "and chmod 600 it" if "encrypted" in reason else "")) from None


def _resolve(base_dir: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base_dir / p


def _app_path(top: _Reader, base_dir: Path, hdfs: HdfsConfig | None) -> str:
    """``hdfs_app_path``: an HDFS path with an ``hdfs`` section, else a local
    path (or file:// URI), resolved against the file's folder."""
    value = top.get("hdfs_app_path", "str")
    if hdfs is not None:
        for scheme in ("hdfs://", "webhdfs://", "swebhdfs://"):
            if value.startswith(scheme):   # the authority is the hdfs section's business
                value = "/" + value[len(scheme):].partition("/")[2]
        if "://" in value:
            raise top.error("hdfs_app_path", f"'{value}': with an hdfs section this is a path on "
                                             f"HDFS (/user/spot, or hdfs://namenode/user/spot)")
        path = value if value.startswith("/") else f"{hdfs.root.rstrip('/')}/{value}"
        parts = [p for p in path.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise top.error("hdfs_app_path", f"'{value}' is not a folder on HDFS: give an "
                                             f"absolute path without . or .. (e.g. /user/spot)")
        return "/" + "/".join(parts)
    if value.startswith("file://"):
        return value
    if "://" in value:
        raise top.error("hdfs_app_path", f"'{value}' is a URI, but the file has no \"hdfs\" "
                                         f"section; add one (see README, Running on Hadoop) or "
                                         f"give a local path or shared mount")
    path = _resolve(base_dir, value)
    # The original's default "/user/spot" is an HDFS home: without an hdfs
    # section it would quietly become a folder on this host's disk.
    if value.startswith("/user/") and not path.is_dir():
        raise top.error("hdfs_app_path", f"'{value}' looks like an HDFS home directory, but the "
                                         f"file has no \"hdfs\" section and no such local "
                                         f"directory exists; add an hdfs section (README: Running "
                                         f"on Hadoop) or create the directory to use it locally")
    return str(path)


def _hdfs_config(top: _Reader, base_dir: Path) -> HdfsConfig | None:
    """The optional ``hdfs`` section; every key checked, each mistake one line."""
    if not top.has("hdfs") or top.data["hdfs"] in (None, {}):
        return None
    section = top.section("hdfs")
    for key in section.data:
        if key not in HDFS_KEYS:
            raise section.error(key, f"unknown key; known keys: {', '.join(HDFS_KEYS)}")
    raw_url = section.data.get("url")
    urls = [raw_url] if isinstance(raw_url, str) else raw_url
    if not urls or not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise section.error("url", f"expected the WebHDFS URL (http://namenode:9870) or a list "
                                   f"of them (HA), got {json.dumps(raw_url)}")
    checked = []
    for url in (u.strip() for text in urls for u in text.split(";")):
        scheme, _, rest = url.partition("://")
        host = rest.split("/")[0]
        if scheme not in ("http", "https") or not host or rest.strip("/") != host \
                or any(c.isspace() for c in url):
            raise section.error("url", f"'{url}' is not http(s)://host:port (the namenode's "
                                       f"WebHDFS port, e.g. http://namenode:9870, or HttpFS's "
                                       f":14000), without a path")
        checked.append(url.rstrip("/"))
    verify = section.data.get("verify", True)
    if isinstance(verify, str):
        verify = _resolve(base_dir, verify)
        if not verify.is_file():
            raise section.error("verify", f"CA bundle '{verify}' is not a readable file")
        verify = str(verify)
    elif not isinstance(verify, bool):
        raise section.error("verify", f"expected true, false or a CA bundle file, got "
                                      f"{json.dumps(verify)}")
    root = section.get("root", "str", "/")
    if not root.startswith("/"):
        raise section.error("root", f"'{root}' is not an absolute HDFS path")
    kerberos = _kerberos_settings(section, base_dir) if section.has("kerberos") else None
    user = section.get("user", "str", None, empty_is_default=True)
    if kerberos is not None and user is not None:
        raise section.error("user", "give either user (simple authentication) or kerberos, "
                                    "not both: with Kerberos the user is the principal's")
    return HdfsConfig(
        urls=tuple(checked), user=user, root=root,
        timeout=section.get("timeout", "pos_num", 60.0), verify=verify, kerberos=kerberos,
        scratch_dir=_resolve(base_dir, section.get("scratch_dir", "str", "/var/tmp/spot-ingest")),
        scratch_max_bytes=section.get("scratch_max_bytes", "pos_int", None))


def _known_keys(section: _Reader, known: tuple[str, ...]) -> None:
    for key in section.data:
        if key not in known:
            raise section.error(key, f"unknown key; known keys: {', '.join(known)}")


def _metrics_config(top: _Reader) -> MetricsConfig:
    section = top.section("metrics", required=False)
    _known_keys(section, METRICS_KEYS)
    ports = {}
    for key in METRICS_KEYS[1:]:
        port = section.get(key, "int", None, empty_is_default=True)
        if port is not None and not 1 <= port <= 65535:
            raise section.error(key, f"{port} is not a port (1-65535)")
        ports[key] = port
    address = section.get("address", "str", "127.0.0.1", empty_is_default=True)
    return MetricsConfig(address=address, **ports)


def _size(section: _Reader, key: str, default: int) -> int:
    """A size in bytes: a number, or a string such as "512MB" or "1GB"."""
    from .units import parse_size
    value = section.data.get(key, default)
    if isinstance(value, bool) or value is None:
        raise section.error(key, f"expected a size such as 512MB, got {json.dumps(value)}")
    if isinstance(value, (int, float)) and value >= 0 and _finite(value):
        return int(value)
    try:
        return parse_size(str(value), allow_zero=True)
    except ValueError as exc:
        raise section.error(key, str(exc)) from None


def _guard_config(top: _Reader) -> ResourceGuardConfig:
    section = top.section("resource_guard", required=False)
    _known_keys(section, GUARD_KEYS)
    defaults = ResourceGuardConfig()
    return ResourceGuardConfig(
        min_free_memory=_size(section, "min_free_memory", defaults.min_free_memory),
        min_free_disk=_size(section, "min_free_disk", defaults.min_free_disk),
        check_seconds=section.get("check_seconds", "pos_num", defaults.check_seconds))


def _log_format(top: _Reader) -> str:
    value = top.get("log_format", "str", "text", empty_is_default=True)
    if value not in LOG_FORMATS:
        raise top.error("log_format", f"'{value}' is not one of {', '.join(LOG_FORMATS)}")
    return value


def _catalog_config(top: _Reader, base_dir: Path, hdfs: HdfsConfig | None = None
                    ) -> CatalogConfig:
    """The optional ``catalog`` section; every key checked, each mistake one
    line. ``hdfs`` (the hdfs section) gives ``kerberos_principal`` its login."""
    if not top.has("catalog") or top.data["catalog"] in (None, {}):
        return CatalogConfig()
    section = top.section("catalog")
    for key in section.data:
        if key not in CATALOG_KEYS:
            raise section.error(key, f"unknown key; known keys: {', '.join(CATALOG_KEYS)}")
    kind = section.get("type", "str", "none")
    if kind not in CATALOG_TYPES:
        raise section.error("type", f"'{kind}' is not one of {', '.join(CATALOG_TYPES)}")
    # A Kerberized metastore: "hive-metastore" with kerberos_principal (the
    # hdfs section's keytab login), or "spark" / "hiveserver2" (principal=...
    # in the URL) with the site's own Kerberos client.
    allowed = {"none": ("type",), "hive-metastore": ("type", "uri", "timeout", "batch_seconds",
                                                     "kerberos_principal"),
               "spark": ("type", "conf", "timeout", "batch_seconds"),
               "hiveserver2": ("type", "url", "user", "password_file", "beeline", "timeout",
                               "batch_seconds")}[kind]
    for key in section.data:
        if key not in allowed:
            raise section.error(key, f"not used with type '{kind}' (it takes "
                                     f"{', '.join(allowed)})")
    uris: tuple[str, ...] = ()
    if kind == "hive-metastore":
        raw = section.data.get("uri")
        listed = [raw] if isinstance(raw, str) else raw
        if not listed or not isinstance(listed, list) or not all(isinstance(u, str) for u in listed):
            raise section.error("uri", f"expected thrift://host:port or a list of them, got "
                                       f"{json.dumps(raw)}")
        found = []
        for uri in (u.strip() for text in listed for u in text.split(",")):
            if not re.fullmatch(r"thrift://[A-Za-z0-9.\-_]+:[0-9]{1,5}", uri) \
                    or not 0 < int(uri.rsplit(":", 1)[1]) < 65536:
                raise section.error("uri", f"'{uri}' is not thrift://host:port (the metastore's "
                                           f"hive.metastore.uris, e.g. thrift://metastore:9083)")
            found.append(uri)
        uris = tuple(found)
    principal = _metastore_principal(section, hdfs) if kind == "hive-metastore" else None
    url = None
    password_file = None
    if kind == "hiveserver2":
        url = section.get("url", "str")
        if not url.startswith("jdbc:hive2://") or any(c.isspace() for c in url):
            raise section.error("url", f"'{url}' is not a HiveServer2 JDBC URL "
                                       f"(jdbc:hive2://host:10000/default)")
        if section.data.get("password_file") not in (None, ""):
            password_file = _resolve(base_dir, section.get("password_file", "str"))
            if not password_file.is_file() or not os.access(password_file, os.R_OK):
                raise section.error("password_file", f"'{password_file}' is not a readable file")
    conf: tuple[tuple[str, str], ...] = ()
    if kind == "spark":
        raw_conf = section.get("conf", "dict", {})
        for key, value in raw_conf.items():
            if not isinstance(value, (str, int, float, bool)):
                raise section.error(f"conf.{key}", f"expected a string, got {json.dumps(value)}")
        conf = tuple(sorted((k, str(v).lower() if isinstance(v, bool) else str(v))
                            for k, v in raw_conf.items()))
    return CatalogConfig(
        type=kind, uris=uris, url=url,
        user=section.get("user", "str", None, empty_is_default=True),
        password_file=password_file,
        beeline=section.get("beeline", "str", None, empty_is_default=True),
        conf=conf, timeout=section.get("timeout", "pos_num", 30.0),
        batch_seconds=section.get("batch_seconds", "nonneg_num", 5.0),
        kerberos_principal=principal,
        kerberos=hdfs.kerberos if principal else None,
        kerberos_state_dir=hdfs.scratch_dir / "kerberos" if principal else None)


def _metastore_principal(section: _Reader, hdfs: HdfsConfig | None) -> str | None:
    """``catalog.kerberos_principal``: checked, and usable only with the
    hdfs section's Kerberos login (whose ticket authenticates)."""
    principal = section.get("kerberos_principal", "str", None, empty_is_default=True)
    if principal is None:
        return None
    if not re.fullmatch(r"[^\s@/]+/[^\s@/]+@[^\s@/]+", principal):
        raise section.error("kerberos_principal", f"'{principal}' is not a service principal "
                                                  f"such as hive/_HOST@EXAMPLE.COM (the "
                                                  f"metastore's hive.metastore.kerberos.principal)")
    if hdfs is None or hdfs.kerberos is None:
        raise section.error("kerberos_principal", "needs the hdfs section with kerberos (its "
                                                  "keytab login authenticates to the metastore); "
                                                  "add hdfs.kerberos or remove this key")
    import importlib.util
    if importlib.util.find_spec("gssapi") is None:
        raise section.error("kerberos_principal", "Kerberos to the metastore needs the Python "
                                                  "package gssapi (pip install "
                                                  "'spot-ingest[kerberos]')")
    return principal


def _kerberos_settings(hdfs: _Reader, base_dir: Path):
    from .kerberos import KerberosSettings
    section = hdfs.section("kerberos")
    for key in section.data:
        if key not in KERBEROS_KEYS:
            raise section.error(key, f"unknown key; known keys: {', '.join(KERBEROS_KEYS)}")
    principal = section.get("principal", "str")
    if not re.fullmatch(r"[^\s@/]+(/[^\s@/]+)?@[^\s@/]+", principal):
        raise section.error("principal", f"'{principal}' is not a principal such as "
                                         f"spot@EXAMPLE.COM")
    keytab = _resolve(base_dir, section.get("keytab", "str"))
    if not keytab.is_file() or not os.access(keytab, os.R_OK):
        raise section.error("keytab", f"'{keytab}' is not a readable file")
    mutual = section.get("mutual_auth", "str", "OPTIONAL").upper()
    if mutual not in MUTUAL_AUTH:
        raise section.error("mutual_auth", f"'{mutual}' is not one of {', '.join(MUTUAL_AUTH)}")
    ccache = section.get("ccache", "str", None, empty_is_default=True)
    return KerberosSettings(principal=principal, keytab=keytab,
                            ccache=_resolve(base_dir, ccache) if ccache else None,
                            mutual_auth=mutual, service=section.get("service", "str", "HTTP"))


MIN_SIGNING_KEY_BYTES = 32
# A message is parsed in one piece by the streaming job: larger ones made a
# 1 GB Spark driver die of OutOfMemoryError (50 MB was tried).
MAX_MESSAGE_SIZE = 16 << 20


def _message_size(kafka: _Reader) -> int:
    size = kafka.get("message_size", "pos_int", 900_000)
    if size > MAX_MESSAGE_SIZE:
        raise kafka.error("message_size", f"{size} bytes is above the {MAX_MESSAGE_SIZE} bytes a "
                                          f"message may have (Kafka's default limit is 1048588)")
    return size


def _signing_key_file(top: _Reader, base_dir: Path) -> Path | None:
    value = top.get("signing_key_file", "str", None, empty_is_default=True)
    if value is None:
        return None
    path = _resolve(base_dir, value)
    try:
        size = len(path.read_bytes().strip())
    except OSError as exc:
        raise top.error("signing_key_file", f"cannot read '{path}': {exc.strerror}") from None
    if size < MIN_SIGNING_KEY_BYTES:
        raise top.error("signing_key_file", f"'{path}' holds {size} bytes; a key needs at least "
                                            f"{MIN_SIGNING_KEY_BYTES} (e.g. head -c 32 /dev/urandom "
                                            f"| base64 > FILE)")
    return path


def read_signing_key(cfg: "IngestConfig") -> bytes | None:
    """The announcement signing key, read when a master or worker starts."""
    return cfg.signing_key_file.read_bytes().strip() if cfg.signing_key_file else None


def _umask(top: _Reader) -> int:
    """``file_mode`` and ``dir_mode`` (octal strings, default 0640 and 0750) as
    one umask: a file gets the directory mode without execute bits."""
    modes = {}
    for key, default in (("file_mode", "0640"), ("dir_mode", "0750")):
        text = top.get(key, "str", default)
        try:
            modes[key] = int(text, 8)
            if not 0 <= modes[key] <= 0o777:
                raise ValueError
        except ValueError:
            raise top.error(key, f"expected an octal mode such as {default}, got "
                                 f"{json.dumps(text)}") from None
    if modes["file_mode"] != modes["dir_mode"] & 0o666:
        raise top.error("file_mode", f"{modes['file_mode']:04o} must be dir_mode "
                                     f"({modes['dir_mode']:04o}) without its execute bits, i.e. "
                                     f"{modes['dir_mode'] & 0o666:04o}")
    if modes["dir_mode"] & 0o700 != 0o700:
        raise top.error("dir_mode", f"{modes['dir_mode']:04o}: the owner needs rwx (07xx)")
    return 0o777 & ~modes["dir_mode"]


KAFKA_SOURCES = ("python", "spark")


def _spark_options(top: _Reader) -> dict:
    """The original's spark-streaming keys; empty values mean Spark's default."""
    section = top.section("spark-streaming", required=False)
    # bind_address (new): where the driver and its UI listen; loopback by default;
    # driver_host (new): the address executors reach the driver at; ui_port (new).
    # kafka_source (new): "python" (kafka-python, no jar) or "spark" (Spark's
    # own Kafka source; kafka_connector names its jar or Maven coordinate).
    for key, kind in (("spark_exec", "pos_int"), ("spark_executor_cores", "pos_int"),
                      ("spark_batch_size", "pos_num"), ("bind_address", "str"),
                      ("driver_host", "str"), ("ui_port", "int"),
                      ("kafka_source", "str"), ("kafka_connector", "str")):
        if section.data.get(key) not in (None, ""):
            section.get(key, kind)   # raises with file, key and value if wrong
    source = section.data.get("kafka_source") or "python"
    if source not in KAFKA_SOURCES:
        raise section.error("kafka_source", f"'{source}' is not one of "
                                            f"{', '.join(KAFKA_SOURCES)}")
    return dict(section.data)
