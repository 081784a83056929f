"""Kerberos for the HDFS client, against a real MIT KDC on loopback (tests/kdc.py):
keytab logins and their renewal, the one-line errors, and SPNEGO requests
(requests_kerberos and HdfsCLI's KerberosClient) checked by a real GSSAPI
acceptor behind a small HTTP server."""
from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

gssapi = pytest.importorskip("gssapi")
requests_kerberos = pytest.importorskip("requests_kerberos")
import requests  # noqa: E402
from hdfs.ext.kerberos import KerberosClient  # noqa: E402

# The fixtures "kdc" (session) and "krb5_env" (per test); see tests/kdc.py.
from kdc import ENV_KEYS, environ, make_acceptor, standard_realm  # noqa: E402
from spot_ingest.kerberos import (KerberosError, KerberosSettings, KerberosUnavailable,  # noqa: E402
                                  KeytabLogin, negotiate_auth)
from spot_ingest.policy import RetryLater  # noqa: E402

NEGOTIATE = re.compile(r"^Negotiate [A-Za-z0-9+/]+=*$")


class Clock:
    """An injected clock: starts at the real time, moves only when told."""

    def __init__(self):
        import time
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _krb5_environment_restored():
    """The Kerberos variables are process-wide: every test leaves them as it found them."""
    before = {k: os.environ.get(k) for k in ENV_KEYS}
    yield
    assert {k: os.environ.get(k) for k in ENV_KEYS} == before


def settings_for(kdc, **keys) -> KerberosSettings:
    values = {"principal": kdc.client_principal, "keytab": kdc.client_keytab}
    values.update(keys)
    return KerberosSettings(**values)


def leftovers(state_dir: Path) -> list[str]:
    return sorted(p.name for p in state_dir.iterdir()) if state_dir.exists() else []


# -- login and renewal ---------------------------------------------------------
def test_keytab_login_holds_a_tgt_in_a_private_cache(krb5_env, tmp_path):
    kdc = krb5_env
    clock = Clock()
    state = tmp_path / "state"
    login = KeytabLogin(settings_for(kdc), state, clock=clock)
    assert login.expires_at == 0.0 and login.logins == 0
    assert login.ccache == state / f"krb5cc_spot_{os.getpid()}"
    assert login.environment() == {"KRB5CCNAME": f"FILE:{login.ccache}"}

    login.ensure()
    assert login.logins == 1
    assert stat.S_IMODE(login.ccache.stat().st_mode) == 0o600
    assert leftovers(state) == [login.ccache.name]      # no temporary cache left
    creds = gssapi.Credentials(usage="initiate", store={"ccache": login.ccache_name})
    assert str(creds.name) == "spot@SPOT.TEST"
    # The KDC caps tickets at max_life (600 s); expires_at is on the injected clock.
    assert kdc.max_life - 5 <= login.lifetime <= kdc.max_life
    assert login.expires_at == pytest.approx(clock.now + login.lifetime, abs=2)
    # The default cache (KRB5CCNAME) is not touched: it is a private file.
    assert not (tmp_path / "krb5cc.default").exists()

    login.ensure()                                       # plenty left: no new login
    assert login.logins == 1
    login.close()
    assert not login.ccache.exists()


def test_ensure_logs_in_again_when_a_fifth_of_the_lifetime_is_left(krb5_env, tmp_path):
    clock = Clock()
    login = KeytabLogin(settings_for(krb5_env), tmp_path, clock=clock)
    login.ensure()
    first_expiry, inode = login.expires_at, login.ccache.stat().st_ino
    margin = login.lifetime / 5                      # 120 s of a 600 s ticket: above 60 s
    assert login.renew_margin() == pytest.approx(margin)

    clock.now = first_expiry - margin - 1
    login.ensure()
    assert login.logins == 1 and login.expires_at == first_expiry

    clock.now = first_expiry - margin + 1
    login.ensure()
    assert login.logins == 2
    assert login.ccache.stat().st_ino != inode           # a new ticket, atomically in place
    assert login.expires_at == pytest.approx(clock.now + login.lifetime, abs=2)
    assert login.expires_at > first_expiry
    login.close()


