"""The catalog against a Kerberized Hive metastore (Hive 2.3's, from PySpark's
jars, with ``hive.metastore.sasl.enabled``), over SASL GSSAPI with the
ticket of the hdfs section's keytab login, all against a real MIT KDC
(tests/kdc.py): tables and partitions registered and read back, a plain
client refused, the one-line errors for a wrong service principal, a
principal without a key, an expired ticket and a KDC that is down, and
the RFC 4752 security layer exchange checked byte by byte against a
GSSAPI acceptor of the test's own.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

gssapi = pytest.importorskip("gssapi")
from thrift.transport import TSocket  # noqa: E402
from thrift.transport.TTransport import TTransportException  # noqa: E402

from conftest import REPO, wait_for  # noqa: E402
from kdc import make_acceptor, standard_realm  # noqa: E402
from metastore import HiveMetastore, MetastoreKerberos  # noqa: E402
from webhdfs import WebHdfsStandIn  # noqa: E402

from spot_ingest.catalog import CatalogError, table_specs  # noqa: E402
from spot_ingest.config import load  # noqa: E402
from spot_ingest.kerberos import KerberosSettings, KeytabLogin  # noqa: E402
from spot_ingest.metastore import CatalogUnavailable, MetastoreCatalog, open_catalog  # noqa: E402
from spot_ingest.policy import RetryLater  # noqa: E402
from spot_ingest.store import open_store  # noqa: E402
from spot_ingest.thrift_sasl import (COMPLETE, OK, START, SaslError,  # noqa: E402
                                     TSaslGssapiTransport, encode_message)

PARTITIONS = ["y=2016/m=5/d=21/h=13", "y=2016/m=5/d=21/h=14"]


@pytest.fixture(scope="module")
def hms(kdc, tmp_path_factory):
    """A Kerberized metastore: service principal hive/127.0.0.1@SPOT.TEST
    (its key in its own keytab). The test's own reads (``hms.call``) go
    over SASL as reader@SPOT.TEST, so that what spot@SPOT.TEST did is
    told apart in the metastore's audit log."""
    root = tmp_path_factory.mktemp("kerberized-metastore")
    hive_keytab = root / "hive.keytab"
    reader_keytab = root / "reader.keytab"
    kdc.principal("hive/127.0.0.1", hive_keytab)
    kdc.principal("nokey/127.0.0.1")       # known to the KDC, in no keytab of the metastore
    kdc.principal("ghost")                 # a client principal without a key in any keytab
    reader = kdc.principal("reader", reader_keytab)
    with kdc.client_environment(root / "krb5cc.default"):
        login = KeytabLogin(KerberosSettings(reader, reader_keytab), root / "reader")
        login.ensure()
        metastore = HiveMetastore(root / "hms", MetastoreKerberos(
            f"hive/127.0.0.1@{kdc.realm}", hive_keytab, kdc.krb5_conf, login.ccache_name))
        metastore.start()
    yield metastore
    metastore.stop()


def write_config(tmp_path: Path, kdc, catalog: dict, hdfs_url: str = "http://localhost:1",
                 **kerberos) -> Path:
    """An ingest_conf.json with a flow pipeline, the given catalog section
    and an hdfs section with Kerberos (spot's keytab). Nothing listens at
    the default namenode URL: loading the file and using the catalog must
    not need it."""
    collector = tmp_path / "collector"
    collector.mkdir(exist_ok=True)
    data = {
        "dbname": f"spot_{uuid.uuid4().hex[:8]}",
        # An absolute path: on HDFS here, and what the metastore resolves
        # against its own (local) file system: it stays in the test's folder.
        "hdfs_app_path": str(tmp_path / "app"),
        "kafka": {"kafka_server": "127.0.0.1", "kafka_port": "9092"},
        "pipelines": {"flow_k": {"type": "flow", "collector_path": str(collector)}},
        "hdfs": {"url": hdfs_url, "timeout": 10, "scratch_dir": str(tmp_path / "scratch"),
                 "kerberos": {"principal": kdc.client_principal,
                              "keytab": str(kdc.client_keytab), **kerberos}},
        "catalog": catalog,
    }
    path = tmp_path / "ingest_conf.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def kerberized(hms: HiveMetastore, principal: str = "hive/_HOST@SPOT.TEST",
               host: str = "127.0.0.1") -> dict:
    return {"type": "hive-metastore", "uri": f"thrift://{host}:{hms.port}",
            "kerberos_principal": principal, "timeout": 20}


def klist(ccache: str) -> str:
    done = subprocess.run(["klist", "-c", ccache], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=30,
                          env=dict(os.environ, LC_ALL="C"))
    assert done.returncode == 0, done.stderr
    return done.stdout


