"""Make real DNS captures: ``dnsmasq`` answers queries on the loopback
interface while ``tcpdump`` records the traffic.

The queries are sent from Python, but every response in the capture is
dnsmasq's and every byte of the file is tcpdump's. Used by the demo, the
tests and the benchmarks.

    python -m pipelines.dns.sample OUT.pcap --queries 1000
"""
from __future__ import annotations

import argparse
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


class Resolver:
    """dnsmasq on 127.0.0.1 and ::1, on a free port."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        args = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--bind-interfaces", "--listen-address=127.0.0.1",
                "--listen-address=::1", f"--port={self.port}", "--pid-file=", "--user=",
                f"--local=/{LOCAL_ZONE}/", f"--address=/{WILDCARD_ZONE}/10.9.9.9",
                "--cache-size=1000", "--dns-forward-max=10000"]
        for name, addrs in ANSWERED.items():
            for addr in addrs:
                args.append(f"--host-record={name},{addr}")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()

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


class Capture:
    """tcpdump on the loopback interface, writing a pcap."""

    def __init__(self, out: Path, port: int):
        self.out = Path(out)
        # --immediate-mode: hand each packet over as it arrives; without it the
        # kernel delivers in blocks and an interrupted tcpdump loses the last one.
        # In that mode the kernel ring has buffer/snaplen slots: a DNS-sized
        # snaplen (-s 9000) keeps thousands of slots instead of 64.
        cmd = ["tcpdump", "-i", "lo", "-U", "--immediate-mode", "-n", "-B", "65536", "-s", "9000",
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
                raise RuntimeError(f"tcpdump did not start: {line.decode(errors='replace')}")

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


def run_queries(port: int, queries: list[Query], window: int = 64) -> int:
    """Send queries, at most ``window`` unanswered at a time; return answers received."""
    socks = {socket.AF_INET: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
             socket.AF_INET6: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)}
    dest = {socket.AF_INET: ("127.0.0.1", port), socket.AF_INET6: ("::1", port)}
    outstanding = received = 0
    try:
        for i, q in enumerate(queries):
            socks[q.family].sendto(encode_query(i & 0xFFFF, q.name, q.qtype), dest[q.family])
            outstanding += 1
            while outstanding >= window or (i == len(queries) - 1 and outstanding):
                ready, _, _ = select.select(list(socks.values()), [], [], 2.0)
                if not ready:
                    outstanding = 0   # a lost answer: the capture is still what it is
                    break
                for s in ready:
                    s.recv(4096)
                    outstanding -= 1
                    received += 1
    finally:
        for s in socks.values():
            s.close()
    return received


def make_dns_capture(dest: Path, queries: int | list[Query] = 200, seed: int = 1) -> tuple[Path, int]:
    """Write a pcap of dnsmasq answering ``queries``; return (path, responses in it)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    qs = standard_queries(queries, seed) if isinstance(queries, int) else queries
    resolver = Resolver()
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".tcpdump-") as tmp:
            capture = Capture(Path(tmp) / "capture.pcap", resolver.port)
            received = run_queries(resolver.port, qs)
            capture.wait_for_packets(len(qs) + received)
            captured, dropped = capture.close()
            if dropped:
                raise RuntimeError(f"tcpdump dropped {dropped} packets")
            os.replace(capture.out, dest)
    finally:
        resolver.close()
    return dest, received


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    path, answers = make_dns_capture(args.out, args.queries, args.seed)
    print(f"{path}: {answers} responses")


if __name__ == "__main__":
    main()
