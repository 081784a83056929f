"""Kerberos for the HDFS client: a keytab login kept fresh in a private
credential cache, and the SPNEGO ("HTTP Negotiate") authentication of
WebHDFS requests made with it.

The login is MIT's ``kinit -k -t <keytab> <principal>`` (an argument list,
never a shell) writing to a file credential cache of our own; the requests
take their tickets from that cache by name, so nothing depends on the
process's KRB5CCNAME (``KeytabLogin.environment()`` gives it to code that
wants the default cache instead). Create the HdfsCLI client like this::

    login = KeytabLogin(settings, state_dir)
    login.ensure()                                   # before each batch of requests
    client = hdfs.ext.kerberos.KerberosClient(url, session=session, timeout=timeout,
                                              root=root, **login.hdfs_client_kwargs())

or, with any ``hdfs.Client``: ``session.auth = negotiate_auth(settings, login)``.

gssapi, requests_kerberos and pyspnego (the ``kerberos`` extra) are imported
only when a login or a request needs them: the settings are usable without.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .logs import printable
from .policy import RetryLater

log = logging.getLogger(__name__)

MUTUAL_AUTH = ("REQUIRED", "OPTIONAL", "DISABLED")
# Log in again when less than max(RENEW_MIN_SECONDS, RENEW_FRACTION x lifetime) is left.
RENEW_MIN_SECONDS = 60.0
RENEW_FRACTION = 0.2
KINIT_TIMEOUT = 60.0
RETRY_AFTER = 10.0
# kinit's messages (run with LC_ALL=C) that mean "the KDC cannot be reached
# now", as opposed to a wrong principal, keytab or configuration.
_UNREACHABLE = ("cannot contact any kdc",                  # KRB5_KDC_UNREACH
                "cannot resolve network address for kdc",  # KRB5_REALM_CANT_RESOLVE (DNS)
                "resource temporarily unavailable",
                "connection timed out")
_INSTALL_HINT = ("install the kerberos extra (pip install 'spot-ingest[kerberos]'; "
                 "scripts/setup.sh --kerberos)")


class KerberosError(Exception):
    """A Kerberos login failed; the message is one line naming the principal,
    the keytab and what kinit (or GSSAPI) said."""


class KerberosUnavailable(RetryLater, KerberosError):
    """The KDC cannot be reached now: retry later, not sooner than ``retry_after``."""

    def __init__(self, message: str, retry_after: float = RETRY_AFTER):
        super().__init__(message, retry_after)


@dataclass(frozen=True)
class KerberosSettings:
    """The ``hdfs.kerberos`` section of ingest_conf.json (built by config.py)."""
    principal: str                  # "spot@EXAMPLE.COM"
    keytab: Path
    ccache: Path | None = None      # default: a private file cache per process in the state directory
    mutual_auth: str = "OPTIONAL"   # REQUIRED | OPTIONAL | DISABLED (requests_kerberos)
    service: str = "HTTP"           # SPNEGO service name: HTTP/<namenode host>

    def __post_init__(self):
        if self.mutual_auth not in MUTUAL_AUTH:
            raise ValueError(f"mutual_auth {self.mutual_auth!r} is not one of {', '.join(MUTUAL_AUTH)}")


class KeytabLogin:
    """Obtains and keeps a TGT for ``settings.principal`` from ``settings.keytab``
    in a credential cache of its own, and logs in again before it expires.

    * The cache is ``settings.ccache`` or ``<state_dir>/krb5cc_spot_<pid>``
      (a file only this process writes; ``close()`` removes it). kinit
      writes a new ticket to a temporary cache beside it, which then replaces
      the cache atomically: a request reading the cache at that moment sees
      the old ticket or the new one, never a half-written file.
    * ``ensure()`` (call it before each batch of HDFS requests; thread-safe)
      logs in when no ticket is held or less than max(60 s, 1/5 of the
      ticket's lifetime) remains. If that fails while the current ticket is
      still valid, it logs a warning, keeps the ticket and tries again at
      most every ``RETRY_AFTER`` seconds; without a valid ticket it raises
      ``KerberosError`` (``KerberosUnavailable``, a ``RetryLater``, when the
      KDC cannot be reached).
    * ``clock`` (``time.time`` by default) is the time line of ``expires_at``
      and of the renewal decision; tests inject one.

    The ticket's remaining lifetime is read with gssapi (the ``lifetime`` of
    the initiator credential in that cache), not from ``klist``: klist's
    dates are printed in the locale's format and time zone, with a two-digit
    year, which is fragile to parse; gssapi answers a number of seconds from
    the same GSSAPI library that will use the ticket, and it is already
    needed for SPNEGO (requests_kerberos uses it through pyspnego). The
    python ``krb5`` bindings would give the absolute end time too, but are a
    lower-level API that changes between versions and would add a direct
    dependency; a relative lifetime also fits an injected clock.
    """

    def __init__(self, settings: KerberosSettings, state_dir: Path,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self.state_dir = Path(state_dir)
        self._clock = clock
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._ccache = self._cache_path()
        self._expires_at = 0.0
        self._lifetime = 0.0
        self._next_attempt = 0.0
        self.logins = 0          # successful kinit runs (for logs and tests)
        _LOGINS.add(self)

    # -- the credential cache ------------------------------------------------
    def _cache_path(self) -> Path:
        if self.settings.ccache is not None:
            return Path(os.path.abspath(self.settings.ccache))
        return Path(os.path.abspath(self.state_dir)) / f"krb5cc_spot_{os.getpid()}"

    def _after_fork(self) -> None:
        """In a forked child: a lock of its own, and not the parent's private
        cache (the child logs in anew into its own)."""
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._ccache = self._cache_path()
        self._expires_at = self._lifetime = self._next_attempt = 0.0

    @property
    def ccache(self) -> Path:
        return self._ccache

    @property
    def ccache_name(self) -> str:
        """``FILE:<path>``, as KRB5CCNAME and GSSAPI's credential store take it."""
        return f"FILE:{self._ccache}"

    def environment(self) -> dict[str, str]:
        """``{"KRB5CCNAME": "FILE:..."}``: apply to ``os.environ`` (process-wide!)
        for code that uses the default credential cache."""
        return {"KRB5CCNAME": self.ccache_name}

    # -- the ticket ----------------------------------------------------------
    @property
    def expires_at(self) -> float:
        """When the ticket expires, on ``clock``'s time line; 0.0 before the first login."""
        return self._expires_at

    @property
    def lifetime(self) -> float:
        """The current ticket's whole lifetime in seconds (as measured right
        after kinit); 0.0 before the first login."""
        return self._lifetime

    def renew_margin(self) -> float:
        return max(RENEW_MIN_SECONDS, RENEW_FRACTION * self._lifetime)

    def ensure(self) -> None:
        """Hold a ticket that is not about to expire; see the class docstring."""
        with self._lock:
            now = self._clock()
            left = self._expires_at - now
            if left > self.renew_margin():
                return
            if left > 0 and now < self._next_attempt:
                return            # renewal failed lately; the current ticket still serves
            try:
                self._login()
            except KerberosError as exc:
                if left > 0:
                    self._next_attempt = now + RETRY_AFTER
                    log.warning("%s; keeping the current ticket (%.0f s left), next attempt "
                                "in %.0f s", exc, left, RETRY_AFTER)
                    return
                raise
            self._next_attempt = 0.0

    def _describe(self) -> str:
        return (f"Kerberos login of {printable(self.settings.principal)} with keytab "
                f"{printable(str(self.settings.keytab))}")

    def _login(self) -> None:
        kinit = shutil.which("kinit") or shutil.which("kinit", path="/usr/bin:/bin")
        if kinit is None:
            raise KerberosError(f"{self._describe()} failed: kinit is not installed "
                                f"(Debian/Ubuntu: apt-get install krb5-user)")
        target = self._ccache
        try:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KerberosError(f"{self._describe()} failed: cannot make the directory of the "
                                f"credential cache {printable(str(target))}: {exc.strerror}"
                                ) from None
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        env = dict(os.environ)
        env["KRB5CCNAME"] = f"FILE:{tmp}"
        env["LC_ALL"] = "C"          # kinit's messages in English: they are classified below
        env.pop("LANGUAGE", None)
        argv = [kinit, "-k", "-t", f"FILE:{os.path.abspath(self.settings.keytab)}",
                "-c", f"FILE:{tmp}", "--", self.settings.principal]
        try:
            try:
                done = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                                      capture_output=True, text=True, errors="replace",
                                      timeout=KINIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise KerberosUnavailable(f"{self._describe()} failed: kinit did not finish "
                                          f"within {KINIT_TIMEOUT:.0f} s (is the KDC reachable?)"
                                          ) from None
            except OSError as exc:
                raise KerberosError(f"{self._describe()} failed: cannot run {kinit}: "
                                    f"{exc.strerror}") from None
            if done.returncode != 0:
                message = _kinit_message(done.stderr or done.stdout, done.returncode)
                error = (KerberosUnavailable if any(m in message.lower() for m in _UNREACHABLE)
                         else KerberosError)
                raise error(f"{self._describe()} failed: {message}")
            lifetime = self._ticket_lifetime(f"FILE:{tmp}")
            try:
                os.replace(tmp, target)
            except OSError as exc:
                raise KerberosError(f"{self._describe()} failed: cannot write the credential "
                                    f"cache {printable(str(target))}: {exc.strerror}") from None
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass
        self._lifetime = lifetime
        self._expires_at = self._clock() + lifetime
        self.logins += 1
        log.info("Kerberos: logged in as %s from %s (ticket valid for %.0f s, cache %s)",
                 printable(self.settings.principal), printable(str(self.settings.keytab)),
                 lifetime, printable(self.ccache_name))

    def _ticket_lifetime(self, ccache_name: str) -> float:
        """Seconds left on the TGT of our principal in that cache (gssapi)."""
        try:
            import gssapi
        except ImportError:
            raise KerberosError(f"{self._describe()} failed: gssapi is not installed; "
                                f"{_INSTALL_HINT}") from None
        try:
            name = gssapi.Name(self.settings.principal, gssapi.NameType.kerberos_principal)
            creds = gssapi.Credentials(name=name, usage="initiate",
                                       store={"ccache": ccache_name})
            lifetime = creds.lifetime
        except gssapi.exceptions.GSSError as exc:
            raise KerberosError(f"{self._describe()} failed: the new ticket cannot be read: "
                                f"{_one_line(str(exc))}") from None
        if not lifetime or lifetime <= 0:
            raise KerberosError(f"{self._describe()} failed: the new ticket has already "
                                f"expired (is this host's clock right?)")
        return float(lifetime)

    def credential(self):
        """The cache as a pyspnego credential (``spnego.KerberosCCache``):
        given as requests_kerberos's ``principal``, the requests take their
        tickets from this cache whatever KRB5CCNAME says."""
        try:
            import spnego
        except ImportError:
            raise KerberosError(f"requests with Kerberos need pyspnego: {_INSTALL_HINT}") from None
        return spnego.KerberosCCache(ccache=self.ccache_name, principal=self.settings.principal)

    def hdfs_client_kwargs(self) -> dict:
        """Keyword arguments of ``hdfs.ext.kerberos.KerberosClient`` for this login
        (``mutual_auth``, ``service``, ``principal``); add url, session, root, timeout."""
        return {"mutual_auth": self.settings.mutual_auth, "service": self.settings.service,
                "principal": self.credential()}

    def close(self) -> None:
        """Remove the private credential cache (not a configured ``ccache``)."""
        with self._lock:
            if self.settings.ccache is None and os.getpid() == self._pid:
                try:
                    self._ccache.unlink()
                except FileNotFoundError:
                    pass
            self._expires_at = self._lifetime = 0.0

    def __enter__(self) -> "KeytabLogin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LOGINS: "weakref.WeakSet[KeytabLogin]" = weakref.WeakSet()


def _forked() -> None:
    for login in list(_LOGINS):
        login._after_fork()


os.register_at_fork(after_in_child=_forked)


def negotiate_auth(settings: KerberosSettings, login: KeytabLogin | None = None):
    """A ``requests_kerberos.HTTPKerberosAuth`` for ``session.auth``. With
    ``login``, its tickets come from the login's cache; without, from the
    default cache (KRB5CCNAME: apply ``login.environment()``), for
    ``settings.principal``."""
    try:
        import requests_kerberos
    except ImportError:
        raise KerberosError(f"requests with Kerberos need requests-kerberos: {_INSTALL_HINT}"
                            ) from None
    principal = login.credential() if login is not None else settings.principal
    return requests_kerberos.HTTPKerberosAuth(
        mutual_authentication=getattr(requests_kerberos, settings.mutual_auth),
        service=settings.service, principal=principal)


def _one_line(text: str) -> str:
    return printable(" ".join(text.split()))


def _kinit_message(output: str, returncode: int) -> str:
    """kinit's error as one line, without its "kinit: " prefix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line[len("kinit: "):] if line.startswith("kinit: ") else line for line in lines]
    return _one_line("; ".join(lines)) or f"kinit exited with status {returncode}"
