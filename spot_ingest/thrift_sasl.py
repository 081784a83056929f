"""Thrift's SASL transport (client side) with Kerberos through python-gssapi:
how a Hive metastore with ``hive.metastore.sasl.enabled=true`` is reached.

The negotiation (Thrift's SASL transport, as libthrift's ``TSaslTransport``
speaks it) is a series of messages, each a status byte, a 4-byte big-endian
payload length and the payload:

* the client sends START with the mechanism's name ("GSSAPI"), then OK with
  its initial response (the first Kerberos token: the AP-REQ);
* each OK from the server carries a challenge, answered with OK (or with
  COMPLETE once the client's side is done);
* the server ends with COMPLETE; BAD or ERROR carry its reason instead, and
  it closes the connection.

GSSAPI over SASL (RFC 4752): the security context is established first (the
server's answer to the AP-REQ is the AP-REP of mutual authentication, to
which the client answers empty); then the server sends a wrapped 4-byte
offer (a bit mask of security layers: 1 none, 2 integrity, 4 confidentiality;
then its largest receivable message, 3 bytes), and the client answers with
wrapped ``[1, 0, 0, 0]``: authentication only, no layer. This client does
not do integrity or confidentiality layers; a server that insists on one
(``hadoop.rpc.protection`` integrity or privacy) is refused with that said.

After the negotiation, every message is framed: what is written until a
``flush()`` goes out as a 4-byte big-endian length and the bytes; reads take
frames apart the same way.

The credentials are the initiator credentials of a given credential cache
(``KeytabLogin.ccache_name``), never the process's default: the caller
decides whose ticket is used. Errors name the service principal and the
server: ``SaslError`` (refused, or no usable ticket; one line),
``SaslUnavailable`` (the KDC cannot be reached now). A connection that breaks
or stays silent raises thrift's ``TTransportException`` as any transport does.
"""
from __future__ import annotations

import re
import struct
from io import BytesIO
from typing import Protocol

from thrift.transport.TTransport import CReadableTransport, TTransportBase, TTransportException

from .logs import printable

START, OK, BAD, ERROR, COMPLETE = 1, 2, 3, 4, 5
STATUS_NAMES = {START: "START", OK: "OK", BAD: "BAD", ERROR: "ERROR", COMPLETE: "COMPLETE"}

# A Kerberos token is a few kilobytes; a larger negotiation message means the
# peer is not a SASL server (or not a sane one), and must not make us buffer it.
MAX_NEGOTIATION_BYTES = 1 << 20
# Frames after the negotiation: a metastore's answer listing many partitions
# can be large, but a length above this is a broken or foreign stream.
MAX_FRAME_BYTES = 256 << 20

# RFC 4752 security layers (bit mask of the server's offer and the client's choice).
LAYER_NONE, LAYER_INTEGRITY, LAYER_CONFIDENTIALITY = 1, 2, 4

# GSSAPI minor codes (MIT krb5 com_err numbers, as the unsigned 32-bit
# values gssapi reports) that mean "the KDC cannot be reached now" rather
# than "refused": KRB5_KDC_UNREACH, KRB5_REALM_CANT_RESOLVE.
_UNREACHABLE_CODES = (-1765328228 & 0xFFFFFFFF, -1765328164 & 0xFFFFFFFF)
_UNREACHABLE_TEXT = ("cannot contact any kdc", "cannot resolve network address for kdc")


class SaslError(Exception):
    """The SASL (Kerberos) authentication failed: the server refused it, or
    this client has no usable ticket. One line naming the service principal
    and the server."""


class SaslUnavailable(SaslError):
    """The KDC could not be reached to get a service ticket: try later."""


# -- bytes on the wire --------------------------------------------------------

def encode_message(status: int, payload: bytes = b"") -> bytes:
    """One negotiation message: status byte, 4-byte big-endian length, payload."""
    if status not in STATUS_NAMES:
        raise ValueError(f"not a SASL negotiation status: {status}")
    return struct.pack(">BI", status, len(payload)) + payload