def test_a_short_ticket_is_renewed_60_seconds_before_it_expires(krb5_env, tmp_path):
    kdc = krb5_env
    keytab = tmp_path / "short.keytab"
    principal = kdc.principal(f"short-{os.getpid()}-{tmp_path.name}"[:60], keytab, max_life=90)
    clock = Clock()
    login = KeytabLogin(KerberosSettings(principal, keytab, ccache=tmp_path / "cc" / "short"),
                        tmp_path, clock=clock)
    login.ensure()
    assert 85 <= login.lifetime <= 90                     # the principal's max life
    assert login.renew_margin() == 60                     # max(60 s, 18 s)
    assert login.ccache == tmp_path / "cc" / "short"      # the configured cache

    clock.now = login.expires_at - 61
    login.ensure()
    assert login.logins == 1
    clock.now = login.expires_at - 59
    login.ensure()
    assert login.logins == 2
    assert login.expires_at == pytest.approx(clock.now + login.lifetime, abs=2)
    login.close()
    assert login.ccache.exists()                          # a configured cache is not removed


def test_concurrent_ensure_logs_in_once(krb5_env, tmp_path):
    login = KeytabLogin(settings_for(krb5_env), tmp_path)
    start = threading.Barrier(8)
    errors = []

    def run():
        start.wait()
        try:
            login.ensure()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and login.logins == 1
    login.close()


