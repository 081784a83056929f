"""The catalog against a real Hive metastore (Hive 2.3's, from PySpark's jars):
tables created, partitions registered as files land, an outage caught up,
``catalog sync``, and ``ddl`` equal to what each catalog type creates.

The store is local here: the metastore and the analyst's Spark session read
the tables' file:// locations. (No HDFS can run here, and Spark cannot read
through the WebHDFS stand-in.)
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import REPO, wait_for
from metastore import HiveMetastore, SparkThriftServer, analyst_counts, beeline_command
from test_end_to_end import drop
from test_proxy import make_logs

from spot_ingest import config
from spot_ingest.catalog import table_specs
from spot_ingest.metastore import open_catalog
from spot_ingest.pipelines.dns.sample import make_dns_capture

IGNORED_PARAMETERS = ("transient_lastDdlTime",)


@pytest.fixture(scope="module")
def metastore(tmp_path_factory):
    hms = HiveMetastore(tmp_path_factory.mktemp("metastore")).start()
    yield hms
    hms.stop()


def with_catalog(env, catalog: dict, dbname: str | None = None):
    env.data["catalog"] = catalog
    env.data["dbname"] = dbname or f"spot_{uuid.uuid4().hex[:8]}"
    env.config.write_text(json.dumps(env.data, indent=2))
    return env.data["dbname"]


def rows_per_partition(hive: Path) -> dict[str, int]:
    counts: Counter = Counter()
    for f in hive.rglob("*.parquet"):
        if "_tmp" not in f.parts:
            counts[str(f.parent.relative_to(hive))] += pq.read_metadata(f).num_rows
    return dict(counts)


def once(env, workers: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, str(workers),
                           "--once", "-c", str(env.config)], capture_output=True, text=True,
                          timeout=600)


def test_once_runs_are_seen_by_an_analyst_without_repair(metastore, make_env, nfcapd_files,
                                                         tmp_path):
    catalog = {"type": "hive-metastore", "uri": metastore.uri, "batch_seconds": 0.5}
    flow = make_env("flow")
    db = with_catalog(flow, catalog)
    for f in nfcapd_files[:3]:
        drop(flow, f, f.name)
    result = once(flow)
    assert result.returncode == 0, result.stdout + result.stderr

    dns = make_env("dns", pipeline="dns_test", ptype="dns", supported_files=[".pcap"],
                   pkt_num=100, worker_processes=1)
    with_catalog(dns, catalog, db)
    capture, _ = make_dns_capture(tmp_path / "lo.pcap", 300, seed=11)
    later = tmp_path / "later.pcap"   # the same traffic a day later: more partitions
    subprocess.run(["editcap", "-t", "86400", str(capture), str(later)], check=True)
    shutil.copyfile(capture, dns.collector / "a.pcap")
    shutil.copyfile(later, dns.collector / "b.pcap")
    result = once(dns)
    assert result.returncode == 0, result.stdout + result.stderr

    proxy = make_env("proxy", pipeline="proxy_test", ptype="proxy", supported_files=[".log"])
    proxy.data["spark-streaming"] = {"spark_batch_size": "2"}
    with_catalog(proxy, catalog, db)
    make_logs(proxy.collector, tmp_path)
    result = once(proxy)
    assert "totals:" in proxy.log(f"{proxy.pipeline}-stream.log"), result.stdout + result.stderr

    expected = {t: rows_per_partition(e.hive) for t, e in
                (("flow", flow), ("dns", dns), ("proxy", proxy))}
    assert all(len(parts) >= 1 for parts in expected.values())
    assert len(expected["dns"]) >= 2, "the captures span several hours"
    # Each table is registered with exactly its partitions...
    for table in expected:
        assert metastore.partitions(db, table) == set(expected[table]), table
    # ... and a separate Spark session, reading through the metastore only,
    # counts exactly the ingested rows per partition.
    seen = analyst_counts(metastore, {t: f"{db}.{t}" for t in expected}, tmp_path / "analyst")
    assert seen == expected
    assert "catalog: registered" in flow.log(f"{flow.pipeline}-worker-0.log") + \
        flow.log(f"{flow.pipeline}-worker-1.log")


def test_metastore_down_during_ingest_rows_land_and_registration_catches_up(make_env, tmp_path):
    hms = HiveMetastore(tmp_path / "hms").start()
    env = make_env("dns", pipeline="dns_test", ptype="dns", supported_files=[".pcap"],
                   pkt_num=100000, worker_processes=1)
    db = with_catalog(env, {"type": "hive-metastore", "uri": hms.uri, "batch_seconds": 0.5,
                            "timeout": 5})
    capture, _ = make_dns_capture(tmp_path / "lo.pcap", 200, seed=5)
    # The same traffic a day later: rows for partitions that do not exist yet.
    later = tmp_path / "later.pcap"
    subprocess.run(["editcap", "-t", "86400", str(capture), str(later)], check=True)
    env.master(1)
    worker = env.worker(0)

    def loaded() -> int:
        return env.log(worker.log_path.name).count("spot_ingest.worker: loaded ")

    shutil.copyfile(capture, env.collector / "a.pcap")
    wait_for(lambda: loaded() == 1 and db in hms.call("get_all_databases") and
             hms.partitions(db, "dns"), 120, "the first capture's partitions registered")
    first = set(rows_per_partition(env.hive))
    assert hms.partitions(db, "dns") == first

    hms.stop()
    shutil.copyfile(later, env.collector / "b.pcap")
    # Rows still land while the metastore is down; the worker says so and keeps going.
    wait_for(lambda: loaded() == 2, 180, "the capture loaded while the metastore is down")
    wait_for(lambda: "partition(s) wait" in env.log(worker.log_path.name), 120,
             "the failed registration logged")
    expected = rows_per_partition(env.hive)
    assert set(expected) > first
    assert worker.poll() is None, "the worker keeps running"

    hms.start()
    wait_for(lambda: hms.partitions(db, "dns") == set(expected), 180,
             "registration caught up after the metastore came back")
    # The worker logs the catch-up right after the metastore answered it.
    wait_for(lambda: "registration caught up" in env.log(worker.log_path.name), 60,
             "the catch-up logged")
    assert "answers again after" in env.log(worker.log_path.name)
    seen = analyst_counts(hms, {"dns": f"{db}.dns"}, tmp_path / "analyst")
    assert seen == {"dns": expected}
    env.stop_all()
    hms.stop()


def test_catalog_sync_registers_what_was_written_before(metastore, make_env, nfcapd_files):
    env = make_env("flow")
    for f in nfcapd_files[:2]:
        drop(env, f, f.name)
    result = once(env)            # no catalog yet
    assert result.returncode == 0, result.stdout + result.stderr
    db = with_catalog(env, {"type": "hive-metastore", "uri": metastore.uri})
    expected = rows_per_partition(env.hive)
    sync = [sys.executable, "-m", "spot_ingest.cli", "catalog", "sync", "-t", env.pipeline,
            "-c", str(env.config)]
    done = subprocess.run(sync, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert f"{db}.flow: registered {len(expected)} partition(s); 0 were registered" in done.stdout
    assert metastore.partitions(db, "flow") == set(expected)
    again = subprocess.run(sync, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert f"registered 0 partition(s); {len(expected)} were registered already" in again.stdout

    # The metastore unreachable: one line naming it, a failure exit code.
    env.data["catalog"]["uri"] = "thrift://127.0.0.1:1"
    env.config.write_text(json.dumps(env.data))
    down = subprocess.run(sync, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert down.returncode == 1 and "thrift://127.0.0.1:1" in down.stderr


def _table(metastore: HiveMetastore, db: str, name: str) -> dict:
    t = metastore.call("get_table", db, name)
    return {
        "columns": [(c.name, c.type) for c in t.sd.cols],
        "partition_keys": [(c.name, c.type) for c in t.partitionKeys],
        "location": t.sd.location, "input": t.sd.inputFormat, "output": t.sd.outputFormat,
        "serde": (t.sd.serdeInfo.serializationLib, t.sd.serdeInfo.parameters),
        "type": t.tableType, "buckets": (t.sd.numBuckets, t.sd.bucketCols, t.sd.sortCols),
        # Spark records its own view of the schema too (spark.sql.*): not Hive's business.
        "parameters": {k: v for k, v in t.parameters.items()
                       if k not in IGNORED_PARAMETERS and not k.startswith("spark.sql.")},
    }


def test_ddl_equals_what_each_catalog_type_creates(metastore, make_env, tmp_path):
    env = make_env("flow")
    env.data["pipelines"]["dns_test"] = dict(env.data["pipelines"][env.pipeline], type="dns",
                                             topic="t-dns")
    env.data["pipelines"]["proxy_test"] = dict(env.data["pipelines"][env.pipeline],
                                               type="proxy", topic="t-proxy")
    tables = ("dns", "flow", "proxy")
    created = {}

    # hive-metastore: Thrift objects.
    db = with_catalog(env, {"type": "hive-metastore", "uri": metastore.uri})
    cfg = config.load(env.config)
    catalog = open_catalog(cfg.catalog)
    for spec in table_specs(cfg).values():
        assert catalog.ensure_table(cfg.dbname, spec) is True
        assert catalog.ensure_table(cfg.dbname, spec) is False
    catalog.close()
    created["hive-metastore"] = db

    # The statements `spot-ingest ddl` prints, run by hand in Spark SQL with Hive support.
    db = with_catalog(env, {"type": "none"})
    ddl = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "ddl", "-c", str(env.config)],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=True).stdout
    script = tmp_path / "run_ddl.py"
    script.write_text(
        "import sys\nfrom pyspark.sql import SparkSession\n"
        "s = (SparkSession.builder.master('local[1]').config('spark.sql.catalogImplementation',"
        " 'hive').config('spark.hadoop.hive.metastore.uris', sys.argv[1])"
        ".config('spark.ui.enabled', 'false').config('spark.driver.bindAddress', '127.0.0.1')"
        f".config('spark.sql.warehouse.dir', 'file://{tmp_path}/wh').getOrCreate())\n"
        "for statement in open(sys.argv[2]).read().split(';\\n'):\n"
        "    if statement.strip():\n        s.sql(statement.strip().rstrip(';'))\n")
    (tmp_path / "ddl.sql").write_text(ddl)
    subprocess.run([sys.executable, str(script), metastore.uri, str(tmp_path / "ddl.sql")],
                   check=True, capture_output=True, timeout=300, cwd=tmp_path)
    created["ddl"] = db

    # "spark": a Spark session with Hive support, through `catalog sync`.
    db = with_catalog(env, {"type": "spark", "conf": {
        "spark.hadoop.hive.metastore.uris": metastore.uri,
        "spark.sql.warehouse.dir": f"file://{tmp_path}/wh2",
        "spark.driver.bindAddress": "127.0.0.1"}})
    for pipeline in env.data["pipelines"]:
        done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "catalog", "sync", "-t",
                               pipeline, "-c", str(env.config)], capture_output=True, text=True,
                              timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
    created["spark"] = db

    # "hiveserver2": beeline against HiveServer2 (Spark's Thrift server) over the metastore.
    hs2 = SparkThriftServer(tmp_path / "hs2", metastore).start()
    try:
        db = with_catalog(env, {"type": "hiveserver2", "url": hs2.url,
                                "beeline": "/nonexistent/beeline"})
        done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "catalog", "sync", "-t",
                               env.pipeline, "-c", str(env.config)], capture_output=True,
                              text=True, timeout=300, cwd=REPO)
        assert done.returncode == 1 and "/nonexistent/beeline" in done.stderr
        wrapper = tmp_path / "beeline"
        wrapper.write_text(f"#!{sys.executable}\nimport os, sys\n"
                           f"os.execvp('java', {beeline_command()!r} + sys.argv[1:])\n")
        wrapper.chmod(0o755)
        env.data["catalog"]["beeline"] = str(wrapper)
        env.config.write_text(json.dumps(env.data))
        for pipeline in env.data["pipelines"]:
            done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "catalog", "sync",
                                   "-t", pipeline, "-c", str(env.config)], capture_output=True,
                                  text=True, timeout=300, cwd=REPO)
            assert done.returncode == 0, done.stderr[-3000:]
    finally:
        hs2.stop()
    created["hiveserver2"] = db

    for table in tables:
        described = {kind: _table(metastore, db, table) for kind, db in created.items()}
        reference = described.pop("ddl")
        assert reference["type"] == "EXTERNAL_TABLE" and reference["parameters"]["EXTERNAL"] == "TRUE"
        assert reference["location"].endswith(f"/{table}/hive")
        for kind, found in described.items():
            assert found == reference, f"{table}: {kind} differs from the ddl"
