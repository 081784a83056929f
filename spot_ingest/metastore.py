"""Registering tables and partitions in the configured catalog.

A ``Catalog`` is where Hive, Impala and Spark look up ``dbname.<table>``:

* ``MetastoreCatalog``: a Hive metastore over Thrift (``catalog.type``
  "hive-metastore"), through the generated client that ``pymetastore`` ships;
  with ``catalog.kerberos_principal``, authenticated with SASL GSSAPI
  (``spot_ingest.thrift_sasl``) by the hdfs section's keytab login;
* ``SparkCatalog``: a Spark SQL session with Hive support ("spark"), for
  sites that allow only that;
* ``BeelineCatalog``: HiveServer2 through ``beeline`` ("hiveserver2"), for
  sites whose metastore is closed to clients.

Each creates missing tables as external Parquet tables from the same
``catalog.TableSpec`` that ``spot-ingest ddl`` prints (the SQL ones run those
very statements), lists a table's partitions, and adds partitions with ADD IF
NOT EXISTS (adding one twice is harmless).

``Registrar`` is what the worker and the streaming job use: ``written()``
queues the partitions of a file whose rows are in place and returns at once;
a thread registers them in batches every ``catalog.batch_seconds``. A
registration that fails is logged and retried with backoff; ingest never
waits for it, and nothing is lost when the process stops first: at its start
the registrar (like ``spot-ingest catalog sync``) compares the partitions in
the store with the catalog's and adds the missing ones.
"""
from __future__ import annotations

import logging
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Protocol

from .catalog import (CatalogError, TableSpec, add_partitions_statement, create_statements,
                      qualified_name, quoted, table_specs)
from .config import CatalogConfig, IngestConfig
from .policy import Backoff, RetryLater
from .progress import progress
from .store import Store, open_store

log = logging.getLogger(__name__)
# Thrift logs every refused connection at ERROR itself; ours says it once, with context.
logging.getLogger("thrift.transport.TSocket").setLevel(logging.CRITICAL)

# Partitions per ADD request: one metastore transaction, one statement.
ADD_BATCH = 200

PARQUET_SERDE = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
PARQUET_INPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat"
PARQUET_OUTPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat"


class CatalogUnavailable(RetryLater):
    """The catalog did not answer (down, unreachable, timed out): try later."""

    def __init__(self, message: str, retry_after: float = 5.0):
        super().__init__(message, retry_after)


class Catalog(Protocol):
    """What spot-ingest asks of a catalog. Every method raises
    ``CatalogUnavailable`` when the catalog cannot be reached and
    ``CatalogError`` when it refuses (the message names the table)."""

    def ensure_table(self, dbname: str, spec: TableSpec) -> bool:
        """Create the database and the table if missing; True if created."""
    def partitions(self, dbname: str, spec: TableSpec) -> set[str]:
        """The table's registered partitions as directories (``y=2016/m=5/...``)."""
    def add_partitions(self, dbname: str, spec: TableSpec, rel_dirs: list[str]) -> None:
        """Register partitions at their default locations; existing ones are kept."""
    def close(self) -> None: ...


# -- a Hive metastore over Thrift ---------------------------------------------

def service_principal(pattern: str, host: str) -> str:
    """The metastore's principal on ``host``: ``_HOST`` in ``pattern``
    replaced by the host name in lower case, as Hadoop's SecurityUtil does."""
    service, _, rest = pattern.partition("/")
    instance, _, realm = rest.partition("@")
    if instance == "_HOST":
        instance = host.lower()
    return f"{service}/{instance}@{realm}" if realm else f"{service}/{instance}"


