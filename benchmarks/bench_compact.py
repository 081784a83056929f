"""Compaction benchmark: the flow table before and after ``spot-ingest compact``.

    python -m benchmarks.bench_compact [--workdir DIR] [--flows 1000000] [--files 12]

One hour of a router, as ingest leaves it: ``--files`` nfcapd files (written by
a real nfcapd, ``--flows`` in all) each loaded by the worker's own code into a
local store. Then the same table after compaction with each codec, sorted (on
``sip``) and not. For each: files per partition, bytes, bytes per row, and the
median of 5 DuckDB query times for three queries, with the ratio against the
table before compaction measured in the same run.

Figures are printed; nothing is asserted (shared machines are noisy).
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_flow import CONVERT_ONE, ensure_file  # noqa: E402
from spot_ingest.store import LocalStore  # noqa: E402

QUERIES = {
    "top talkers": "SELECT sip, sum(ibyt) AS b FROM t GROUP BY sip ORDER BY b DESC LIMIT 10",
    "one host": "SELECT count(*), sum(ibyt) FROM t WHERE sip = '{sip}'",
    "dns flows": "SELECT count(*) FROM t WHERE dport = 53",
}


def table_figures(hive: Path) -> dict:
    import duckdb
    files = [f for f in hive.rglob("*.parquet") if "_tmp" not in f.parts]
    partitions = {f.parent for f in files}
    con = duckdb.connect()
    con.execute(f"CREATE VIEW t AS SELECT * FROM read_parquet('{hive}/**/*.parquet', "
                f"hive_partitioning=true)")
    rows = con.execute("SELECT count(*) FROM t").fetchone()[0]
    sip = con.execute("SELECT sip FROM t GROUP BY sip ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    times = {}
    for name, sql in QUERIES.items():
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            con.execute(sql.format(sip=sip)).fetchall()
            runs.append(time.perf_counter() - start)
        times[name] = statistics.median(runs)
    size = sum(f.stat().st_size for f in files)
    return {"files": len(files), "partitions": len(partitions), "bytes": size, "rows": rows,
            "per_row": size / rows, "times": times}


def show(label: str, fig: dict, base: dict | None) -> None:
    ratio = (lambda k: f" ({fig['times'][k] / base['times'][k]:.2f}x)") if base else (lambda k: "")
    print(f"{label:28s} {fig['files']:4d} files in {fig['partitions']} partition(s), "
          f"{fig['bytes'] / 1e6:7.1f} MB, {fig['per_row']:5.1f} B/row"
          + (f" ({fig['bytes'] / base['bytes']:.2f}x)" if base else ""))
    print("    " + ", ".join(f"{k} {v * 1000:6.1f} ms{ratio(k)}" for k, v in fig["times"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "spot-bench")
    parser.add_argument("--flows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=12)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    per_file = args.flows // args.files
    srcs = [ensure_file(args.workdir / f"nfcapd.compact{per_file}.{i:02d}", per_file, seed=40 + i)
            for i in range(args.files)]
    root = args.workdir / "compact-bench"
    shutil.rmtree(root, ignore_errors=True)
    store = LocalStore(str(root / "warehouse"))
    store.mark()
    script = args.workdir / "convert_one.py"
    script.write_text(CONVERT_ONE.format(repo=str(REPO)))
    for src in srcs:   # each file loaded as a worker loads it
        staged = store.stage(src, "flow", src.name, time.time())
        out = subprocess.run([sys.executable, str(script), staged.location, str(staged.size),
                              staged.sha256, str(store.root)], capture_output=True, text=True,
                             check=True)
        assert json.loads(out.stdout)["status"] == "loaded", out.stdout
    hive = store.root / "flow" / "hive"
    before = table_figures(hive)
    print(f"\n{args.files} nfcapd files, {before['rows']:,} flows")
    show("before (snappy, per file)", before, None)
    saved = root / "before"
    shutil.copytree(hive, saved)
    conf = root / "ingest_conf.json"
    conf.write_text(json.dumps({
        "dbname": "bench", "hdfs_app_path": str(store.root),
        "kafka": {"kafka_server": "127.0.0.1", "kafka_port": "9092"},
        "pipelines": {"bench": {"type": "flow", "collector_path": str(root)}}}))
    for codec, sort in (("zstd", True), ("zstd", False), ("snappy", True), ("snappy", False)):
        shutil.rmtree(hive)
        shutil.copytree(saved, hive)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spot_ingest.cli", "compact", "-t", "bench", "-c",
                        str(conf), "--older-than", "0", "--codec", codec,
                        *([] if sort else ["--no-sort"])], check=True, cwd=REPO,
                       capture_output=True)
        took = time.perf_counter() - start
        after = table_figures(hive)
        assert after["rows"] == before["rows"]
        show(f"after: {codec}, {'sorted' if sort else 'unsorted'} ({took:.1f} s)", after, before)


if __name__ == "__main__":
    main()
