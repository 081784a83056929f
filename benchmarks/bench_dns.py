"""DNS benchmark: the whole pipeline with 2 workers against one tshark pass.

    python -m benchmarks.bench_dns [--workdir DIR] [--packets 1000000] [--pkt-num N]
                                   [--worker-processes N] [--repeat N]

Input: a capture of 1,000,000 DNS packets (queries and responses), made by
tcpdump of dnsmasq answering queries on loopback, then repeated with editcap
(time-shifted copies) and mergecap to reach the size.
  (a) one tshark pass with the original Spot field list, output to /dev/null;
  (b) start_standalone_ingest.sh --once with 2 workers: split with editcap,
      stage, announce, decode, write the dns table; wall time from start to
      exit, and the peak memory (PSS) of each worker's process tree.
For each, the load average before it and the cores used (the machine's busy
CPU time over the wall time, from /proc/stat: other work on the machine
counts too); for (b) also when the first chunk began decoding and when each
worker finished (from the ingest reports). The memory sampler's own CPU time
is printed: it runs beside (b), on the same cores (about 0.1 s per second
here; the first version of this benchmark sampled every process twenty times
a second and took 3.5 s of CPU during an 18 s run).
Targets: a/b >= 1.7 on this 2-core machine; peak memory < 500 MB per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import re
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

from benchmarks.machine import busy_seconds, machine_ceiling  # noqa: E402
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
    """Samples the peak PSS (and summed RSS) of each worker's process tree
    (the worker, its pool processes and their tshark). The workers are looked
    for once a second and their trees listed twice a second (each listing
    reads every process of the machine); the trees' memory is read ten times
    a second (one small /proc file per process). So the sampler takes little
    of the cores the pipeline runs on (``cpu`` is its own time); a tshark
    reaches its peak at the end of its chunk, seconds after it started."""

    def __init__(self, match: str):
        super().__init__(daemon=True)
        self.match, self.peaks, self.stop = match, {}, threading.Event()
        self.workers: dict[str, psutil.Process] = {}
        self.trees: dict[str, list[psutil.Process]] = {}
        self.cpu = 0.0

    def _find(self) -> None:
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.match in cmd and " worker " in f" {cmd} " and " -i " in cmd:
                wid = cmd.split(" -i ")[1].split()[0]
                if wid not in self.workers or not self.workers[wid].is_running():
                    self.workers[wid] = p

    def run(self):
        found_at = listed_at = 0.0
        while not self.stop.is_set():
            now = time.monotonic()
            if now - found_at >= 1.0:
                self._find()
                found_at = now
            if now - listed_at >= 0.5:
                for wid, root in list(self.workers.items()):
                    try:
                        self.trees[wid] = [root, *root.children(recursive=True)]
                    except psutil.Error:
                        self.trees.pop(wid, None)
                listed_at = now
            for wid, procs in list(self.trees.items()):
                pss = rss = 0
                for proc in procs:
                    try:
                        mem = proc.memory_full_info()
                    except psutil.Error:
                        continue
                    pss, rss = pss + mem.pss, rss + mem.rss
                old = self.peaks.get(wid, (0, 0))
                self.peaks[wid] = (max(old[0], pss), max(old[1], rss))
            self.cpu = time.thread_time()
            time.sleep(0.1)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def timeline(root: Path, started: float) -> tuple[float | None, dict[str, float]]:
    """From the run's ingest reports: when the first chunk began decoding and
    when each worker loaded its last chunk, in seconds after ``started``."""
    first, ends = None, {}
    for report in (root / "warehouse" / "dns" / "_reports").rglob("worker*.jsonl"):
        for line in report.read_text().splitlines():
            r = json.loads(line)
            if r.get("outcome") != "loaded":
                continue
            begin = r["ts"] - (r.get("seconds") or 0) - started
            first = begin if first is None else min(first, begin)
            ends[str(r["worker"])] = max(ends.get(str(r["worker"]), 0.0), r["ts"] - started)
    return first, ends


def conversion_processes(root: Path) -> dict[str, str]:
    """Conversion processes per worker, as each worker's log says."""
    found = {}
    for log in sorted((root / "logs").glob("*-worker-*.log")):
        m = re.search(r"worker (\d+) of pipeline .* (\d+) processes", log.read_text())
        if m:
            found[m.group(1)] = m.group(2)
    return found