class MetastoreCatalog:
    """A Hive metastore over Thrift, the URIs tried in order. With
    ``config.kerberos_principal`` the connection authenticates with SASL
    GSSAPI: the ticket is that of a ``KeytabLogin`` over the hdfs section's
    settings and credential cache directory, i.e. the same cache file as
    the HDFS store's login in this process (``ensure()`` before each
    connection renews it when due). ``close()`` leaves that cache alone:
    the store may still use it.

    A metastore or KDC that cannot be reached is ``CatalogUnavailable``;
    a refused authentication or a login that cannot work (wrong keytab,
    unknown principal) is ``CatalogError`` naming the principal."""

    def __init__(self, config: CatalogConfig):
        self.config = config
        self.client = None
        self.transport = None
        self.uri = None
        self.login = None
        if config.kerberos_principal:
            from .kerberos import KeytabLogin
            self.login = KeytabLogin(config.kerberos, config.kerberos_state_dir)

    def _ticket_cache(self) -> str:
        """The login's cache, with a ticket that is not about to expire."""
        from .kerberos import KerberosError, KerberosUnavailable
        try:
            self.login.ensure()
        except KerberosUnavailable as exc:
            raise CatalogUnavailable(f"Hive metastore {', '.join(self.config.uris)}: {exc}",
                                     exc.retry_after) from None
        except KerberosError as exc:
            raise CatalogError(f"Hive metastore {', '.join(self.config.uris)}: {exc}") from None
        return self.login.ccache_name

    def _connect(self):
        from pymetastore.hive_metastore import ThriftHiveMetastore
        from thrift.protocol import TBinaryProtocol
        from thrift.transport import TSocket, TTransport

        from .thrift_sasl import SaslError, SaslUnavailable, TSaslGssapiTransport
        ccache = self._ticket_cache() if self.login is not None else None
        errors, refused = [], []
        for uri in self.config.uris:
            host, port = uri.removeprefix("thrift://").rsplit(":", 1)
            sock = TSocket.TSocket(host, int(port))
            sock.setTimeout(self.config.timeout * 1000)
            if ccache is not None:
                transport = TSaslGssapiTransport(
                    sock, service_principal(self.config.kerberos_principal, host), ccache,
                    f"{host}:{port}")
            else:
                transport = TTransport.TBufferedTransport(sock)
            try:
                transport.open()
            except SaslUnavailable as exc:   # the KDC, not this metastore: the next may do
                errors.append(str(exc))
                continue
            except SaslError as exc:         # refused here; another may accept
                refused.append(f"{exc} (catalog.kerberos_principal is "
                               f"{self.config.kerberos_principal})")
                continue
            except Exception as exc:   # TTransportException or OSError: try the next
                errors.append(f"{uri}: {exc}")
                continue
            self.transport, self.uri = transport, uri
            self.client = ThriftHiveMetastore.Client(TBinaryProtocol.TBinaryProtocol(transport))
            return self.client
        if refused:
            raise CatalogError("; ".join(refused + errors))
        raise CatalogUnavailable(f"no Hive metastore answers ({'; '.join(errors)})")

    def _call(self, what: str, action):
        """``action(client)``; a broken connection is closed (the next call
        reconnects) and reported as CatalogUnavailable."""
        from pymetastore.hive_metastore.ttypes import MetaException
        from thrift.Thrift import TApplicationException
        from thrift.transport.TTransport import TTransportException
        client = self.client or self._connect()
        try:
            return action(client)
        except (TTransportException, OSError, socket.timeout, EOFError) as exc:
            self.close()
            hint = ""
            if (self.login is None and isinstance(exc, TTransportException)
                    and exc.type == TTransportException.END_OF_FILE):
                # What a metastore with hive.metastore.sasl.enabled does to a plain client.
                hint = (" (if the metastore requires Kerberos, set catalog.kerberos_principal "
                        "to its hive.metastore.kerberos.principal)")
            raise CatalogUnavailable(f"Hive metastore {self.uri}: {what}: {exc}{hint}") from None
        except (MetaException, TApplicationException) as exc:
            raise CatalogError(f"Hive metastore {self.uri}: {what}: "
                               f"{getattr(exc, 'message', None) or exc}") from None

    def ensure_table(self, dbname: str, spec: TableSpec) -> bool:
        from pymetastore.hive_metastore.ttypes import (AlreadyExistsException, Database,
                                                       GetTableRequest, NoSuchObjectException)

        def database(client):
            try:
                client.get_database(dbname)
            except NoSuchObjectException:
                try:   # no location: the metastore's warehouse, as CREATE DATABASE does
                    client.create_database(Database(name=dbname, description="", parameters={}))
                except AlreadyExistsException:
                    pass
        self._call(f"create database {dbname}", database)

        def table(client):
            try:   # get_table_req: Hive 4 no longer answers the older get_table
                client.get_table_req(GetTableRequest(dbName=dbname, tblName=spec.name))
                return False
            except NoSuchObjectException:
                pass
            try:
                client.create_table(thrift_table(dbname, spec))
                return True
            except AlreadyExistsException:
                return False
        return self._call(f"create table {dbname}.{spec.name}", table)

    def partitions(self, dbname: str, spec: TableSpec) -> set[str]:
        return set(self._call(f"list the partitions of {dbname}.{spec.name}",
                              lambda c: c.get_partition_names(dbname, spec.name, -1)))

    def add_partitions(self, dbname: str, spec: TableSpec, rel_dirs: list[str]) -> None:
        from pymetastore.hive_metastore.ttypes import AddPartitionsRequest
        for start in range(0, len(rel_dirs), ADD_BATCH):
            chunk = rel_dirs[start:start + ADD_BATCH]
            parts = [thrift_partition(dbname, spec, d) for d in chunk]
            self._call(f"add {len(chunk)} partition(s) to {dbname}.{spec.name}",
                       lambda c: c.add_partitions_req(AddPartitionsRequest(
                           dbName=dbname, tblName=spec.name, parts=parts, ifNotExists=True,
                           needResult=False)))

    def close(self) -> None:
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:   # closing a broken socket; nothing to keep
                pass
        self.client = self.transport = None


