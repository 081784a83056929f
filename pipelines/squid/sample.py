"""Make a real Squid access.log: the real ``squid`` (Debian package ``squid``)
runs on loopback as a forward proxy in front of a local web server, Python
sends requests through it, and squid writes the log in its native format.

How:

* A web server (``http.server`` in a thread, 127.0.0.1, a free port) serves
  a few paths with different status codes, sizes and content types.
* squid runs in the foreground (``-N``) with a private ``squid.conf`` in a
  temporary directory: ``http_port`` on 127.0.0.1 and a free port, no disk
  cache and nothing cached in memory (``cache deny all``), the access log in
  the native ``squid`` format with query strings kept (``strip_query_terms
  off``; squid's default strips them), its cache log, pid file and core
  directory in the temporary directory, ``netdb_filename none`` and no
  pinger, ICP or HTCP, so that nothing is written anywhere else. Paths under
  ``/private/`` need proxy credentials (checked by squid's own
  ``basic_fake_auth`` helper, which accepts any password: the log then names
  the user), paths under ``/blocked/`` are refused by squid (403), and a
  request to a port where nothing listens gets squid's 503.
* Run as root, squid is started as the user ``proxy`` (Debian's user for it;
  ``nobody`` if there is none) and the temporary directory is handed to that
  user: squid never runs as root here. Otherwise it runs as the caller.
* The requests go through ``http.client`` connected to squid with absolute
  URLs (what a browser configured with a proxy sends), and CONNECT through
  ``set_tunnel``. Not urllib's ``ProxyHandler``: it bypasses the proxy for
  hosts listed in the ``no_proxy`` environment variable, which often lists
  127.0.0.1.
* squid is stopped with SIGTERM (it closes its log at shutdown; the
  shutdown grace period is set to 1 s) and waited for; the log is then
  copied into the destination folder under a hidden name and renamed, so it
  appears complete to a watcher.

Every wait has a time limit; squid and the web server are stopped even when
something fails. Readiness is polled (a TCP connect to squid's port), never
assumed after a sleep.

    python -m pipelines.squid.sample DEST_DIR --requests 200
"""
from __future__ import annotations

import argparse
import http.client
import http.server
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from base64 import b64encode
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from spot_ingest.pipeline import ToolMissingError

SQUID_DIRS = ("/usr/sbin", "/sbin")      # where Debian puts squid: not on a normal user's PATH
HELPER_DIRS = ("/usr/lib/squid",)        # squid's helpers (basic_fake_auth)
SAMPLE_NAME = "access.log.0"             # what ``squid -k rotate`` names the last finished log
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 15.0
INSTALL_HINT = "install it: apt-get install squid"


def find_squid(path: str | None = None, dirs: tuple[str, ...] | None = None) -> str:
    """The squid program: on ``path`` (default $PATH), else in ``dirs``
    (default SQUID_DIRS). Raises ``ToolMissingError`` naming the package."""
    dirs = SQUID_DIRS if dirs is None else dirs
    found = shutil.which("squid", path=path) or shutil.which("squid", path=os.pathsep.join(dirs))
    if found is None:
        raise ToolMissingError(f"the squid sample needs squid (not found on PATH, "
                               f"{', '.join(dirs)}); {INSTALL_HINT}")
    return found


