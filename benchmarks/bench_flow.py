"""Flow benchmark: the worker's conversion against the original's nfdump csv export.

    python -m benchmarks.bench_flow [--workdir DIR] [--flows 1000000]

Part 1, on one nfcapd file of 1,000,000 flows (written by a real nfcapd):
  (a) ``nfdump -r FILE -o csv > /dev/null``, the export the original ran;
  (b) one worker's conversion of that file to Parquet (the code a worker
      runs per file, in a fresh process), with the peak memory of that
      process tree (Python plus nfdump) sampled every 20 ms.
  Targets: b/a <= 1.0, peak memory < 600 MB.
Part 2, 8 files of 250,000 flows through a real worker process reading the
  topic of a real broker, with 1 and with 2 conversion processes.
  Target: speed-up >= 1.7.

Figures are printed; nothing is asserted (shared machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from spot_ingest.pipelines.flow.sample import make_nfcapd_file  # noqa: E402
from spot_ingest.broker import EmbeddedBroker  # noqa: E402
from spot_ingest.bus import Announcement, Announcer, ensure_topic  # noqa: E402
from spot_ingest.config import KafkaConfig, load  # noqa: E402
from spot_ingest.standalone import RunProgress  # noqa: E402
from spot_ingest.store import LocalStore  # noqa: E402


def run_sampled(cmd, env=None, stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MB of its process tree)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 1e6


def ensure_file(path: Path, flows: int, seed: int) -> Path:
    if not path.exists():
        print(f"making {path.name}: {flows} flows through nfcapd ...", flush=True)
        make_nfcapd_file(path, flows, seed)
    return path


CONVERT_ONE = """
import sys, json, time
sys.path.insert(0, {repo!r})
from spot_ingest.bus import Announcement
from spot_ingest.config import PipelineConfig
from spot_ingest.store import LocalStore
from spot_ingest.worker import Job, load_file
from spot_ingest.pipelines.flow import FLOW
relative, size, sha, store = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
pcfg = PipelineConfig("bench", "flow", None, None, "", (), "t", 1, 1, None, True,
                      FLOW.parse_options({{}}, None))