def _storage(spec: TableSpec, location: str):
    from pymetastore.hive_metastore.ttypes import FieldSchema, SerDeInfo, StorageDescriptor
    return StorageDescriptor(
        cols=[FieldSchema(n, t.lower(), None) for n, t in spec.columns], location=location,
        inputFormat=PARQUET_INPUT, outputFormat=PARQUET_OUTPUT, compressed=False,
        numBuckets=-1, bucketCols=[], sortCols=[], parameters={},
        serdeInfo=SerDeInfo(serializationLib=PARQUET_SERDE,
                            parameters={"serialization.format": "1"}))


def thrift_table(dbname: str, spec: TableSpec):
    """The metastore object that Hive's CREATE EXTERNAL TABLE ... STORED AS
    PARQUET LOCATION ... (``catalog.create_statements``) makes."""
    from pymetastore.hive_metastore.ttypes import FieldSchema, Table
    return Table(tableName=spec.name, dbName=dbname, owner=None, createTime=int(time.time()),
                 lastAccessTime=0, retention=0, sd=_storage(spec, spec.location),
                 partitionKeys=[FieldSchema(n, t.lower(), None) for n, t in spec.partition_columns],
                 parameters={"EXTERNAL": "TRUE"}, tableType="EXTERNAL_TABLE")


def thrift_partition(dbname: str, spec: TableSpec, rel_dir: str):
    from pymetastore.hive_metastore.ttypes import Partition
    return Partition(values=spec.partition_values(rel_dir), dbName=dbname, tableName=spec.name,
                     sd=_storage(spec, f"{spec.location}/{rel_dir.strip('/')}"), parameters={},
                     createTime=int(time.time()), lastAccessTime=0)


# -- SQL catalogs: Spark SQL or HiveServer2 -----------------------------------

