"""DNS benchmark: the whole pipeline with 2 workers against one tshark pass.

    python -m benchmarks.bench_dns [--workdir DIR] [--packets 1000000] [--pkt-num 100000]

Input: a capture of 1,000,000 DNS packets (queries and responses), made by
tcpdump of dnsmasq answering queries on loopback, then repeated with editcap
(time-shifted copies) and mergecap to reach the size.
  (a) one tshark pass with the original Spot field list, output to /dev/null;
  (b) start_standalone_ingest.sh --once with 2 workers: split with editcap,
      stage, announce, decode, write the dns table; wall time from start to
      exit, and the peak memory of each worker's process tree.
Targets: a/b >= 1.7 on this 2-core machine; peak memory < 500 MB per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spot_ingest.pipelines.dns.sample import make_dns_capture  # noqa: E402
from spot_ingest.broker import EmbeddedBroker  # noqa: E402
from spot_ingest.config import load  # noqa: E402
from spot_ingest.standalone import RunProgress  # noqa: E402

ORIGINAL_TSHARK = ["-E", "separator=,", "-E", "header=y", "-E", "occurrence=f", "-T", "fields",
                   "-e", "frame.time", "-e", "frame.time_epoch", "-e", "frame.len", "-e", "ip.src",
                   "-e", "ip.dst", "-e", "dns.resp.name", "-e", "dns.resp.type",
                   "-e", "dns.resp.class", "-e", "dns.flags.rcode", "-e", "dns.a",
                   "dns.flags.response == 1"]


def make_capture(workdir: Path, packets: int) -> Path:
    big = workdir / f"dns-{packets}.pcap"
    if big.exists():
        return big
    base_queries = 50_000
    base, _ = make_dns_capture(workdir / "dns-base.pcap", base_queries, seed=5)
    copies = -(-packets // (2 * base_queries))
    parts = []
    for i in range(copies):
        part = workdir / f"dns-part{i}.pcap"
        subprocess.run(["editcap", "-t", str(i * 30), str(base), str(part)], check=True)
        parts.append(part)
    merged = workdir / "dns-merged.pcap"
    subprocess.run(["mergecap", "-F", "pcap", "-a", "-w", str(merged), *map(str, parts)], check=True)
    subprocess.run(["editcap", "-F", "pcap", "-r", str(merged), str(big), f"1-{packets}"], check=True)
    for p in parts + [merged]:
        p.unlink()
    return big


class TreePeak(threading.Thread):
    """Samples the peak RSS of every process whose command line matches."""

    def __init__(self, match: str):
        super().__init__(daemon=True)
        self.match, self.peaks, self.stop = match, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    if self.match in cmd and "worker" in cmd and "-i" in cmd:
                        wid = cmd.split(" -i ")[1].split()[0]
                        procs = [p, *p.children(recursive=True)]
                        mem = [c.memory_full_info() for c in procs]
                        rss = sum(m.rss for m in mem)
                        pss = sum(m.pss for m in mem)
                        old = self.peaks.get(wid, (0, 0))
                        self.peaks[wid] = (max(old[0], pss), max(old[1], rss))
                except (psutil.Error, IndexError):
                    continue
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--pkt-num", type=int, default=None,
                        help="packets per chunk (default: the pipeline's default)")
    parser.add_argument("--worker-processes", type=int, default=None,
                        help="conversion processes per worker (default: the cores shared "
                             "among the host's workers)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    capture = make_capture(args.workdir, args.packets)
    count = subprocess.run(["capinfos", "-c", "-M", str(capture)], capture_output=True,
                           text=True).stdout.split()[-1]
    print(f"capture: {capture} ({count} packets, {capture.stat().st_size / 1e6:.0f} MB)")
    print(f"tshark: {subprocess.run(['tshark', '-v'], capture_output=True, text=True).stdout.splitlines()[0]}")

    start = time.perf_counter()
    subprocess.run(["tshark", "-r", str(capture), *ORIGINAL_TSHARK], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    a = time.perf_counter() - start

    run = uuid.uuid4().hex[:8]
    root = args.workdir / f"dns-run-{run}"
    collector = root / "collector"
    collector.mkdir(parents=True)
    shutil.copyfile(capture, collector / capture.name)
    with EmbeddedBroker() as broker:
        host, port = broker.bootstrap.split(":")
        conf = root / "ingest_conf.json"
        conf.write_text(json.dumps({
            "dbname": "bench", "hdfs_app_path": str(root / "warehouse"), "collector_processes": 2,
            "ingestion_interval": 0.2, "log_dir": str(root / "logs"),
            "kafka": {"kafka_server": host, "kafka_port": port},
            "pipelines": {"bench_dns": {
                "type": "dns", "collector_path": str(collector), "local_staging": str(root / "staging"),
                "supported_files": [".pcap"], "settle_seconds": 0.2, "topic": f"bench-dns-{run}",
                **({"pkt_num": args.pkt_num} if args.pkt_num else {}),
                **({"worker_processes": args.worker_processes} if args.worker_processes
                   else {})}}}))
        sampler = TreePeak("bench_dns")
        sampler.start()
        start = time.perf_counter()
        tracker = RunProgress(load(conf), "bench_dns", "dns", total=1)
        proc = subprocess.Popen([str(REPO / "start_standalone_ingest.sh"), "bench_dns", "2",
                                 "--once", "-c", str(conf)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:     # on a terminal: files and records done, the rate
            tracker.poll()
            time.sleep(0.2)
        out, err = proc.communicate()
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        b = time.perf_counter() - start
        tracker.close()
        sampler.stop.set()
    if result.returncode != 0:
        raise SystemExit(f"ingest failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    summary = [line for line in result.stdout.splitlines() if line.startswith("dns table")]
    print(f"(a) one tshark pass, original field list, to /dev/null   {a:6.2f} s")
    print(f"(b) whole pipeline, 2 workers, split to table            {b:6.2f} s   {summary[0]}")
    used = load(conf).pipeline("bench_dns")
    print(f"speed-up a/b = {a / b:.2f}   (target >= 1.7; pkt_num {used.options.pkt_num}"
          f"{'' if args.pkt_num else ' (default)'}, "
          f"{args.worker_processes or max(1, (os.cpu_count() or 1) // 2)} conversion process(es) "
          f"per worker{'' if args.worker_processes else ' (default)'}, {os.cpu_count()} cores)")
    for wid, (pss, rss) in sorted(sampler.peaks.items()):
        print(f"peak memory, worker {wid} with its pool and tshark processes: {pss / 1e6:.0f} MB "
              f"PSS (target < 500 MB); RSS summed over the processes, counting shared "
              f"libraries once per process: {rss / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