def tshark_pass(capture: Path) -> tuple[float, float, str]:
    """(a): wall seconds, cores used, load average before."""
    load = load_average()
    busy, start = busy_seconds(), time.perf_counter()
    subprocess.run(["tshark", "-r", str(capture), *ORIGINAL_TSHARK], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    a = time.perf_counter() - start
    return a, (busy_seconds() - busy) / a, load


def pipeline_run(args, capture: Path) -> dict:
    """(b): the whole pipeline with 2 workers; what it measured."""
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
        sampler = TreePeak(str(conf))
        sampler.start()
        before = load_average()
        tracker = RunProgress(load(conf), "bench_dns", "dns", total=1)
        busy, started, start = busy_seconds(), time.time(), time.perf_counter()
        proc = subprocess.Popen([str(REPO / "start_standalone_ingest.sh"), "bench_dns", "2",
                                 "--once", "-c", str(conf)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:     # on a terminal: files and records done, the rate
            tracker.poll()
            time.sleep(0.2)
        out, err = proc.communicate()
        b = time.perf_counter() - start
        tracker.close()
        cores = (busy_seconds() - busy) / b
        sampler.stop.set()
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed:\n{out}\n{err[-3000:]}")
    first, ends = timeline(root, started)
    return {"b": b, "cores": cores, "load": before, "conf": conf, "root": root,
            "summary": [line for line in out.splitlines() if line.startswith("dns table")][0],
            "peaks": sampler.peaks, "sampler_cpu": sampler.cpu, "first": first, "ends": ends,
            "processes": conversion_processes(root)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--packets", type=int, default=1_000_000)
    parser.add_argument("--pkt-num", type=int, default=None,
                        help="packets per chunk (default: the pipeline's default)")
    parser.add_argument("--worker-processes", type=int, default=None,
                        help="conversion processes per worker (default: the cores shared "
                             "among the host's workers)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run (a) then (b) this many times, to see the spread")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    capture = make_capture(args.workdir, args.packets)
    count = subprocess.run(["capinfos", "-c", "-M", str(capture)], capture_output=True,
                           text=True).stdout.split()[-1]
    print(f"capture: {capture} ({count} packets, {capture.stat().st_size / 1e6:.0f} MB)")
    print(f"tshark: {subprocess.run(['tshark', '-v'], capture_output=True, text=True).stdout.splitlines()[0]}")
    print(f"machine: {os.cpu_count()} cores")
    ratios = []
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"-- run {i + 1} of {args.repeat}")
        a, a_cores, a_load = tshark_pass(capture)
        r = pipeline_run(args, capture)
        b = r["b"]
        ceiling = machine_ceiling(os.cpu_count() or 1)
        ratios.append(a / b)
        print(f"(a) one tshark pass, original field list, to /dev/null   {a:6.2f} s   "
              f"cores used {a_cores:.2f}, load average before {a_load}")
        print(f"(b) whole pipeline, 2 workers, split to table            {b:6.2f} s   "
              f"{r['summary']}")
        print(f"    cores used {r['cores']:.2f}, load average before {r['load']}; first chunk "
              f"decoding at {r['first']:.2f} s; workers done at "
              + ", ".join(f"{t:.2f} s" for _, t in sorted(r["ends"].items())))
        used = load(r["conf"]).pipeline("bench_dns")
        processes = sorted(set(r["processes"].values())) or ["?"]
        print(f"speed-up a/b = {a / b:.2f}   (target >= 1.7; pkt_num {used.options.pkt_num}"
              f"{'' if args.pkt_num else ' (default)'}, {'/'.join(processes)} conversion "
              f"process(es) per worker{'' if args.worker_processes else ' (default)'}, "
              f"{os.cpu_count()} cores)")
        print(f"machine ceiling: {os.cpu_count()} pinned CPU-bound processes run "
              f"{ceiling:.2f}x as fast as one (measured now); a/b is {a / b / ceiling:.2f} of it")
        for wid, (pss, rss) in sorted(r["peaks"].items()):
            print(f"peak memory, worker {wid} with its pool and tshark processes: {pss / 1e6:.0f} "
                  f"MB PSS (target < 500 MB); RSS summed over the processes, counting shared "
                  f"libraries once per process: {rss / 1e6:.0f} MB")
        print(f"(the memory sampler used {r['sampler_cpu']:.2f} s of CPU during (b))")
    if args.repeat > 1:
        ratios.sort()
        print(f"speed-up over {args.repeat} runs: min {ratios[0]:.2f}, median "
              f"{ratios[len(ratios) // 2]:.2f}, max {ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
