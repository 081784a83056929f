"""A real Hive metastore, a real HiveServer2 and an analyst's Spark session,
for the catalog tests.

* ``HiveMetastore``: Hive 2.3's metastore server from PySpark's jars
  (``org.apache.hadoop.hive.metastore.HiveMetaStore``) on an embedded Derby
  database in the test's folder, listening on a free loopback port. Its
  logger needs Debian's libdisruptor-java (``scripts/setup.sh --test``).
* ``SparkThriftServer``: Spark's HiveServer2 (``HiveThriftServer2``, also in
  PySpark's jars), which speaks the HiveServer2 protocol that beeline uses,
  over that metastore.
* ``analyst_counts``: a separate Spark session with Hive support pointed at
  the metastore, as an analyst's on a cluster would be, that counts rows per
  partition through ``dbname.table`` (no MSCK REPAIR, no file listing of its
  own: what it sees is what the metastore registered).

Readiness is a real request answered (a Thrift call, a beeline query), never
a sleep.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyspark

SPARK_HOME = Path(pyspark.__file__).parent
DISRUPTOR = Path("/usr/share/java/disruptor.jar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: "
                               f"{log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s: "
                               f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


@dataclass(frozen=True)
class MetastoreKerberos:
    """What a Kerberized metastore needs: its service principal and keytab,
    the realm's krb5.conf (for its JVM), and a client ticket cache
    (``FILE:...``) that ``client()`` and the readiness check authenticate with."""
    principal: str          # hive/127.0.0.1@SPOT.TEST
    keytab: Path
    krb5_conf: Path
    client_ccache: str


def _site(settings: dict[str, str]) -> str:
    return ("<configuration>\n" + "".join(
        f"  <property><name>{k}</name><value>{v}</value></property>\n"
        for k, v in settings.items()) + "</configuration>\n")


class HiveMetastore:
    """The metastore server; with ``kerberos``, it requires SASL GSSAPI
    (``hive.metastore.sasl.enabled``) and logs in with the given keytab."""

    def __init__(self, root: Path, kerberos: MetastoreKerberos | None = None):
        self.root = root
        self.kerberos = kerberos
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        conf = root / "conf"
        conf.mkdir(exist_ok=True)
        settings = {
            "javax.jdo.option.ConnectionURL":
                f"jdbc:derby:;databaseName={root}/metastore_db;create=true",
            "datanucleus.schema.autoCreateAll": "true",
            "hive.metastore.schema.verification": "false",
            "hive.metastore.warehouse.dir": f"file://{root}/warehouse",
        }
        if kerberos is not None:
            settings.update({
                "hive.metastore.sasl.enabled": "true",
                "hive.metastore.kerberos.keytab.file": str(kerberos.keytab),
                "hive.metastore.kerberos.principal": kerberos.principal,
            })
            # Hadoop's UserGroupInformation reads this from core-site.xml on the class path.
            (conf / "core-site.xml").write_text(_site({
                "hadoop.security.authentication": "kerberos"}))
        (conf / "hive-site.xml").write_text(_site(settings))

    @property
    def uri(self) -> str:
        return f"thrift://127.0.0.1:{self.port}"

    def hive_log(self) -> str:
        """Hive's log of a Kerberized metastore (audit lines: ``ugi=<user> ... cmd=...``)."""
        found = sorted((self.root / "tmp").glob("*/hive.log"))
        return found[0].read_text(errors="replace") if found else ""

    def start(self) -> "HiveMetastore":
        if not DISRUPTOR.is_file():
            raise RuntimeError(f"{DISRUPTOR} is missing: apt-get install libdisruptor-java "
                               f"(scripts/setup.sh --test installs it)")
        log = self.root / "metastore.log"
        jvm = ["-Xmx512m"]
        if self.kerberos is not None:
            # Hive's own log (with the audit lines naming the authenticated
            # user) goes to <java.io.tmpdir>/<user>/hive.log: this one's own.
            jvm += [f"-Djava.security.krb5.conf={self.kerberos.krb5_conf}",
                    f"-Djava.io.tmpdir={self.root / 'tmp'}"]
            (self.root / "tmp").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            ["java", *jvm, "-cp", f"{self.root / 'conf'}:{SPARK_HOME}/jars/*:{DISRUPTOR}",
             "org.apache.hadoop.hive.metastore.HiveMetaStore", "-p", str(self.port)],
            cwd=self.root, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        _wait(self.answers, 120, "the Hive metastore", self.proc, log)
        return self

    def client(self, sasl: bool | None = None, principal: str | None = None):
        """A Thrift client of the metastore (the caller closes ``._transport``):
        with SASL GSSAPI (``spot_ingest.thrift_sasl``, the ticket of
        ``kerberos.client_ccache``, for ``principal``, default the
        metastore's) when the metastore is Kerberized, unless ``sasl`` is False."""
        from pymetastore.hive_metastore import ThriftHiveMetastore
        from thrift.protocol import TBinaryProtocol
        from thrift.transport import TSocket, TTransport
        sock = TSocket.TSocket("127.0.0.1", self.port)
        sock.setTimeout(30000)
        if sasl is None:
            sasl = self.kerberos is not None
        if sasl:
            from spot_ingest.thrift_sasl import TSaslGssapiTransport
            transport = TSaslGssapiTransport(sock, principal or self.kerberos.principal,
                                             self.kerberos.client_ccache, f"127.0.0.1:{self.port}")
        else:
            transport = TTransport.TBufferedTransport(sock)
        transport.open()
        client = ThriftHiveMetastore.Client(TBinaryProtocol.TBinaryProtocol(transport))
        client._transport = transport
        return client

    def answers(self) -> bool:
        try:
            client = self.client()
        except Exception:
            return False
        try:
            return "default" in client.get_all_databases()
        except Exception:
            return False
        finally:
            client._transport.close()

    def call(self, method: str, *args):
        client = self.client()
        try:
            return getattr(client, method)(*args)
        finally:
            client._transport.close()

    def partitions(self, db: str, table: str) -> set[str]:
        return set(self.call("get_partition_names", db, table, -1))

    def stop(self) -> None:
        """Stop it as an operator would (SIGTERM), and wait."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None


def beeline_command() -> list[str]:
    return ["java", "-cp", f"{SPARK_HOME}/jars/*", "org.apache.hive.beeline.BeeLine"]


class SparkThriftServer:
    """HiveServer2 (Spark's) over ``metastore``, on a free loopback port."""

    def __init__(self, root: Path, metastore: HiveMetastore):
        self.root, self.metastore = root, metastore
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"jdbc:hive2://127.0.0.1:{self.port}/default"

    def start(self) -> "SparkThriftServer":
        log = self.root / "hiveserver2.log"
        env = dict(os.environ, SPARK_HOME=str(SPARK_HOME), SPARK_LOCAL_IP="127.0.0.1")
        self.proc = subprocess.Popen(
            [str(SPARK_HOME / "bin" / "spark-submit"), "--class",
             "org.apache.spark.sql.hive.thriftserver.HiveThriftServer2", "--master", "local[1]",
             "--driver-memory", "512m",
             "--conf", f"spark.hadoop.hive.metastore.uris={self.metastore.uri}",
             "--conf", "spark.sql.catalogImplementation=hive", "--conf", "spark.ui.enabled=false",
             "--conf", f"spark.sql.warehouse.dir=file://{self.root}/warehouse",
             "--conf", "spark.driver.bindAddress=127.0.0.1",
             "--hiveconf", f"hive.server2.thrift.port={self.port}",
             "--hiveconf", "hive.server2.thrift.bind.host=127.0.0.1", "spark-internal"],
            cwd=self.root, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        _wait(self.answers, 180, "Spark's HiveServer2", self.proc, log)
        return self

    def answers(self) -> bool:
        done = subprocess.run([*beeline_command(), "-u", self.url, "--silent=true",
                               "-e", "SHOW DATABASES"], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)
        return done.returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.proc = None


_ANALYST = r"""
import json, sys
from pyspark.sql import SparkSession
uri, warehouse, queries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
spark = (SparkSession.builder.master("local[1]").appName("analyst")
         .config("spark.sql.catalogImplementation", "hive")
         .config("spark.hadoop.hive.metastore.uris", uri)
         .config("spark.sql.warehouse.dir", warehouse)
         .config("spark.ui.enabled", "false").config("spark.driver.bindAddress", "127.0.0.1")
         .getOrCreate())
spark.sparkContext.setLogLevel("ERROR")
out = {}
for name, table in queries.items():
    rows = spark.sql(f"SELECT concat('y=', y, '/m=', m, '/d=', d, '/h=', h) AS p, count(*) AS n "
                     f"FROM {table} GROUP BY y, m, d, h").collect()
    out[name] = {r["p"]: r["n"] for r in rows}
print("RESULT " + json.dumps(out))
spark.stop()
"""


def analyst_counts(metastore: HiveMetastore, tables: dict[str, str], workdir: Path
                   ) -> dict[str, dict[str, int]]:
    """Rows per partition of each ``db.table`` as a separate Spark session
    reading through the metastore sees them: {name: {"y=../m=../d=../h=..": rows}}."""
    workdir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _ANALYST, metastore.uri,
                           f"file://{workdir}/warehouse", json.dumps(tables)],
                          capture_output=True, text=True, timeout=300, cwd=workdir)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise AssertionError(f"the analyst's Spark session failed ({done.returncode}): "
                         f"{done.stderr[-3000:]}")
