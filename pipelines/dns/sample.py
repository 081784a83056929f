"""Make real DNS captures: the real ``dnsmasq`` answers queries sent from
Python over UDP on loopback, and the exchange is written to a pcap file.

How: dnsmasq runs as the calling user on 127.0.0.1 and ::1, on a free port.
Python sends the queries over UDP sockets (IPv4 and IPv6) and receives
dnsmasq's answers. Every query sent and every answer received goes into a
classic pcap file (linktype EN10MB, as tcpdump writes for ``lo``) through
``dpkt.pcap.Writer``. The DNS payload of every packet is exactly the bytes we
sent or dnsmasq answered; only the Ethernet (zero MAC addresses, as on
``lo``), IPv4/IPv6 and UDP headers are written by dpkt, with the real
addresses and ports, correct lengths and correct checksums. Each packet's
time is the kernel's software timestamp of that datagram (SO_TIMESTAMPING:
when the query left the socket, when the answer arrived), and the packets are
in that order. Not the kernel's own values: the IPv4 identification (a
counter), the IPv6 flow label (0) and the TTL/hop limit (64, Linux's default).

Why: recording ``lo`` with tcpdump needs root (packet capture privileges),
and the demo, the tests and the benchmarks must work for a normal user. The
tcpdump way stays available (``recorder="tcpdump"``, as root) and the tests
check that tshark reads the same DNS traffic from both files.

    python -m pipelines.dns.sample OUT.pcap --queries 1000 [--recorder tcpdump]
"""
from __future__ import annotations

import argparse
import heapq
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable

import dpkt

from spot_ingest.pipeline import ToolMissingError

# Names dnsmasq answers, and how (see Resolver.start).
ANSWERED = {
    "www.example.test": ["10.0.0.1"],
    "multi.example.test": ["10.0.0.2", "10.0.0.3", "10.0.0.4"],
    "v6.example.test": ["2001:db8::53"],
}
WILDCARD_ZONE = "wild.test"       # any name under it: A 10.9.9.9
LOCAL_ZONE = "example.test"       # other names under it: NXDOMAIN
# Anything else: REFUSED (dnsmasq has no upstream server).

QTYPES = {"A": 1, "AAAA": 28, "MX": 15, "TXT": 16, "ANY": 255}


def encode_query(qid: int, name: bytes, qtype: int) -> bytes:
    labels = b"".join(bytes([len(label)]) + label for label in name.split(b".") if label)
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + b"\x00" + \
        struct.pack("!HH", qtype, 1)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Query:
    name: bytes
    qtype: int
    family: int = socket.AF_INET


