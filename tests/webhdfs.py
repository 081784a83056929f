"""A stand-in WebHDFS server (a "namenode" and a "datanode" on two loopback
ports) for tests, demos and benchmarks on a machine that cannot run Hadoop.

Written from Hadoop's WebHDFS REST documentation (WebHDFS.md: operations,
JSON shapes, RemoteException and its status codes, two-step CREATE/APPEND,
OPEN through a 307 redirect). See :class:`WebHdfsStandIn` for what it does
and does not model.

In a test::

    with WebHdfsStandIn(tmp_path / "hdfs") as standin:
        client = hdfs.InsecureClient(standin.url, user="spot")
        client.write("/a/b.txt", b"hello")
        assert (tmp_path / "hdfs" / "a" / "b.txt").read_bytes() == b"hello"

As a program (prints the namenode URL on one line, serves until SIGTERM or
SIGINT)::

    python tests/webhdfs.py --data-dir DIR [--port N] [--datanode-port M]

Only the standard library is used.
"""
from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

PREFIX = "/webhdfs/v1"
DEFAULT_BLOCK_SIZE = 128 * 1024 * 1024   # dfs.blocksize default
DEFAULT_REPLICATION = 3                   # dfs.replication default
COPY_CHUNK = 1 << 16

# exception name -> (HTTP status, javaClassName); statuses per WebHDFS.md
# "Error Responses" (IOException and its subclasses: 403).
EXCEPTIONS = {
    "IllegalArgumentException": (400, "java.lang.IllegalArgumentException"),
    "UnsupportedOperationException": (400, "java.lang.UnsupportedOperationException"),
    "SecurityException": (401, "java.lang.SecurityException"),
    "StandbyException": (403, "org.apache.hadoop.ipc.StandbyException"),
    "AccessControlException": (403, "org.apache.hadoop.security.AccessControlException"),
    "AuthenticationException": (
        403, "org.apache.hadoop.security.authentication.client.AuthenticationException"),
    "InvalidToken": (403, "org.apache.hadoop.security.token.SecretManager$InvalidToken"),
    "FileAlreadyExistsException": (403, "org.apache.hadoop.fs.FileAlreadyExistsException"),
    "ParentNotDirectoryException": (403, "org.apache.hadoop.fs.ParentNotDirectoryException"),
    "PathIsNotEmptyDirectoryException": (
        403, "org.apache.hadoop.fs.PathIsNotEmptyDirectoryException"),
    "IOException": (403, "java.io.IOException"),
    "FileNotFoundException": (404, "java.io.FileNotFoundException"),
    "RuntimeException": (500, "java.lang.RuntimeException"),
}

# Operations Hadoop knows per HTTP method (an op outside these lists is an
# IllegalArgumentException, as Hadoop's enum parsing makes it; one inside
# but not implemented here is an UnsupportedOperationException).
HADOOP_OPS = {
    "GET": {"OPEN", "GETFILESTATUS", "LISTSTATUS", "LISTSTATUS_BATCH", "GETCONTENTSUMMARY",
            "GETQUOTAUSAGE", "GETFILECHECKSUM", "GETHOMEDIRECTORY", "GETDELEGATIONTOKEN",
            "GETTRASHROOT", "GETXATTRS", "LISTXATTRS", "GETACLSTATUS", "CHECKACCESS",
            "GETALLSTORAGEPOLICY", "GETSTORAGEPOLICY", "GETSNAPSHOTDIFF",
            "GETSNAPSHOTDIFFLISTING", "GETSNAPSHOTTABLEDIRECTORYLIST", "GETSNAPSHOTLIST",
            "GETFILEBLOCKLOCATIONS", "GETECPOLICY", "GETSERVERDEFAULTS", "GETLINKTARGET",
            "GETFILELINKSTATUS", "GETSTATUS", "GETECPOLICIES"},
    "PUT": {"CREATE", "MKDIRS", "CREATESYMLINK", "RENAME", "SETREPLICATION", "SETOWNER",
            "SETPERMISSION", "SETTIMES", "RENEWDELEGATIONTOKEN", "CANCELDELEGATIONTOKEN",
            "ALLOWSNAPSHOT", "DISALLOWSNAPSHOT", "CREATESNAPSHOT", "RENAMESNAPSHOT",
            "SETXATTR", "REMOVEXATTR", "SETSTORAGEPOLICY", "SATISFYSTORAGEPOLICY",
            "ENABLEECPOLICY", "DISABLEECPOLICY", "SETECPOLICY", "MODIFYACLENTRIES",
            "REMOVEACLENTRIES", "REMOVEDEFAULTACL", "REMOVEACL", "SETACL", "SETQUOTA",
            "SETQUOTABYSTORAGETYPE"},
    "POST": {"APPEND", "CONCAT", "TRUNCATE", "UNSETSTORAGEPOLICY", "UNSETECPOLICY"},
    "DELETE": {"DELETE", "DELETESNAPSHOT"},
}


class Request(NamedTuple):
    """One namenode request, as logged in :attr:`WebHdfsStandIn.requests`."""
    method: str
    path: str          # HDFS path, normalised when valid ("/a/b"), else as received
    op: str | None     # upper-cased, None when absent
    query: dict        # query parameters, first value of each
    user: str | None   # effective user; None when authentication failed


class DatanodeRequest(NamedTuple):
    """One datanode request, as logged in :attr:`WebHdfsStandIn.datanode_requests`
    (appended when the request is over, before its response is sent)."""
    method: str
    path: str
    op: str | None
    query: dict
    user: str | None   # the user the namenode put in the one-time ticket
    status: int | None  # HTTP status sent; None when the client went away mid-body
    chunked: bool      # the body came with Transfer-Encoding: chunked


