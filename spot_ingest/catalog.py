"""The tables as a SQL catalog sees them.

``table_specs`` describes every table the configured pipelines fill
(``dbname`` is the database, as in the original): its columns and partition
columns, taken from each pipeline's own Arrow schema, and its location in
the store. The types follow the Parquet files exactly (int8 is TINYINT,
int16 SMALLINT ...), so every engine reads the files without a cast.

From one ``TableSpec`` come both

* ``ddl_statements``: for Hive, Impala or Spark SQL, the CREATE DATABASE and
  CREATE EXTERNAL TABLE statements a site runs by hand (``spot-ingest ddl``),
  then the statement with which the engine finds the partitions written; and
* what a configured catalog (``spot_ingest.metastore``) creates: the Thrift
  ``Table`` of a Hive metastore, or the same Hive statements run through
  Spark SQL or beeline.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def quoted(identifier: str) -> str:
    """An identifier quoted for all three engines (columns such as ``input``
    or ``dir`` are reserved words in some of them)."""
    if "`" in identifier:
        raise CatalogError(f"identifier {identifier!r} holds a backquote")
    return f"`{identifier}`"


def _string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class TableSpec:
    """One table as declared to a catalog."""
    name: str
    columns: tuple[tuple[str, str], ...]             # (name, Hive type)
    partition_columns: tuple[tuple[str, str], ...]   # (name, Hive type), outermost first
    location: str

    def partition_values(self, rel_dir: str) -> list[str]:
        """The values of a partition directory (``y=2016/m=5/d=21/h=13``) in
        partition-column order; ``CatalogError`` for anything else."""
        parts = rel_dir.strip("/").split("/")
        names = [n for n, _ in self.partition_columns]
        if len(parts) != len(names):
            raise CatalogError(f"{self.name}: '{rel_dir}' is not a partition directory "
                               f"({'/'.join(f'{n}=...' for n in names)})")
        values = []
        for part, (name, kind) in zip(parts, self.partition_columns):
            key, sep, value = part.partition("=")
            if key != name or not sep or not value:
                raise CatalogError(f"{self.name}: '{rel_dir}': expected {name}=<value>, got "
                                   f"'{part}'")
            if kind != "STRING" and not value.lstrip("-").isdigit():
                raise CatalogError(f"{self.name}: '{rel_dir}': {name} must be a whole number")
            if any(c in value for c in "'\\`\n\r"):
                raise CatalogError(f"{self.name}: '{rel_dir}': {name} holds a quote or a "
                                   f"line break")
            values.append(value)
        return values

    def partition_spec(self, rel_dir: str) -> str:
        """``PARTITION (`y`=2016, ...)`` of a partition directory."""
        values = self.partition_values(rel_dir)
        return "PARTITION (" + ", ".join(
            f"{quoted(n)}={v if kind != 'STRING' else _string(v)}"
            for (n, kind), v in zip(self.partition_columns, values)) + ")"


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


def table_specs(cfg: IngestConfig, only: str | None = None) -> dict[str, TableSpec]:
    """Every table the configured pipelines fill (or only the table ``only``)."""
    found = tables(cfg)
    if only is not None:
        if only not in found:
            raise CatalogError(f"no configured pipeline fills a table {only!r}; tables: "
                               f"{', '.join(found) or '(none)'}")
        found = {only: found[only]}
    return {table: TableSpec(
                table, tuple((f.name, hive_type(f)) for f in plugin.schema),
                tuple((f.name, hive_type(f)) for f in plugin.partition_schema),
                table_location(cfg, table))
            for table, plugin in found.items()}


def qualified_name(dbname: str, table: str) -> str:
    return f"{quoted(dbname)}.{quoted(table)}"


def create_statements(dbname: str, spec: TableSpec, engine: str = "hive") -> list[str]:
    """CREATE DATABASE and CREATE [EXTERNAL] TABLE, IF NOT EXISTS, for one table."""
    qualified = qualified_name(dbname, spec.name)
    columns = ",\n".join(f"  {quoted(n)} {t}" for n, t in spec.columns)
    parts = [f"{quoted(n)} {t}" for n, t in spec.partition_columns]
    location = _string(spec.location)
    if engine == "spark":
        # A Spark data source table: partition columns are declared with the
        # others and named in PARTITIONED BY.
        table = (f"CREATE TABLE IF NOT EXISTS {qualified} (\n{columns},\n"
                 + ",\n".join(f"  {p}" for p in parts) + "\n)\nUSING PARQUET\n"
                 f"PARTITIONED BY ({', '.join(quoted(n) for n, _ in spec.partition_columns)})\n"
                 f"LOCATION {location}")
    else:
        table = (f"CREATE EXTERNAL TABLE IF NOT EXISTS {qualified} (\n{columns}\n)\n"
                 f"PARTITIONED BY ({', '.join(parts)})\nSTORED AS PARQUET\nLOCATION {location}")
    return [f"CREATE DATABASE IF NOT EXISTS {quoted(dbname)}", table]


def add_partitions_statement(dbname: str, spec: TableSpec, rel_dirs) -> str:
    """ALTER TABLE ... ADD IF NOT EXISTS PARTITION (...) PARTITION (...): the
    partitions at their default locations (the table's, plus the directory)."""
    return (f"ALTER TABLE {qualified_name(dbname, spec.name)} ADD IF NOT EXISTS "
            + " ".join(spec.partition_spec(d) for d in rel_dirs))


def ddl_statements(cfg: IngestConfig, engine: str = "hive",
                   only: str | None = None) -> list[str]:
    """The statements, each without its final semicolon. With ``engine``
    "hive" they are exactly what a configured catalog creates."""
    if engine not in ENGINES:
        raise CatalogError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
    statements = [f"CREATE DATABASE IF NOT EXISTS {quoted(cfg.dbname)}"]
    for spec in table_specs(cfg, only).values():
        statements += create_statements(cfg.dbname, spec, engine)[1:]
        qualified = qualified_name(cfg.dbname, spec.name)
        statements.append(f"ALTER TABLE {qualified} RECOVER PARTITIONS" if engine == "impala"
                          else f"MSCK REPAIR TABLE {qualified}")
    return statements