def test_a_forked_child_does_not_use_its_parents_cache(krb5_env, tmp_path):
    login = KeytabLogin(settings_for(krb5_env), tmp_path)
    login.ensure()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                          # the child: report and leave at once
        try:
            os.write(write, json.dumps([str(login.ccache), login.expires_at]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ccache, child_expiry = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert child_ccache == str(tmp_path / f"krb5cc_spot_{pid}") and child_expiry == 0.0
    assert login.ccache == tmp_path / f"krb5cc_spot_{os.getpid()}" and login.expires_at > 0
    login.close()


# -- errors ----------------------------------------------------------------------
def _failed_login(settings: KerberosSettings, state: Path) -> KerberosError:
    login = KeytabLogin(settings, state)
    with pytest.raises(KerberosError) as info:
        login.ensure()
    assert login.logins == 0 and login.expires_at == 0.0
    assert not login.ccache.exists()
    assert leftovers(state) == []                         # no temporary cache left either
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"Kerberos login of {settings.principal} with keytab "
                              f"{settings.keytab} failed: ")
    return info.value


def test_a_principal_not_in_the_keytab_is_one_clear_line(krb5_env, tmp_path):
    error = _failed_login(settings_for(krb5_env, principal="nobody@SPOT.TEST"), tmp_path / "s")
    assert "Keytab contains no suitable keys for nobody@SPOT.TEST" in str(error)
    assert not isinstance(error, RetryLater)


def test_a_principal_unknown_to_the_kdc_is_one_clear_line(krb5_env, tmp_path):
    kdc = krb5_env
    keytab = tmp_path / "gone.keytab"
    principal = kdc.principal(f"gone-{tmp_path.name}"[:60], keytab)
    kdc.delete_principal(principal)
    error = _failed_login(KerberosSettings(principal, keytab), tmp_path / "s")
    assert "not found in Kerberos database" in str(error)
    assert not isinstance(error, RetryLater)


def test_a_missing_keytab_is_one_clear_line(krb5_env, tmp_path):
    missing = tmp_path / "no-such.keytab"
    error = _failed_login(settings_for(krb5_env, keytab=missing), tmp_path / "s")
    assert f"Key table file '{missing}' not found" in str(error)
    assert not isinstance(error, RetryLater)


def test_an_unreachable_kdc_is_retry_later(tmp_path, caplog):
    """A KDC of its own, stopped in the middle: a first login fails with
    KerberosUnavailable (a RetryLater); a held ticket serves until it expires."""
    with standard_realm(tmp_path / "realm") as kdc, \
            kdc.client_environment(tmp_path / "krb5cc.default"):
        clock = Clock()
        login = KeytabLogin(settings_for(kdc), tmp_path / "held", clock=clock)
        login.ensure()
        expiry = login.expires_at
        kdc.stop()

        error = _failed_login(settings_for(kdc), tmp_path / "fresh")
        assert isinstance(error, KerberosUnavailable)
        assert isinstance(error, RetryLater) and error.retry_after == 10.0
        assert "Cannot contact any KDC for realm 'SPOT.TEST'" in str(error)

        # Renewal due, KDC down: keep the valid ticket, warn, do not raise.
        clock.now = expiry - 30
        with caplog.at_level(logging.WARNING, logger="spot_ingest.kerberos"):
            login.ensure()
        assert login.logins == 1 and login.expires_at == expiry
        assert "Cannot contact any KDC" in caplog.text and "keeping the current ticket" in caplog.text
        # The ticket has expired: now it is an error.
        clock.now = expiry + 1
        with pytest.raises(KerberosUnavailable, match="Cannot contact any KDC"):
            login.ensure()
        # The KDC is back (on another port; its krb5.conf follows): so is the login.
        kdc.start()
        login.ensure()
        assert login.logins == 2 and login.expires_at > clock.now
        login.close()


# -- SPNEGO against a real acceptor --------------------------------------------
class NegotiateServer:
    """A small HTTP server that authenticates with HTTP Negotiate and a real
    GSSAPI acceptor (make_acceptor), answering like WebHDFS's GETFILESTATUS;
    it records each request's Authorization header."""

    def __init__(self, service_keytab: Path):
        accept = make_acceptor(service_keytab)
        self.authorizations: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                header = self.headers.get("Authorization", "")
                server.authorizations.append(header)
                user = accept(header[len("Negotiate "):]) if header.startswith("Negotiate ") else None
                if user is None:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", "Negotiate")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = json.dumps({"FileStatus": {"owner": str(user), "principal": user.principal,
                                                  "type": "DIRECTORY", "path": self.path}}).encode()
                self.send_response(200)
                if user.token:
                    self.send_header("WWW-Authenticate", f"Negotiate {user.token}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        # "localhost", not 127.0.0.1: the client asks a ticket for HTTP/<host>.
        self.url = f"http://localhost:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def negotiate_server(krb5_env):
    server = NegotiateServer(krb5_env.service_keytab)
    yield server
    server.close()


@pytest.fixture
def login(krb5_env, tmp_path):
    made = KeytabLogin(settings_for(krb5_env, mutual_auth="REQUIRED"), tmp_path / "state")
    made.ensure()
    yield made
    made.close()


def test_requests_send_a_negotiate_token_the_acceptor_accepts(negotiate_server, login):
    # The process's default cache (krb5_env) is empty: the ticket can only
    # come from the login's cache, named by the credential in the auth object.
    session = requests.Session()
    session.auth = negotiate_auth(login.settings, login)
    answer = session.get(f"{negotiate_server.url}/webhdfs/v1/user/spot?op=GETFILESTATUS",
                         timeout=30)
    assert answer.status_code == 200
    status = answer.json()["FileStatus"]
    assert status["principal"] == "spot@SPOT.TEST" and status["owner"] == "spot"
    first, second = negotiate_server.authorizations
    assert first == ""                                    # the challenge, then the token
    assert NEGOTIATE.match(second), second
    # Mutual authentication REQUIRED: the acceptor's answer token was checked.
    assert session.auth.auth_done


def test_the_default_cache_serves_after_applying_environment(negotiate_server, login):
    with environ(**login.environment()):
        auth = negotiate_auth(login.settings)             # principal by name, default cache
        answer = requests.get(f"{negotiate_server.url}/webhdfs/v1/?op=GETFILESTATUS",
                              auth=auth, timeout=30)
    assert answer.status_code == 200
    assert answer.json()["FileStatus"]["principal"] == "spot@SPOT.TEST"


def test_hdfscli_kerberos_client_with_the_login(negotiate_server, login):
    client = KerberosClient(negotiate_server.url, session=requests.Session(), timeout=30,
                            **login.hdfs_client_kwargs())
    status = client.status("/user/spot")
    assert status["owner"] == "spot" and status["principal"] == "spot@SPOT.TEST"
    assert status["path"] == "/webhdfs/v1/user/spot?op=GETFILESTATUS"
    assert NEGOTIATE.match(negotiate_server.authorizations[-1])


def test_without_a_ticket_the_request_stays_unauthenticated(negotiate_server, krb5_env, tmp_path):
    """requests_kerberos logs the GSSAPI failure and returns the server's 401:
    a caller that forgot ensure() gets an HTTP 401, not a token."""
    unused = KeytabLogin(settings_for(krb5_env), tmp_path / "state")   # ensure() not called
    answer = requests.get(f"{negotiate_server.url}/webhdfs/v1/?op=GETFILESTATUS",
                          auth=negotiate_auth(unused.settings, unused), timeout=30)
    assert answer.status_code == 401
    assert negotiate_server.authorizations == [""]


def test_the_acceptor_refuses_what_is_not_a_valid_token(krb5_env):
    accept = make_acceptor(krb5_env.service_keytab)
    assert accept("not base64!") is None
    assert accept("YSBmb3JnZWQgdG9rZW4=") is None        # base64 of "a forged token"
    assert accept("") is None