def find_helper(name: str, squid: str) -> str:
    """A squid helper program: next to squid's installation (``/usr/lib/squid``)."""
    prefix = Path(squid).resolve().parent.parent
    for d in (str(prefix / "lib" / "squid"), *HELPER_DIRS):
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ToolMissingError(f"the squid sample needs squid's helper {name} (not found in "
                           f"{', '.join(HELPER_DIRS)}); {INSTALL_HINT}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the web server behind squid ----------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    """Routes (the query string is ignored unless said):

    ``/`` and ``/page/*``  200 text/html
    ``/data.json``         200 application/json; charset=utf-8
    ``/big.bin?kb=N``      200 application/octet-stream, N KiB (default 256)
    ``/slow?ms=N``         200 text/plain after N ms (at most 2000)
    ``/redirect``          302 to /
    ``/empty``             204, no body
    ``/error``             500 text/plain
    ``/submit`` (POST)     201 text/plain, says how many bytes came
    ``/private/*``         200 text/plain (squid asks for credentials first)
    anything else          404 text/html
    HEAD: the same status and headers, no body."""

    server_version = "spot-ingest-sample/1"
    sys_version = ""

    def log_message(self, format, *args) -> None:   # noqa: A002 - the base class's name
        pass    # quiet: the access log is squid's

    def _route(self, method: str) -> tuple[int, str, bytes, dict[str, str]]:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        path = url.path
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            got = self.rfile.read(length) if length else b""
            if path == "/submit":
                return 201, "text/plain", f"received {len(got)} bytes\n".encode(), {}
            return 404, "text/html", b"<html><body>not found</body></html>\n", {}
        if path == "/" or path.startswith("/page/"):
            body = (f"<html><head><title>{path}</title></head><body>"
                    + "lorem ipsum " * (1 + len(path) * 7) + "</body></html>\n").encode()
            return 200, "text/html", body, {}
        if path == "/data.json":
            return 200, "application/json; charset=utf-8", b'{"items": [1, 2, 3]}\n', {}
        if path == "/big.bin":
            kb = min(int(query.get("kb", ["256"])[0] or 256), 4096)
            return 200, "application/octet-stream", bytes(range(256)) * 4 * kb, {}
        if path == "/slow":
            # A server that takes its time: squid's elapsed column shows it.
            threading.Event().wait(min(int(query.get("ms", ["100"])[0] or 100), 2000) / 1000)
            return 200, "text/plain", b"slow answer\n", {}
        if path == "/redirect":
            return 302, "text/html", b"<a href=\"/\">moved</a>\n", {"Location": "/"}
        if path == "/empty":
            return 204, "", b"", {}
        if path == "/error":
            return 500, "text/plain", b"internal error\n", {}
        if path.startswith("/private/"):
            return 200, "text/plain", b"for authenticated users\n", {}
        return 404, "text/html", b"<html><body>not found</body></html>\n", {}

    def _answer(self, method: str) -> None:
        status, ctype, body, extra = self._route(method)
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if method != "HEAD" and status != 204:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def do_POST(self) -> None:
        self._answer("POST")


class WebServer:
    """``http.server`` on 127.0.0.1 and a free port, served by a thread."""

    def __init__(self) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.port: int = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1}, name="squid-sample-web",
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()          # returns once serve_forever has stopped
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def __enter__(self) -> "WebServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- squid ----------------------------------------------------------------------

def squid_conf(workdir: Path, port: int, fake_auth: str) -> str:
    """The private configuration: everything squid writes goes to ``workdir``."""
    return "\n".join([
        f"http_port 127.0.0.1:{port}",
        "visible_hostname spot-ingest-sample",
        # No disk cache (no cache_dir), and nothing kept in memory either:
        # every request goes to the web server, as the sample wants.
        "cache deny all",
        "cache_mem 8 MB",
        f"access_log stdio:{workdir / 'access.log'} squid",
        "strip_query_terms off",
        "logfile_rotate 0",
        f"cache_log {workdir / 'cache.log'}",
        "cache_store_log none",
        f"pid_filename {workdir / 'squid.pid'}",
        f"coredump_dir {workdir}",
        "netdb_filename none",
        "pinger_enable off",
        "icp_port 0",
        "htcp_port 0",
        "shutdown_lifetime 1 seconds",
        # Paths under /private/ need credentials (any password is accepted by
        # basic_fake_auth, so the log names the user); /blocked/ is refused.
        f"auth_param basic program {fake_auth}",
        "auth_param basic children 1 startup=1 idle=1",
        "auth_param basic realm spot-ingest-sample",
        "acl authed proxy_auth REQUIRED",
        "acl private urlpath_regex ^/private/",
        "acl blocked urlpath_regex ^/blocked/",
        "http_access deny blocked",
        "http_access deny private !authed",
        "http_access allow localhost",
        "http_access deny all",
        ""])


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) squid runs as when we are root: ``proxy``, else ``nobody``; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("proxy", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    raise RuntimeError("running as root, and there is no user 'proxy' or 'nobody' to run squid as")


class Squid:
    """squid in the foreground on 127.0.0.1 and a free port, configured by
    ``squid_conf`` in ``workdir``. Ready when the constructor returns (its
    port accepts connections); ``close`` stops it and waits for it to exit,
    which is when its access log is complete."""

    def __init__(self, workdir: Path, squid: str | None = None):
        self.workdir = Path(workdir)
        self.binary = squid or find_squid()
        fake_auth = find_helper("basic_fake_auth", self.binary)
        self.port = _free_port()
        self.conf = self.workdir / "squid.conf"
        self.conf.write_text(squid_conf(self.workdir, self.port, fake_auth))
        self.access_log = self.workdir / "access.log"
        self.output = self.workdir / "squid.out"
        ids = _run_as()
        if ids is not None:
            uid, gid = ids
            for p in (self.workdir, self.conf):
                os.chown(p, uid, gid)
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-N", "-f", str(self.conf)], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
                **({"user": ids[0], "group": ids[1], "extra_groups": []} if ids else {}))
        try:
            self._wait_ready()
        except BaseException:
            self.close()     # never left running when it did not come up
            raise

    def diagnostics(self) -> str:
        """The end of squid's own output and cache log, for error messages."""
        parts = []
        for p in (self.output, self.workdir / "cache.log"):
            try:
                text = p.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"{p.name}: " + " | ".join(text.splitlines()[-8:]))
        return "; ".join(parts) or "no output"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                hint = ""
                if os.geteuid() == 0:
                    hint = (" (run as root, squid runs as user proxy: the temporary directory "
                            f"{self.workdir.parent} must be reachable by it)")
                raise RuntimeError(f"squid exited with status {self.proc.returncode} before "
                                   f"it listened{hint}: {self.diagnostics()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"squid did not listen on 127.0.0.1:{self.port} within "
                                       f"{START_TIMEOUT:g} s: {self.diagnostics()}") from None
                try:
                    self.proc.wait(timeout=0.05)   # poll again soon, or notice an exit at once
                except subprocess.TimeoutExpired:
                    pass

    def close(self) -> int:
        """Stop squid (SIGTERM: a clean shutdown that closes the access log),
        wait for it; SIGKILL its process group after STOP_TIMEOUT. Returns
        its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        # Its helpers (basic_fake_auth) are in its session: none may outlive it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        return self.proc.returncode

    def __enter__(self) -> "Squid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the requests -----------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One request to send through squid. ``path`` is on the web server
    (``target="web"``), or on a port where nothing listens (``"closed"``);
    ``method`` CONNECT opens a tunnel to the web server and sends a GET of
    ``path`` through it."""
    method: str
    path: str
    body: bytes | None = None
    user: str | None = None
    target: str = "web"


@dataclass(frozen=True)
class Exchange:
    """What the client did and saw: the URL as squid was asked for it (an
    absolute URL, or ``host:port`` for CONNECT), the status squid answered
    (for CONNECT: squid's 200 for the tunnel), and the proxy user sent."""
    method: str
    url: str
    status: int
    user: str | None


def standard_requests(count: int, seed: int = 1) -> list[Request]:
    """A deterministic mix: pages, JSON, large downloads, a slow answer,
    404s, a redirect, 204, 500, query strings, HEAD, POST, CONNECT, proxy
    users (one with a space in the name), requests squid refuses (403, 407)
    and one to a port where nothing listens (503)."""
    rnd = random.Random(seed)
    kinds = [
        lambda i: Request("GET", "/"),
        lambda i: Request("GET", f"/page/{rnd.randrange(1000)}.html"),
        lambda i: Request("GET", f"/data.json?id={rnd.randrange(10**6)}&q=a%20b"),
        lambda i: Request("GET", f"/missing/{i}.png"),
        lambda i: Request("HEAD", f"/page/{i}.html"),
        lambda i: Request("POST", "/submit",
                          body=bytes(rnd.randrange(256) for _ in range(1 + i % 700))),
        lambda i: Request("GET", f"/big.bin?kb={rnd.choice([16, 64, 300])}"),
        lambda i: Request("GET", "/redirect"),
        lambda i: Request("GET", f"/private/report-{i}.txt",
                          user=rnd.choice(["alice", "bob smith"])),
        lambda i: Request("GET", "/empty"),
        lambda i: Request("GET", "/error"),
        lambda i: Request("CONNECT", f"/page/tunnel-{i}.html"),
        lambda i: Request("GET", f"/blocked/{i}"),
        lambda i: Request("GET", f"/private/nocreds-{i}"),
        lambda i: Request("GET", f"/slow?ms={rnd.choice([20, 150])}"),
        lambda i: Request("POST", f"/nowhere?i={i}", body=b"x=1"),
        lambda i: Request("GET", "/", target="closed"),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


def send(proxy_port: int, web_port: int, closed_port: int, req: Request) -> Exchange:
    """Send one request through squid on a new connection; read the whole answer."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=REQUEST_TIMEOUT)
    headers = {"User-Agent": "spot-ingest-squid-sample", "Connection": "close"}
    if req.user is not None:
        token = b64encode(f"{req.user}:secret".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    try:
        if req.method == "CONNECT":
            conn.set_tunnel("127.0.0.1", web_port)
            conn.request("GET", req.path, headers={"Host": f"127.0.0.1:{web_port}",
                                                   "Connection": "close"})
            conn.getresponse().read()
            return Exchange("CONNECT", f"127.0.0.1:{web_port}", 200, None)
        port = web_port if req.target == "web" else closed_port
        url = f"http://127.0.0.1:{port}{req.path}"
        conn.request(req.method, url, body=req.body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return Exchange(req.method, url, resp.status, req.user)
    finally:
        conn.close()


@dataclass(frozen=True)
class SquidSample:
    path: Path
    exchanges: list[Exchange]


def make_access_log(dest_dir: Path, requests: int | list[Request] = 60, seed: int = 1,
                    name: str = SAMPLE_NAME) -> SquidSample:
    """Run squid and the web server, send the requests, stop squid, and put
    its access log in ``dest_dir/name`` (hidden name first, then renamed).
    Returns the path and what the client did and saw, in order.

    Raises ``ToolMissingError`` when squid (or its helper) is not installed,
    ``RuntimeError`` when squid does not start, fails or writes no log."""
    dest_dir = Path(dest_dir)
    squid = find_squid()
    plan = standard_requests(requests, seed) if isinstance(requests, int) else requests
    exchanges: list[Exchange] = []
    with tempfile.TemporaryDirectory(prefix="spot-squid-") as tmp:
        workdir = Path(tmp)
        with WebServer() as web:
            proxy = Squid(workdir, squid)
            try:
                closed = _free_port()
                for req in plan:
                    exchanges.append(send(proxy.port, web.port, closed, req))
            finally:
                status = proxy.close()
        if status != 0:
            raise RuntimeError(f"squid exited with status {status}: {proxy.diagnostics()}")
        if not proxy.access_log.is_file():
            raise RuntimeError(f"squid wrote no access log: {proxy.diagnostics()}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / name
        part = dest_dir / f".{name}.part"
        shutil.copyfile(proxy.access_log, part)
        os.replace(part, final)
    return SquidSample(final, exchanges)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest_dir", type=Path)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name", default=SAMPLE_NAME)
    args = parser.parse_args(argv)
    try:
        sample = make_access_log(args.dest_dir, args.requests, args.seed, args.name)
    except ToolMissingError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{sample.path}: {len(sample.exchanges)} requests")


if __name__ == "__main__":
    main()