class RemoteError(Exception):
    """A failure sent to the client as a RemoteException JSON body."""

    def __init__(self, exception: str, message: str, headers: list | None = None):
        super().__init__(message)
        self.status, self.java_class = EXCEPTIONS[exception]
        self.exception = exception
        self.message = message
        self.headers = headers or []

    def body(self) -> dict:
        return {"RemoteException": {"exception": self.exception,
                                    "javaClassName": self.java_class,
                                    "message": self.message}}


class _ClientGone(Exception):
    """The client closed the connection (or broke the framing) mid-body."""


def _hidden(name: str) -> bool:
    # HDFS forbids ':' in a path component, so a name with one can never be a
    # client's: the stand-in uses such names for its partial and doomed files.
    return ":" in name


def normalize(raw: str) -> str:
    """An HDFS path as received -> "/a/b"; RemoteError(400) when not absolute
    or when a component is "." or ".." or holds ':' (invalid in HDFS)."""
    if raw in ("", "/"):
        return "/"
    if not raw.startswith("/"):
        raise RemoteError("IllegalArgumentException",
                          f"Invalid path name {raw}: not an absolute path")
    parts = [p for p in raw.split("/") if p]
    for part in parts:
        if part in (".", "..") or ":" in part or "\x00" in part:
            raise RemoteError("IllegalArgumentException", f"Invalid path name {raw}")
    return "/" + "/".join(parts)


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def _param_error(name: str, value: str, why: str) -> RemoteError:
    return RemoteError("IllegalArgumentException",
                       f'Invalid value for webhdfs parameter "{name}": {why}: "{value}"')


def _bool(query: dict, name: str, default: bool) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _param_error(name, value, "Failed to parse as a boolean")


def _int(query: dict, name: str, default: int | None, minimum: int | None = None) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise _param_error(name, value, "Failed to parse as an integer") from None
    if minimum is not None and number < minimum:
        raise _param_error(name, value, f"Value must be >= {minimum}")
    return number


def _permission(query: dict, default: int) -> int:
    value = query.get("permission")
    if value is None or value == "":
        return default
    try:
        mode = int(value, 8)
    except ValueError:
        raise _param_error("permission", value, "Failed to parse as an octal") from None
    if not 0 <= mode <= 0o1777:
        raise _param_error("permission", value, "Value out of range [0, 1777]")
    return mode