def standard_queries(count: int, seed: int = 1) -> list[Query]:
    """A mix: answered, multi-answer, IPv6 answers, NXDOMAIN, REFUSED, odd names, IPv6 transport."""
    rnd = random.Random(seed)
    odd = [b'quote"and,comma.wild.test', b"tab\there.wild.test", b"sp ace.wild.test",
           b"semi;colon$(x).wild.test", b"back\\slash.wild.test", b"ctl\x01a\x02b\nc.wild.test",
           b"bad\xffutf8.wild.test"]
    out = []
    for i in range(count):
        kind = i % 10
        if kind < 4:
            name = f"host{rnd.randrange(10**6)}.{WILDCARD_ZONE}".encode()
            out.append(Query(name, QTYPES["A"]))
        elif kind == 4:
            out.append(Query(b"multi.example.test", QTYPES["A"]))
        elif kind == 5:
            out.append(Query(b"v6.example.test", QTYPES["AAAA"], socket.AF_INET6))
        elif kind == 6:
            out.append(Query(f"missing{i}.{LOCAL_ZONE}".encode(), QTYPES["A"]))
        elif kind == 7:
            out.append(Query(f"elsewhere{i}.org".encode(), QTYPES["A"]))
        elif kind == 8:
            out.append(Query(odd[(i // 10) % len(odd)], QTYPES["A"]))
        else:
            out.append(Query(b"www.example.test", QTYPES["A"], socket.AF_INET6))
    return out


DNSMASQ_DIRS = ("/usr/sbin", "/sbin")   # where Debian puts it: not on a normal user's PATH


def find_dnsmasq(path: str | None = None, dirs: tuple[str, ...] | None = None) -> str:
    """The dnsmasq program: on ``path`` (default $PATH), else in ``dirs`` (default DNSMASQ_DIRS)."""
    dirs = DNSMASQ_DIRS if dirs is None else dirs
    found = shutil.which("dnsmasq", path=path) or shutil.which("dnsmasq", path=os.pathsep.join(dirs))
    if found is None:
        raise ToolMissingError("the dns sample needs dnsmasq (not found on PATH, /usr/sbin or /sbin); "
                               "install it: apt-get install dnsmasq-base")
    return found


class Resolver:
    """dnsmasq on 127.0.0.1 and ::1, on a free port, as the calling user.

    Nothing here needs root: the port is above 1024, ``--user=`` keeps dnsmasq
    from switching user and ``--pid-file=`` from writing /run/dnsmasq.pid."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        args = [find_dnsmasq(), "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                "--listen-address=::1", f"--port={self.port}", "--pid-file=", "--user=",
                f"--local=/{LOCAL_ZONE}/", f"--address=/{WILDCARD_ZONE}/10.9.9.9",
                "--cache-size=1000", "--dns-forward-max=10000"]
        for name, addrs in ANSWERED.items():
            for addr in addrs:
                args.append(f"--host-record={name},{addr}")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self._wait_ready()
        except BaseException:
            self.close()   # not left running when it never answered
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        probe = encode_query(1, b"www.example.test", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.1)
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"dnsmasq exited: {self.proc.stderr.read().decode()}")
                try:
                    s.sendto(probe, ("127.0.0.1", self.port))
                    s.recv(512)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("dnsmasq did not answer within 10 s") from None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> "Resolver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Capture:
    """tcpdump on the loopback interface, writing a pcap (needs root)."""

    def __init__(self, out: Path, port: int):
        self.out = Path(out)
        tcpdump = shutil.which("tcpdump") or shutil.which("tcpdump", path="/usr/sbin:/sbin")
        if tcpdump is None:
            raise ToolMissingError("the tcpdump recorder needs tcpdump (not found on PATH, /usr/sbin "
                                   "or /sbin); install it: apt-get install tcpdump")
        # --immediate-mode: hand each packet over as it arrives; without it the
        # kernel delivers in blocks and an interrupted tcpdump loses the last one.
        # In that mode the kernel ring has buffer/snaplen slots: a DNS-sized
        # snaplen (-s 9000) keeps thousands of slots instead of 64.
        cmd = [tcpdump, "-i", "lo", "-U", "--immediate-mode", "-n", "-B", "65536", "-s", "9000",
               "-w", str(self.out), f"udp port {port}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # tcpdump says "listening on lo" once the capture runs: wait for that.
        line = b""
        deadline = time.monotonic() + 10
        while b"listening on" not in line:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.5)
            if ready:
                line = self.proc.stderr.readline()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                hint = " (recording lo needs root)" if os.geteuid() != 0 else ""
                raise RuntimeError(f"tcpdump did not start{hint}: {line.decode(errors='replace')}")

    def wait_for_packets(self, count: int, timeout: float = 60) -> None:
        """Block until the file holds ``count`` packets (tcpdump -U writes each at once)."""
        deadline = time.monotonic() + timeout
        while pcap_packet_count(self.out) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tcpdump wrote {pcap_packet_count(self.out)} of {count} packets")
            time.sleep(0.01)

    def close(self) -> tuple[int, int]:
        """Stop; return (packets captured, packets dropped by the kernel)."""
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.stderr.read().decode(errors="replace")
        self.proc.wait(timeout=30)
        captured = int(re.search(r"(\d+) packets? captured", err).group(1))
        dropped = int(re.search(r"(\d+) packets? dropped by kernel", err).group(1))
        return captured, dropped


def pcap_packet_count(path: Path) -> int:
    """Packets in a classic pcap file, from its record headers."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return 0
    if len(data) < 24:
        return 0
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    count, pos = 0, 24
    while pos + 16 <= len(data):
        incl_len = struct.unpack_from(endian + "I", data, pos + 8)[0]
        if pos + 16 + incl_len > len(data):
            break
        pos += 16 + incl_len
        count += 1
    return count


# Linux socket timestamping (linux/net_tstamp.h, asm-generic/socket.h); the
# socket module has no names for them. Software stamps need no privileges.
SO_TIMESTAMPING = 37
_STAMP_FLAGS = (1 << 1       # SOF_TIMESTAMPING_TX_SOFTWARE: when a datagram leaves
                | 1 << 3     # SOF_TIMESTAMPING_RX_SOFTWARE: when a datagram arrives
                | 1 << 4     # SOF_TIMESTAMPING_SOFTWARE: report software stamps
                | 1 << 7     # SOF_TIMESTAMPING_OPT_ID: number the sent datagrams
                | 1 << 11)   # SOF_TIMESTAMPING_OPT_TSONLY: the stamp alone, no copy of the data
_RECVERR = {(socket.IPPROTO_IP, 11), (socket.IPPROTO_IPV6, 25)}   # IP_RECVERR, IPV6_RECVERR
_TIMESPEC = struct.Struct("@ll")


def _stamp_ns(cmsgs) -> int | None:
    """The software time (ns since the epoch) in a SCM_TIMESTAMPING message, if any."""
    for level, kind, data in cmsgs:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            if sec or nsec:
                return sec * 1_000_000_000 + nsec
    return None


class Client:
    """A UDP socket on loopback that knows when each datagram left and arrived.

    The times are the kernel's software timestamps; where the kernel gives none
    (not Linux), the clock just before ``sendto`` and just after ``recvmsg``."""

    def __init__(self, family: int, server_port: int):
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        self.family = family
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.addr = self.sock.getsockname()[:2]
        self.server = (host, server_port)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, _STAMP_FLAGS)
            self.stamped = True
        except OSError:
            self.stamped = False
        self.sock.setblocking(False)
        self.sent = 0

    def send(self, payload: bytes) -> int:
        """Send one datagram to the server; return when it left (ns)."""
        before = time.time_ns()
        self.sock.sendto(payload, self.server)
        number, self.sent = self.sent, self.sent + 1
        return (self._sent_stamp(number) if self.stamped else None) or before

    def _sent_stamp(self, number: int | None) -> int | None:
        # On loopback the kernel stamps the datagram inside sendto: the stamp
        # is on the error queue already. OPT_ID numbers them, to match; stamps
        # of earlier datagrams (late, or ``number`` None) are dropped.
        while True:
            try:
                _, cmsgs, _, _ = self.sock.recvmsg(0, 512, socket.MSG_ERRQUEUE)
            except BlockingIOError:
                return None
            ident = next((struct.unpack_from("=I", data, 12)[0]   # sock_extended_err.ee_data
                          for level, kind, data in cmsgs if (level, kind) in _RECVERR), None)
            if number is not None and ident == number & 0xFFFFFFFF:
                return _stamp_ns(cmsgs)

    def receive(self) -> tuple[bytes, tuple, int] | None:
        """(payload, source address, arrival ns) of the next datagram waiting, or None."""
        try:
            data, cmsgs, flags, src = self.sock.recvmsg(65535, 512)
        except BlockingIOError:
            if self.stamped:
                self._sent_stamp(None)   # a late send stamp would keep select() waking us
            return None
        after = time.time_ns()
        if flags & socket.MSG_TRUNC:
            raise RuntimeError(f"a {len(data)}+ byte answer from {src} did not fit the buffer")
        return data, src[:2], _stamp_ns(cmsgs) or after

    def close(self) -> None:
        self.sock.close()


class PcapRecorder:
    """Datagrams into a classic pcap (EN10MB, microseconds, as tcpdump writes),
    each wrapped by dpkt in Ethernet + IPv4/IPv6 + UDP headers, in time order.

    ``packet`` takes datagrams in the order Python handled them; an answer read
    late may have arrived before a query sent since, so they wait in a heap
    until ``settle(t)`` says nothing stamped before ``t`` is still to come."""

    def __init__(self, fileobj):
        self.writer = dpkt.pcap.Writer(fileobj, snaplen=262144, linktype=dpkt.pcap.DLT_EN10MB)
        self.pending: list[tuple[int, int, bytes, tuple, tuple]] = []
        self.seen = self.written = 0

    def packet(self, stamp_ns: int, payload: bytes, src: tuple, dst: tuple) -> None:
        heapq.heappush(self.pending, (stamp_ns, self.seen, payload, src, dst))
        self.seen += 1

    def settle(self, before_ns: int | None = None) -> None:
        """Write the packets stamped before ``before_ns`` (None: all of them)."""
        while self.pending and (before_ns is None or self.pending[0][0] < before_ns):
            stamp_ns, _, payload, src, dst = heapq.heappop(self.pending)
            frame = udp_frame(payload, src, dst, ident=self.written & 0xFFFF)
            # Exact microseconds (tcpdump truncates the kernel's ns the same way).
            self.writer.writepkt_time(frame, Decimal(stamp_ns // 1000) / 1_000_000)
            self.written += 1


def udp_frame(payload: bytes, src: tuple, dst: tuple, ident: int = 0) -> bytes:
    """``payload`` as a UDP datagram from ``src`` to ``dst`` ((address, port) pairs),
    in an Ethernet frame with zero MAC addresses, as tcpdump records ``lo``.
    dpkt fills in the lengths and the checksums."""
    udp = dpkt.udp.UDP(sport=src[1], dport=dst[1], ulen=8 + len(payload), data=payload)
    if ":" in src[0]:
        ip = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, src[0]),
                          dst=socket.inet_pton(socket.AF_INET6, dst[0]),
                          nxt=dpkt.ip.IP_PROTO_UDP, hlim=64, plen=udp.ulen, data=udp)
        bytes(ip)                  # computes the UDP checksum
        if udp.sum == 0:
            udp.sum = 0xFFFF       # RFC 8200: a zero UDP checksum is sent as all ones over IPv6
        ethertype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        ip = dpkt.ip.IP(src=socket.inet_aton(src[0]), dst=socket.inet_aton(dst[0]),
                        p=dpkt.ip.IP_PROTO_UDP, ttl=64, id=ident, data=udp)
        ip.df = 1                  # Linux sets DF on UDP (path MTU discovery)
        ethertype = dpkt.ethernet.ETH_TYPE_IP
    return bytes(dpkt.ethernet.Ethernet(dst=b"\0" * 6, src=b"\0" * 6, type=ethertype, data=ip))


def run_queries(port: int, queries: list[Query], window: int = 64,
                recorder: PcapRecorder | None = None) -> int:
    """Send queries, at most ``window`` unanswered at a time; return answers received.
    Every query sent and answer received is handed to ``recorder`` if given."""
    clients = {family: Client(family, port) for family in (socket.AF_INET, socket.AF_INET6)}
    by_sock = {c.sock: c for c in clients.values()}
    waiting: dict[tuple[int, int], int] = {}   # (family, id) -> when the query left; oldest first
    received = 0
    try:
        for i, q in enumerate(queries):
            client, qid = clients[q.family], i & 0xFFFF
            payload = encode_query(qid, q.name, q.qtype)
            stamp = client.send(payload)
            waiting[(q.family, qid)] = stamp
            if recorder:
                recorder.packet(stamp, payload, client.addr, client.server)
            while len(waiting) >= window or (i == len(queries) - 1 and waiting):
                ready, _, _ = select.select(list(by_sock), [], [], 2.0)
                if not ready:
                    waiting.clear()   # a lost answer: the capture is still what it is
                    break
                for s in ready:
                    client = by_sock[s]
                    while (got := client.receive()) is not None:
                        answer, src, stamp = got
                        received += 1
                        waiting.pop((client.family, int.from_bytes(answer[:2], "big")), None)
                        if recorder:
                            recorder.packet(stamp, answer, src, client.addr)
            if recorder:
                # An answer still to come arrives after its query: the oldest
                # unanswered query bounds what may still come before.
                recorder.settle(next(iter(waiting.values()), None))
    finally:
        for c in clients.values():
            c.close()
    return received


RECORDERS = ("dpkt", "tcpdump")


def make_dns_capture(dest: Path, queries: int | list[Query] = 200, seed: int = 1, *,
                     recorder: str = "dpkt",
                     on_ready: Callable[[int], None] | None = None) -> tuple[Path, int]:
    """Write a pcap of dnsmasq answering ``queries``; return (path, responses in it).

    ``recorder``: "dpkt" (default, needs no privileges: see the module
    docstring) or "tcpdump" (records ``lo``, needs root). ``on_ready(port)`` is
    called once dnsmasq answers on ``port``, before the first query."""
    if recorder not in RECORDERS:
        raise ValueError(f"recorder must be one of {', '.join(RECORDERS)}, not {recorder!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    qs = standard_queries(queries, seed) if isinstance(queries, int) else queries
    with Resolver() as resolver:
        if on_ready:
            on_ready(resolver.port)
        # Written under a hidden folder next to dest, then renamed: dest
        # appears complete (a watcher ignores hidden folders).
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".dns-sample-") as tmp:
            out = Path(tmp) / (dest.name + ".part")
            if recorder == "tcpdump":
                capture = Capture(out, resolver.port)
                try:
                    received = run_queries(resolver.port, qs)
                    capture.wait_for_packets(len(qs) + received)
                finally:
                    captured, dropped = capture.close()
                if dropped:
                    raise RuntimeError(f"tcpdump dropped {dropped} packets")
            else:
                with open(out, "xb") as f:
                    pcap = PcapRecorder(f)
                    received = run_queries(resolver.port, qs, recorder=pcap)
                    pcap.settle()
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(out, dest)
    return dest, received


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--recorder", choices=RECORDERS, default="dpkt",
                        help="dpkt: no privileges needed (default); tcpdump: record lo, needs root")
    args = parser.parse_args(argv)
    try:
        path, answers = make_dns_capture(args.out, args.queries, args.seed, recorder=args.recorder)
    except ToolMissingError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{path}: {answers} responses")


if __name__ == "__main__":
    main()
