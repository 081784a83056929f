"""HDFS benchmark: what staging and loading through WebHDFS cost against local disk.

    python -m benchmarks.bench_hdfs [--workdir DIR] [--flows 1000000] [--runs 3]
                                    [--datanode-mbit 1000]

No Hadoop runs here: the HDFS side is the WebHDFS stand-in of the tests
(tests/webhdfs.py), started as a process of its own, namenode and datanode on
loopback, files on the same local disk. So the figures measure what this
project adds on HDFS (HTTP transfer through HdfsCLI, the 307 to the
datanode, the copy to local scratch, the upload and rename of table files,
the extra status calls of safe renames), not a real cluster's network or
replication.

Part 1, one nfcapd file of 1,000,000 flows (made by a real nfcapd):
  (a) the master's staging of it: into a local store, and into HDFS;
  (b) one worker's load of it (check, copy to scratch, convert with nfdump,
      write Parquet, make visible), in a fresh process: local, and HDFS.
Part 2, 8 files of 250,000 flows through a real worker (2 processes) reading
  a real broker: local, HDFS, and HDFS without the worker's prefetching
  (whether copying the next files to scratch while converting keeps HDFS
  off the critical path). ``--datanode-mbit`` holds each datanode transfer
  to a link's speed (loopback is far faster than a cluster's network).

Medians of ``--runs`` runs; figures and the HDFS/local ratio are printed,
nothing is asserted (shared machines are noisy).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_flow import ensure_file  # noqa: E402
from spot_ingest.broker import EmbeddedBroker  # noqa: E402
from spot_ingest.bus import Announcement, Announcer, ensure_topic  # noqa: E402
from spot_ingest.config import HdfsConfig, KafkaConfig, StoreLocation  # noqa: E402
from spot_ingest.store import open_store  # noqa: E402

LOAD_ONE = """
import sys, json, pickle, time
sys.path.insert(0, {repo!r})
from spot_ingest.bus import Announcement
from spot_ingest.config import PipelineConfig
from spot_ingest.worker import Job, load_file
from spot_ingest.pipelines.flow import FLOW
relative, size, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3]
location = pickle.loads(bytes.fromhex(sys.argv[4]))
pcfg = PipelineConfig("bench", "flow", None, None, "", (), "t", 1, 1, None, True,
                      FLOW.parse_options({{}}, None))
ann = Announcement("bench", "flow", relative, size, sha, "bench", 0, "bench")
started = time.perf_counter()
out = load_file(Job(ann, relative, pcfg, location, "bench", "t", 0, 0))
print(json.dumps({{"rows": out.rows, "status": out.status, "detail": out.detail,
                  "seconds": time.perf_counter() - started}}))
