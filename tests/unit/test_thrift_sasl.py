"""Thrift's SASL transport (spot_ingest.thrift_sasl), in-process and fast: the
bytes of the negotiation and of the frames, the RFC 4752 security layer
answer, and the server's refusals, against a scripted server on a socket
pair. The mechanism here is a trivial one of the test's (GSSAPI itself is
exercised against a real KDC and metastore in tests/test_catalog_kerberos.py)."""
from __future__ import annotations

import socket
import struct
import threading

import pytest
from thrift.transport import TSocket
from thrift.transport.TTransport import TTransportException

from spot_ingest.metastore import service_principal
from spot_ingest.thrift_sasl import (BAD, COMPLETE, ERROR, OK, START, SaslError,
                                     TSaslGssapiTransport, decode_header, encode_message, frame,
                                     frame_length, parse_security_offer, security_answer)


class Echo:
    """A SASL mechanism for the framing: "hello" first, then "re:<challenge>"
    to each challenge; its side is complete after ``rounds`` challenges."""
    name = "TEST"

    def __init__(self, rounds: int = 2):
        self.rounds = rounds
        self.seen: list[bytes] = []

    @property
    def complete(self) -> bool:
        return len(self.seen) >= self.rounds

    def initial_response(self) -> bytes:
        return b"hello"

    def respond(self, challenge: bytes) -> bytes:
        self.seen.append(challenge)
        return b"re:" + challenge


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"peer closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[int, bytes]:
    status, length = struct.unpack(">BI", recv_exact(sock, 5))
    return status, recv_exact(sock, length)


def read_frame(sock: socket.socket) -> bytes:
    (length,) = struct.unpack(">I", recv_exact(sock, 4))
    return recv_exact(sock, length)


class Peer:
    """The server end of a socket pair, running ``script(sock)`` in a thread;
    ``client`` is a TSocket on the other end; ``result``/``error`` what the
    script returned or raised."""

    def __init__(self, script):
        server, client = socket.socketpair()
        for s in (server, client):
            s.settimeout(10)   # a broken test fails, it does not hang
        self.client = TSocket.TSocket()
        self.client.setHandle(client)
        self.result = self.error = None

        def run():
            try:
                self.result = script(server)
            except BaseException as exc:   # reported by join()
                self.error = exc
            finally:
                server.close()
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self):
        self.thread.join(10)
        assert not self.thread.is_alive(), "the scripted server did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def transport(peer: Peer, mechanism=None) -> TSaslGssapiTransport:
    return TSaslGssapiTransport(peer.client, "hive/ms.example@EXAMPLE.COM", "FILE:/nowhere",
                                "ms.example:9083", mechanism=mechanism or Echo())


def handshake(sock: socket.socket) -> list[tuple[int, bytes]]:
    """The server's side of a two-challenge negotiation; what the client sent."""
    got = [read_message(sock), read_message(sock)]
    sock.sendall(encode_message(OK, b"c1"))
    got.append(read_message(sock))
    sock.sendall(encode_message(OK, b"c2"))
    got.append(read_message(sock))
    sock.sendall(encode_message(COMPLETE))
    return got


# -- bytes ---------------------------------------------------------------------

def test_messages_are_status_byte_length_and_payload():
    assert encode_message(START, b"GSSAPI") == b"\x01\x00\x00\x00\x06GSSAPI"
    assert encode_message(COMPLETE) == b"\x05\x00\x00\x00\x00"
    assert decode_header(b"\x02\x00\x00\x01\x00") == (OK, 256)
    with pytest.raises(ValueError, match="not a SASL negotiation status"):
        encode_message(9, b"")


def test_a_plain_thrift_reply_or_an_absurd_length_is_not_a_negotiation_message():
    # A TBinaryProtocol message starts 0x80 0x01: what a server without SASL sends.
    with pytest.raises(ValueError, match="status byte 128 is not a SASL negotiation status"):
        decode_header(b"\x80\x01\x00\x02\x00")
    with pytest.raises(ValueError, match="OK message of 16777216 bytes, above the 1048576"):
        decode_header(b"\x02\x01\x00\x00\x00")
    with pytest.raises(ValueError, match="5 bytes"):
        decode_header(b"\x02\x00")