def sync(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spot_ingest.cli", "catalog", "sync", "-t",
                           "flow_k", "-c", str(config)], capture_output=True, text=True,
                          timeout=180, cwd=REPO, stdin=subprocess.DEVNULL)


# -- against the Kerberized metastore --------------------------------------------

def test_tables_and_partitions_are_registered_over_sasl_with_the_hdfs_login(
        krb5_env, hms, tmp_path):
    cfg = load(write_config(tmp_path, krb5_env, kerberized(hms)))
    spec = table_specs(cfg)["flow"]
    catalog = open_catalog(cfg.catalog)
    assert isinstance(catalog, MetastoreCatalog)
    try:
        assert catalog.ensure_table(cfg.dbname, spec) is True
        assert catalog.ensure_table(cfg.dbname, spec) is False
        catalog.add_partitions(cfg.dbname, spec, PARTITIONS)
        catalog.add_partitions(cfg.dbname, spec, PARTITIONS[:1])   # again: kept, no error
        assert catalog.partitions(cfg.dbname, spec) == set(PARTITIONS)
    finally:
        catalog.close()

    # Another SASL connection, another principal, reads them back.
    assert hms.partitions(cfg.dbname, "flow") == set(PARTITIONS)
    table = hms.call("get_table", cfg.dbname, "flow")
    # The HDFS path, qualified by the metastore with its default file system (here file:).
    assert table.tableType == "EXTERNAL_TABLE" and table.sd.location == f"file:{spec.location}"
    # The metastore knew the catalog's connection as spot (its audit log:
    # the test's own reads are reader's).
    wait_for(lambda: f"ugi={krb5_env.client_principal}\tip=127.0.0.1\tcmd=add_partitions"
             in hms.hive_log(), 60, "the metastore's audit of spot's add_partitions")
    assert "ugi=reader@SPOT.TEST\tip=127.0.0.1\tcmd=get_table" in hms.hive_log()

    # The ticket came from the HDFS store's credential cache of this process
    # (its keytab login): _HOST became the URI's host.
    cache = tmp_path / "scratch" / "kerberos" / f"krb5cc_spot_{os.getpid()}"
    assert catalog.login.ccache == cache
    listed = klist(f"FILE:{cache}")
    assert "Default principal: spot@SPOT.TEST" in listed
    assert "hive/127.0.0.1@SPOT.TEST" in listed
    assert open_store(cfg.store).login.ccache == cache


def test_catalog_sync_lists_kerberized_hdfs_and_registers_with_the_same_ticket(
        krb5_env, hms, tmp_path):
    """``spot-ingest catalog sync`` in a process of its own: the store's
    partitions listed through a WebHDFS that demands SPNEGO, registered in
    the metastore over SASL, both from one configured credential cache."""
    with WebHdfsStandIn(tmp_path / "hdfs", negotiate=make_acceptor(krb5_env.service_keytab)
                        ) as namenode:
        shared = tmp_path / "krb5cc_shared"
        config = write_config(tmp_path, krb5_env, kerberized(hms),
                              hdfs_url=namenode.url.replace("127.0.0.1", "localhost"),
                              ccache=str(shared))
        db = json.loads(config.read_text())["dbname"]
        hive = tmp_path / "hdfs" / str(tmp_path / "app").lstrip("/") / "flow" / "hive"
        for rel in PARTITIONS:
            (hive / rel).mkdir(parents=True)
            (hive / rel / "part-0.parquet").write_bytes(b"PAR1")
        done = sync(config)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{db}.flow: registered 2 partition(s); 0 were registered already" in done.stdout
        assert {r[4] for r in namenode.requests} - {None} == {"spot"}
        again = sync(config)
        assert "registered 0 partition(s); 2 were registered already" in again.stdout, \
            again.stderr[-3000:]
    assert hms.partitions(db, "flow") == set(PARTITIONS)
    wait_for(lambda: f"ugi={krb5_env.client_principal}\tip=127.0.0.1\tcmd=add_partitions"
             in hms.hive_log(), 60, "the metastore's audit of spot's add_partitions")
    # The catalog's login and the store's: the same keytab, the same cache,
    # and no other cache made (the private ones are in scratch/kerberos).
    logins = [line for line in done.stderr.splitlines() if "Kerberos: logged in as" in line]
    assert logins and all(f"cache FILE:{shared})" in line for line in logins), done.stderr
    assert "Default principal: spot@SPOT.TEST" in klist(f"FILE:{shared}")
    assert not list((tmp_path / "scratch" / "kerberos").glob("krb5cc_spot_*"))


