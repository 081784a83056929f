"""Scale-out benchmark: the same flow files through 1, 2 and 4 worker
"hosts" (network namespaces on one machine, tests/netns.py), each worker
pinned to its own CPU set with taskset, against a broker on a host of its own.

    python -m benchmarks.bench_scale [--workdir DIR] [--files 16] [--flows 150000]
                                     [--hosts 1,2,4]

The files are staged in the shared store and announced beforehand (one
partition per host, files dealt in turn), so the figure is the workers'
alone: from the start of the workers to the last one's exit after its
end-of-run marker. Worker hosts get CPUs in turn: on a 2-core machine, 1
host runs on core 0, 2 hosts on cores 0 and 1 (the honest comparison: one
core each), 4 hosts two to a core. Each worker has one conversion process.
"Cores used" is the machine's busy CPU time over the wall time (it includes
the broker and the system), so a worker that already used more than one
core is not mistaken for scaling. Efficiency = speed-up / hosts.

Needs root (namespaces). Figures are printed; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.bench_flow import ensure_file  # noqa: E402
from benchmarks.machine import busy_seconds, machine_ceiling  # noqa: E402
from spot_ingest.broker import broker_binary  # noqa: E402
from netns import Lan  # noqa: E402

PORT = 9092

ANNOUNCE = """
import json, sys, time
sys.path.insert(0, {repo!r})
from spot_ingest.bus import Announcement, Announcer, ensure_topic
from spot_ingest.config import load
from spot_ingest.store import LocalStore
cfg = load(sys.argv[1]); hosts = int(sys.argv[2]); run = sys.argv[3]; files = sys.argv[4:]
ensure_topic(cfg.kafka, "bench-" + run, hosts)
store = LocalStore(cfg.hdfs_app_path); store.mark()
announcer = Announcer(cfg.kafka, "bench-" + run, hosts, "bench")
for i, path in enumerate(files):
    from pathlib import Path
    staged = store.stage(Path(path), "flow", Path(path).name, time.time())
    announcer.announce(Announcement("bench", "flow", staged.location, staged.size, staged.sha256,
                                    Path(path).name, 0, "bench"), i % hosts)
for p in range(hosts):
    announcer.announce(Announcement.end_of_run("bench", "flow", run, "bench"), p)
announcer.close()
"""


def rows_of(store: Path) -> int:
    import pyarrow.dataset as ds
    return ds.dataset(store / "flow" / "hive", format="parquet",
                      partitioning="hive").count_rows()


def one_run(lan: Lan, workdir: Path, srcs: list[Path], hosts: int) -> dict:
    run = uuid.uuid4().hex[:8]
    root = workdir / f"scale-{hosts}-{run}"
    (root / "logs").mkdir(parents=True)
    conf = root / "ingest_conf.json"
    conf.write_text(json.dumps({
        "dbname": "bench", "hdfs_app_path": str(root / "store"), "log_dir": str(root / "logs"),
        "kafka": {"kafka_server": lan.addresses["broker"], "kafka_port": str(PORT)},
        "pipelines": {"bench": {"type": "flow", "collector_path": str(root),
                                "local_staging": str(root / "staging"), "topic": f"bench-{run}",
                                "worker_processes": 1}}}))
    done = lan.run("master", [sys.executable, "-c", ANNOUNCE.format(repo=str(REPO)), str(conf),
                              str(hosts), run, *map(str, srcs)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"announcing failed: {done.stderr[-2000:]}")
    cores = os.cpu_count() or 1
    before, start = busy_seconds(), time.perf_counter()
    workers = [lan.popen(f"h{i}", [sys.executable, "-m", "spot_ingest.cli", "worker", "-t",
                                   "bench", "-i", str(i), "-c", str(conf), "--run-id", run],
                         log=root / "logs" / f"worker-{i}.log", cpus=str(i % cores), cwd=REPO)
               for i in range(hosts)]
    for w in workers:
        w.wait()
    wall = time.perf_counter() - start
    busy = busy_seconds() - before
    if any(w.returncode != 0 for w in workers):
        raise SystemExit(f"a worker failed; see {root / 'logs'}")
    rows = rows_of(root / "store")
    # The ingest span, from the ingest reports: the first file's start to the
    # last file's end (the workers' own start-up, a second or two per
    # process whatever the work, left out).
    from spot_ingest.reports import read_reports
    from spot_ingest.store import LocalStore
    done = [r for r in read_reports(LocalStore(str(root / "store")), "flow", 0).reports
            if r.get("outcome") == "loaded"]
    span = max(r["ts"] for r in done) - min(r["ts"] - r["seconds"] for r in done)
    return {"hosts": hosts, "wall": wall, "span": span, "files_s": len(srcs) / span,
            "rows_s": rows / span, "rows": rows, "cores": busy / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--flows", type=int, default=150_000)
    parser.add_argument("--hosts", default="1,2,4")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_scale needs root (network namespaces)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    srcs = [ensure_file(args.workdir / f"nfcapd.scale{args.flows}.{i:02d}", args.flows, 70 + i)
            for i in range(args.files)]
    counts = [int(h) for h in args.hosts.split(",")]
    names = ["broker", "master", *[f"h{i}" for i in range(max(counts))]]
    print(f"{args.files} nfcapd files of {args.flows:,} flows; {os.cpu_count()} cores; load "
          f"average {os.getloadavg()[0]:.2f}")
    with Lan(names) as lan:
        address = lan.addresses["broker"]
        lan.popen("broker", [broker_binary(), "broker", "--listener-url",
                             f"tcp://{address}:{PORT}", "--advertised-listener-url",
                             f"tcp://{address}:{PORT}"])
        probe = f"import socket; socket.create_connection(('{address}', {PORT}), timeout=1)"
        deadline = time.monotonic() + 30
        while lan.run("master", [sys.executable, "-c", probe], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise SystemExit("the broker did not listen within 30 s")
            time.sleep(0.1)
        results = [one_run(lan, args.workdir, srcs, n) for n in counts]
    ceilings = {n: machine_ceiling(n) for n in counts}
    base = results[0]
    print(f"{'hosts':>5} {'CPU sets':>8} {'wall s':>7} {'ingest s':>8} {'files/s':>8} "
          f"{'rows/s':>10} {'cores used':>10} {'speed-up':>8} {'efficiency':>10} "
          f"{'(wall)':>7} {'machine':>8} {'of machine':>10}")
    cores = os.cpu_count() or 1
    for r in results:
        speedup, wall_speedup = base["span"] / r["span"], base["wall"] / r["wall"]
        sets = ",".join(str(i % cores) for i in range(r["hosts"]))
        print(f"{r['hosts']:>5} {sets:>8} {r['wall']:>7.2f} {r['span']:>8.2f} "
              f"{r['files_s']:>8.2f} {r['rows_s']:>10,.0f} {r['cores']:>10.2f} {speedup:>8.2f} "
              f"{speedup / r['hosts']:>10.2f} {wall_speedup / r['hosts']:>7.2f} "
              f"{ceilings[r['hosts']]:>8.2f} {speedup / ceilings[r['hosts']]:>10.2f}")
    print("ingest s: first file's start to last file's end (from the ingest reports); wall s: "
          "from starting the workers to their exit.\nefficiency = speed-up / hosts on the "
          "ingest span (in brackets: on the wall time); target >= 0.9 at 2 hosts, one core "
          "each. cores used = the machine's busy CPU time / wall time.\nmachine = the speed-up "
          "this machine gives the same number of pinned CPU-bound processes (a pure-Python loop) "
          "in this run; of machine = our speed-up / that ceiling")


if __name__ == "__main__":
    main()