class _Namespace:
    """The file system: a local directory plus in-memory owner/group/
    permission/replication/block size per path. One lock serialises every
    change (and each check-then-act), so each operation is atomic with
    respect to the others."""

    def __init__(self, root: Path, default_user: str):
        self.root = str(root)
        self.default_user = default_user
        self.lock = threading.RLock()
        self.meta: dict[str, dict] = {}

    # -- helpers ------------------------------------------------------------
    def local(self, path: str) -> str:
        return self.root if path == "/" else os.path.join(self.root, *path[1:].split("/"))

    def stat(self, path: str) -> os.stat_result | None:
        try:
            return os.stat(self.local(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _visible(self, local_dir: str) -> list[os.DirEntry]:
        try:
            with os.scandir(local_dir) as it:
                return [e for e in it if not _hidden(e.name)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def file_status(self, path: str, st: os.stat_result, suffix: str) -> dict:
        is_dir = stat.S_ISDIR(st.st_mode)
        meta = self.meta.get(path, {})
        return {
            "accessTime": 0 if is_dir else st.st_atime_ns // 1_000_000,
            "blockSize": 0 if is_dir else meta.get("blockSize", DEFAULT_BLOCK_SIZE),
            "childrenNum": len(self._visible(self.local(path))) if is_dir else 0,
            "fileId": st.st_ino,
            "group": meta.get("group", "supergroup"),
            "length": 0 if is_dir else st.st_size,
            "modificationTime": st.st_mtime_ns // 1_000_000,
            "owner": meta.get("owner", self.default_user),
            "pathSuffix": suffix,
            "permission": format(meta.get("permission", 0o755 if is_dir else 0o644), "o"),
            "replication": 0 if is_dir else meta.get("replication", DEFAULT_REPLICATION),
            "storagePolicy": 0,
            "type": "DIRECTORY" if is_dir else "FILE",
        }

    def _set_meta(self, path: str, **values) -> None:
        self.meta.setdefault(path, {}).update(values)

    def _drop_meta(self, path: str) -> None:
        prefix = path.rstrip("/") + "/"
        for key in [k for k in self.meta if k == path or k.startswith(prefix)]:
            del self.meta[key]

    def _move_meta(self, src: str, dst: str) -> None:
        prefix = src + "/"
        moved = {k: v for k, v in self.meta.items() if k == src or k.startswith(prefix)}
        self._drop_meta(dst)
        for key, value in moved.items():
            del self.meta[key]
            self.meta[dst + key[len(src):]] = value

    def _make_parents(self, path: str, user: str, permission: int) -> None:
        """Create the missing directories of ``path`` (itself included);
        ParentNotDirectoryException when one of them is a file."""
        current = ""
        for part in (path[1:].split("/") if path != "/" else []):
            current += "/" + part
            st = self.stat(current)
            if st is None:
                os.mkdir(self.local(current))
                self._set_meta(current, owner=user, group="supergroup", permission=permission)
            elif not stat.S_ISDIR(st.st_mode):
                raise RemoteError("ParentNotDirectoryException",
                                  f"Parent path is not a directory: {current}")

    # -- operations ---------------------------------------------------------
    def get_file_status(self, path: str) -> dict:
        st = self.stat(path)
        if st is None:
            raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
        return {"FileStatus": self.file_status(path, st, "")}

    def list_status(self, path: str) -> dict:
        st = self.stat(path)
        if st is None:
            raise RemoteError("FileNotFoundException", f"File {path} does not exist.")
        if not stat.S_ISDIR(st.st_mode):
            return {"FileStatuses": {"FileStatus": [self.file_status(path, st, "")]}}
        statuses = []
        base = "" if path == "/" else path
        for entry in sorted(self._visible(self.local(path)), key=lambda e: e.name.encode()):
            try:
                child_st = entry.stat()
            except FileNotFoundError:   # removed by someone else meanwhile
                continue
            statuses.append(self.file_status(f"{base}/{entry.name}", child_st, entry.name))
        return {"FileStatuses": {"FileStatus": statuses}}

    def content_summary(self, path: str) -> dict:
        st = self.stat(path)
        if st is None:
            raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
        files = dirs = length = consumed = 0
        if stat.S_ISDIR(st.st_mode):
            local_root = self.local(path)
            for folder, dirnames, filenames in os.walk(local_root):
                dirs += 1
                dirnames[:] = [d for d in dirnames if not _hidden(d)]
                rel = os.path.relpath(folder, local_root)
                hdfs_folder = path if rel == "." else f"{path.rstrip('/')}/{rel}"
                for name in filenames:
                    if _hidden(name):
                        continue
                    try:
                        size = os.stat(os.path.join(folder, name)).st_size
                    except FileNotFoundError:
                        continue
                    files += 1
                    length += size
                    repl = self.meta.get(f"{hdfs_folder.rstrip('/')}/{name}", {}).get(
                        "replication", DEFAULT_REPLICATION)
                    consumed += size * repl
        else:
            files, length = 1, st.st_size
            consumed = length * self.meta.get(path, {}).get("replication", DEFAULT_REPLICATION)
        return {"ContentSummary": {"directoryCount": dirs, "fileCount": files, "length": length,
                                   "quota": -1, "spaceConsumed": consumed, "spaceQuota": -1,
                                   "typeQuota": {}}}

    def mkdirs(self, path: str, permission: int, user: str) -> dict:
        with self.lock:
            st = self.stat(path)
            if st is not None and not stat.S_ISDIR(st.st_mode):
                raise RemoteError("FileAlreadyExistsException", f"Path is not a directory: {path}")
            if st is None:
                parent = _parent(path)
                # implicit parents get u+wx added, as HDFS does
                self._make_parents(parent, user, permission | 0o300)
                os.mkdir(self.local(path))
                self._set_meta(path, owner=user, group="supergroup", permission=permission)
        return {"boolean": True}

    def delete(self, path: str, recursive: bool) -> dict:
        with self.lock:
            local = self.local(path)
            st = self.stat(path)
            if st is None:
                return {"boolean": False}
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(local) as it:
                    non_empty = any(True for _ in it)
                if non_empty and not recursive:
                    raise RemoteError("PathIsNotEmptyDirectoryException",
                                      f"`{path} is non empty': Directory is not empty")
                if path == "/":   # HDFS refuses to delete the root: false, not an error
                    return {"boolean": False}
                # atomic disappearance: rename out of sight, then remove
                doomed = os.path.join(os.path.dirname(local),
                                      f".{os.path.basename(local)[:64]}:deleting-"
                                      f"{uuid.uuid4().hex}")
                os.rename(local, doomed)
            else:
                os.unlink(local)
                doomed = None
            self._drop_meta(path)
        if doomed:
            shutil.rmtree(doomed, ignore_errors=True)
        return {"boolean": True}

    def rename(self, src: str, dst: str) -> dict:
        """HDFS's (old, boolean) rename: false rather than an error when the
        source is missing, the destination exists as a file, or its parent is
        missing; onto an existing directory it moves the source inside."""
        with self.lock:
            if src == "/" or self.stat(src) is None:
                return {"boolean": False}
            dst_st = self.stat(dst)
            if dst_st is not None and stat.S_ISDIR(dst_st.st_mode):
                dst = ("" if dst == "/" else dst) + "/" + _basename(src)
                dst_st = self.stat(dst)
            if dst == src:
                return {"boolean": True}
            if dst.startswith(src + "/"):   # into its own subtree: HDFS says false too
                return {"boolean": False}
            if dst_st is not None:
                return {"boolean": False}
            parent_st = self.stat(_parent(dst))
            if parent_st is None or not stat.S_ISDIR(parent_st.st_mode):
                return {"boolean": False}
            os.rename(self.local(src), self.local(dst))
            self._move_meta(src, dst)
        return {"boolean": True}

    def _require(self, path: str) -> os.stat_result:
        st = self.stat(path)
        if st is None:
            raise RemoteError("FileNotFoundException", f"File does not exist: {path}")
        return st

    def set_permission(self, path: str, permission: int) -> None:
        with self.lock:
            self._require(path)
            self._set_meta(path, permission=permission)

    def set_owner(self, path: str, owner: str | None, group: str | None) -> None:
        if not owner and not group:
            raise RemoteError("IllegalArgumentException", "Both owner and group are empty.")
        with self.lock:
            self._require(path)
            if owner:
                self._set_meta(path, owner=owner)
            if group:
                self._set_meta(path, group=group)

    def set_times(self, path: str, mtime: int, atime: int) -> None:
        with self.lock:
            st = self._require(path)
            if mtime == -1 and atime == -1:
                return
            os.utime(self.local(path), ns=(
                st.st_atime_ns if atime == -1 else atime * 1_000_000,
                st.st_mtime_ns if mtime == -1 else mtime * 1_000_000))

    def set_replication(self, path: str, replication: int | None) -> dict:
        with self.lock:
            st = self._require(path)
            if stat.S_ISDIR(st.st_mode):
                return {"boolean": False}
            self._set_meta(path, replication=replication or DEFAULT_REPLICATION)
        return {"boolean": True}

    def acl_status(self, path: str) -> dict:
        st = self._require(path)
        status = self.file_status(path, st, "")
        return {"AclStatus": {"entries": [], "group": status["group"], "owner": status["owner"],
                              "permission": status["permission"], "stickyBit": False}}

    def open_check(self, path: str, offset: int) -> None:
        st = self.stat(path)
        if st is None:
            raise RemoteError("FileNotFoundException", f"File {path} not found.")
        if stat.S_ISDIR(st.st_mode):
            raise RemoteError("FileNotFoundException", f"Path is not a file: {path}")
        if offset >= st.st_size and st.st_size > 0:
            raise RemoteError("IOException", f"Offset={offset} out of the range "
                                             f"[0, {st.st_size}); OPEN, path={path}")

    # -- datanode side ------------------------------------------------------
    def _create_checks(self, path: str, overwrite: bool) -> None:
        st = self.stat(path)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise RemoteError("FileAlreadyExistsException", f"{path} already exists as a directory")
        if st is not None and not overwrite:
            raise RemoteError("FileAlreadyExistsException",
                              f"{path} for client 127.0.0.1 already exists")

    def begin_create(self, path: str, overwrite: bool, user: str, nonce: str) -> str:
        """Checks, creates the missing parents and the file itself, empty (an
        existing one is truncated with overwrite): as in HDFS, the file is
        visible under its name, with a growing length, while it is written,
        and what was written stays when the writer goes away."""
        if path == "/":
            raise RemoteError("FileAlreadyExistsException", "/ already exists as a directory")
        with self.lock:
            self._create_checks(path, overwrite)
            self._make_parents(_parent(path), user, 0o755)
            local = self.local(path)
            open(local, "wb").close()
        return local

    def commit_create(self, path: str, partial: str, overwrite: bool, meta: dict) -> None:
        with self.lock:
            self.meta[path] = dict(meta)

    def begin_append(self, path: str, nonce: str) -> str:
        with self.lock:
            st = self.stat(path)
            if st is None:
                raise RemoteError("FileNotFoundException", f"File {path} not found.")
            if stat.S_ISDIR(st.st_mode):
                raise RemoteError("FileNotFoundException", f"Path is not a file: {path}")
            local = self.local(path)
            partial = os.path.join(os.path.dirname(local),
                                   f".{os.path.basename(local)[:64]}:{nonce}.part")
            shutil.copyfile(local, partial)
        return partial

    def commit_append(self, path: str, partial: str) -> None:
        with self.lock:
            st = self.stat(path)
            if st is None or stat.S_ISDIR(st.st_mode):
                os.unlink(partial)
                raise RemoteError("FileNotFoundException", f"File does not exist: {path} "
                                                           "(removed while being appended to)")
            os.rename(partial, self.local(path))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address, handler, standin: "WebHdfsStandIn"):
        self.standin = standin
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (getfqdn): skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        if self.standin.tls is not None:   # https: every accepted connection is TLS
            self.socket = self.standin.tls.wrap_socket(self.socket, server_side=True)

    def close_connections(self) -> None:
        """Cut every open connection (keep-alive ones included): their
        handler threads see EOF at once and end."""
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "WebHdfsStandIn/1.0"
    server: _Server

    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        if self.server.standin.verbose:
            sys.stderr.write(f"{self.server.standin.role_of(self.server)} "
                             f"{self.address_string()} {format % args}\n")

    def do_GET(self):
        self._safe_dispatch("GET")

    def do_PUT(self):
        self._safe_dispatch("PUT")

    def do_POST(self):
        self._safe_dispatch("POST")

    def do_DELETE(self):
        self._safe_dispatch("DELETE")

    # -- request pieces -----------------------------------------------------
    def _parse(self):
        split = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        op = (query.get("op") or "").upper() or None
        raw = split.path
        if raw == PREFIX or raw.startswith(PREFIX + "/"):
            raw_path = unquote(raw[len(PREFIX):]) or "/"
            try:
                return normalize(raw_path), raw_path, query, op, None
            except RemoteError as err:
                return raw_path, raw_path, query, op, err
        return unquote(raw), unquote(raw), query, op, RemoteError(
            "FileNotFoundException", f"Not a WebHDFS URL (expected {PREFIX}/<path>): {raw}")

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body(self):
        """Yield the request body, decoding chunked transfer encoding;
        _ClientGone when the connection ends (or the framing breaks) first."""
        readline = self._readline
        if self._chunked():
            while True:
                line = readline(65537)
                if not line.endswith(b"\n"):
                    raise _ClientGone("connection ended in a chunk header")
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise _ClientGone(f"bad chunk header {line!r}") from None
                if size == 0:
                    while True:   # trailers, up to the empty line
                        trailer = readline(65537)
                        if not trailer.endswith(b"\n"):
                            raise _ClientGone("connection ended in the trailers")
                        if trailer in (b"\r\n", b"\n"):
                            self._consumed = True
                            return
                yield from self._exactly(size)
                if readline(3) not in (b"\r\n", b"\n"):
                    raise _ClientGone("chunk not followed by CRLF")
        else:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise _ClientGone("bad Content-Length") from None
            yield from self._exactly(length)
            self._consumed = True

    def _readline(self, limit: int) -> bytes:
        try:
            return self.rfile.readline(limit)
        except OSError as err:   # reset, or cut by stop()/pause()
            raise _ClientGone(str(err)) from None

    def _exactly(self, count: int):
        while count > 0:
            try:
                data = self.rfile.read(min(count, COPY_CHUNK))
            except OSError as err:
                raise _ClientGone(str(err)) from None
            if not data:
                raise _ClientGone("connection ended mid-body")
            count -= len(data)
            yield data

    def _drain(self) -> None:
        if not self._consumed:
            for _ in self._body():
                pass

    def _send(self, status: int, body: bytes = b"", content_type: str | None = None,
              headers: list | None = None) -> None:
        self.send_response(status)
        for name, value in headers or ():
            self.send_header(name, value)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, headers: list | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers)

    def _send_error(self, err: RemoteError, headers: list | None = None) -> None:
        self._send_json(err.body(), err.status, list(headers or []) + err.headers)

    def _safe_dispatch(self, method: str) -> None:
        self._consumed = False
        try:
            self.dispatch(method)
        except (_ClientGone, ConnectionError):
            self.close_connection = True

    def dispatch(self, method: str) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


def _os_error(err: OSError, path: str) -> RemoteError:
    if isinstance(err, (FileNotFoundError, NotADirectoryError)):
        return RemoteError("FileNotFoundException", f"File does not exist: {path}")
    return RemoteError("IOException", f"{path}: {err.strerror or err}")


class _NamenodeHandler(_Handler):

    def dispatch(self, method: str) -> None:
        standin = self.server.standin
        path, _raw, query, op, path_error = self._parse()
        self._drain()   # no namenode operation takes a body
        try:
            user, auth_headers = standin._authenticate(self.headers, query)
        except RemoteError as err:
            standin._log(standin.requests, Request(method, path, op, query, None))
            self._send_error(err)
            return
        standin._log(standin.requests, Request(method, path, op, query, user))
        try:
            if standin.standby:   # the standby namenode of an HA pair refuses every operation
                raise RemoteError("StandbyException", f"Operation category {op or 'READ'} is "
                                                      f"not supported in state standby")
            if path_error is not None:
                raise path_error
            self._operation(method, op, path, query, user, auth_headers)
        except RemoteError as err:
            self._send_error(err, auth_headers)
        except ConnectionError:
            raise
        except OSError as err:
            self._send_error(_os_error(err, path), auth_headers)
        except Exception as err:  # a bug here must not hang or kill the server
            self._send_error(RemoteError("RuntimeException", f"{type(err).__name__}: {err}"),
                             auth_headers)

    def _operation(self, method, op, path, query, user, headers) -> None:
        ns = self.server.standin._ns
        if op is None:
            raise RemoteError("UnsupportedOperationException", "op=NULL is not supported")
        if method == "GET":
            if op == "GETFILESTATUS":
                return self._send_json(ns.get_file_status(path), headers=headers)
            if op == "LISTSTATUS":
                return self._send_json(ns.list_status(path), headers=headers)
            if op == "GETCONTENTSUMMARY":
                return self._send_json(ns.content_summary(path), headers=headers)
            if op == "GETHOMEDIRECTORY":
                return self._send_json({"Path": f"/user/{user}"}, headers=headers)
            if op == "GETTRASHROOT":
                return self._send_json({"Path": f"/user/{user}/.Trash"}, headers=headers)
            if op == "GETACLSTATUS":
                return self._send_json(ns.acl_status(path), headers=headers)
            if op == "OPEN":
                offset = _int(query, "offset", 0, minimum=0)
                length = _int(query, "length", None, minimum=0)
                _int(query, "buffersize", None, minimum=1)
                ns.open_check(path, offset)
                return self._redirect("OPEN", path, user, headers,
                                      offset=offset, length=length)
        elif method == "PUT":
            if op == "CREATE":
                # Like Hadoop's namenode: validate and redirect; the datanode
                # creates the file (and reports FileAlreadyExistsException).
                ticket = {"overwrite": _bool(query, "overwrite", False),
                          "permission": _permission(query, 0o644),
                          "replication": _int(query, "replication", None, minimum=1),
                          "blocksize": _int(query, "blocksize", None, minimum=1)}
                _int(query, "buffersize", None, minimum=1)
                if path == "/":
                    raise RemoteError("FileAlreadyExistsException",
                                      "/ already exists as a directory")
                return self._redirect("CREATE", path, user, headers, **ticket)
            if op == "MKDIRS":
                return self._send_json(ns.mkdirs(path, _permission(query, 0o755), user),
                                       headers=headers)
            if op == "RENAME":
                dst = query.get("destination")
                if not dst:
                    raise RemoteError("IllegalArgumentException",
                                      "Required param destination for op: RENAME "
                                      "is null or empty")
                if not dst.startswith("/"):
                    raise RemoteError("IllegalArgumentException",
                                      f"Invalid parameter value: destination = {dst} "
                                      "is not an absolute path")
                return self._send_json(ns.rename(path, normalize(dst)), headers=headers)
            if op == "SETPERMISSION":
                ns.set_permission(path, _permission(query, 0o755))
                return self._send(200, headers=headers)
            if op == "SETOWNER":
                ns.set_owner(path, query.get("owner"), query.get("group"))
                return self._send(200, headers=headers)
            if op == "SETTIMES":
                ns.set_times(path, _int(query, "modificationtime", -1, minimum=-1),
                             _int(query, "accesstime", -1, minimum=-1))
                return self._send(200, headers=headers)
            if op == "SETREPLICATION":
                return self._send_json(
                    ns.set_replication(path, _int(query, "replication", None, minimum=1)),
                    headers=headers)
        elif method == "POST":
            if op == "APPEND":
                _int(query, "buffersize", None, minimum=1)
                ns.open_check(path, 0)
                return self._redirect("APPEND", path, user, headers)
        elif method == "DELETE":
            if op == "DELETE":
                return self._send_json(ns.delete(path, _bool(query, "recursive", False)),
                                       headers=headers)
        if op in HADOOP_OPS.get(method, ()):
            raise RemoteError("UnsupportedOperationException",
                              f"{op} is not supported by this WebHDFS stand-in")
        kind = {"GET": "GetOpParam", "PUT": "PutOpParam", "POST": "PostOpParam",
                "DELETE": "DeleteOpParam"}[method]
        raise RemoteError("IllegalArgumentException",
                          f'Invalid value for webhdfs parameter "op": No enum constant '
                          f"org.apache.hadoop.hdfs.web.resources.{kind}.Op.{op}")

    def _redirect(self, op: str, path: str, user: str, headers: list, **ticket) -> None:
        standin = self.server.standin
        nonce = standin._issue(op, path, user, ticket)
        params = {"op": op, "user.name": user,
                  "namenoderpcaddress": f"127.0.0.1:{standin.port}"}
        for key, value in ticket.items():
            if value is None:
                continue
            if key == "permission":
                value = format(value, "o")
            elif isinstance(value, bool):
                value = "true" if value else "false"
            params[key] = value
        params["nonce"] = nonce
        location = (f"{standin.datanode_url}{PREFIX}{quote(path, safe='/')}?"
                    f"{urlencode(params)}")
        self._send(307, content_type="application/octet-stream",
                   headers=[("Location", location)] + list(headers))


class _DatanodeHandler(_Handler):

    def dispatch(self, method: str) -> None:
        standin = self.server.standin
        path, _raw, query, op, path_error = self._parse()
        ticket = standin._redeem(query.get("nonce"), method, op, path)
        user = ticket["user"] if ticket else None
        chunked = self._chunked()

        def log(status):
            standin._log(standin.datanode_requests,
                         DatanodeRequest(method, path, op, query, user, status, chunked))

        try:
            if path_error is not None:
                raise path_error
            if ticket is None:
                raise RemoteError("InvalidToken", "Missing, used or mismatched datanode ticket "
                                                  "(the stand-in's one-time 'nonce' parameter); "
                                                  "ask the namenode for a new redirect")
            if op == "CREATE" and method == "PUT":
                return self._write(path, ticket, log, append=False)
            if op == "APPEND" and method == "POST":
                return self._write(path, ticket, log, append=True)
            if op == "OPEN" and method == "GET":
                self._drain()
                return self._open(path, ticket, log)
            raise RemoteError("IllegalArgumentException", f"Invalid operation {op}")
        except _ClientGone:
            log(None)
            raise
        except ConnectionError:   # the client went away while we answered
            raise
        except (RemoteError, OSError) as err:
            if isinstance(err, OSError):
                err = _os_error(err, path)
            self._drain()   # read what the client sends, so it reads our answer
            log(err.status)
            self._send_error(err)

    def _write(self, path: str, ticket: dict, log, append: bool) -> None:
        ns = self.server.standin._ns
        nonce = ticket["nonce"]
        if append:
            partial = ns.begin_append(path, nonce)
        else:
            partial = ns.begin_create(path, ticket["overwrite"], ticket["user"], nonce)
        failure = None
        try:
            pace = _Pace(self.server.standin.datanode_rate)
            with open(partial, "ab") as out:
                for data in self._body():
                    pace.sent(len(data))
                    if failure is None:
                        try:
                            out.write(data)
                            out.flush()   # readers see the length grow, as in HDFS
                        except OSError as err:   # e.g. a full disk: keep reading, then say so
                            failure = err
        except BaseException:
            if append:
                _unlink(partial)
            raise   # a created file keeps what was written (HDFS after lease recovery)
        if failure is not None:
            if append:
                _unlink(partial)
            raise failure
        if append:
            ns.commit_append(path, partial)
            log(200)
            self._send(200)
            return
        ns.commit_create(path, partial, ticket["overwrite"], {
            "owner": ticket["user"], "group": "supergroup", "permission": ticket["permission"],
            "replication": ticket["replication"] or DEFAULT_REPLICATION,
            "blockSize": ticket["blocksize"] or DEFAULT_BLOCK_SIZE})
        log(201)
        self._send(201, headers=[("Location", f"webhdfs://127.0.0.1:"
                                              f"{self.server.standin.port}{path}")])

    def _open(self, path: str, ticket: dict, log) -> None:
        local = self.server.standin._ns.local(path)
        try:
            handle = open(local, "rb")
        except IsADirectoryError:
            raise RemoteError("FileNotFoundException", f"Path is not a file: {path}") from None
        with handle:
            size = os.fstat(handle.fileno()).st_size
            offset = min(ticket["offset"] or 0, size)
            count = size - offset
            if ticket["length"] is not None:
                count = min(count, ticket["length"])
            handle.seek(offset)
            log(200)
            self.close_connection = True   # as Hadoop's datanode does after OPEN
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(count))
            self.send_header("Connection", "close")
            self.end_headers()
            pace = _Pace(self.server.standin.datanode_rate)
            while count > 0:
                data = handle.read(min(count, COPY_CHUNK))
                if not data:   # truncated meanwhile: the client sees a short body
                    break
                self.wfile.write(data)
                count -= len(data)
                pace.sent(len(data))