def test_a_client_without_sasl_is_refused_and_told_what_to_set(krb5_env, hms, tmp_path):
    plain = hms.client(sasl=False)
    try:
        with pytest.raises(TTransportException):
            plain.get_all_databases()
    finally:
        plain._transport.close()

    cfg = load(write_config(tmp_path, krb5_env, {"type": "hive-metastore", "uri": hms.uri,
                                                  "timeout": 20}))
    catalog = open_catalog(cfg.catalog)
    with pytest.raises(CatalogUnavailable) as err:
        catalog.ensure_table(cfg.dbname, table_specs(cfg)["flow"])
    catalog.close()
    message = str(err.value)
    assert hms.uri in message and "set catalog.kerberos_principal" in message
    assert "\n" not in message
    assert cfg.dbname not in hms.call("get_all_databases")   # SASL clients are still served


@pytest.mark.parametrize("host, principal, named, reason", [
    # _HOST follows the URI: hive/localhost is no principal of the realm.
    ("localhost", "hive/_HOST@SPOT.TEST", "hive/localhost@SPOT.TEST",
     "Server hive/localhost@SPOT.TEST not found in Kerberos database"),
    # A real principal, but the metastore holds no key for it.
    ("127.0.0.1", "nokey/_HOST@SPOT.TEST", "nokey/127.0.0.1@SPOT.TEST",
     "the server refused the authentication (BAD: GSS initiate failed)"),
])
def test_a_wrong_service_principal_is_one_line_naming_it(krb5_env, hms, tmp_path, host,
                                                         principal, named, reason):
    config = write_config(tmp_path, krb5_env, kerberized(hms, principal, host))
    done = sync(config)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert named in errors[0] and reason in errors[0]
    assert f"{host}:{hms.port}" in errors[0] and f"kerberos_principal is {principal}" in errors[0]

    # In-process: a CatalogError (refused; not a RetryLater), one line.
    cfg = load(config)
    with pytest.raises(CatalogError) as err:
        open_catalog(cfg.catalog).ensure_table(cfg.dbname, table_specs(cfg)["flow"])
    assert not isinstance(err.value, RetryLater)
    assert named in str(err.value) and "\n" not in str(err.value)
    assert cfg.dbname not in hms.call("get_all_databases")


def test_a_client_principal_without_a_key_is_one_line_naming_it(krb5_env, hms, tmp_path):
    cfg = load(write_config(tmp_path, krb5_env, kerberized(hms), principal="ghost@SPOT.TEST"))
    with pytest.raises(CatalogError) as err:
        open_catalog(cfg.catalog).ensure_table(cfg.dbname, table_specs(cfg)["flow"])
    message = str(err.value)
    assert not isinstance(err.value, RetryLater) and "\n" not in message
    assert "ghost@SPOT.TEST" in message and str(krb5_env.client_keytab) in message
    assert hms.uri in message


# -- the transport on its own -----------------------------------------------------

def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[int, bytes]:
    status, length = struct.unpack(">BI", recv_exact(sock, 5))
    return status, recv_exact(sock, length)


def serve(script) -> tuple[TSocket.TSocket, dict, threading.Thread]:
    """``script(sock, record)`` on the server end of a socket pair, in a thread."""
    server, client = socket.socketpair()
    for s in (server, client):
        s.settimeout(20)
    record: dict = {}

    def run():
        try:
            script(server, record)
        except EOFError:
            record["closed"] = True
        except BaseException as exc:   # checked by the test
            record["error"] = exc
        finally:
            server.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    handle = TSocket.TSocket()
    handle.setHandle(client)
    return handle, record, thread


def gssapi_server(keytab: Path, offer: bytes):
    """The server side of SASL GSSAPI as RFC 4752 has it, with a real
    acceptor: the AP-REP, the wrapped ``offer``, the client's unwrapped
    answer recorded, then one frame echoed."""
    def script(sock, record):
        creds = gssapi.Credentials(usage="accept", store={
            "keytab": f"FILE:{keytab}", "rcache": f"file2:{keytab}.rcache2"})
        ctx = gssapi.SecurityContext(usage="accept", creds=creds)
        record["start"] = read_message(sock)
        _, token = read_message(sock)
        sock.sendall(encode_message(OK, ctx.step(token) or b""))
        record["after_ap_rep"] = read_message(sock)
        record["initiator"] = str(ctx.initiator_name)
        sock.sendall(encode_message(OK, ctx.wrap(offer, False).message))
        status, answer = read_message(sock)
        unwrapped = ctx.unwrap(answer)
        record["answer"] = (status, unwrapped.message, unwrapped.encrypted)
        sock.sendall(encode_message(COMPLETE))
        (length,) = struct.unpack(">I", recv_exact(sock, 4))
        data = recv_exact(sock, length)
        sock.sendall(struct.pack(">I", len(data)) + data)
    return script


def client_ccache(kdc, tmp_path: Path) -> str:
    login = KeytabLogin(KerberosSettings(kdc.client_principal, kdc.client_keytab), tmp_path)
    login.ensure()
    return login.ccache_name