ann = Announcement("bench", "flow", relative, size, sha, "bench", 0, "bench")
out = load_file(Job(ann, relative, pcfg, store, "bench", "t", 0, 0))
print(json.dumps({{"rows": out.rows, "status": out.status, "detail": out.detail}}))
"""


def part1(workdir: Path, flows: int) -> None:
    src = ensure_file(workdir / f"nfcapd.bench{flows}", flows, seed=11)
    size_mb = src.stat().st_size / 1e6
    print(f"\n== Part 1: one file, {flows} flows, {size_mb:.0f} MB (nfcapd, uncompressed)")
    a_wall, a_mem = run_sampled(["nfdump", "-r", str(src), "-o", "csv"])
    a_utc, _ = run_sampled(["nfdump", "-r", str(src), "-o", "csv"], env={**os.environ, "TZ": "UTC"})
    store = LocalStore(str(workdir / "warehouse-part1"))
    store.mark()
    staged = store.stage(src, "flow", src.name, time.time())   # as the master does
    script = workdir / "convert_one.py"
    script.write_text(CONVERT_ONE.format(repo=str(REPO)))
    result_file = workdir / "convert_one.out"
    with open(result_file, "w") as out:   # the worker reads, checks and hashes it, then converts
        b_wall, b_mem = run_sampled([sys.executable, str(script), staged.location, str(staged.size),
                                     staged.sha256, str(store.root)], stdout=out)
    result = json.loads(result_file.read_text())
    assert result["status"] == "loaded" and result["rows"] == flows, result
    print(f"(a) nfdump -r FILE -o csv > /dev/null          {a_wall:6.2f} s   peak {a_mem:6.0f} MB")
    print(f"    same with TZ=UTC (for reference)            {a_utc:6.2f} s")
    print(f"(b) worker conversion to Parquet ({result['rows']} rows)  {b_wall:6.2f} s   "
          f"peak {b_mem:6.0f} MB (Python + nfdump)")
    print(f"ratio b/a = {b_wall / a_wall:.2f}   (target <= 1.0; "
          f"against the TZ=UTC export: {b_wall / a_utc:.2f})")
    print(f"peak memory {b_mem:.0f} MB (target < 600 MB)")


def part2(workdir: Path, files: int, flows: int) -> None:
    srcs = [ensure_file(workdir / f"nfcapd.bench{flows}.{i}", flows, seed=20 + i) for i in range(files)]
    print(f"\n== Part 2: {files} files of {flows} flows, one worker process reading a real broker")
    with EmbeddedBroker() as broker:
        results = {}
        for label, processes, cores in (("1 process", 1, None), ("2 processes", 2, None),
                                        ("1 process on 1 core", 1, "0")):
            wall, cpu = run_worker(workdir, broker.bootstrap, srcs, processes, cores)
            results[label] = wall
            print(f"worker, {label:20s} {wall:6.2f} s  {files * flows / wall:>9,.0f} flows/s  "
                  f"machine CPU {cpu:5.1f} s = {cpu / wall:.2f} cores busy")
    print(f"speed-up, 2 processes vs 1 process: {results['1 process'] / results['2 processes']:.2f}x"
          f"   (target >= 1.7)")
    print(f"speed-up, 2 processes on 2 cores vs 1 process on 1 core: "
          f"{results['1 process on 1 core'] / results['2 processes']:.2f}x")
    print(f"machine: {os.cpu_count()} cores. One conversion already keeps ~1.5 cores busy "
          f"(nfdump and the Arrow parser run side by side), which bounds the first figure.")


def run_worker(workdir: Path, bootstrap: str, srcs, processes: int, cores: str | None):
    run = uuid.uuid4().hex[:8]
    root = workdir / f"part2-{processes}-{run}"
    collector = root / "collector"
    collector.mkdir(parents=True)
    conf = root / "ingest_conf.json"
    topic = f"bench-{run}"
    conf.write_text(json.dumps({
        "dbname": "bench", "hdfs_app_path": str(root / "warehouse"), "collector_processes": 2,
        "ingestion_interval": 1, "log_dir": str(root / "logs"),
        "kafka": {"kafka_server": bootstrap.split(":")[0], "kafka_port": bootstrap.split(":")[1]},
        "pipelines": {"bench": {"type": "flow", "collector_path": str(collector),
                                "local_staging": str(root / "staging"), "topic": topic,
                                "worker_processes": processes}}}))
    kafka = KafkaConfig(bootstrap.split(":")[0], int(bootstrap.split(":")[1]))
    ensure_topic(kafka, topic, 1)
    store = LocalStore(str(root / "warehouse"))
    store.mark()
    announcer = Announcer(kafka, topic, 1, "bench")
    for i, src in enumerate(srcs):   # staged beforehand: this measures the worker alone
        staged = store.stage(src, "flow", src.name, time.time())
        announcer.announce(Announcement("bench", "flow", staged.location, staged.size,
                                        staged.sha256, src.name, 0, "bench"), 0)
    announcer.announce(Announcement.end_of_run("bench", "flow", run, "bench"), 0)
    announcer.close()
    log = open(root / "worker.log", "w")
    pin = ["taskset", "-c", cores] if cores else []
    before = _busy_cpu_seconds()
    start = time.perf_counter()
    tracker = RunProgress(load(conf), "bench", "flow", total=len(srcs))
    proc = subprocess.Popen([*pin, sys.executable, "-m", "spot_ingest.cli", "worker", "-t", "bench",
                             "-i", "0", "-c", str(conf), "--run-id", run], stdout=log,
                            stderr=subprocess.STDOUT, cwd=REPO)
    while proc.poll() is None:     # on a terminal: files and records done, the rate
        tracker.poll()
        time.sleep(0.2)
    wall = time.perf_counter() - start
    tracker.close()
    cpu = _busy_cpu_seconds() - before
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed; see {root / 'worker.log'}")
    return wall, cpu


def _busy_cpu_seconds() -> float:
    # The whole machine's busy time: the worker's pool processes are not its
    # waited-for children (the forkserver reaps them), so rusage misses them.
    t = psutil.cpu_times()
    return t.user + t.system + t.nice + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--file-flows", type=int, default=250_000)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"nfdump: {subprocess.run(['nfdump', '-V'], capture_output=True, text=True).stdout.strip()}")
    part1(args.workdir, args.flows)
    part2(args.workdir, args.files, args.file_flows)


if __name__ == "__main__":
    main()
