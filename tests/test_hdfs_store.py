"""The HDFS store against the WebHDFS stand-in (tests/webhdfs.py: no Hadoop
can run here; the stand-in speaks the documented REST protocol: 307 to a
datanode port, RemoteException errors, ``{"boolean": false}`` renames).

Each test names the WebHDFS behaviour it guards against, the ones a POSIX
habit gets wrong."""
from __future__ import annotations

import hashlib
import os

import pytest

from spot_ingest.config import HdfsConfig, StoreLocation
from spot_ingest.hdfs_store import HdfsStore, ScratchFull
from spot_ingest.store import RefusedInput, StoreError, StoreUnavailable
from spot_ingest.warehouse import TableWriter
from tests.webhdfs import WebHdfsStandIn

import pyarrow as pa
import pyarrow.parquet as pq


@pytest.fixture
def webhdfs(tmp_path):
    with WebHdfsStandIn(tmp_path / "hdfs") as server:
        yield server


def hdfs_store(webhdfs, tmp_path, **keys) -> HdfsStore:
    cfg = HdfsConfig(urls=(webhdfs.url,), user="spot", timeout=10,
                     scratch_dir=tmp_path / "scratch", **keys)
    store = HdfsStore(StoreLocation("/user/spot", cfg))
    store.mark()
    return store


def capture(tmp_path, name="nfcapd.202611220800", size=300_000):
    src = tmp_path / "collector" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(os.urandom(size))
    return src


