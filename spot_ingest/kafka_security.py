"""Kafka clients as production clusters run them: TLS and SASL.

``client_kwargs(kafka)`` is the one place where a ``KafkaConfig`` becomes the
keyword arguments of kafka-python's KafkaProducer, KafkaConsumer and
KafkaAdminClient; every client spot-ingest makes (bus, master, the streaming
job's source) is made with it. The password is read there, when a client is
made, from the file or environment variable the configuration names, and is
handed over as a ``Secret``: a string that shows itself as ``***`` in reprs,
log lines and messages (kafka-python logs its whole configuration at DEBUG).

``diagnose(kafka)`` says why connecting keeps failing when the cause will not
go away by waiting: a TLS certificate the configured CA does not vouch for, a
SASL mechanism the broker does not offer, credentials it refuses. kafka-python
only retries and finally reports "Unable to bootstrap"; this makes one TLS
handshake (and SASL exchange) of its own with each bootstrap broker and names
the broker, the file and the reason. It never reports the password.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import socket
import ssl
import struct

from .config import KafkaConfig

PROBE_TIMEOUT = 5.0
_CLIENT_ID = b"spot-ingest-probe"


class Secret(str):
    """A password: usable as a string, shown as ``***``."""

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __format__(self, spec: str) -> str:
        return "***"


class _Closed(OSError):
    """The broker closed the connection instead of answering."""


class PasswordError(Exception):
    """The password cannot be read where the configuration says it is."""


def read_password(kafka: KafkaConfig) -> Secret:
    if kafka.sasl_password_file:
        try:
            text = kafka.sasl_password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise PasswordError(f"kafka.sasl_password_file: cannot read "
                                f"'{kafka.sasl_password_file}': {reason}") from None
        password = text.rstrip("\r\n")      # the file's final newline is not part of it
    elif kafka.sasl_password_env:
        password = os.environ.get(kafka.sasl_password_env, "")
    else:
        raise PasswordError(f"sasl_mechanism {kafka.sasl_mechanism} needs a password: set "
                            f"kafka.sasl_password_file or kafka.sasl_password_env")
    if not password:
        raise PasswordError(f"the password in {kafka.password_source} is empty")
    return Secret(password)


def client_kwargs(kafka: KafkaConfig) -> dict:
    """Keyword arguments for KafkaProducer, KafkaConsumer and KafkaAdminClient."""
    if not isinstance(kafka, KafkaConfig):
        raise TypeError(f"expected a KafkaConfig, got {type(kafka).__name__} (a bare bootstrap "
                        f"string would silently drop the TLS and SASL settings)")
    kwargs = {"bootstrap_servers": kafka.bootstrap, "security_protocol": kafka.security_protocol}
    if kafka.uses_tls:
        kwargs["ssl_check_hostname"] = kafka.ssl_check_hostname
        if kafka.ssl_cafile:
            kwargs["ssl_cafile"] = str(kafka.ssl_cafile)
        if kafka.ssl_certfile:
            kwargs["ssl_certfile"] = str(kafka.ssl_certfile)
        if kafka.ssl_keyfile:
            kwargs["ssl_keyfile"] = str(kafka.ssl_keyfile)
    if kafka.uses_sasl:
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        if kafka.sasl_mechanism == "GSSAPI":
            kwargs["sasl_kerberos_service_name"] = kafka.sasl_kerberos_service_name
        else:
            kwargs["sasl_plain_username"] = kafka.sasl_username
            kwargs["sasl_plain_password"] = read_password(kafka)
    return kwargs


# -- diagnosis ------------------------------------------------------------------

def tls_context(kafka: KafkaConfig) -> ssl.SSLContext:
    """The context kafka-python builds from the same settings."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = kafka.ssl_check_hostname
    if kafka.ssl_cafile:
        ctx.load_verify_locations(str(kafka.ssl_cafile))
    else:
        ctx.load_default_certs()
    if kafka.ssl_certfile:
        ctx.load_cert_chain(str(kafka.ssl_certfile),
                            str(kafka.ssl_keyfile) if kafka.ssl_keyfile else None)
    return ctx


def _ca_note(kafka: KafkaConfig) -> str:
    return (f"ssl_cafile {kafka.ssl_cafile}" if kafka.ssl_cafile
            else "no ssl_cafile: the system's CA certificates")


def diagnose(kafka: KafkaConfig, timeout: float = PROBE_TIMEOUT) -> str | None:
    """A one-line reason why clients cannot connect that waiting will not
    cure (TLS verification, SASL mechanism or credentials), or None. Brokers
    that cannot be reached at all are skipped: that is for retrying."""
    if not (kafka.uses_tls or kafka.uses_sasl):
        return None
    for host, port in kafka.brokers:
        where = f"{host}:{port}"
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            continue
        sock = raw
        try:
            if kafka.uses_tls:
                try:
                    sock = tls_context(kafka).wrap_socket(raw, server_hostname=host)
                except ssl.SSLCertVerificationError as exc:
                    return (f"TLS handshake with {where} failed: certificate verify failed: "
                            f"{exc.verify_message} ({_ca_note(kafka)})")
                except ssl.SSLError as exc:
                    return (f"TLS handshake with {where} failed: {exc.reason or exc} "
                            f"({_ca_note(kafka)}; is it a TLS port?)")
                except OSError:
                    continue            # reset or timed out: a connection problem
            if kafka.uses_sasl and kafka.sasl_mechanism != "GSSAPI":
                try:
                    problem = _sasl_probe(sock, kafka, where)
                except PasswordError as exc:
                    return str(exc)
                except (OSError, ValueError, struct.error):
                    continue
                if problem:
                    return problem
        finally:
            sock.close()
    return None