"""


class StandIn:
    """The WebHDFS stand-in as a separate process."""

    def __init__(self, data_dir: Path, mbit: float | None):
        self.data_dir, self.mbit = data_dir, mbit

    def __enter__(self) -> "StandIn":
        rate = ["--datanode-mbit", str(self.mbit)] if self.mbit else []
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "webhdfs.py"),
                                      "--data-dir", str(self.data_dir), *rate],
                                     stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            raise RuntimeError("the WebHDFS stand-in did not start")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def locations(workdir: Path, url: str, run: str) -> dict[str, StoreLocation]:
    hdfs = HdfsConfig(urls=(url,), user="spot", timeout=120, scratch_dir=workdir / "scratch")
    return {"local": StoreLocation(str(workdir / f"local-{run}")),
            "hdfs": StoreLocation(f"/bench-{run}", hdfs)}


def part1(workdir: Path, url: str, flows: int, runs: int) -> None:
    src = ensure_file(workdir / f"nfcapd.bench{flows}", flows, seed=11)
    print(f"\n== Part 1: one file, {flows} flows, {src.stat().st_size / 1e6:.0f} MB")
    script = workdir / "load_one.py"
    script.write_text(LOAD_ONE.format(repo=str(REPO)))
    import pickle
    stage_s = {"local": [], "hdfs": []}
    load_s = {"local": [], "hdfs": []}
    for i in range(runs):
        for kind, location in locations(workdir, url, f"{i}-{uuid.uuid4().hex[:6]}").items():
            store = open_store(location)
            store.mark()
            started = time.perf_counter()
            staged = store.stage(src, "flow", src.name, time.time())
            stage_s[kind].append(time.perf_counter() - started)
            started = time.perf_counter()
            out = subprocess.run([sys.executable, str(script), staged.location, str(staged.size),
                                  staged.sha256, pickle.dumps(location).hex()],
                                 capture_output=True, text=True, cwd=REPO)
            wall = time.perf_counter() - started
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-2000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["status"] == "loaded" and result["rows"] == flows, result
            load_s[kind].append(wall)
    for label, figures in (("(a) staging", stage_s), ("(b) worker load, fresh process", load_s)):
        local, hdfs = statistics.median(figures["local"]), statistics.median(figures["hdfs"])
        print(f"{label:34s} local {local:6.2f} s   HDFS {hdfs:6.2f} s   "
              f"HDFS/local {hdfs / local:.2f}   (+{hdfs - local:.2f} s)")
        print(f"{'':34s} runs: local {_fmt(figures['local'])}; HDFS {_fmt(figures['hdfs'])}")


def _fmt(values) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def part2(workdir: Path, url: str, files: int, flows: int, runs: int) -> None:
    srcs = [ensure_file(workdir / f"nfcapd.bench{flows}.{i}", flows, seed=20 + i)
            for i in range(files)]
    print(f"\n== Part 2: {files} files of {flows} flows, one worker (2 processes), real broker")
    walls = {"local": [], "hdfs": [], "hdfs, no prefetch": []}
    with EmbeddedBroker() as broker:
        for i in range(runs):
            where = locations(workdir, url, f"p2-{i}-{uuid.uuid4().hex[:6]}")
            for kind in walls:
                walls[kind].append(run_worker(workdir, broker.bootstrap, srcs,
                                              where[kind.split(",")[0]],
                                              prefetch=kind != "hdfs, no prefetch"))
    local = statistics.median(walls["local"])
    for kind, figures in walls.items():
        wall = statistics.median(figures)
        print(f"worker wall, {kind:18s} {wall:6.2f} s   /local {wall / local:.2f}   "
              f"runs: {_fmt(figures)}")


# The worker, optionally with its prefetching turned off (for comparison only).
RUN_WORKER = ("import sys; from spot_ingest.hdfs_store import HdfsStore; "
              "HdfsStore.prefetches = sys.argv.pop(1) == 'prefetch'; "
              "from spot_ingest.cli import main; sys.exit(main(sys.argv[1:]))")


def run_worker(workdir: Path, bootstrap: str, srcs, location: StoreLocation,
               prefetch: bool = True) -> float:
    run = uuid.uuid4().hex[:8]
    root = workdir / f"part2-{run}"
    (root / "collector").mkdir(parents=True)
    conf = root / "ingest_conf.json"
    topic = f"bench-{run}"
    host, port = bootstrap.split(":")
    data = {"dbname": "bench", "hdfs_app_path": location.path, "log_dir": str(root / "logs"),
            "kafka": {"kafka_server": host, "kafka_port": port},
            "pipelines": {"bench": {"type": "flow", "collector_path": str(root / "collector"),
                                    "local_staging": str(root / "staging"), "topic": topic,
                                    "worker_processes": 2}}}
    if location.hdfs:
        data["hdfs"] = {"url": location.hdfs.url, "user": "spot",
                        "scratch_dir": str(location.hdfs.scratch_dir)}
    conf.write_text(json.dumps(data))
    kafka = KafkaConfig(host, int(port))
    ensure_topic(kafka, topic, 1)
    store = open_store(location)
    store.mark()
    announcer = Announcer(kafka, topic, 1, "bench")
    for src in srcs:   # staged beforehand: this measures the worker alone
        staged = store.stage(src, "flow", src.name, time.time())
        announcer.announce(Announcement("bench", "flow", staged.location, staged.size,
                                        staged.sha256, src.name, 0, "bench"), 0)
    announcer.announce(Announcement.end_of_run("bench", "flow", run, "bench"), 0)
    announcer.close()
    with open(root / "worker.log", "w") as log:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", RUN_WORKER,
                               "prefetch" if prefetch else "none", "worker", "-t", "bench",
                               "-i", "0", "-c", str(conf), "--run-id", run], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed; see {root / 'worker.log'}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--file-flows", type=int, default=250_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-part2", action="store_true")
    parser.add_argument("--datanode-mbit", type=float, default=None,
                        help="hold each datanode transfer to this speed (default: loopback)")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    hdfs_dir = args.workdir / "hdfs"
    shutil.rmtree(hdfs_dir, ignore_errors=True)
    with StandIn(hdfs_dir, args.datanode_mbit) as standin:
        print(f"WebHDFS stand-in at {standin.url} (data in {hdfs_dir}), datanode transfers at "
              f"{f'{args.datanode_mbit:g} Mbit/s' if args.datanode_mbit else 'loopback speed'}")
        part1(args.workdir, standin.url, args.flows, args.runs)
        if not args.skip_part2:
            part2(args.workdir, standin.url, args.files, args.file_flows, args.runs)
    shutil.rmtree(hdfs_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
