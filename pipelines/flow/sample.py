"""Make real nfcapd files: a real ``nfcapd`` collector receives NetFlow v5
datagrams that this module exports over UDP on the loopback interface.

The flows are synthetic, but the file is written by nfcapd itself, so it is
exactly what a production collector directory holds. Used by the demo
(``start_standalone_ingest.sh --demo``), the tests and the benchmarks.

    python -m pipelines.flow.sample OUT_DIR --flows 100000
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

V5_HEADER = struct.Struct("!HHIIIIBBH")
V5_RECORD = struct.Struct("!IIIHHIIIIHHBBBBHHBBH")
V5_MAX_RECORDS = 30

PROTOCOLS = (6, 6, 6, 17, 17, 1)  # weighted like real traffic: mostly TCP
TCP_FLAGS = (0x02, 0x12, 0x10, 0x18, 0x11, 0x04, 0x1B)


def _ip(a: int, b: int, c: int, d: int) -> int:
    return (a << 24) | (b << 16) | (c << 8) | d


def v5_records(count: int, seed: int = 1):
    """Yield ``count`` NetFlow v5 record tuples, deterministic for a seed."""
    rnd = random.Random(seed)
    for i in range(count):
        proto = rnd.choice(PROTOCOLS)
        sport = rnd.randrange(1024, 65535)
        dport = rnd.choice((22, 53, 80, 123, 443, 8080, rnd.randrange(1, 65535)))
        if proto == 1:
            sport, dport = 0, rnd.choice((0x0800, 0x0000, 0x0303))
        pkts = rnd.randrange(1, 5000)
        first = rnd.randrange(0, 50_000)
        yield (
            _ip(10, rnd.randrange(256), rnd.randrange(256), rnd.randrange(1, 255)),
            _ip(192, 168, rnd.randrange(256), rnd.randrange(1, 255)),
            _ip(10, 0, 0, 1),                   # next hop
            rnd.randrange(1, 48),               # input SNMP interface
            rnd.randrange(1, 48),               # output SNMP interface
            pkts,
            pkts * rnd.randrange(40, 1500),     # bytes
            first,                              # First (sys uptime, ms)
            first + rnd.randrange(0, 10_000),   # Last
            sport,
            dport,
            0,
            rnd.choice(TCP_FLAGS) if proto == 6 else 0,
            proto,
            rnd.choice((0, 0, 8, 32, 46 << 2)),  # ToS
            rnd.randrange(0, 65000),            # source AS
            rnd.randrange(0, 65000),            # destination AS
            24,
            16,
            0,
        )


def v5_datagrams(count: int, seed: int = 1, uptime_ms: int = 60_000):
    """Yield NetFlow v5 datagrams holding ``count`` flows in total."""
    records = v5_records(count, seed)
    sequence = 0
    remaining = count
    while remaining > 0:
        n = min(V5_MAX_RECORDS, remaining)
        now = time.time()
        header = V5_HEADER.pack(5, n, uptime_ms, int(now), int((now % 1) * 1e9),
                                sequence, 0, 0, 0)
        body = b"".join(V5_RECORD.pack(*next(records)) for _ in range(n))
        yield header + body
        sequence += n
        remaining -= n


def _udp_socket_state(port: int) -> tuple[int, int] | None:
    """(receive queue bytes, drops) of the UDP socket bound to ``port``."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port:
            rx_queue = int(fields[4].split(":")[1], 16)
            return rx_queue, int(fields[12])
    return None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Collector:
    """A running ``nfcapd`` on a loopback port, writing into ``out_dir``."""

    def __init__(self, out_dir: Path, port: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_udp_port()
        # nfcapd wants a writable directory for its temporary files only; it
        # writes nfcapd.current.PID there and renames it when it closes.
        self.proc = subprocess.Popen(
            ["nfcapd", "-b", "127.0.0.1", "-p", str(self.port), "-w", str(self.out_dir),
             "-B", str(8 * 1024 * 1024), "-t", "3600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while _udp_socket_state(self.port) is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nfcapd exited: {self.proc.stderr.read().decode(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError("nfcapd did not open its UDP port within 10 s")
            time.sleep(0.01)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, datagrams) -> None:
        """Send datagrams, pacing so that the collector's buffer never overflows."""
        for i, dgram in enumerate(datagrams):
            self.sock.sendto(dgram, ("127.0.0.1", self.port))
            if i % 200 == 199:
                self.wait_drained(limit=4 * 1024 * 1024)

    def wait_drained(self, limit: int = 0) -> None:
        """Block until nfcapd has read its socket down to ``limit`` bytes."""
        deadline = time.monotonic() + 60
        while True:
            state = _udp_socket_state(self.port)
            if state is None or state[0] <= limit:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("nfcapd stopped reading its socket")
            time.sleep(0.002)

    def drops(self) -> int:
        state = _udp_socket_state(self.port)
        return state[1] if state else 0

    def close(self) -> Path:
        """Stop nfcapd (it closes and renames its file) and return that file."""
        self.wait_drained()
        drops = self.drops()
        self.sock.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        if drops:
            raise RuntimeError(f"the kernel dropped {drops} datagrams before nfcapd read them")
        files = sorted(p for p in self.out_dir.iterdir()
                       if p.name.startswith("nfcapd.") and ".current." not in p.name)
        if not files:
            raise RuntimeError(f"nfcapd left no file in {self.out_dir}")
        return max(files, key=lambda p: p.stat().st_mtime)


def make_nfcapd_file(dest: Path, flows: int, seed: int = 1) -> Path:
    """Write one nfcapd file holding ``flows`` flows at ``dest`` (a file path).

    nfcapd runs in a private temporary directory, so the file appears at
    ``dest`` complete, by a rename, the way a collector rotates its files.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".nfcapd-") as tmp:
        collector = Collector(Path(tmp))
        try:
            collector.send(v5_datagrams(flows, seed))
        except BaseException:
            collector.proc.kill()
            raise
        os.replace(collector.close(), dest)
    return dest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--flows", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d%H%M", time.gmtime())
    for i in range(args.files):
        path = make_nfcapd_file(args.out_dir / f"nfcapd.{stamp}.{i:03d}", args.flows, args.seed + i)
        print(path)


if __name__ == "__main__":
    main()