class SqlCatalog:
    """A catalog reached by running the Hive statements of ``catalog``."""

    def run(self, statement: str) -> list[str]:
        """Run one statement; the first column of each result row."""
        raise NotImplementedError

    def ensure_table(self, dbname: str, spec: TableSpec) -> bool:
        existed = (dbname in self.run(f"SHOW DATABASES LIKE '{dbname}'") and spec.name in
                   self.run(f"SHOW TABLES IN {quoted(dbname)} LIKE '{spec.name}'"))
        for statement in create_statements(dbname, spec, "hive"):
            self.run(statement)
        return not existed

    def partitions(self, dbname: str, spec: TableSpec) -> set[str]:
        return set(self.run(f"SHOW PARTITIONS {qualified_name(dbname, spec.name)}"))

    def add_partitions(self, dbname: str, spec: TableSpec, rel_dirs: list[str]) -> None:
        for start in range(0, len(rel_dirs), ADD_BATCH):
            self.run(add_partitions_statement(dbname, spec, rel_dirs[start:start + ADD_BATCH]))

    def close(self) -> None:
        pass


class SparkCatalog(SqlCatalog):
    """A Spark session with Hive support: the running one (the streaming
    job's, made with Hive support when this catalog is configured), or a
    local one with ``catalog.conf``."""

    def __init__(self, config: CatalogConfig, session=None):
        self.config, self.session = config, session

    def _session(self):
        if self.session is None:
            from pyspark.sql import SparkSession
            builder = (SparkSession.builder.master("local[1]").appName("spot-ingest-catalog")
                       .config("spark.ui.enabled", "false")
                       .config("spark.sql.catalogImplementation", "hive"))
            for key, value in self.config.conf:
                builder = builder.config(key, value)
            self.session = builder.getOrCreate()
        return self.session

    def run(self, statement: str) -> list[str]:
        try:
            rows = self._session().sql(statement).collect()
        except Exception as exc:
            message = str(exc).splitlines()[0][:500]
            if any(s in str(exc) for s in ("TTransportException", "Connection refused",
                                           "Unable to instantiate", "SocketTimeout")):
                raise CatalogUnavailable(f"Spark catalog: {message}") from None
            raise CatalogError(f"Spark catalog: {statement.splitlines()[0]}: {message}") from None
        return [r[1] if len(r) > 1 and statement.startswith("SHOW TABLES") else r[0]
                for r in rows]


class BeelineCatalog(SqlCatalog):
    """HiveServer2 through beeline (``catalog.beeline``, else ``beeline`` on
    the PATH, else the BeeLine class in PySpark's jars with ``java``), one
    beeline per batch of statements, run with an argument list."""

    def __init__(self, config: CatalogConfig):
        self.config = config

    def command(self) -> list[str]:
        if self.config.beeline:
            return [self.config.beeline]
        if found := shutil.which("beeline"):
            return [found]
        import pyspark
        jars = Path(pyspark.__file__).parent / "jars"
        java = shutil.which("java")
        if not java or not jars.is_dir():
            raise CatalogError("catalog type hiveserver2: no beeline on the PATH, and no java "
                               "with PySpark's jars to run one; set catalog.beeline")
        return [java, "-cp", f"{jars}/*", "org.apache.hive.beeline.BeeLine"]

    def run(self, statement: str) -> list[str]:
        args = [*self.command(), "-u", self.config.url, "--silent=true", "--showHeader=false",
                "--outputformat=tsv2", "-e", statement]
        if self.config.user:
            args[len(self.command()):len(self.command())] = ["-n", self.config.user]
        if self.config.password_file:
            args[len(self.command()):len(self.command())] = ["-w", str(self.config.password_file)]
        try:
            done = subprocess.run(args, capture_output=True, text=True, errors="replace",
                                  stdin=subprocess.DEVNULL, timeout=self.config.timeout + 60)
        except OSError as exc:
            raise CatalogError(f"catalog type hiveserver2: cannot run {args[0]}: "
                               f"{exc.strerror}") from None
        except subprocess.TimeoutExpired:
            raise CatalogUnavailable(f"HiveServer2 {self.config.url}: beeline did not finish "
                                     f"within {self.config.timeout + 60:.0f} s") from None
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("Error")),
                          lines[-1] if lines else f"beeline exited with {done.returncode}")
            if any(s in done.stderr for s in ("Could not open client transport",
                                              "No current connection")):
                raise CatalogUnavailable(f"HiveServer2 {self.config.url}: {detail[:500]}")
            raise CatalogError(f"HiveServer2 {self.config.url}: {statement.splitlines()[0]}: "
                               f"{detail[:500]}")
        values = []
        for line in done.stdout.splitlines():
            line = _PROMPT.sub("", line).strip()
            if line:
                cells = line.split("\t")
                # SHOW TABLES: Hive gives the name; Spark's server (database, name, temporary).
                values.append(cells[1] if statement.startswith("SHOW TABLES") and len(cells) > 1
                              else cells[0])
        return values