def test_the_security_layer_answer_is_auth_only_wrapped_for_the_acceptor(krb5_env, tmp_path):
    sock, record, thread = serve(gssapi_server(krb5_env.service_keytab,
                                               bytes([7, 0x00, 0x10, 0x00])))
    t = TSaslGssapiTransport(sock, krb5_env.service_principal,
                             client_ccache(krb5_env, tmp_path), "in-process")
    t.open()
    t.write(b"ping")
    t.flush()
    assert t.readAll(4) == b"ping"
    t.close()
    thread.join(20)
    assert "error" not in record, record.get("error")
    assert record["start"] == (START, b"GSSAPI")
    assert record["after_ap_rep"] == (OK, b"")        # the client's empty answer to the AP-REP
    assert record["initiator"] == "spot@SPOT.TEST"
    # Layer "none", maximum size 0, no authorization id; signed, not encrypted.
    assert record["answer"] == (COMPLETE, b"\x01\x00\x00\x00", False)


def test_a_server_demanding_a_protection_layer_is_refused_with_that_said(krb5_env, tmp_path):
    sock, record, thread = serve(gssapi_server(krb5_env.service_keytab,
                                               bytes([4, 0x00, 0x10, 0x00])))
    t = TSaslGssapiTransport(sock, krb5_env.service_principal,
                             client_ccache(krb5_env, tmp_path), "in-process:1")
    with pytest.raises(SaslError) as err:
        t.open()
    thread.join(20)
    assert "requires a SASL confidentiality layer" in str(err.value)
    assert "in-process:1" in str(err.value) and krb5_env.service_principal in str(err.value)
    assert record.get("closed") and "answer" not in record   # hung up, nothing answered


def test_an_expired_ticket_is_named_before_anything_is_sent(krb5_env, tmp_path):
    cache = tmp_path / "short"
    subprocess.run(["kinit", "-l", "2s", "-k", "-t", str(krb5_env.client_keytab), "-c",
                    f"FILE:{cache}", krb5_env.client_principal], check=True,
                   capture_output=True, stdin=subprocess.DEVNULL, timeout=30)

    def expired() -> bool:
        try:
            return gssapi.Credentials(usage="initiate",
                                      store={"ccache": f"FILE:{cache}"}).lifetime <= 0
        except gssapi.exceptions.ExpiredCredentialsError:
            return True
    wait_for(expired, 30, "the 2-second ticket to expire")

    def script(sock, record):
        record["received"] = sock.recv(100)
    sock, record, thread = serve(script)
    t = TSaslGssapiTransport(sock, "hive/127.0.0.1@SPOT.TEST", f"FILE:{cache}", "ms:9083")
    with pytest.raises(SaslError) as err:
        t.open()
    thread.join(20)
    assert str(err.value).startswith("Kerberos (SASL GSSAPI) authentication to ms:9083 "
                                     "(service principal hive/127.0.0.1@SPOT.TEST): the ticket "
                                     f"in FILE:{cache} has expired")
    assert record["received"] == b""                    # the connection closed, unused


def test_a_kdc_that_is_down_makes_the_catalog_unavailable(tmp_path):
    """A realm of this test's own, stopped: without a ticket the login
    cannot be made; with a TGT but no service ticket, none can be had.
    Both are CatalogUnavailable (retried), naming the principal."""
    listener = socket.create_server(("127.0.0.1", 0))   # a metastore that accepts and waits
    port = listener.getsockname()[1]
    kdc = standard_realm(tmp_path / "kdc")
    try:
        with kdc.client_environment(tmp_path / "krb5cc.default"):
            catalog = {"type": "hive-metastore", "uri": f"thrift://127.0.0.1:{port}",
                       "kerberos_principal": "hive/_HOST@SPOT.TEST", "timeout": 10}
            cfg = load(write_config(tmp_path, kdc, catalog))
            spec = table_specs(cfg)["flow"]
            with_tgt = open_catalog(cfg.catalog)
            with_tgt.login.ensure()
            kdc.stop()

            with pytest.raises(CatalogUnavailable) as err:
                with_tgt.ensure_table(cfg.dbname, spec)
            message = str(err.value)
            assert "hive/127.0.0.1@SPOT.TEST" in message and f"127.0.0.1:{port}" in message
            assert "Cannot contact any KDC" in message and "\n" not in message

            fresh = MetastoreCatalog(dataclasses.replace(cfg.catalog,
                                                         kerberos_state_dir=tmp_path / "other"))
            with pytest.raises(CatalogUnavailable) as err:
                fresh.ensure_table(cfg.dbname, spec)
            assert "spot@SPOT.TEST" in str(err.value) and "\n" not in str(err.value)
            assert "Cannot contact any KDC" in str(err.value)
    finally:
        kdc.stop()
        listener.close()