def test_staged_file_appears_complete_under_its_checksum_name_through_a_datanode(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    src = capture(tmp_path)
    staged = store.stage(src, "flow", "router1/" + src.name, 1_795_000_000)
    on_disk = webhdfs.data_dir / "user" / "spot" / staged.location
    assert on_disk.read_bytes() == src.read_bytes()
    assert staged.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert staged.location.startswith("flow/binary/20261118/11/")
    assert f"/router1/{staged.sha256[:16]}-{src.name}" in staged.location
    # The upload went to a datanode (a 307 from the namenode), as user spot.
    creates = [r for r in webhdfs.requests if r[2] == "CREATE"]
    assert creates and all(r[4] == "spot" for r in creates)
    # Staged again: the same name, one file, nothing left in _incoming.
    again = store.stage(src, "flow", "router1/" + src.name, 1_795_000_000)
    assert again.location == staged.location
    assert len(list(on_disk.parent.iterdir())) == 1
    assert not list((webhdfs.data_dir / "user/spot/flow/_incoming").iterdir())


def test_fetch_copies_to_scratch_and_removes_it_after(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    src = capture(tmp_path)
    staged = store.stage(src, "flow", src.name, 1_795_000_000)
    with store.fetch(staged.location) as copy:
        assert copy.path.read_bytes() == src.read_bytes()
        assert str(copy.path).startswith(str(tmp_path / "scratch"))
        assert os.fstat(copy.fd).st_size == src.stat().st_size
    assert not copy.path.exists()


def test_prefetched_copy_is_taken_over_not_downloaded_again(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    src = capture(tmp_path)
    staged = store.stage(src, "flow", src.name, 1_795_000_000)
    ahead = store.prefetch(staged.location)
    opens = sum(1 for r in webhdfs.requests if r[2] == "OPEN")
    with store.fetch(staged.location, ahead) as copy:
        assert copy.path.read_bytes() == src.read_bytes()
    assert sum(1 for r in webhdfs.requests if r[2] == "OPEN") == opens
    assert not ahead.exists() and not copy.path.exists()


def stage_and_fetch(cfg: HdfsConfig, tmp_path) -> HdfsStore:
    """A store of ``cfg`` that has staged a capture and read it back whole."""
    store = HdfsStore(StoreLocation("/user/spot", cfg))
    store.mark()
    src = capture(tmp_path)
    staged = store.stage(src, "flow", src.name, 1_795_000_000)
    with store.fetch(staged.location) as copy:
        assert copy.path.read_bytes() == src.read_bytes()
    return store


def test_fetch_refuses_a_directory_and_a_missing_file(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    (webhdfs.data_dir / "user/spot/flow/binary/20261122/08/x").mkdir(parents=True)
    with pytest.raises(RefusedInput, match="not a regular file"):
        with store.fetch("flow/binary/20261122/08/x"):
            pass
    with pytest.raises(RefusedInput, match="is not in the store"):
        with store.fetch("flow/binary/20261122/08/absent"):
            pass
    with pytest.raises(RefusedInput, match="not under flow/binary"):
        store.staged_relative("/user/spot/flow/quarantine/x", "flow")
    with pytest.raises(RefusedInput, match="outside the store"):
        store.staged_relative("/etc/passwd", "flow")


def table_file(store, rows: int, name="part-a"):
    schema = pa.schema([("n", pa.int64())])
    parts = pa.schema([("h", pa.int8())])
    with TableWriter(store, "flow", name, schema, parts, "flow-w0-1") as writer:
        writer.write(pa.RecordBatch.from_pydict({"n": list(range(rows)), "h": [1] * rows},
                                                pa.schema([("n", pa.int64()), ("h", pa.int8())])))


def test_table_file_replaces_the_earlier_one_although_rename_does_not(webhdfs, tmp_path):
    # WebHDFS RENAME onto an existing file answers {"boolean": false} with
    # HTTP 200: a store that trusted the status would keep the old file.
    store = hdfs_store(webhdfs, tmp_path)
    table_file(store, 10)
    table_file(store, 7)
    final = webhdfs.data_dir / "user/spot/flow/hive/h=1/part-a.parquet"
    assert pq.read_table(final).num_rows == 7
    assert store.list("flow/hive", ".parquet") == ["h=1/part-a.parquet"]
    assert not list((webhdfs.data_dir / "user/spot/flow/_tmp").iterdir())
    assert not [p for p in (tmp_path / "scratch").rglob("*") if p.is_file()]


def test_a_directory_where_a_table_file_goes_is_refused_not_renamed_into(webhdfs, tmp_path):
    # A rename onto an existing directory moves the source into it.
    store = hdfs_store(webhdfs, tmp_path)
    (webhdfs.data_dir / "user/spot/flow/hive/h=1/part-a.parquet").mkdir(parents=True)
    with pytest.raises(StoreError, match="is a directory"):
        table_file(store, 3)
    assert not list((webhdfs.data_dir / "user/spot/flow/hive/h=1/part-a.parquet").iterdir())


def test_quarantine_never_overwrites_an_earlier_item(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    src = capture(tmp_path, "same.pcap", 1000)
    where = []
    for i in range(2):   # the same content collected in two hours: one name twice
        staged = store.stage(src, "dns", src.name, 1_795_000_000 + i * 3600)
        where.append(store.quarantine(staged.location, "dns", f"reason {i}"))
    assert where[1] == where[0] + ".1"
    folder = next((webhdfs.data_dir / "user/spot/dns/quarantine").iterdir())
    names = sorted(p.name for p in folder.iterdir())
    assert len([n for n in names if not n.endswith(".reason.txt")]) == 2
    reasons = sorted(p.read_text() for p in folder.glob("*.reason.txt"))
    assert "reason 0" in reasons[0] and "reason 1" in reasons[1]
    assert all(w.startswith(webhdfs.url) for w in where)


def test_remove_aside_deletes_only_the_killed_writers_temporaries(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    tmp = webhdfs.data_dir / "user/spot/flow/_tmp"
    tmp.mkdir(parents=True)
    (tmp / "flow-w0-123-part-x.parquet.tmp").write_bytes(b"partial")
    (tmp / "flow-w1-456-part-y.parquet.tmp").write_bytes(b"another worker's")
    assert store.remove_aside("flow", "flow-w0") == 1
    assert [p.name for p in tmp.iterdir()] == ["flow-w1-456-part-y.parquet.tmp"]


def test_unreachable_namenode_is_store_unavailable_naming_the_url(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    webhdfs.pause()
    try:
        with pytest.raises(StoreUnavailable, match=webhdfs.url.replace(".", r"\.")) as info:
            store.check_reachable()
        assert info.value.retry_after >= 5
    finally:
        webhdfs.resume()
    store.check_reachable()


def test_ha_pair_the_store_follows_the_active_namenode(tmp_path):
    """Two namenodes over one namespace, one standby (403 StandbyException):
    requests go to the active one, before and after a failover; with both
    in standby the store waits (StoreUnavailable), naming the namenodes."""
    with WebHdfsStandIn(tmp_path / "hdfs") as first, WebHdfsStandIn(tmp_path / "hdfs") as second:
        second.standby = True
        cfg = HdfsConfig(urls=(second.url, first.url), user="spot", timeout=10,
                         scratch_dir=tmp_path / "scratch")
        store = HdfsStore(StoreLocation("/user/spot", cfg))
        store.mark()
        src = capture(tmp_path)
        staged = store.stage(src, "flow", src.name, 1_795_000_000)
        first.standby, second.standby = True, False     # failover
        with store.fetch(staged.location) as copy:
            assert copy.path.read_bytes() == src.read_bytes()
        assert any(r[2] == "OPEN" for r in second.requests)
        second.standby = True
        with pytest.raises(StoreUnavailable, match="StandbyException"):
            store.check_reachable()


def test_https_namenode_and_datanode_with_the_configured_ca(tmp_path, pki):
    """swebhdfs: both the namenode and the datanode it redirects to speak
    TLS; the store trusts the CA of ``hdfs.verify``, and a CA that did not
    sign the certificate is one clear error naming the key to check."""
    import ssl
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki / "server.pem", pki / "server.key")
    with WebHdfsStandIn(tmp_path / "hdfs", tls=tls) as server:
        assert server.url.startswith("https://") and server.datanode_url.startswith("https://")
        cfg = HdfsConfig(urls=(server.url,), user="spot", timeout=10, verify=str(pki / "ca.pem"),
                         scratch_dir=tmp_path / "scratch")
        store = stage_and_fetch(cfg, tmp_path)
        other = HdfsConfig(urls=(server.url,), user="spot", timeout=10,
                           verify=str(pki / "other.pem"), scratch_dir=tmp_path / "scratch2")
        with pytest.raises(StoreError, match="certificate verify failed|unable to get local "
                                             "issuer|check hdfs.verify") as info:
            HdfsStore(StoreLocation("/user/spot", other)).check_reachable()
        assert "hdfs.verify" in str(info.value) and server.url in str(info.value)
        assert "\n" not in str(info.value)


def test_scratch_limit_is_a_retry_later_not_a_failure(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path, scratch_max_bytes=100_000)
    src = capture(tmp_path, size=300_000)
    staged = store.stage(src, "flow", src.name, 1_795_000_000)
    with pytest.raises(ScratchFull, match="scratch_max_bytes=100000") as info:
        with store.fetch(staged.location):
            pass
    assert info.value.retry_after


def test_expire_removes_only_loaded_files_past_retention(webhdfs, tmp_path):
    store = hdfs_store(webhdfs, tmp_path)
    a = store.stage(capture(tmp_path / "a", size=10), "flow", "a", 1_795_000_000)
    b = store.stage(capture(tmp_path / "b", size=11), "flow", "b", 1_795_000_000)
    store.mark_loaded("flow", a.sha256)
    assert store.expire_staged("flow", 1, now=4_000_000_000) == 1
    assert not (webhdfs.data_dir / "user/spot" / a.location).exists()
    assert (webhdfs.data_dir / "user/spot" / b.location).exists()


def test_kerberos_store_authenticates_every_request_with_spnego(krb5_env, tmp_path):
    """A stand-in that demands "Authorization: Negotiate" and checks each
    token with a real GSSAPI acceptor (the service key from a real KDC);
    the store logs in from the client keytab."""
    from kdc import make_acceptor
    from spot_ingest.kerberos import KerberosSettings
    accept = make_acceptor(krb5_env.service_keytab)
    with WebHdfsStandIn(tmp_path / "hdfs", negotiate=accept) as server:
        url = server.url.replace("127.0.0.1", "localhost")   # the service is HTTP/localhost
        cfg = HdfsConfig(urls=(url,), timeout=10, scratch_dir=tmp_path / "scratch",
                         kerberos=KerberosSettings(krb5_env.client_principal,
                                                   krb5_env.client_keytab))
        store = stage_and_fetch(cfg, tmp_path)
        table_file(store, 5)
        # requests_kerberos sends its token in answer to the 401 of a first,
        # bare request (user None); every request served was spot's.
        users = {r[4] for r in server.requests}
        assert users == {None, "spot"}, users
        assert {r[2] for r in server.requests if r[4] == "spot"} >= {"CREATE", "RENAME", "OPEN"}
        # Without the header the stand-in refuses: the header above was needed.
        import requests
        plain = requests.get(f"{url}/webhdfs/v1/user/spot?op=GETFILESTATUS", timeout=10)
        assert plain.status_code == 401
        assert plain.headers["WWW-Authenticate"].startswith("Negotiate")