# beeline prints its prompt before the first row even with --silent.
_PROMPT = re.compile(r"^(\d+: )?jdbc:hive2://\S*> ?")


def open_catalog(config: CatalogConfig, session=None) -> Catalog | None:
    """The configured catalog (None for type "none")."""
    if config.type == "hive-metastore":
        return MetastoreCatalog(config)
    if config.type == "spark":
        return SparkCatalog(config, session)
    if config.type == "hiveserver2":
        return BeelineCatalog(config)
    return None


# -- what is in the store -----------------------------------------------------

def stored_partitions(store: Store, spec: TableSpec) -> set[str]:
    """The partition directories of a table that hold at least one Parquet file."""
    depth = len(spec.partition_columns)
    found = set()
    for relative in store.list(f"{spec.name}/hive", ".parquet"):
        parts = relative.split("/")
        if len(parts) == depth + 1 and not any(p.startswith((".", "_")) for p in parts):
            found.add("/".join(parts[:-1]))
    return found


def sync(cfg: IngestConfig, spec: TableSpec, catalog: Catalog, store: Store | None = None
         ) -> tuple[int, int]:
    """Create the table if missing and register every partition in the
    store that the catalog lacks: (registered now, registered before)."""
    catalog.ensure_table(cfg.dbname, spec)
    stored = stored_partitions(store or open_store(cfg.store), spec)
    known = catalog.partitions(cfg.dbname, spec)
    missing = sorted(stored - known)
    with progress(len(missing), "partition", f"register {spec.name}") as bar:
        for start in range(0, len(missing), ADD_BATCH):
            chunk = missing[start:start + ADD_BATCH]
            catalog.add_partitions(cfg.dbname, spec, chunk)
            bar.update(len(chunk))
    return len(missing), len(stored & known)


# -- registration beside ingest -----------------------------------------------