class _Pace:
    """Holds one transfer to ``rate`` bytes per second (None: no limit), to
    stand for a network link slower than loopback (benchmarks)."""

    def __init__(self, rate: float | None):
        self.rate, self.bytes, self.started = rate, 0, None

    def sent(self, n: int) -> None:
        if not self.rate:
            return
        import time
        if self.started is None:
            self.started = time.monotonic()
        self.bytes += n
        ahead = self.bytes / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)   # pacing a transfer, not waiting for an event


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class WebHdfsStandIn:
    """A stand-in for an HDFS cluster's WebHDFS interface, written from
    Hadoop's WebHDFS REST documentation: a namenode on one loopback port and
    a datanode on another, both ThreadingHTTPServers (HTTP/1.1, keep-alive),
    over a local directory (HDFS path ``/a/b`` is ``data_dir/a/b``).

    Modelled: GETFILESTATUS, LISTSTATUS, GETCONTENTSUMMARY, GETHOMEDIRECTORY,
    GETTRASHROOT, GETACLSTATUS, MKDIRS, DELETE, RENAME (HDFS's boolean
    rename: false, not an error, for a missing source, an existing
    destination file or a missing destination parent; onto an existing
    directory it moves the source inside), SETPERMISSION, SETOWNER,
    SETTIMES, SETREPLICATION; CREATE and APPEND in two steps (the namenode
    answers 307 with a Location on the datanode port carrying a one-time
    ``nonce``; the datanode takes the body, Content-Length or chunked, and
    answers 201 with ``Location: webhdfs://...`` for CREATE, 200 for APPEND);
    OPEN through a 307 to the datanode (offset, length). ``overwrite``
    defaults to false; as in Hadoop, the namenode redirects regardless and
    the *datanode* answers 403 FileAlreadyExistsException. Missing parents
    of a created file are created. Errors are RemoteException JSON with the
    documented statuses (400 IllegalArgumentException / unknown op /
    UnsupportedOperationException, 401 SecurityException, 403 IOExceptions:
    AccessControlException, FileAlreadyExistsException,
    PathIsNotEmptyDirectoryException, ParentNotDirectoryException,
    InvalidToken, 404 FileNotFoundException, 500 RuntimeException). A path
    that is not absolute or has ".", ".." or ':' in a component: 400.
    Authentication: ``user.name`` (and ``doas``), or, with ``negotiate``,
    SPNEGO: "Authorization: Negotiate <token>" on every namenode request
    (none: 401 with "WWW-Authenticate: Negotiate"; refused: 403).

    NOT modelled:

    * blocks, replication and block placement (``replication`` and
      ``blockSize`` are only stored and reported), one datanode, no
      checksums (GETFILECHECKSUM unsupported), quotas, storage policies,
      erasure coding, symlinks, xattrs, ACL entries, snapshots, CONCAT,
      TRUNCATE, LISTSTATUS_BATCH, ``noredirect``;
    * visibility while writing is modelled as HDFS has it: a created file
      is visible under its name, with a growing length, from the datanode's
      first byte, and a writer that goes away leaves what it wrote (HDFS
      after lease recovery). Leases themselves are not: APPEND copies to a
      hidden partial (a name with ':', which HDFS forbids, so never listed),
      appends, renames;
    * leases and concurrent writers: two CREATEs of one path both write,
      the last to finish wins (or, without overwrite, the second gets
      FileAlreadyExistsException at its end instead of its start); namespace
      changes under a file being written are not tracked;
    * permissions: owner, group and permission bits are stored (in memory:
      lost on restart; paths nobody set report ``default_user``,
      "supergroup", 755/644) and reported, never enforced; no superuser, no
      proxy-user authorisation of ``doas``, no umask;
    * security beyond the Negotiate header's presence and the callable's
      verdict: no delegation tokens (the datanode trusts the namenode's
      one-time nonce instead), no hadoop.auth cookie, no CSRF header; TLS
      (``tls``) only as a server certificate, no client certificates;
    * HA beyond ``standby`` (two stand-ins over one ``data_dir``, one with
      ``standby = True``, answer as an HA pair's namenodes; no failover
      controller, no RetriableException), safe mode,
      trash policy, the namenode's atime precision, inode ids (``fileId`` is
      the local inode number).

    Attributes: ``url`` and ``datanode_url`` (after start), ``port`` and
    ``datanode_port``, ``data_dir``; ``requests``, a :class:`Request`
    (method, path, op, query, user) per namenode request, and
    ``datanode_requests``, a :class:`DatanodeRequest` (the same plus the
    status sent, None when the client went away mid-body, and whether the
    body was chunked) per datanode request; :meth:`wait_for` blocks until a
    condition on them holds. Local-file OSErrors are answered as IOException
    (403, as the documented table maps IOException), other failures of the
    stand-in as RuntimeException (500).
    """

    def __init__(self, data_dir: Path, *, negotiate: Callable[[str], "str | None"] | None = None,
                 default_user: str = "dr.who", port: int = 0, datanode_port: int = 0,
                 verbose: bool = False, datanode_rate: float | None = None,
                 tls: "ssl.SSLContext | None" = None):
        """``negotiate(token_b64)`` returns the user name, or None to refuse;
        it may also return a ``(user, reply_token_b64)`` pair, and the reply
        is then sent as "WWW-Authenticate: Negotiate <reply>" on the
        response (the mutual authentication requests-kerberos expects)."""
        self.data_dir = Path(data_dir)
        self.default_user = default_user
        self.verbose = verbose
        # Bytes per second of each datanode transfer (None: as fast as loopback).
        self.datanode_rate = datanode_rate
        # A server-side SSLContext: both ports speak https (swebhdfs).
        self.tls = tls
        # True: answer as the standby of an HA pair (403 StandbyException).
        # Two stand-ins over one data_dir make a pair; flip it to fail over.
        self.standby = False
        self.url: str | None = None
        self.datanode_url: str | None = None
        self.port = port
        self.datanode_port = datanode_port
        self.requests: list[Request] = []
        self.datanode_requests: list[DatanodeRequest] = []
        self._negotiate = negotiate
        self._ns = _Namespace(self.data_dir, default_user)
        self._cond = threading.Condition()
        self._tickets: dict[str, dict] = {}
        self._tickets_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._nn: tuple[_Server, threading.Thread] | None = None
        self._dn: tuple[_Server, threading.Thread] | None = None

    # -- life cycle -----------------------------------------------------------
    def _serve(self, handler, port: int) -> tuple[_Server, threading.Thread]:
        server = _Server(("127.0.0.1", port), handler, self)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"webhdfs-standin-{handler.__name__}", daemon=True)
        thread.start()
        return server, thread

    @staticmethod
    def _halt(pair: tuple[_Server, threading.Thread]) -> None:
        server, thread = pair
        server.shutdown()          # serve_forever returns (within its poll interval)
        server.server_close()      # the listening socket: new connections are refused
        server.close_connections()  # keep-alive and in-flight ones end too
        thread.join(5)

    def start(self) -> "WebHdfsStandIn":
        """Start the datanode and the namenode; returns self."""
        with self._state_lock:
            if self._dn is not None:
                raise RuntimeError("WebHdfsStandIn already started")
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dn = self._serve(_DatanodeHandler, self.datanode_port)
            self.datanode_port = self._dn[0].server_address[1]
            scheme = "https" if self.tls is not None else "http"
            self.datanode_url = f"{scheme}://127.0.0.1:{self.datanode_port}"
            try:
                self._nn = self._serve(_NamenodeHandler, self.port)
            except BaseException:
                self._halt(self._dn)
                self._dn = None
                raise
            self.port = self._nn[0].server_address[1]
            self.url = f"{scheme}://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        """Stop both servers and cut every open connection (idempotent)."""
        with self._state_lock:
            pairs = [p for p in (self._nn, self._dn) if p is not None]
            self._nn = self._dn = None
        for pair in pairs:
            self._halt(pair)

    def pause(self) -> None:
        """Make the namenode unreachable: its listening socket is closed (new
        connections are refused) and its open connections are cut. The
        datanode keeps serving."""
        with self._state_lock:
            if self._dn is None:
                raise RuntimeError("WebHdfsStandIn not started")
            pair, self._nn = self._nn, None
        if pair is not None:
            self._halt(pair)

    def resume(self) -> None:
        """Listen again, on the same namenode port (same :attr:`url`)."""
        with self._state_lock:
            if self._dn is None:
                raise RuntimeError("WebHdfsStandIn not started")
            if self._nn is None:
                self._nn = self._serve(_NamenodeHandler, self.port)

    @property
    def paused(self) -> bool:
        return self._dn is not None and self._nn is None

    def __enter__(self) -> "WebHdfsStandIn":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def role_of(self, server) -> str:
        return "datanode" if self._dn is not None and server is self._dn[0] else "namenode"

    # -- observation ------------------------------------------------------------
    def wait_for(self, predicate: Callable[["WebHdfsStandIn"], object],
                 timeout: float = 5.0) -> bool:
        """Block until ``predicate(self)`` is true, re-checked each time a
        request is logged (no polling); False on timeout."""
        with self._cond:
            return bool(self._cond.wait_for(lambda: predicate(self), timeout))

    def _log(self, log: list, entry) -> None:
        with self._cond:
            log.append(entry)
            self._cond.notify_all()

    # -- authentication and tickets -------------------------------------------
    def _authenticate(self, headers, query: dict) -> tuple[str, list]:
        reply_headers: list = []
        if self._negotiate is None:
            user = query.get("user.name") or self.default_user
        else:
            scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "negotiate" or not token:
                raise RemoteError("SecurityException", "Authentication required",
                                  headers=[("WWW-Authenticate", "Negotiate")])
            try:
                verdict = self._negotiate(token)
            except Exception as err:   # an acceptor raising on a bad token refuses it
                verdict, why = None, f"{type(err).__name__}: {err}"
            else:
                why = "token refused"
            reply = None
            if isinstance(verdict, tuple):
                verdict, reply = verdict
            if not verdict:
                raise RemoteError("AuthenticationException",
                                  f"GSSException: Negotiate authentication failed ({why})")
            user = verdict
            if reply:
                reply_headers.append(("WWW-Authenticate", f"Negotiate {reply}"))
        return query.get("doas") or user, reply_headers

    def _issue(self, op: str, path: str, user: str, values: dict) -> str:
        nonce = uuid.uuid4().hex
        ticket = {"op": op, "path": path, "user": user, "nonce": nonce,
                  "method": {"CREATE": "PUT", "APPEND": "POST", "OPEN": "GET"}[op],
                  "overwrite": False, "permission": 0o644, "replication": None,
                  "blocksize": None, "offset": 0, "length": None}
        ticket.update(values)
        with self._tickets_lock:
            self._tickets[nonce] = ticket
        return nonce

    def _redeem(self, nonce, method: str, op, path: str) -> dict | None:
        if not nonce:
            return None
        with self._tickets_lock:
            ticket = self._tickets.pop(nonce, None)
        if ticket is None or (ticket["method"], ticket["op"], ticket["path"]) != (method, op, path):
            return None
        return ticket


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Stand-in WebHDFS server (namenode + datanode) over a local directory. "
                    "Prints the namenode URL, serves until SIGTERM or SIGINT.")
    parser.add_argument("--data-dir", required=True, type=Path,
                        help="local directory holding the namespace (HDFS /a/b is DIR/a/b)")
    parser.add_argument("--port", type=int, default=0, help="namenode port (default: any free)")
    parser.add_argument("--datanode-port", type=int, default=0,
                        help="datanode port (default: any free)")
    parser.add_argument("--default-user", default="dr.who",
                        help="user of requests without user.name (default: dr.who)")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    parser.add_argument("--datanode-mbit", type=float, default=None,
                        help="hold each datanode transfer to this many Mbit/s (benchmarks)")
    args = parser.parse_args(argv)
    # Block the signals before any thread starts (threads inherit the mask),
    # then wait for one synchronously: no handler runs inside a lock.
    signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    standin = WebHdfsStandIn(args.data_dir, default_user=args.default_user, port=args.port,
                             datanode_port=args.datanode_port, verbose=args.verbose,
                             datanode_rate=args.datanode_mbit * 125_000 if args.datanode_mbit
                             else None).start()
    try:
        print(standin.url, flush=True)
        signal.sigwait(signals)
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