def test_frames_are_a_big_endian_length_and_the_bytes():
    assert frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00"
    assert frame_length(b"\x00\x01\x00\x00") == 65536
    with pytest.raises(ValueError, match="frame of 65536 bytes, above the limit of 1000"):
        frame_length(b"\x00\x01\x00\x00", limit=1000)


def test_the_security_layer_answer_is_auth_only_with_size_zero():
    # RFC 4752: the offer is a layer bit mask and a 3-byte maximum size.
    assert parse_security_offer(bytes([7, 0, 0x10, 0])) == (7, 4096)
    assert security_answer(bytes([7, 0, 0x10, 0])) == b"\x01\x00\x00\x00"
    assert security_answer(bytes([1, 0xff, 0xff, 0xff])) == b"\x01\x00\x00\x00"
    assert security_answer(bytes([1, 0, 0, 0]), b"spot") == b"\x01\x00\x00\x00spot"
    with pytest.raises(ValueError, match="requires a SASL integrity or confidentiality layer"):
        security_answer(bytes([6, 0, 0x10, 0]))
    with pytest.raises(ValueError, match="requires a SASL confidentiality layer"):
        security_answer(bytes([4, 0, 0x10, 0]))
    with pytest.raises(ValueError, match="offer has 4 bytes, got 3"):
        security_answer(b"\x01\x00\x00")


def test_service_principal_replaces_host_with_the_uri_host_in_lower_case():
    assert service_principal("hive/_HOST@EXAMPLE.COM", "MS1.Example.com") == \
        "hive/ms1.example.com@EXAMPLE.COM"
    assert service_principal("hive/fixed.example@EXAMPLE.COM", "other") == \
        "hive/fixed.example@EXAMPLE.COM"
    assert service_principal("hive/_HOST", "h") == "hive/h"


# -- the negotiation and the frames over a socket ------------------------------

def test_negotiation_then_writes_go_out_as_one_frame_per_flush_and_reads_unframe():
    def script(sock):
        got = handshake(sock)
        got.append(("frame", read_frame(sock)))
        # An empty frame is legal; reads go on to the next.
        sock.sendall(frame(b"") + frame(b"xyz") + frame(b"12345"))
        got.append(("frame", read_frame(sock)))
        return got

    peer = Peer(script)
    mechanism = Echo()
    t = transport(peer, mechanism)
    t.open()
    assert mechanism.complete and mechanism.seen == [b"c1", b"c2"]
    t.write(b"abc")
    t.write(b"def")
    t.flush()
    assert t.readAll(8) == b"xyz12345"
    t.write(b"")
    t.flush()
    t.close()
    # START with the mechanism, OK with the initial response, OK to the first
    # challenge, COMPLETE with the last response (the client's side is done).
    assert peer.join() == [(START, b"TEST"), (OK, b"hello"), (OK, b"re:c1"),
                           (COMPLETE, b"re:c2"), ("frame", b"abcdef"), ("frame", b"")]


@pytest.mark.parametrize("accelerated", [False, True])
def test_a_thrift_call_and_its_answer_travel_in_frames(accelerated):
    """A real generated client (pymetastore's) and a real processor: the
    request is one frame, the reply is split across three (the last split
    inside the result struct, which the accelerated protocol decodes in C
    and refills through ``cstringio_refill``)."""
    from pymetastore.hive_metastore import ThriftHiveMetastore
    from thrift.protocol import TBinaryProtocol
    from thrift.transport.TTransport import TMemoryBuffer

    class Handler:
        def get_all_databases(self):
            return ["default", "spot"]

    def script(sock):
        handshake(sock)
        request = read_frame(sock)
        out = TMemoryBuffer()
        ThriftHiveMetastore.Processor(Handler()).process(
            TBinaryProtocol.TBinaryProtocol(TMemoryBuffer(request)),
            TBinaryProtocol.TBinaryProtocol(out))
        reply = out.getvalue()
        sock.sendall(frame(reply[:7]) + frame(reply[7:-3]) + frame(reply[-3:]))
        return request

    peer = Peer(script)
    t = transport(peer)
    t.open()
    protocol = (TBinaryProtocol.TBinaryProtocolAccelerated if accelerated
                else TBinaryProtocol.TBinaryProtocol)(t)
    assert ThriftHiveMetastore.Client(protocol).get_all_databases() == ["default", "spot"]
    t.close()
    assert b"get_all_databases" in peer.join()


