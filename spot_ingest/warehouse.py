"""Write Arrow batches as Hive-partitioned Parquet, atomically and idempotently.

``TableWriter`` receives the batches converted from one input file. Rows are
routed to their partition (``y=2016/m=5/d=21/h=13``), buffered, and written to
temporary files under ``<table>/_tmp/``; ``commit()`` renames each into
``<table>/hive/<partition>/<name>.parquet``. ``<name>`` derives from the
input's checksum, so converting the same input again replaces the earlier
output instead of adding rows beside it, and readers (Hive, Spark, DuckDB,
which list ``*.parquet`` under ``hive/``) never see a partial file.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 256 * 1024
BUFFER_LIMIT_BYTES = 128 << 20


def partition_dir(names, values) -> str:
    # Integers the way Hive and Spark write them (no zero padding); strings as given.
    return "/".join(f"{n}={v}" for n, v in zip(names, values))


class _Partition:
    def __init__(self, rel_dir: str, tmp_path: Path):
        self.rel_dir = rel_dir
        self.tmp_path = tmp_path
        self.batches: list[pa.RecordBatch] = []
        self.buffered_rows = 0
        self.buffered_bytes = 0
        self.rows = 0
        self.writer: pq.ParquetWriter | None = None


class TableWriter:
    def __init__(self, table_root: Path, name: str, schema: pa.Schema, partition_schema: pa.Schema,
                 tmp_prefix: str, data_dir: str = "hive"):
        self.table_root = Path(table_root)
        self.hive_root = self.table_root / data_dir
        self.tmp_dir = self.table_root / "_tmp"
        self.name = name
        self.schema = schema
        self.partition_names = partition_schema.names
        self.tmp_prefix = tmp_prefix
        self.partitions: dict[tuple, _Partition] = {}
        self.buffered_bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        if batch.num_rows == 0:
            return
        keys = batch.select(self.partition_names)
        data = batch.select(self.schema.names)
        first = tuple(keys.column(i)[0].as_py() for i in range(len(self.partition_names)))
        if all(pc.all(pc.equal(keys.column(i), v)).as_py() for i, v in enumerate(first)):
            self._buffer(first, data)
            return
        combos = pa.Table.from_batches([keys]).group_by(self.partition_names).aggregate([])
        for combo in combos.to_pylist():
            mask = None
            for n in self.partition_names:
                eq = pc.equal(keys.column(n), combo[n])
                mask = eq if mask is None else pc.and_(mask, eq)
            self._buffer(tuple(combo[n] for n in self.partition_names), data.filter(mask))

    def _buffer(self, key: tuple, data: pa.RecordBatch) -> None:
        part = self.partitions.get(key)
        if part is None:
            rel_dir = partition_dir(self.partition_names, key)
            tmp = self.tmp_dir / f"{self.tmp_prefix}-{self.name}-{len(self.partitions)}.parquet.tmp"
            part = self.partitions[key] = _Partition(rel_dir, tmp)
        part.batches.append(data)
        part.buffered_rows += data.num_rows
        part.buffered_bytes += data.nbytes
        self.buffered_bytes += data.nbytes
        if part.buffered_rows >= ROW_GROUP_ROWS:
            self._flush(part)
        while self.buffered_bytes > BUFFER_LIMIT_BYTES:
            self._flush(max(self.partitions.values(), key=lambda p: p.buffered_bytes))

    def _flush(self, part: _Partition) -> None:
        if not part.batches:
            return
        if part.writer is None:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            part.writer = pq.ParquetWriter(part.tmp_path, self.schema, compression="snappy")
        part.writer.write_table(pa.Table.from_batches(part.batches, self.schema),
                                row_group_size=ROW_GROUP_ROWS)
        part.rows += part.buffered_rows
        self.buffered_bytes -= part.buffered_bytes
        part.batches, part.buffered_rows, part.buffered_bytes = [], 0, 0

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leaving the block with an error aborts (nothing becomes visible);
        leaving it normally commits what was not yet committed or aborted."""
        if exc_type is not None:
            self.abort()
        elif self.partitions:
            self.commit()

    def commit(self) -> dict[str, int]:
        """Make every partition file visible; return rows per partition dir."""
        for part in self.partitions.values():
            self._flush(part)
            part.writer.close()
            with open(part.tmp_path, "rb") as f:
                os.fsync(f.fileno())
        result = {}
        for part in self.partitions.values():
            final_dir = self.hive_root / part.rel_dir
            final_dir.mkdir(parents=True, exist_ok=True)
            os.replace(part.tmp_path, final_dir / f"{self.name}.parquet")
            result[part.rel_dir] = part.rows
        self.partitions.clear()
        return result

    def abort(self) -> None:
        for part in self.partitions.values():
            if part.writer is not None:
                try:
                    part.writer.close()
                except Exception:  # the file is being thrown away anyway
                    pass
            part.tmp_path.unlink(missing_ok=True)
        self.partitions.clear()
        self.buffered_bytes = 0


def remove_stale_temporaries(table_root: Path, tmp_prefix: str) -> int:
    """Delete temporaries a killed process of ours left behind."""
    tmp_dir = Path(table_root) / "_tmp"
    removed = 0
    if tmp_dir.is_dir():
        for p in tmp_dir.glob(f"{tmp_prefix}-*.parquet.tmp"):
            p.unlink(missing_ok=True)
            removed += 1
    return removed