class Registrar(threading.Thread):
    """Registers the partitions a process writes, without holding it up.

    ``written(table, dirs)`` queues and returns. The thread first makes the
    tables and registers what the store holds and the catalog lacks (the
    catch-up after an outage or a stop), then every ``batch_seconds`` adds
    what was queued, one request per table. A failure is logged with what
    waits and retried with backoff, for as long as the process runs;
    ``close()`` gives it until ``catalog.timeout`` to finish and says what
    is left for ``spot-ingest catalog sync``."""

    def __init__(self, cfg: IngestConfig, tables: Iterable[str], session=None):
        super().__init__(name="catalog-registrar", daemon=True)
        self.cfg = cfg
        self.specs = {t: s for t, s in table_specs(cfg).items() if t in set(tables)}
        self.catalog = open_catalog(cfg.catalog, session)
        self.queue: queue.Queue = queue.Queue()
        self.pending: dict[str, set[str]] = {t: set() for t in self.specs}
        self.registered: dict[str, set[str]] = {t: set() for t in self.specs}
        self.ready = False              # tables made and caught up
        self.stopping = threading.Event()
        self.idle = threading.Event()   # nothing pending (after the catch-up)
        self.failures = 0
        self.count = 0                  # partitions registered by this process

    def written(self, table: str, rel_dirs: Iterable[str]) -> None:
        if table in self.specs:
            dirs = set(rel_dirs) - self.registered[table]
            if dirs:   # queued first: the thread sets ``idle`` only after seeing the queue empty
                self.queue.put((table, dirs))
                self.idle.clear()

    def run(self) -> None:
        backoff = Backoff(1.0, 60.0)
        while not self.stopping.is_set():
            self._drain(self.cfg.catalog.batch_seconds if self.ready else 0)
            try:
                if not self.ready:
                    self._catch_up()
                self._register()
            except (CatalogUnavailable, CatalogError) as exc:
                self.failures += 1
                delay = backoff.delay(getattr(exc, "retry_after", None))
                waiting = sum(len(d) for d in self.pending.values())
                log.warning("catalog: %s; %s; retry %d in %.0f s (the rows are in the table; "
                            "only their registration waits)", exc,
                            f"{waiting} partition(s) wait" if self.ready else
                            "tables and partitions not yet checked", backoff.attempts, delay)
                self.stopping.wait(delay)
                continue
            if backoff.attempts:
                log.info("catalog %s answers again after %d failed attempt(s); registration "
                         "caught up", self.cfg.catalog.describe(), backoff.attempts)
            backoff.reset()
            if not any(self.pending.values()) and self.queue.empty():
                self.idle.set()

    def _drain(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        while True:
            try:
                table, dirs = self.queue.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                self.pending[table] |= dirs
            except queue.Empty:
                if time.monotonic() >= deadline or self.stopping.is_set():
                    return

    def _catch_up(self) -> None:
        store = open_store(self.cfg.store)
        for table, spec in self.specs.items():
            if self.catalog.ensure_table(self.cfg.dbname, spec):
                log.info("catalog: created table %s.%s at %s", self.cfg.dbname, table,
                         spec.location)
            added, before = sync(self.cfg, spec, self.catalog, store)
            self.registered[table] |= stored_partitions(store, spec)
            if added:
                log.info("catalog: caught up %d partition(s) of %s.%s written while they "
                         "were not registered (%d already were)", added, self.cfg.dbname,
                         table, before)
        self.ready = True

    def _register(self) -> None:
        for table, dirs in self.pending.items():
            todo = sorted(dirs - self.registered[table])
            if todo:
                self.catalog.add_partitions(self.cfg.dbname, self.specs[table], todo)
                self.registered[table] |= set(todo)
                self.count += len(todo)
                log.info("catalog: registered %d partition(s) of %s.%s: %s", len(todo),
                         self.cfg.dbname, table, ", ".join(todo[:5]) +
                         (f" and {len(todo) - 5} more" if len(todo) > 5 else ""))
            dirs.clear()

    def close(self, timeout: float | None = None) -> int:
        """Wait until what was queued is registered (at most ``timeout``,
        default ``catalog.timeout``), stop, and return how many partitions
        were left unregistered (logged, with the command that adds them)."""
        if self.is_alive():
            self.idle.wait(self.cfg.catalog.timeout if timeout is None else timeout)
        self.stopping.set()
        if self.is_alive():
            self.join(self.cfg.catalog.timeout)
        self._drain(0)
        left = sum(len(d - self.registered[t]) for t, d in self.pending.items())
        if left or not self.ready:
            log.warning("catalog: %s; run 'spot-ingest catalog sync -t PIPELINE' when %s "
                        "answers (the rows are in the table)",
                        f"{left} partition(s) not registered" if self.ready else
                        "tables and partitions not checked", self.cfg.catalog.describe())
        if self.catalog is not None:
            self.catalog.close()
        return left


def start_registrar(cfg: IngestConfig, table: str, session=None) -> Registrar | None:
    """A running registrar for ``table``, or None without a catalog."""
    if not cfg.catalog.enabled:
        return None
    registrar = Registrar(cfg, [table], session)
    registrar.start()
    return registrar
