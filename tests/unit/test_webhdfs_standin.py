"""The WebHDFS stand-in (tests/webhdfs.py), through real HTTP on loopback:
HdfsCLI's InsecureClient (what the HDFS store uses) and raw requests where
the protocol itself (status, headers, JSON) is the point. In-process, fast."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from hdfs import HdfsError, InsecureClient

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.webhdfs import WebHdfsStandIn  # noqa: E402

T = 5  # seconds: every network call is bounded


@pytest.fixture
def standin(tmp_path):
    with WebHdfsStandIn(tmp_path / "hdfs") as server:
        yield server


@pytest.fixture
def client(standin):
    return InsecureClient(standin.url, user="alice", timeout=T)


def rest(standin, method, path, **params):
    return requests.request(method, f"{standin.url}/webhdfs/v1{path}", params=params,
                            allow_redirects=False, timeout=T)


def remote_exception(response) -> dict:
    assert response.headers["Content-Type"] == "application/json"
    return response.json()["RemoteException"]


def test_bytes_and_generator_writes_read_back_through_the_datanode(standin, client):
    client.write("/in/a.bin", data=b"\x00bytes\xff" * 1000)
    client.write("/in/g.bin", data=(bytes([i]) * 70_000 for i in range(5)))
    with client.read("/in/a.bin") as reader:
        assert reader.read() == b"\x00bytes\xff" * 1000
    with client.read("/in/g.bin") as reader:
        assert reader.read() == b"".join(bytes([i]) * 70_000 for i in range(5))
    assert (standin.data_dir / "in" / "g.bin").stat().st_size == 350_000
    assert sorted(os.listdir(standin.data_dir / "in")) == ["a.bin", "g.bin"], "no partial left"
    # the generator came chunked, the bytes with a Content-Length
    writes = {r.path: r for r in standin.datanode_requests if r.op == "CREATE"}
    assert writes["/in/g.bin"].chunked and not writes["/in/a.bin"].chunked
    assert {r.status for r in writes.values()} == {201}
    status = client.status("/in/a.bin")
    assert (status["type"], status["length"], status["owner"], status["permission"]) == (
        "FILE", 7000, "alice", "644")
    assert client.list("/in") == ["a.bin", "g.bin"]
    assert client.content("/in")["fileCount"] == 2
    assert client.content("/in")["length"] == 357_000


def test_create_is_a_307_from_the_namenode_to_a_datanode_on_another_port(standin, client):
    first = rest(standin, "PUT", "/r/x.txt", op="CREATE", **{"user.name": "bob"})
    assert first.status_code == 307 and first.content == b""
    assert first.headers["Content-Length"] == "0"
    location = urlsplit(first.headers["Location"])
    assert location.port == urlsplit(standin.datanode_url).port != urlsplit(standin.url).port
    assert location.path == "/webhdfs/v1/r/x.txt"
    assert not (standin.data_dir / "r").exists(), "the namenode step writes nothing"
    second = requests.put(first.headers["Location"], data=b"payload", timeout=T)
    assert second.status_code == 201 and second.content == b""
    assert second.headers["Location"] == f"webhdfs://127.0.0.1:{standin.port}/r/x.txt"
    assert (standin.data_dir / "r" / "x.txt").read_bytes() == b"payload"
    # the ticket in the Location is good once
    again = requests.put(first.headers["Location"], data=b"other", timeout=T)
    assert again.status_code == 403 and remote_exception(again)["exception"] == "InvalidToken"
    assert (standin.data_dir / "r" / "x.txt").read_bytes() == b"payload"
    # HdfsCLI goes the same way: CREATE logged on the namenode, body on the datanode
    client.write("/r/y.txt", b"y")
    assert standin.requests[-1][:3] == ("PUT", "/r/y.txt", "CREATE")
    assert standin.datanode_requests[-1][:3] == ("PUT", "/r/y.txt", "CREATE")
    assert not any(r.op == "CREATE" and r.method == "PUT" and r.path == "/r/y.txt"
                   and r.query.get("nonce") for r in standin.requests)


def test_overwrite_defaults_to_false_and_the_datanode_refuses(standin, client):
    client.write("/o/f", b"first")
    with pytest.raises(HdfsError) as info:
        client.write("/o/f", b"second")
    assert info.value.exception == "FileAlreadyExistsException"
    assert "/o/f" in str(info.value)
    assert (standin.data_dir / "o" / "f").read_bytes() == b"first"
    # as in Hadoop, the namenode redirects anyway; the datanode answers 403
    first = rest(standin, "PUT", "/o/f", op="CREATE")
    assert first.status_code == 307
    refused = requests.put(first.headers["Location"], data=b"x" * 200_000, timeout=T)
    assert refused.status_code == 403
    assert remote_exception(refused) == {
        "exception": "FileAlreadyExistsException",
        "javaClassName": "org.apache.hadoop.fs.FileAlreadyExistsException",
        "message": "/o/f for client 127.0.0.1 already exists"}
    client.write("/o/f", b"third", overwrite=True)
    assert (standin.data_dir / "o" / "f").read_bytes() == b"third"
    client.makedirs("/o/d")
    with pytest.raises(HdfsError, match="already exists as a directory"):
        client.write("/o/d", b"x", overwrite=True)
    assert sorted(os.listdir(standin.data_dir / "o")) == ["d", "f"]


def test_rename_onto_an_existing_file_is_false_not_an_error(standin, client):
    client.write("/m/src", b"src")
    client.write("/m/dst", b"dst")
    answer = rest(standin, "PUT", "/m/src", op="RENAME", destination="/m/dst")
    assert (answer.status_code, answer.json()) == (200, {"boolean": False})
    # HdfsCLI turns the false into HdfsError("Unable to rename '/m/src' to '/m/dst'."),
    # with no exception name (.exception is None): it cannot tell why.
    with pytest.raises(HdfsError, match="Unable to rename") as info:
        client.rename("/m/src", "/m/dst")
    assert info.value.exception is None
    assert (standin.data_dir / "m" / "src").read_bytes() == b"src"
    assert (standin.data_dir / "m" / "dst").read_bytes() == b"dst"
    # missing destination parent, missing source: false as well
    for src, dst in (("/m/src", "/nowhere/x"), ("/m/absent", "/m/new")):
        answer = rest(standin, "PUT", src, op="RENAME", destination=dst)
        assert (answer.status_code, answer.json()) == (200, {"boolean": False})
        with pytest.raises(HdfsError, match="Unable to rename"):
            client.rename(src, dst)
    assert not (standin.data_dir / "nowhere").exists()
    client.rename("/m/src", "/m/renamed")
    assert (standin.data_dir / "m" / "renamed").read_bytes() == b"src"
    assert not (standin.data_dir / "m" / "src").exists()


def test_rename_onto_an_existing_directory_moves_the_source_inside(standin, client):
    client.write("/a.txt", b"a")
    client.makedirs("/dir/sub")
    client.rename("/a.txt", "/dir")
    assert (standin.data_dir / "dir" / "a.txt").read_bytes() == b"a"
    assert not (standin.data_dir / "a.txt").exists()
    assert client.status("/dir/a.txt")["owner"] == "alice", "metadata moved along"
    client.rename("/dir/sub", "/")   # a directory into the root
    assert (standin.data_dir / "sub").is_dir()
    # a directory onto itself means into itself: false (as HDFS); a file onto itself: true
    answer = rest(standin, "PUT", "/dir", op="RENAME", destination="/dir")
    assert answer.json() == {"boolean": False}
    answer = rest(standin, "PUT", "/dir", op="RENAME", destination="/dir/deeper")
    assert answer.json() == {"boolean": False}
    answer = rest(standin, "PUT", "/dir/a.txt", op="RENAME", destination="/dir/a.txt")
    assert answer.json() == {"boolean": True}
    assert (standin.data_dir / "dir" / "a.txt").exists()


def test_delete_non_empty_without_recursive_is_an_error_and_missing_is_false(standin, client):
    client.write("/d/x/f", b"f")
    with pytest.raises(HdfsError) as info:
        client.delete("/d")
    assert info.value.exception == "PathIsNotEmptyDirectoryException"
    raw = rest(standin, "DELETE", "/d", op="DELETE")
    assert raw.status_code == 403
    assert remote_exception(raw)["message"] == "`/d is non empty': Directory is not empty"
    assert (standin.data_dir / "d" / "x" / "f").exists()
    assert client.delete("/d", recursive=True) is True
    assert not (standin.data_dir / "d").exists() and os.listdir(standin.data_dir) == []
    assert client.delete("/d") is False
    raw = rest(standin, "DELETE", "/d", op="DELETE")
    assert (raw.status_code, raw.json()) == (200, {"boolean": False})
    assert rest(standin, "DELETE", "/", op="DELETE", recursive="true").json() == {"boolean": False}


def test_status_of_a_missing_path_is_none_or_a_404_remote_exception(standin, client):
    assert client.status("/missing", strict=False) is None
    assert client.content("/missing", strict=False) is None
    with pytest.raises(HdfsError) as info:
        client.status("/missing")
    assert info.value.exception == "FileNotFoundException"
    raw = rest(standin, "GET", "/missing", op="GETFILESTATUS")
    assert raw.status_code == 404
    assert remote_exception(raw) == {"exception": "FileNotFoundException",
                                     "javaClassName": "java.io.FileNotFoundException",
                                     "message": "File does not exist: /missing"}
    with pytest.raises(HdfsError) as info:
        with client.read("/missing") as reader:
            reader.read()
    assert info.value.exception == "FileNotFoundException"
    client.write("/file", b"x")
    assert client.status("/file/child", strict=False) is None, "below a file: missing too"


def test_user_name_is_the_effective_user_and_is_logged(standin, client):
    client.write("/u/f", b"x")
    assert {r.user for r in standin.requests} == {"alice"}
    assert all(r.query["user.name"] == "alice" for r in standin.requests)
    assert rest(standin, "GET", "/", op="GETHOMEDIRECTORY").json() == {"Path": "/user/dr.who"}
    assert standin.requests[-1] == ("GET", "/", "GETHOMEDIRECTORY",
                                    {"op": "GETHOMEDIRECTORY"}, "dr.who")
    bob = InsecureClient(standin.url, user="bob", timeout=T)
    bob.write("rel.txt", b"relative")   # relative: resolved under GETHOMEDIRECTORY
    assert (standin.data_dir / "user" / "bob" / "rel.txt").read_bytes() == b"relative"
    assert bob.status("/user/bob/rel.txt")["owner"] == "bob"
    assert standin.datanode_requests[-1].user == "bob"


def test_pause_refuses_connections_and_resume_serves_on_the_same_url(standin, client):
    url = standin.url
    assert client.status("/")["type"] == "DIRECTORY"   # leaves a keep-alive connection
    standin.pause()
    with pytest.raises(requests.exceptions.ConnectionError):
        client.status("/")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", standin.port), timeout=T).close()
    assert requests.get(standin.datanode_url + "/webhdfs/v1/?op=OPEN", timeout=T
                        ).status_code == 403, "the datanode keeps serving"
    standin.resume()
    assert standin.url == url
    client.write("/after", b"back")
    assert (standin.data_dir / "after").read_bytes() == b"back"


def test_negotiate_wants_the_header_and_takes_the_user_from_the_token(tmp_path):
    def accept(token):
        return {"abc": "spot", "mutual": ("spot", "c2VydmVyLXJlcGx5")}.get(token)

    with WebHdfsStandIn(tmp_path / "hdfs", negotiate=accept) as standin:
        home = f"{standin.url}/webhdfs/v1/?op=GETHOMEDIRECTORY&user.name=mallory"
        bare = requests.get(home, timeout=T)
        assert bare.status_code == 401
        assert bare.headers["WWW-Authenticate"] == "Negotiate"
        assert remote_exception(bare)["exception"] == "SecurityException"
        good = requests.get(home, headers={"Authorization": "Negotiate abc"}, timeout=T)
        assert (good.status_code, good.json()) == (200, {"Path": "/user/spot"})
        assert "WWW-Authenticate" not in good.headers
        refused = requests.get(home, headers={"Authorization": "Negotiate zzz"}, timeout=T)
        assert refused.status_code == 403
        basic = requests.get(home, headers={"Authorization": "Basic YTpi"}, timeout=T)
        assert basic.status_code == 401
        mutual = requests.get(home, headers={"Authorization": "Negotiate mutual"}, timeout=T)
        assert mutual.headers["WWW-Authenticate"] == "Negotiate c2VydmVyLXJlcGx5"
        assert [r.user for r in standin.requests] == [None, "spot", None, None, "spot"]
        # the header goes to the namenode only; the datanode trusts its ticket
        first = requests.put(f"{standin.url}/webhdfs/v1/k/f?op=CREATE",
                             headers={"Authorization": "Negotiate abc"},
                             allow_redirects=False, timeout=T)
        assert first.status_code == 307
        assert requests.put(first.headers["Location"], data=b"k", timeout=T).status_code == 201
        assert (standin.data_dir / "k" / "f").read_bytes() == b"k"
        assert standin.datanode_requests[-1].user == "spot"
        with pytest.raises(HdfsError, match="Authentication failure"):
            InsecureClient(standin.url, user="spot", timeout=T).status("/")


def test_bad_paths_and_unknown_operations_are_400(standin):
    conn = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=T)
    try:
        for target in ("/webhdfs/v1/a/../b?op=GETFILESTATUS", "/webhdfs/v1/a/./b?op=LISTSTATUS",
                       "/webhdfs/v1/a:b?op=MKDIRS"):
            conn.request("GET" if "MKDIRS" not in target else "PUT", target)
            answer = conn.getresponse()
            body = answer.read()
            assert answer.status == 400, target
            assert b'"IllegalArgumentException"' in body
    finally:
        conn.close()
    relative = rest(standin, "PUT", "/x", op="RENAME", destination="x/y")
    assert relative.status_code == 400 and "absolute" in remote_exception(relative)["message"]
    unknown = rest(standin, "GET", "/", op="FROBNICATE")
    assert unknown.status_code == 400
    assert remote_exception(unknown)["exception"] == "IllegalArgumentException"
    assert rest(standin, "PUT", "/", op="GETFILESTATUS").status_code == 400, "op of another verb"
    unsupported = rest(standin, "GET", "/", op="GETFILECHECKSUM")
    assert (unsupported.status_code, remote_exception(unsupported)["exception"]) == (
        400, "UnsupportedOperationException")
    assert rest(standin, "GET", "/").status_code == 400, "no op at all"
    bad_bool = rest(standin, "DELETE", "/x", op="DELETE", recursive="maybe")
    assert bad_bool.status_code == 400
    assert not os.listdir(standin.data_dir)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_client_gone_mid_body_leaves_what_it_wrote_as_hdfs_does(standin, framing):
    first = rest(standin, "PUT", "/up/part.bin", op="CREATE")
    location = urlsplit(first.headers["Location"])
    if framing == "chunked":
        head, body = "Transfer-Encoding: chunked", b"5\r\nhello\r\n3\r\nwo"
    else:
        head, body = "Content-Length: 1000", b"x" * 10
    with socket.create_connection((location.hostname, location.port), timeout=T) as sock:
        sock.sendall(f"PUT {location.path}?{location.query} HTTP/1.1\r\nHost: dn\r\n"
                     f"{head}\r\n\r\n".encode() + body)
    assert standin.wait_for(lambda s: any(
        r.path == "/up/part.bin" and r.status is None for r in s.datanode_requests))
    # HDFS keeps a file under its name from creation; a writer that goes
    # away leaves the bytes it wrote (after lease recovery): only a rename
    # of a complete file makes "whole or nothing" (the store's job).
    assert os.listdir(standin.data_dir / "up") == ["part.bin"]
    assert rest(standin, "GET", "/up/part.bin", op="GETFILESTATUS").status_code == 200


def test_partial_files_are_hidden_and_a_file_is_visible_while_written(standin, client):
    client.makedirs("/h")
    (standin.data_dir / "h" / ".f:0123.part").write_bytes(b"partial")  # the stand-in's naming
    assert client.list("/h") == []
    assert client.status("/h")["childrenNum"] == 0
    assert client.content("/h")["fileCount"] == 0
    seen = []

    def body():
        yield b"one "
        seen.append(client.status("/h/f", strict=False))   # mid-body, from the namenode
        yield b"two"

    client.write("/h/f", data=body())
    assert len(seen) == 1   # (the namenode answered mid-body; whether the file shows yet is a race)
    assert client.list("/h") == ["f"]
    assert (standin.data_dir / "h" / "f").read_bytes() == b"one two"


def test_append_and_ranged_reads(standin, client):
    client.write("/ap", b"hello")
    client.write("/ap", b" world", append=True)
    assert (standin.data_dir / "ap").read_bytes() == b"hello world"
    with client.read("/ap", offset=6, length=3) as reader:
        assert reader.read() == b"wor"
    with client.read("/ap", offset=6) as reader:
        assert reader.read() == b"world"
    out_of_range = requests.get(f"{standin.url}/webhdfs/v1/ap?op=OPEN&offset=11", timeout=T)
    assert out_of_range.status_code == 403
    with pytest.raises(HdfsError) as info:
        client.write("/absent", b"x", append=True)
    assert info.value.exception == "FileNotFoundException"
    opened = requests.get(f"{standin.url}/webhdfs/v1/ap?op=OPEN", timeout=T)
    assert (opened.status_code, opened.content) == (200, b"hello world")
    assert opened.headers["Content-Type"] == "application/octet-stream"
    assert [r.status_code for r in opened.history] == [307]


def test_mkdirs_and_the_cheap_setters_show_in_the_status(standin, client):
    client.makedirs("/x/y/z", permission="700")
    assert client.status("/x/y/z")["permission"] == "700"
    assert client.status("/x")["type"] == "DIRECTORY"
    assert rest(standin, "PUT", "/x/y", op="MKDIRS").json() == {"boolean": True}
    client.write("/x/f", b"data", permission="600", replication=1)
    listing = dict(client.list("/x", status=True))
    assert listing["f"]["permission"] == "600" and listing["f"]["replication"] == 1
    assert listing["y"]["childrenNum"] == 1 and listing["y"]["length"] == 0
    assert listing["f"]["fileId"] != listing["y"]["fileId"]
    with pytest.raises(HdfsError) as info:
        client.makedirs("/x/f")
    assert info.value.exception == "FileAlreadyExistsException"
    with pytest.raises(HdfsError) as info:
        client.makedirs("/x/f/below")
    assert info.value.exception == "ParentNotDirectoryException"
    client.set_permission("/x/f", "640")
    client.set_owner("/x/f", owner="spot", group="hadoop")
    client.set_times("/x/f", modification_time=1_600_000_000_123)
    status = client.status("/x/f")
    assert (status["permission"], status["owner"], status["group"]) == ("640", "spot", "hadoop")
    assert status["modificationTime"] == 1_600_000_000_123
    assert (standin.data_dir / "x" / "f").stat().st_mtime_ns == 1_600_000_000_123_000_000
    client.set_replication("/x/f", 2)
    assert client.status("/x/f")["replication"] == 2
    with pytest.raises(HdfsError, match="not a file"):
        client.set_replication("/x/y", 2)


def test_concurrent_writers_of_distinct_files_all_land_and_are_all_logged(standin):
    errors = []

    def writer(n):
        try:
            c = InsecureClient(standin.url, user=f"w{n}", timeout=T)
            for i in range(5):
                c.write(f"/c/{n}/{i}", data=f"{n}-{i}".encode())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert errors == []
    assert sum(1 for r in standin.requests if r.op == "CREATE") == 40
    assert sum(1 for r in standin.datanode_requests if r.status == 201) == 40
    assert all((standin.data_dir / "c" / str(n) / str(i)).read_text() == f"{n}-{i}"
               for n in range(8) for i in range(5))


def test_stop_cuts_idle_keep_alive_and_half_sent_uploads_at_once(tmp_path):
    standin = WebHdfsStandIn(tmp_path / "hdfs").start()
    idle = http.client.HTTPConnection("127.0.0.1", standin.port, timeout=T)
    idle.request("GET", "/webhdfs/v1/?op=GETHOMEDIRECTORY")
    reply = idle.getresponse()
    assert (reply.status, reply.read()) == (200, b'{"Path": "/user/dr.who"}')
    assert not reply.will_close and idle.sock is not None, "kept alive"
    location = urlsplit(rest(standin, "PUT", "/s/f", op="CREATE").headers["Location"])
    uploading = socket.create_connection((location.hostname, location.port), timeout=T)
    uploading.sendall(f"PUT {location.path}?{location.query} HTTP/1.1\r\nHost: dn\r\n"
                      "Content-Length: 100000\r\n\r\n".encode() + b"x" * 100)
    started = time.monotonic()
    standin.stop()
    assert time.monotonic() - started < 1.0
    assert idle.sock.recv(1) == b"", "the keep-alive connection was closed by the server"
    idle.close()
    uploading.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", standin.port), timeout=T).close()
    standin.stop()   # idempotent


def test_runs_as_a_program_printing_its_url_until_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "webhdfs.py"),
                             "--data-dir", str(tmp_path / "d")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if not url else url
        client = InsecureClient(url, user="demo", timeout=T)
        client.write("/p/f", b"from the program")
        assert (tmp_path / "d" / "p" / "f").read_bytes() == b"from the program"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=T) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
