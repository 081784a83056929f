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


# -- the catalog section and what registration sends ---------------------------

@pytest.mark.parametrize("catalog, problem", [
    ({"type": "glue"}, "catalog.type: 'glue' is not one of none, hive-metastore, spark, hiveserver2"),
    ({"type": "hive-metastore"}, "catalog.uri: expected thrift://host:port"),
    ({"type": "hive-metastore", "uri": "http://metastore:9083"},
     "catalog.uri: 'http://metastore:9083' is not thrift://host:port"),
    ({"type": "hive-metastore", "uri": "thrift://metastore:99999"}, "is not thrift://host:port"),
    ({"type": "hive-metastore", "uri": "thrift://m:9083", "url": "jdbc:hive2://h:1/"},
     "catalog.url: not used with type 'hive-metastore'"),
    ({"type": "hiveserver2", "url": "thrift://h:10000"}, "is not a HiveServer2 JDBC URL"),
    ({"type": "hiveserver2", "url": "jdbc:hive2://h:10000/", "password_file": "/nonexistent"},
     "catalog.password_file: '/nonexistent' is not a readable file"),
    ({"type": "spark", "conf": {"a": ["b"]}}, "catalog.conf.a: expected a string"),
    ({"type": "spark", "batch_seconds": -1}, "catalog.batch_seconds: expected a number of 0"),
    ({"type": "spark", "kerberos": True}, "catalog.kerberos: unknown key"),
    ({"type": "spark", "kerberos_principal": "hive/_HOST@EX.COM"},
     "catalog.kerberos_principal: not used with type 'spark'"),
])
def test_catalog_section_mistakes_are_one_line_naming_the_key(tmp_path, catalog, problem):
    from spot_ingest.config import ConfigError
    with pytest.raises(ConfigError) as err:
        config(tmp_path, catalog=catalog)
    assert problem in str(err.value) and str(tmp_path / "ingest_conf.json") in str(err.value)
    assert "\n" not in str(err.value)


KERBERIZED = {"type": "hive-metastore", "uri": "thrift://ms:9083",
              "kerberos_principal": "hive/_HOST@EX.COM"}


@pytest.mark.parametrize("hdfs, principal, problem", [
    (None, "hive/_HOST@EX.COM", "catalog.kerberos_principal: needs the hdfs section with "
                                "kerberos (its keytab login authenticates to the metastore)"),
    ({"url": "http://nn:9870"}, "hive/_HOST@EX.COM", "needs the hdfs section with kerberos"),
    ("kerberos", "hive@EX.COM", "catalog.kerberos_principal: 'hive@EX.COM' is not a service "
                                "principal such as hive/_HOST@EXAMPLE.COM"),
    ("kerberos", "hive/_HOST", "'hive/_HOST' is not a service principal"),
])
def test_metastore_kerberos_principal_needs_the_hdfs_login_and_a_service_name(
        tmp_path, hdfs, principal, problem):
    from spot_ingest.config import ConfigError
    if hdfs == "kerberos":
        (tmp_path / "spot.keytab").write_bytes(b"\x05\x02")
        hdfs = {"url": "http://nn:9870", "kerberos": {"principal": "spot@EX.COM",
                                                      "keytab": "spot.keytab"}}
    top = {"catalog": dict(KERBERIZED, kerberos_principal=principal)}
    if hdfs is not None:
        top.update(hdfs=hdfs, hdfs_app_path="/user/spot")
    with pytest.raises(ConfigError) as err:
        config(tmp_path, **top)
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_metastore_kerberos_shares_the_hdfs_sections_login(tmp_path):
    (tmp_path / "spot.keytab").write_bytes(b"\x05\x02")
    cfg = config(tmp_path, hdfs_app_path="/user/spot", catalog=KERBERIZED,
                 hdfs={"url": "http://nn:9870", "scratch_dir": "scratch",
                       "kerberos": {"principal": "spot@EX.COM", "keytab": "spot.keytab"}})
    assert cfg.catalog.kerberos_principal == "hive/_HOST@EX.COM"
    assert cfg.catalog.kerberos is cfg.hdfs.kerberos
    # The directory of the HDFS store's login: one credential cache per process for both.
    assert cfg.catalog.kerberos_state_dir == tmp_path / "scratch" / "kerberos"
    plain = config(tmp_path, catalog={"type": "hive-metastore", "uri": "thrift://ms:9083"})
    assert plain.catalog.kerberos_principal is None and plain.catalog.kerberos is None


def test_catalog_section_is_read_into_its_settings(tmp_path):
    cfg = config(tmp_path, catalog={"type": "hive-metastore",
                                    "uri": ["thrift://a:9083", "thrift://b:9083"]})
    assert cfg.catalog.uris == ("thrift://a:9083", "thrift://b:9083") and cfg.catalog.enabled
    assert not config(tmp_path).catalog.enabled


def test_partition_directories_are_checked_before_they_reach_a_statement(tmp_path):
    from spot_ingest.catalog import add_partitions_statement, table_specs
    specs = table_specs(config(tmp_path))
    flow, proxy = specs["flow"], specs["proxy"]
    assert add_partitions_statement("spotdb", flow, ["y=2016/m=5/d=21/h=13"]) == (
        "ALTER TABLE `spotdb`.`flow` ADD IF NOT EXISTS "
        "PARTITION (`y`=2016, `m`=5, `d`=21, `h`=13)")
    assert proxy.partition_spec("y=2016/m=05/d=21/h=03") == \
        "PARTITION (`y`='2016', `m`='05', `d`='21', `h`='03')"
    for bad in ("y=2016/m=5/d=21", "y=2016/m=5/d=21/x=1", "y=2016/m=5/d=21/h=1;DROP",
                "m=5/y=2016/d=21/h=13", "y=2016/m=5/d=21/h="):
        with pytest.raises(CatalogError):
            flow.partition_values(bad)
    with pytest.raises(CatalogError):
        proxy.partition_values("y=2016/m=05/d=21/h=0'3")


def test_metastore_table_is_the_one_the_hive_ddl_declares(tmp_path):
    from spot_ingest.catalog import table_specs
    from spot_ingest.metastore import thrift_partition, thrift_table
    spec = table_specs(config(tmp_path))["flow"]
    table = thrift_table("spotdb", spec)
    statement = [s for s in ddl_statements(config(tmp_path), "hive", "flow")
                 if s.startswith("CREATE EXTERNAL")][0]
    for col in table.sd.cols:
        assert f"`{col.name}` {col.type.upper()}" in statement
    keys = ", ".join(f"`{k.name}` {k.type.upper()}" for k in table.partitionKeys)
    assert f"PARTITIONED BY ({keys})" in statement
    assert f"LOCATION '{table.sd.location}'" in statement
    assert table.tableType == "EXTERNAL_TABLE" and table.parameters == {"EXTERNAL": "TRUE"}
    part = thrift_partition("spotdb", spec, "y=2016/m=5/d=21/h=13")
    assert part.values == ["2016", "5", "21", "13"]
    assert part.sd.location == f"{table.sd.location}/y=2016/m=5/d=21/h=13"
