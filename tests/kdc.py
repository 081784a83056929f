"""A real MIT Kerberos KDC on loopback for the tests, and a real GSSAPI acceptor.

``KDC(root)`` makes a realm of its own under ``root`` (``kdb5_util create``
with a private kdc.conf and krb5.conf), starts ``krb5kdc -n`` in the
foreground as a child on free 127.0.0.1 ports, waits until it accepts
connections, and stops it again (``with KDC(root) as kdc: ...``). Its
``principal()`` adds a principal with a random key and writes it to a keytab
with ``kadmin.local``. Nothing in /etc is read or written: every program gets
``KRB5_CONFIG`` and ``KRB5_KDC_PROFILE`` pointing at the realm's files.

``kdc_fixture`` (fixture name ``kdc``, session scope) is such a KDC with the
realm SPOT.TEST, the client ``spot@SPOT.TEST`` (``kdc.client_keytab``) and the
service ``HTTP/localhost@SPOT.TEST`` (``kdc.service_keytab``); tickets live
``KDC_MAX_LIFE`` seconds at most. ``krb5_env_fixture`` (fixture name
``krb5_env``, per test) points this process's Kerberos library at it and
restores the environment after the test (KRB5_CONFIG, KRB5CCNAME,
KRB5_KTNAME, KRB5_CLIENT_KTNAME and KRB5RCACHEDIR are process-wide).

``make_acceptor(service_keytab)`` is the server side of HTTP Negotiate (SPNEGO),
as a WebHDFS namenode does it: a token in, the authenticated user's short name
out (or None).
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

REALM = "SPOT.TEST"
# Short enough that a test can watch a renewal decision, long enough that
# no test's ticket expires under it by accident.
KDC_MAX_LIFE = 600
SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
ENV_KEYS = ("KRB5_CONFIG", "KRB5CCNAME", "KRB5_KTNAME", "KRB5_CLIENT_KTNAME", "KRB5RCACHEDIR",
            "KRB5_KDC_PROFILE", "KRB5_TRACE")


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if not found:
        pytest.skip(f"{name} is not installed (scripts/setup.sh --test installs krb5-kdc, "
                    f"krb5-admin-server and krb5-user)")
    return found


def _free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (the KDC listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both TCP and UDP on 127.0.0.1")


class KDC:
    """One realm and its running ``krb5kdc``; see the module's docstring.

    ``max_life`` (seconds) is the realm's longest ticket, and the default of
    every principal made here, ``krbtgt`` included."""

    def __init__(self, root: Path, realm: str = REALM, max_life: int = KDC_MAX_LIFE,
                 start_timeout: float = 30.0):
        self.root = Path(root)
        self.realm = realm
        self.max_life = int(max_life)
        self.start_timeout = start_timeout
        self.krb5_conf = self.root / "krb5.conf"
        self.kdc_conf = self.root / "kdc.conf"
        self.log = self.root / "kdc.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._created = False
        # Set by standard_realm():
        self.client_principal: str | None = None
        self.client_keytab: Path | None = None
        self.service_principal: str | None = None
        self.service_keytab: Path | None = None

    # -- the realm's files -----------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment of the realm's programs (kinit, kadmin.local, krb5kdc)."""
        env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
        env.update(KRB5_CONFIG=str(self.krb5_conf), KRB5_KDC_PROFILE=str(self.kdc_conf),
                   KRB5CCNAME=f"FILE:{self.root / 'ccache.default'}", LC_ALL="C")
        return env

    def _write_config(self) -> None:
        db = self.root / "db"
        db.mkdir(mode=0o700, exist_ok=True)
        self.kdc_conf.write_text(f"""\
[kdcdefaults]
    kdc_ports = {self.port}
    kdc_tcp_ports = {self.port}

[realms]
    {self.realm} = {{
        database_name = {db}/principal
        key_stash_file = {db}/stash
        acl_file = {db}/kadm5.acl
        admin_keytab = FILE:{db}/kadm5.keytab
        kdc_listen = 127.0.0.1:{self.port}
        kdc_tcp_listen = 127.0.0.1:{self.port}
        max_life = {self.max_life}
        max_renewable_life = 0
        default_principal_flags = +preauth
    }}

[logging]
    kdc = FILE:{self.log}
    admin_server = FILE:{self.root}/kadmin.log
    default = FILE:{self.root}/krb5lib.log
""")
        # TCP first: when the KDC is down, the refused connection is an
        # immediate "Cannot contact any KDC", not a series of UDP timeouts.
        self.krb5_conf.write_text(f"""\
[libdefaults]
    default_realm = {self.realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    kdc_timeout = 3s
    max_retries = 2
    default_ccache_name = FILE:{self.root}/ccache.default
    default_keytab_name = FILE:{self.root}/default.keytab
    default_client_keytab_name = FILE:{self.root}/default-client.keytab

[realms]
    {self.realm} = {{
        kdc = 127.0.0.1:{self.port}
    }}

[domain_realm]
    localhost = {self.realm}
    .localhost = {self.realm}
""")

    def _run(self, *argv: str, timeout: float = 60) -> str:
        done = subprocess.run(list(argv), env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()}")
        return done.stdout

    def kadmin(self, *command: str) -> str:
        """One ``kadmin.local`` command, as an argument list (no query string)."""
        return self._run(_tool("kadmin.local"), "-r", self.realm, *command)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> "KDC":
        kdb5_util, krb5kdc = _tool("kdb5_util"), _tool("krb5kdc")
        _tool("kadmin.local")
        self.root.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _ in range(5):   # another process may take the port between choice and bind
            self.port = _free_port()
            self._write_config()
            if not self._created:
                self._run(kdb5_util, "-r", self.realm, "-P", secrets.token_urlsafe(24),
                          "create", "-s")
                self._created = True
            log_start = self.log.stat().st_size if self.log.exists() else 0
            self.proc = subprocess.Popen([krb5kdc, "-n", "-r", self.realm], env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
            if self._wait_ready():
                return self
            _, err = self.proc.communicate()
            self.proc = None
            last_error = (err.decode(errors="replace").strip() + " "
                          + self._log_since(log_start)).strip()
            if "in use" not in last_error:
                break
        raise RuntimeError(f"krb5kdc did not start: {last_error or 'no message'}")

    def _log_since(self, offset: int) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").strip()[-2000:]

    def _wait_ready(self) -> bool:
        """Poll until the KDC accepts a TCP connection (it opens its UDP and
        TCP sockets together, after loading the database) or exits."""
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"krb5kdc did not listen on 127.0.0.1:{self.port} within "
                           f"{self.start_timeout:.0f} s")

    def stop(self) -> None:
        """Stop the KDC (SIGTERM, then SIGKILL) and reap it; the realm stays,
        and ``start()`` starts it again (perhaps on another port: the realm's
        krb5.conf follows)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "KDC":
        return self if self.running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- principals ----------------------------------------------------------
    def principal(self, name: str, keytab: Path | None = None,
                  max_life: int | None = None) -> str:
        """Add ``name`` (``name@REALM`` when it has no realm) with a random
        key; with ``keytab``, write its key there. Returns the full name."""
        full = name if "@" in name else f"{name}@{self.realm}"
        args = ["addprinc", "-randkey"]
        if max_life is not None:
            args += ["-maxlife", f"{int(max_life)} seconds"]
        self.kadmin(*args, full)
        if keytab is not None:
            self.kadmin("ktadd", "-k", f"FILE:{keytab}", full)
        return full

    def delete_principal(self, name: str) -> None:
        full = name if "@" in name else f"{name}@{self.realm}"
        self.kadmin("delprinc", "-force", full)

    # -- the process's Kerberos environment ---------------------------------
    @contextlib.contextmanager
    def client_environment(self, ccache: Path) -> Iterator[None]:
        """Point this process's Kerberos library at the realm (and at
        ``ccache`` as the default cache), then restore the environment exactly."""
        with environ(**{**dict.fromkeys(ENV_KEYS), "KRB5_CONFIG": str(self.krb5_conf),
                        "KRB5CCNAME": f"FILE:{ccache}", "KRB5RCACHEDIR": str(self.root)}):
            yield


@contextlib.contextmanager
def environ(**values: str | None) -> Iterator[None]:
    """Set (a value) or unset (None) environment variables for the block,
    then restore each exactly as it was."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def standard_realm(root: Path, max_life: int = KDC_MAX_LIFE) -> KDC:
    """A started KDC with the client spot@REALM and the service HTTP/localhost@REALM;
    ``client_principal``, ``client_keytab``, ``service_principal`` and
    ``service_keytab`` name them. Stop it (``with``) when done."""
    kdc = KDC(root, max_life=max_life).start()
    try:
        kdc.client_keytab = kdc.root / "spot.keytab"
        kdc.service_keytab = kdc.root / "http.keytab"
        kdc.client_principal = kdc.principal("spot", kdc.client_keytab)
        kdc.service_principal = kdc.principal("HTTP/localhost", kdc.service_keytab)
    except BaseException:
        kdc.stop()
        raise
    return kdc