def _send(sock, api_key: int, version: int, body: bytes, correlation: int) -> bytes:
    header = struct.pack(">hhih", api_key, version, correlation, len(_CLIENT_ID)) + _CLIENT_ID
    message = header + body
    sock.sendall(struct.pack(">i", len(message)) + message)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    data = _recv_exact(sock, size)
    if struct.unpack(">i", data[:4])[0] != correlation:
        raise ValueError("unexpected correlation id")
    return data[4:]


def _recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise _Closed("connection closed")
        buf += chunk
    return buf


def _string(data: bytes, pos: int) -> tuple[str | None, int]:
    n = struct.unpack(">h", data[pos:pos + 2])[0]
    pos += 2
    if n < 0:
        return None, pos
    return data[pos:pos + n].decode("utf-8", "replace"), pos + n


def _authenticate(sock, auth: bytes, correlation: int) -> tuple[int, str | None, bytes]:
    """SaslAuthenticate v0: (error code, error message, server's bytes)."""
    data = _send(sock, 36, 0, struct.pack(">i", len(auth)) + auth, correlation)
    code = struct.unpack(">h", data[:2])[0]
    message, pos = _string(data, 2)
    n = struct.unpack(">i", data[pos:pos + 4])[0]
    return code, message, data[pos + 4:pos + 4 + max(n, 0)]


def _scram_attributes(message: bytes) -> dict[str, str]:
    """``a=1,b=2`` of a SCRAM server message as a dict."""
    return dict(p.split("=", 1) for p in message.decode("utf-8", "replace").split(",") if "=" in p)


def _sasl_probe(sock, kafka: KafkaConfig, where: str) -> str | None:
    mechanism = kafka.sasl_mechanism
    body = struct.pack(">h", len(mechanism)) + mechanism.encode()
    try:
        data = _send(sock, 17, 1, body, 1)                   # SaslHandshake v1
    except _Closed:
        return (f"SASL handshake with {where} failed: the broker closed the connection when "
                f"asked for mechanism {mechanism} (it does not accept it, or does not expect "
                f"SASL on this port) (kafka.sasl_mechanism, kafka.security_protocol)")
    code = struct.unpack(">h", data[:2])[0]
    count = struct.unpack(">i", data[2:6])[0]
    offered, pos = [], 6
    for _ in range(max(count, 0)):
        name, pos = _string(data, pos)
        offered.append(name)
    if code == 33:
        others = [m for m in offered if m and m != mechanism]
        return (f"SASL handshake with {where} failed: the broker does not accept mechanism "
                f"{mechanism}" + (f" (it offers {', '.join(others)})" if others else "")
                + " (kafka.sasl_mechanism)")
    if code:
        return f"SASL handshake with {where} failed: error code {code}"
    user = kafka.sasl_username or ""
    password = read_password(kafka)
    failed = f"SASL/{mechanism} authentication as '{user}' with {where} failed"
    check = f"check kafka.sasl_username and the password in {kafka.password_source}"
    if mechanism == "PLAIN":
        code, message, _ = _authenticate(
            sock, b"\0".join([user.encode(), user.encode(), password.encode()]), 2)
        return f"{failed}: {message or f'error code {code}'} ({check})" if code else None
    # SCRAM (RFC 5802), as a broker sees it from any client.
    digest = hashlib.sha256 if mechanism == "SCRAM-SHA-256" else hashlib.sha512
    nonce = secrets.token_hex(16)
    name = user.replace("=", "=3D").replace(",", "=2C")
    first_bare = f"n={name},r={nonce}"
    code, message, server_first = _authenticate(sock, f"n,,{first_bare}".encode(), 2)
    if code:
        return f"{failed}: {message or f'error code {code}'} ({check})"
    fields = _scram_attributes(server_first)
    if "e" in fields:
        return f"{failed}: the broker answered '{fields['e']}' ({check})"
    if not fields.get("r", "").startswith(nonce) or "s" not in fields or "i" not in fields:
        return f"{failed}: the broker's SCRAM reply is not valid"
    salted = hashlib.pbkdf2_hmac(digest().name, password.encode(), base64.b64decode(fields["s"]),
                                 int(fields["i"]))
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    final_bare = f"c=biws,r={fields['r']}"
    auth_message = f"{first_bare},{server_first.decode()},{final_bare}".encode()
    signature = hmac.new(digest(client_key).digest(), auth_message, digest).digest()
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature))).decode()
    code, message, server_final = _authenticate(sock, f"{final_bare},p={proof}".encode(), 3)
    if code:
        return f"{failed}: {message or f'error code {code}'} ({check})"
    final = _scram_attributes(server_final)
    if "e" in final:
        return f"{failed}: the broker answered '{final['e']}' ({check})"
    return None