@pytest.mark.parametrize("status, name", [(BAD, "BAD"), (ERROR, "ERROR")])
def test_a_refusal_is_raised_with_the_servers_reason_principal_and_server(status, name):
    def script(sock):
        got = [read_message(sock), read_message(sock)]
        sock.sendall(encode_message(status, b"GSS initiate\nfailed"))
        return got

    peer = Peer(script)
    t = transport(peer)
    with pytest.raises(SaslError) as err:
        t.open()
    message = str(err.value)
    assert message == ("Kerberos (SASL GSSAPI) authentication to ms.example:9083 (service "
                       f"principal hive/ms.example@EXAMPLE.COM): the server refused the "
                       f"authentication ({name}: GSS initiate failed)")
    assert peer.join() == [(START, b"TEST"), (OK, b"hello")]
    assert not t.isOpen()


def test_a_server_that_hangs_up_gives_a_transport_error_with_a_hint():
    def script(sock):
        read_message(sock)
        read_message(sock)

    peer = Peer(script)
    t = transport(peer)
    with pytest.raises(TTransportException) as err:
        t.open()
    peer.join()
    assert err.value.type == TTransportException.END_OF_FILE
    assert "ms.example:9083" in str(err.value) and "without hive.metastore.sasl.enabled" \
        in str(err.value)
    assert not t.isOpen()


def test_a_server_without_sasl_or_ending_early_or_oversized_is_refused():
    def plain(sock):   # what a Thrift server without SASL might answer
        read_message(sock)
        read_message(sock)
        sock.sendall(b"\x80\x01\x00\x03\x00\x00\x00\x00")

    def early(sock):
        read_message(sock)
        read_message(sock)
        sock.sendall(encode_message(COMPLETE))

    def huge(sock):
        read_message(sock)
        read_message(sock)
        sock.sendall(struct.pack(">BI", OK, 50 << 20))

    for script, expected in ((plain, "not Thrift SASL (status byte 128"),
                             (early, "ended the negotiation before the client's side"),
                             (huge, "OK message of 52428800 bytes")):
        peer = Peer(script)
        with pytest.raises(SaslError, match="ms.example:9083") as err:
            transport(peer).open()
        peer.join()
        assert expected in str(err.value)


def test_a_complete_carrying_data_is_refused():
    def script(sock):
        read_message(sock)
        read_message(sock)
        sock.sendall(encode_message(OK, b"c1"))
        read_message(sock)
        sock.sendall(encode_message(COMPLETE, b"surprise"))

    peer = Peer(script)
    with pytest.raises(SaslError, match="COMPLETE carries 8 bytes; none were expected"):
        transport(peer, Echo(rounds=1)).open()
    peer.join()


def test_a_challenge_after_the_clients_last_word_is_refused():
    def script(sock):
        read_message(sock)
        read_message(sock)
        sock.sendall(encode_message(OK, b"c1"))
        read_message(sock)
        sock.sendall(encode_message(OK, b"again"))

    peer = Peer(script)
    with pytest.raises(SaslError, match="challenge after the client's side was complete"):
        transport(peer, Echo(rounds=1)).open()
    peer.join()


def test_an_oversized_frame_is_refused_before_it_is_read():
    def script(sock):
        handshake(sock)
        sock.sendall(struct.pack(">I", 2000))

    peer = Peer(script)
    t = TSaslGssapiTransport(peer.client, "hive/h@R", "FILE:/x", "h:1", max_frame=1000,
                             mechanism=Echo())
    t.open()
    with pytest.raises(TTransportException, match="h:1: frame of 2000 bytes, above the limit"):
        t.read(1)
    t.close()
    peer.join()