@pytest.fixture(scope="session", name="kdc")
def kdc_fixture(tmp_path_factory):
    """The session's KDC (see ``standard_realm``), stopped at the end of the session."""
    with standard_realm(tmp_path_factory.mktemp("kdc")) as kdc:
        yield kdc


@pytest.fixture(name="krb5_env")
def krb5_env_fixture(kdc, tmp_path):
    """This process's Kerberos library pointed at the session's KDC for one
    test (default ccache: an empty file cache of the test's own)."""
    with kdc.client_environment(tmp_path / "krb5cc.default"):
        yield kdc


# -- the server side of HTTP Negotiate ----------------------------------------
class Accepted(str):
    """The short name of an authenticated user ("spot" for spot@SPOT.TEST, as
    Hadoop's default auth_to_local makes it), with ``principal`` (the full
    initiator name) and ``token`` (the acceptor's answer in base64, for a
    ``WWW-Authenticate: Negotiate <token>`` header: mutual authentication;
    None when GSSAPI made none)."""

    principal: str
    token: str | None

    def __new__(cls, short: str, principal: str, token: str | None):
        self = super().__new__(cls, short)
        self.principal = principal
        self.token = token
        return self


def make_acceptor(service_keytab: Path) -> Callable[[str], Accepted | None]:
    """A real GSSAPI acceptor with the keys in ``service_keytab``: called
    with the base64 token of an ``Authorization: Negotiate <token>`` header,
    it returns the initiator's short name (an ``Accepted``), or None when the
    token is refused (malformed, for another service, expired, replayed).
    Its replay cache is a file beside the keytab. The process's KRB5_CONFIG
    must name the realm (``krb5_env``)."""
    import gssapi

    keytab = Path(service_keytab).resolve()
    store = {"keytab": f"FILE:{keytab}",
             "rcache": f"file2:{keytab.parent / (keytab.name + '.rcache2')}"}

    def accept(token_b64: str) -> Accepted | None:
        try:
            token = base64.b64decode(token_b64.strip(), validate=True)
            creds = gssapi.Credentials(usage="accept", store=store)
            ctx = gssapi.SecurityContext(usage="accept", creds=creds)
            answer = ctx.step(token)
            if not ctx.complete:
                return None
            principal = str(ctx.initiator_name)
        except (gssapi.exceptions.GSSError, binascii.Error, ValueError):
            return None
        short = principal.split("@", 1)[0].split("/", 1)[0]
        return Accepted(short, principal, base64.b64encode(answer).decode() if answer else None)

    return accept
