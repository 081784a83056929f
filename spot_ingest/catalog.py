"""The tables as a SQL catalog sees them: the statements that declare them.

``ddl_statements`` writes, for Hive, Impala or Spark SQL, the CREATE DATABASE
and CREATE EXTERNAL TABLE statements of every table the configured pipelines
fill (``dbname`` is the database, as in the original), at the table's
location in the store, with the columns and the partition columns of
``spec/tables.md`` taken from each pipeline's own Arrow schema, then the
statement with which the engine finds the partitions already written. The
types follow the Parquet files exactly (int8 is TINYINT, int16 SMALLINT ...),
so every engine reads the files without a cast.
"""
from __future__ import annotations

import pyarrow as pa

from . import pipeline as registry
from .config import IngestConfig

ENGINES = ("hive", "impala", "spark")

_HIVE_TYPES = {
    pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INT", pa.int64(): "BIGINT",
    pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.string(): "STRING", pa.bool_(): "BOOLEAN",
}


class CatalogError(Exception):
    """A table or type the catalog cannot declare; the message says which."""


def hive_type(field: pa.Field) -> str:
    try:
        return _HIVE_TYPES[field.type]
    except KeyError:
        raise CatalogError(f"column {field.name}: Arrow type {field.type} has no Hive "
                           f"equivalent here") from None


def _name(identifier: str) -> str:
    """An identifier quoted for all three engines (columns such as ``input``
    or ``dir`` are reserved words in some of them)."""
    if "`" in identifier:
        raise CatalogError(f"identifier {identifier!r} holds a backquote")
    return f"`{identifier}`"


def _string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def table_location(cfg: IngestConfig, table: str) -> str:
    """Where a table's partitions are: on HDFS, the path (the engines resolve
    it against their cluster's default file system); locally, a file:// URI."""
    path = cfg.hdfs_app_path.removeprefix("file://").rstrip("/")
    return f"{path}/{table}/hive" if cfg.hdfs is not None else f"file://{path}/{table}/hive"


def tables(cfg: IngestConfig) -> dict[str, registry.Pipeline]:
    """Each table the configured pipelines fill, with a pipeline that fills it."""
    found: dict[str, registry.Pipeline] = {}
    for pcfg in cfg.pipelines.values():
        plugin = registry.load(pcfg.type)
        found.setdefault(plugin.table, plugin)
    return dict(sorted(found.items()))


def ddl_statements(cfg: IngestConfig, engine: str = "hive",
                   only: str | None = None) -> list[str]:
    """The statements, each without its final semicolon."""
    if engine not in ENGINES:
        raise CatalogError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    found = tables(cfg)
    if only is not None:
        if only not in found:
            raise CatalogError(f"no configured pipeline fills a table {only!r}; tables: "
                               f"{', '.join(found) or '(none)'}")
        found = {only: found[only]}
    db = _name(cfg.dbname)
    statements = [f"CREATE DATABASE IF NOT EXISTS {db}"]
    for table, plugin in found.items():
        qualified = f"{db}.{_name(table)}"
        columns = ",\n".join(f"  {_name(f.name)} {hive_type(f)}" for f in plugin.schema)
        parts = [f"{_name(f.name)} {hive_type(f)}" for f in plugin.partition_schema]
        location = _string(table_location(cfg, table))
        if engine == "spark":
            # A Spark data source table: partition columns are declared with the
            # others and named in PARTITIONED BY.
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {qualified} (\n{columns},\n"
                + ",\n".join(f"  {p}" for p in parts) + "\n)\nUSING PARQUET\n"
                f"PARTITIONED BY ({', '.join(_name(f.name) for f in plugin.partition_schema)})\n"
                f"LOCATION {location}")
        else:
            statements.append(
                f"CREATE EXTERNAL TABLE IF NOT EXISTS {qualified} (\n{columns}\n)\n"
                f"PARTITIONED BY ({', '.join(parts)})\nSTORED AS PARQUET\nLOCATION {location}")
        statements.append(f"ALTER TABLE {qualified} RECOVER PARTITIONS" if engine == "impala"
                          else f"MSCK REPAIR TABLE {qualified}")
    return statements