def decode_header(header: bytes, limit: int = MAX_NEGOTIATION_BYTES) -> tuple[int, int]:
    """(status, payload length) of a negotiation message's 5-byte header;
    ValueError when it cannot be one (unknown status, absurd length)."""
    if len(header) != 5:
        raise ValueError(f"a SASL message header has 5 bytes, got {len(header)}")
    status, length = struct.unpack(">BI", header)
    if status not in STATUS_NAMES:
        raise ValueError(f"status byte {status} is not a SASL negotiation status "
                         f"(first bytes {header.hex()})")
    if length > limit:
        raise ValueError(f"{STATUS_NAMES[status]} message of {length} bytes, above the "
                         f"{limit} a negotiation message may have")
    return status, length


def frame(payload: bytes) -> bytes:
    """A data frame after the negotiation: 4-byte big-endian length, payload."""
    return struct.pack(">I", len(payload)) + payload


def frame_length(header: bytes, limit: int = MAX_FRAME_BYTES) -> int:
    """The payload length in a frame's 4-byte header; ValueError above ``limit``."""
    if len(header) != 4:
        raise ValueError(f"a frame header has 4 bytes, got {len(header)}")
    (length,) = struct.unpack(">I", header)
    if length > limit:
        raise ValueError(f"frame of {length} bytes, above the limit of {limit}")
    return length


def parse_security_offer(offer: bytes) -> tuple[int, int]:
    """The server's unwrapped RFC 4752 offer: (bit mask of security layers,
    largest message it can receive). ValueError unless it is 4 bytes."""
    if len(offer) != 4:
        raise ValueError(f"the security layer offer has 4 bytes, got {len(offer)}")
    return offer[0], int.from_bytes(offer[1:4], "big")


def security_answer(offer: bytes, authzid: bytes = b"") -> bytes:
    """The client's answer (to be wrapped) to an RFC 4752 offer: layer
    "none", maximum size 0 (no layer: nothing is ever wrapped for us), then
    an optional authorization identity. ValueError when the offer lacks the
    "none" layer: the server wants integrity or confidentiality."""
    layers, _ = parse_security_offer(offer)
    if not layers & LAYER_NONE:
        wanted = [n for bit, n in ((LAYER_INTEGRITY, "integrity"),
                                   (LAYER_CONFIDENTIALITY, "confidentiality")) if layers & bit]
        raise ValueError(f"the server requires a SASL {' or '.join(wanted) or 'unknown'} "
                         f"layer (offer 0x{layers:02x}; hadoop.rpc.protection "
                         f"integrity/privacy), and this client does authentication only")
    return bytes([LAYER_NONE, 0, 0, 0]) + authzid


def gss_message(exc: Exception) -> str:
    """A GSSError as one printable line: its major and minor messages
    without the codes and without GSSAPI's "see the minor code" filler."""
    text = " ".join(str(exc).split())
    text = re.sub(r", Minor \(\d+\): Success$", "", text)   # a minor status "Success" adds nothing
    text = re.sub(r"\b(Major|Minor) \(\d+\): ", "", text)
    text = text.replace("Unspecified GSS failure. Minor code may provide more information, ", "")
    return printable(text)


# -- mechanisms ---------------------------------------------------------------

class Mechanism(Protocol):
    """A SASL client mechanism as ``negotiate`` drives it."""
    name: str

    @property
    def complete(self) -> bool:
        """The client's side is done (its last response is the final one)."""

    def initial_response(self) -> bytes:
        """What goes with START's OK (may be empty)."""

    def respond(self, challenge: bytes) -> bytes:
        """The answer to one server challenge; raises SaslError if refused."""


