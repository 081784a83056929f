"""Operating it: after a known run (three real nfcapd files and one file
nfdump cannot read), the metrics scraped over HTTP during the run, the
ingest reports (``spot-ingest report``), ``spot-ingest status`` and the
summary picture all give exactly the numbers of that run; every log line is
one JSON object with ``log_format: json``, and a line about a file names it
and its checksum."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import urllib.request

import duckdb
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO, wait_for
from reference import flow_reference_rows, flow_table_rows
from test_end_to_end import drop


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple, float]:
    """One scrape, parsed by prometheus_client: {(sample name, labels...): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


def total(scrapes: list[dict], name: str, **labels) -> float:
    want = sorted(labels.items())
    return sum(v for s in scrapes for (n, *lab), v in s.items()
               if n == name and all(item in lab for item in want))


def cli(env, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", *args, "-t", env.pipeline,
                           "-c", str(env.config)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def check_status(status: dict, env, rows: int, bad) -> None:
    parts = status["broker"]["partitions"]
    assert sum(p["end"] for p in parts) == 4      # four announcements (no end-of-run: not --once)
    assert all(p["lag"] == 0 and (p["committed"] == p["end"] or p["end"] == 0) for p in parts)
    assert all(p["seconds_since_commit"] is not None and p["seconds_since_commit"] < 120
               for p in parts if p["end"])
    for window in ("last_hour", "last_day"):
        w = status[window]
        assert (w["staged"], w["loaded"], w["set_aside"], w["records"]) == (4, 3, 1, rows)
        assert w["failures"] == {"quarantined": 1} and w["reasons"][0]["file"] == bad.name
    assert status["collector"] == {"path": str(env.collector), "exists": True, "waiting": 0}
    table = env.table()
    newest = status["newest_partition"]
    keys = dict(kv.split("=") for kv in newest["partition"].split("/"))
    assert newest["rows"] == sum(1 for y, m, d, h in zip(*(table.column(k).to_pylist()
                                                           for k in "ymdh"))
                                 if (str(y), str(m), str(d), str(h)) ==
                                 (keys["y"], keys["m"], keys["d"], keys["h"]))
    assert newest["rows"] > 0 and status["stream"] is None


def test_a_known_run_is_counted_reported_and_logged_as_json(env, nfcapd_files, tmp_path):
    good = nfcapd_files[:3]
    bad = tmp_path / "nfcapd.random"
    bad.write_bytes(os.urandom(50_000))
    expected_rows = flow_reference_rows(good)
    ports = {"master": free_port(), "worker": free_port()}
    env.data["log_format"] = "json"
    env.data["metrics"] = {"master_port": ports["master"], "worker_port": ports["worker"]}
    env.config.write_text(json.dumps(env.data, indent=2))

    env.master(2)
    workers = [env.worker(0), env.worker(1)]
    endpoints = [ports["master"], ports["worker"], ports["worker"] + 1]
    for proc in (*env.procs,):
        assert proc.poll() is None
    for f in good:
        drop(env, f, f.name)
    drop(env, bad, bad.name)

    def scrapes():
        try:
            return [scrape(p) for p in endpoints]
        except OSError:     # an endpoint not up yet
            return None

    def settled():
        found = scrapes()
        done = found and (total(found, "spot_ingest_files_loaded_total") +
                          total(found, "spot_ingest_files_set_aside_total")) == 4
        return found if done else None
    # Scraped over HTTP while the processes run: the counters reach the run's numbers.
    found = wait_for(settled, 120, "the metrics to count four files")
    assert total(found, "spot_ingest_files_seen_total") == 4
    assert total(found, "spot_ingest_files_staged_total") == 4
    assert total(found, "spot_ingest_files_announced_total") == 4
    assert total(found, "spot_ingest_files_loaded_total") == 3
    assert total(found, "spot_ingest_files_set_aside_total", outcome="quarantined") == 1
    assert total(found, "spot_ingest_records_written_total", table="flow") == len(expected_rows)
    assert total(found, "spot_ingest_input_bytes_total") == \
        sum(f.stat().st_size for f in good) + bad.stat().st_size
    assert total(found, "spot_ingest_convert_seconds_count") == 3
    assert total(found, "spot_ingest_process_memory_bytes") > 0
    assert total(found, "spot_ingest_process_cpu_seconds_total") > 0
    assert all(total([s], "spot_ingest_partition_lag_records") == 0 for s in found[1:])
    assert flow_table_rows(env.table()) == expected_rows

    # The reports, rolled up: exactly that run.
    report = json.loads(cli(env, "report", "--since", "1h", "--json").stdout)
    assert (report["files_received"], report["files_loaded"]) == (4, 3)
    assert report["records"] == len(expected_rows)
    assert report["failures"] == {"quarantined": 1}
    [aside] = report["set_aside"]
    assert aside["file"] == bad.name and "nfdump could not read" in aside["reason"]
    assert aside["sha256"] == hashlib.sha256(bad.read_bytes()).hexdigest()
    assert report["bytes_out"] == sum(p.stat().st_size for p in env.hive.rglob("*.parquet"))
    assert report["broken_lines"] == 0
    # One query reads them (DuckDB here; Spark alike).
    per_file = duckdb.sql(
        f"SELECT file, outcome, records FROM read_json_auto('{env.warehouse}/flow/_reports/**/*.jsonl') "
        f"WHERE role = 'worker' ORDER BY file").fetchall()
    rows_of = {f.name: n for f, n in zip(good, (len(flow_reference_rows([f])) for f in good))}
    assert per_file == sorted([(name, "loaded", n) for name, n in rows_of.items()]
                              + [(bad.name, "quarantined", 0)])

    # Status, while the processes run and after they stopped: the same numbers.
    last = {}

    def status_settled():
        found = last["status"] = json.loads(cli(env, "status", "--json").stdout)
        return found if all(p["lag"] == 0 for p in found["broker"]["partitions"]) else None
    try:
        status = wait_for(status_settled, 60, "status to show every partition committed")
    except AssertionError:
        raise AssertionError(json.dumps(last, indent=1)) from None
    check_status(status, env, len(expected_rows), bad)
    env.stop_all()
    assert all(w.returncode in (0, 3) for w in workers)
    check_status(json.loads(cli(env, "status", "--json").stdout), env, len(expected_rows), bad)
    assert "newest partition:" in cli(env, "status").stdout

    # The summary picture: a PNG, and the numbers it was drawn from equal the
    # table's rows per 5 minutes (DuckDB over the table's files).
    out = tmp_path / "summary"
    cli(env, "summary", "--since", "1d", "--out", str(out))
    png = out / f"ingest-summary-{env.pipeline}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    height, width = imread(str(png)).shape[:2]
    assert width >= 800 and height >= 600
    data = json.loads((out / f"ingest-summary-{env.pipeline}.json").read_text())
    plotted = {s: n for s, n in zip(data["starts"], data["records"]) if n}
    in_table = dict(duckdb.sql(
        f"SELECT unix_tstamp // 300 * 300 AS s, count(*) FROM read_parquet('{env.hive}/**/*.parquet') "
        f"WHERE unix_tstamp >= {data['since']} AND unix_tstamp < {data['until']} GROUP BY 1").fetchall())
    assert plotted == in_table and sum(plotted.values()) == len(expected_rows)
    assert (sum(data["files"]), sum(data["failures"])) == (3, 1)
    assert "data:image/png;base64," in (out / f"ingest-summary-{env.pipeline}.html").read_text()
    # Every line of every log is one JSON object; lines about a file name it and its checksum.
    sums = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (*good, bad)}
    about = []
    for name in ("master.log", "worker-0.log", "worker-1.log"):
        for line in env.log(name).splitlines():
            if line.strip():
                record = json.loads(line)
                assert {"time", "level", "logger", "message"} <= set(record)
                if "file" in record:
                    about.append(record)
    loaded = {r["file"]: r["sha256"] for r in about if r["message"].startswith("loaded ")}
    assert loaded == {f.name: sums[f.name] for f in good}
    quarantined = [r for r in about if r["message"].startswith("quarantined ")]
    assert [(r["file"], r["sha256"]) for r in quarantined] == [(bad.name, sums[bad.name])]
    assert sums[bad.name][:16] in quarantined[0]["message"]
