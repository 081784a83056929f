"""``spot-ingest ddl``: the statements run in a real Spark SQL session, Hive
dialect (Spark with Hive support, its own embedded metastore) and Spark's,
declare tables that return exactly the ingested rows, per partition. Impala's
dialect cannot be run here (no Impala); it differs only in its last statement.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter

import pytest

from conftest import REPO
from reference import flow_reference_rows

# Run in a process of its own: a JVM per engine, nothing left in pytest's.
RUN_DDL = r"""
import json, sys
from pyspark.sql import SparkSession
from spot_ingest.spark_env import prepare_environment
statements_file, engine, scratch = sys.argv[1:4]
prepare_environment()
builder = (SparkSession.builder.master("local[1]").appName("ddl-test")
           .config("spark.ui.enabled", "false")
           .config("spark.sql.warehouse.dir", f"{scratch}/warehouse")
           .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={scratch}"))
if engine == "hive":
    builder = builder.enableHiveSupport().config(
        "spark.hadoop.javax.jdo.option.ConnectionURL",
        f"jdbc:derby:;databaseName={scratch}/metastore_db;create=true")
spark = builder.getOrCreate()
for statement in open(statements_file).read().split(";\n"):
    if statement.strip().rstrip(";"):
        spark.sql(statement.strip().rstrip(";"))
rows = spark.sql("SELECT y, m, d, h, count(*) AS n FROM `spot`.`flow` GROUP BY y, m, d, h").collect()
kinds = {f.name: f.dataType.simpleString() for f in spark.table("`spot`.`flow`").schema}
print(json.dumps({"partitions": [[r.y, r.m, r.d, r.h, r.n] for r in rows], "types": kinds}))
spark.stop()
"""


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, broker, nfcapd_files):
    """A flow table ingested by the standalone launcher from two captures."""
    from conftest import Env
    env = Env(tmp_path_factory.mktemp("ddl"), broker)
    for f in nfcapd_files[:2]:
        shutil.copyfile(f, env.collector / f.name)
    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "1",
                             "--once", "-c", str(env.config)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    yield env, nfcapd_files[:2]
    env.stop_all()


@pytest.mark.parametrize("engine", ["hive", "spark"])
def test_ddl_declares_tables_that_return_every_ingested_row(ingested, engine, tmp_path):
    env, sources = ingested
    ddl = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "ddl", "-c", str(env.config),
                          "--engine", engine, "--table", "flow"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ddl.returncode == 0, ddl.stderr
    statements = tmp_path / "flow.sql"
    statements.write_text(ddl.stdout)
    script = tmp_path / "run_ddl.py"
    script.write_text(RUN_DDL)
    run = subprocess.run([sys.executable, str(script), str(statements), engine, str(tmp_path)],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    # Rows per hour of treceived (UTC), from nfdump's own export of the captures.
    expected = Counter((int(r[-2][:4]), int(r[-2][5:7]), int(r[-2][8:10]), int(r[-2][11:13]))
                       for r in flow_reference_rows(sources))
    assert {tuple(p[:4]): p[4] for p in seen["partitions"]} == dict(expected)
    # The declared types are the files' own: no engine needs a cast.
    assert seen["types"]["y"] == "smallint" and seen["types"]["h"] == "tinyint"
    assert seen["types"]["unix_tstamp"] == "bigint" and seen["types"]["tdur"] == "float"
    assert list(seen["types"])[:3] == ["treceived", "unix_tstamp", "tryear"]


def test_ddl_for_an_unknown_table_names_the_known_ones(ingested):
    ddl = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "ddl", "-c",
                          str(ingested[0].config), "--table", "netflow"],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ddl.returncode == 2
    assert "no configured pipeline fills a table 'netflow'; tables: flow" in ddl.stderr