class GssapiMechanism:
    """SASL GSSAPI (RFC 4752) with Kerberos through python-gssapi: initiator
    credentials from ``ccache`` (``FILE:/path``), target ``service_principal``
    (``hive/host@REALM``), mutual authentication, no security layer.

    ``describe`` is the phrase that errors start with (who, to what, where)."""

    name = "GSSAPI"

    def __init__(self, service_principal: str, ccache: str, describe: str):
        self.service_principal = service_principal
        self.ccache = ccache
        self.describe = describe
        self._ctx = None
        self._done = False

    @property
    def complete(self) -> bool:
        return self._done

    def _fail(self, what: str, exc: Exception) -> SaslError:
        text = gss_message(exc)
        unreachable = (getattr(exc, "min_code", None) in _UNREACHABLE_CODES
                       or any(t in text.lower() for t in _UNREACHABLE_TEXT))
        kind = SaslUnavailable if unreachable else SaslError
        return kind(f"{self.describe}: {what}: {text}")

    def initial_response(self) -> bytes:
        try:
            import gssapi
        except ImportError:
            raise SaslError(f"{self.describe}: the Python package gssapi is not installed "
                            f"(pip install 'spot-ingest[kerberos]')") from None
        try:
            creds = gssapi.Credentials(usage="initiate", store={"ccache": self.ccache})
            left = creds.lifetime
        except gssapi.exceptions.ExpiredCredentialsError as exc:
            raise self._fail(f"the ticket in {self.ccache} has expired", exc) from None
        except gssapi.exceptions.GSSError as exc:
            raise self._fail(f"no usable ticket in {self.ccache}", exc) from None
        if left is not None and left <= 0:
            raise SaslError(f"{self.describe}: the ticket of {creds.name} in {self.ccache} "
                            f"has expired")
        try:
            target = gssapi.Name(self.service_principal, gssapi.NameType.kerberos_principal)
        except gssapi.exceptions.GSSError as exc:
            raise self._fail(f"'{self.service_principal}' is not a Kerberos principal",
                             exc) from None
        flags = (gssapi.RequirementFlag.mutual_authentication
                 | gssapi.RequirementFlag.out_of_sequence_detection)
        self._ctx = gssapi.SecurityContext(name=target, creds=creds, usage="initiate",
                                           flags=flags)
        try:   # asks the KDC for a service ticket unless the cache holds one
            return self._ctx.step() or b""
        except gssapi.exceptions.GSSError as exc:
            raise self._fail("no service ticket", exc) from None

    def respond(self, challenge: bytes) -> bytes:
        import gssapi
        if self._ctx is None:
            raise SaslError(f"{self.describe}: a challenge before the initial response")
        if not self._ctx.complete:
            try:   # the server's AP-REP: it proved it holds the service's key
                token = self._ctx.step(challenge)
            except gssapi.exceptions.GSSError as exc:
                raise self._fail("the server's Kerberos answer was not accepted (mutual "
                                 "authentication failed)", exc) from None
            # RFC 4752: the context done, answer empty and wait for the offer.
            return token or b""
        try:
            offer = self._ctx.unwrap(challenge).message
        except gssapi.exceptions.GSSError as exc:
            raise self._fail("the server's security layer offer cannot be unwrapped", exc
                             ) from None
        try:
            answer = security_answer(offer)
        except ValueError as exc:
            raise SaslError(f"{self.describe}: {exc}") from None
        self._done = True
        try:
            return self._ctx.wrap(answer, False).message
        except gssapi.exceptions.GSSError as exc:
            raise self._fail("cannot wrap the security layer answer", exc) from None


# -- the negotiation ----------------------------------------------------------

def _send(transport, status: int, payload: bytes) -> None:
    transport.write(encode_message(status, payload))
    transport.flush()


def _receive(transport, describe: str) -> tuple[int, bytes]:
    header = transport.readAll(5)
    try:
        status, length = decode_header(header)
    except ValueError as exc:
        raise SaslError(f"{describe}: the server's answer is not Thrift SASL ({exc}); is "
                        f"this a SASL (Kerberized) Thrift server?") from None
    return status, transport.readAll(length) if length else b""


def _refused(describe: str, status: int, payload: bytes) -> SaslError:
    reason = printable(" ".join(payload.decode("utf-8", "replace").split())) or "no reason given"
    return SaslError(f"{describe}: the server refused the authentication "
                     f"({STATUS_NAMES[status]}: {reason})")


