"""The DDL the catalog writes: locations, types and quoting (fast, in-process;
tests/test_ddl.py runs the statements in a real Spark SQL session)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from spot_ingest.catalog import CatalogError, ddl_statements, hive_type
from spot_ingest.config import load


def config(tmp_path, **top):
    collector = tmp_path / "collector"
    collector.mkdir(exist_ok=True)
    data = {"dbname": "spotdb", "hdfs_app_path": str(tmp_path / "store"),
            "kafka": {"kafka_server": "127.0.0.1", "kafka_port": "9092"},
            "pipelines": {
                "flow_a": {"type": "flow", "collector_path": str(collector)},
                "flow_b": {"type": "flow", "collector_path": str(collector)},
                "proxy_1": {"type": "proxy", "collector_path": str(collector)}}}
    data.update(top)
    path = tmp_path / "ingest_conf.json"
    path.write_text(json.dumps(data))
    return load(path)


def test_one_table_per_type_at_its_location_with_its_partition_types(tmp_path):
    statements = ddl_statements(config(tmp_path))
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS `spotdb`"
    creates = [s for s in statements if s.startswith("CREATE EXTERNAL")]
    assert [s.split("\n")[0] for s in creates] == [
        "CREATE EXTERNAL TABLE IF NOT EXISTS `spotdb`.`flow` (",
        "CREATE EXTERNAL TABLE IF NOT EXISTS `spotdb`.`proxy` ("], "two flow pipelines, one table"
    flow = creates[0]
    assert "PARTITIONED BY (`y` SMALLINT, `m` TINYINT, `d` TINYINT, `h` TINYINT)" in flow
    assert f"LOCATION 'file://{tmp_path}/store/flow/hive'" in flow
    assert "`tdur` FLOAT" in flow and "`input` INT" in flow
    assert "PARTITIONED BY (`y` STRING, `m` STRING, `d` STRING, `h` STRING)" in creates[1]
    assert statements[-1] == "MSCK REPAIR TABLE `spotdb`.`proxy`"


def test_on_hdfs_the_location_is_the_hdfs_path_and_impala_recovers_partitions(tmp_path):
    cfg = config(tmp_path, hdfs_app_path="/user/spot", hdfs={"url": "http://nn:9870"})
    statements = ddl_statements(cfg, "impala", "flow")
    assert "LOCATION '/user/spot/flow/hive'" in statements[1]
    assert statements[2] == "ALTER TABLE `spotdb`.`flow` RECOVER PARTITIONS"


def test_spark_declares_partition_columns_with_the_others(tmp_path):
    create = ddl_statements(config(tmp_path), "spark", "flow")[1]
    assert "USING PARQUET\nPARTITIONED BY (`y`, `m`, `d`, `h`)" in create
    assert "  `y` SMALLINT,\n  `m` TINYINT" in create


def test_what_cannot_be_declared_is_named(tmp_path):
    with pytest.raises(CatalogError, match="no configured pipeline fills a table 'dns'"):
        ddl_statements(config(tmp_path), "hive", "dns")
    with pytest.raises(CatalogError, match="not one of hive, impala, spark"):
        ddl_statements(config(tmp_path), "presto")
    with pytest.raises(CatalogError, match="column t: Arrow type timestamp"):
        hive_type(pa.field("t", pa.timestamp("s")))
    with pytest.raises(CatalogError, match="backquote"):
        ddl_statements(config(tmp_path, dbname="spot`db"))


def test_a_quote_in_a_location_is_escaped(tmp_path):
    odd = tmp_path / "it's"
    odd.mkdir()
    create = ddl_statements(config(odd))[1]
    assert "LOCATION 'file://" + str(odd).replace("'", "\\'") + "/store/flow/hive'" in create