def negotiate(transport, mechanism: Mechanism, describe: str) -> None:
    """Run the Thrift SASL negotiation on the open ``transport`` (anything
    with ``write``, ``flush`` and ``readAll``) until the server says COMPLETE.

    Raises ``SaslError`` when the mechanism or the server refuses (BAD/ERROR
    with the server's reason), ``TTransportException`` when the connection
    breaks or times out. The initial response is made before anything is
    sent: a client without a ticket does not bother the server."""
    initial = mechanism.initial_response()
    try:
        _send(transport, START, mechanism.name.encode("ascii"))
        _send(transport, OK, initial)
    except TTransportException:
        # A server that refuses at once may close before reading it all: its reason first.
        status, payload = _receive(transport, describe)
        if status in (BAD, ERROR):
            raise _refused(describe, status, payload) from None
        raise
    while True:
        status, payload = _receive(transport, describe)
        if status in (BAD, ERROR):
            raise _refused(describe, status, payload)
        if status == COMPLETE:
            # GSSAPI's last word is the client's: a server done first skipped a step.
            if not mechanism.complete:
                raise SaslError(f"{describe}: the server ended the negotiation before the "
                                f"client's side was complete")
            if payload:
                raise SaslError(f"{describe}: the server's COMPLETE carries "
                                f"{len(payload)} bytes; none were expected")
            return
        if status != OK:
            raise SaslError(f"{describe}: unexpected {STATUS_NAMES[status]} from the server "
                            f"during the negotiation")
        if mechanism.complete:
            raise SaslError(f"{describe}: the server sent a challenge after the client's "
                            f"side was complete")
        response = mechanism.respond(payload)
        _send(transport, COMPLETE if mechanism.complete else OK, response)


# -- the transport ------------------------------------------------------------

class TSaslGssapiTransport(TTransportBase, CReadableTransport):
    """A Thrift client transport over ``transport`` (a ``TSocket``):
    ``open()`` connects and authenticates with SASL GSSAPI as the ticket
    holder of ``ccache`` to ``service_principal``; afterwards writes are
    buffered until ``flush()`` and sent as one frame, reads unframe.
    ``server`` (host:port) is for messages. ``mechanism`` replaces GSSAPI
    by another ``Mechanism`` (the framing's tests use a trivial one)."""

    def __init__(self, transport, service_principal: str, ccache: str, server: str,
                 max_frame: int = MAX_FRAME_BYTES, mechanism: Mechanism | None = None):
        self.transport = transport
        self.service_principal = service_principal
        self.ccache = ccache
        self.server = server
        self.max_frame = max_frame
        self.mechanism = mechanism
        self._wbuf = BytesIO()
        self._rbuf = BytesIO(b"")

    @property
    def describe(self) -> str:
        return (f"Kerberos (SASL GSSAPI) authentication to {self.server} (service "
                f"principal {self.service_principal})")

    def isOpen(self) -> bool:
        return self.transport.isOpen()

    def open(self) -> None:
        if not self.transport.isOpen():
            self.transport.open()
        try:
            mechanism = self.mechanism or GssapiMechanism(self.service_principal, self.ccache,
                                                          self.describe)
            negotiate(self.transport, mechanism, self.describe)
        except TTransportException as exc:
            self.transport.close()
            hint = (" (the server closed it: a Thrift server without SASL, e.g. a metastore "
                    "without hive.metastore.sasl.enabled, does that)"
                    if exc.type == TTransportException.END_OF_FILE else "")
            raise TTransportException(exc.type, f"{self.describe}: the connection failed "
                                                 f"during the negotiation: {exc.message}{hint}"
                                      ) from None
        except BaseException:
            self.transport.close()
            raise
        self._wbuf, self._rbuf = BytesIO(), BytesIO(b"")

    def close(self) -> None:
        self.transport.close()

    def write(self, buf: bytes) -> None:
        self._wbuf.write(buf)

    def flush(self) -> None:
        data = self._wbuf.getvalue()
        self._wbuf = BytesIO()
        self.transport.write(frame(data))
        self.transport.flush()

    def _read_frame(self) -> None:
        try:
            length = frame_length(self.transport.readAll(4), self.max_frame)
        except ValueError as exc:
            raise TTransportException(TTransportException.SIZE_LIMIT,
                                      f"{self.server}: {exc}") from None
        self._rbuf = BytesIO(self.transport.readAll(length) if length else b"")

    def read(self, sz: int) -> bytes:
        data = self._rbuf.read(sz)
        while not data:   # an empty frame is legal: read on
            self._read_frame()
            data = self._rbuf.read(sz)
        return data

    # For the C-accelerated protocol (as thrift's framed transport does).
    @property
    def cstringio_buf(self):
        return self._rbuf

    def cstringio_refill(self, partialread: bytes, reqlen: int):
        # Called with the current frame used up: what was read of it, then whole new frames.
        data = partialread
        while len(data) < reqlen:
            self._read_frame()
            data += self._rbuf.getvalue()
        self._rbuf = BytesIO(data)
        return self._rbuf
