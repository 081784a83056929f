"""Write Arrow batches as Hive-partitioned Parquet, atomically and idempotently.

``TableWriter`` receives the batches converted from one input file. Rows are
routed to their partition (``y=2016/m=5/d=21/h=13``), buffered, and written
aside in the store (``Store.write_aside``: ``<table>/_tmp/``); ``commit()``
makes each visible as ``<table>/hive/<partition>/<name>.parquet``. ``<name>`` derives from the
input's checksum, so converting the same input again replaces the earlier
output instead of adding rows beside it, and readers (Hive, Spark, DuckDB,
which list ``*.parquet`` under ``hive/``) never see a partial file.

A file can hold the rows of several inputs: a compacted file
(``spot_ingest.compaction``, named ``merged-*``) or a streaming batch. Its
Parquet key-value metadata ``INPUTS_KEY`` lists their names, and the writer
checks it: an input a merged file of the partition already holds is not
written again (the same name is the same checksum, hence the same rows), so
a file delivered again after its hour was compacted never doubles rows.
"""
from __future__ import annotations

import json
import struct
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .store import Store

ROW_GROUP_ROWS = 256 * 1024
# Parquet key-value metadata: JSON list (sorted) of the input names (file
# stems such as "part-<sha32>") whose rows a file holds.
INPUTS_KEY = b"spot_ingest.inputs"
# A file that lists its inputs is named merged-*: held_inputs() reads the
# footers of those only, not of every file of a partition.
MERGED_PREFIX = "merged-"
BUFFER_LIMIT_BYTES = 128 << 20


# The partitions of the original Spot tables: year, month, day and hour as
# Hive INT-family columns (y=2016/m=5/d=21/h=13).
HOURLY_PARTITIONS = pa.schema([("y", pa.int16()), ("m", pa.int8()), ("d", pa.int8()),
                               ("h", pa.int8())])


def hourly_partitions(timestamps: pa.Array) -> list[pa.Array]:
    """The ``HOURLY_PARTITIONS`` columns of an Arrow timestamp column."""
    return [pc.cast(pc.year(timestamps), pa.int16()), pc.cast(pc.month(timestamps), pa.int8()),
            pc.cast(pc.day(timestamps), pa.int8()), pc.cast(pc.hour(timestamps), pa.int8())]


def partition_dir(names, values) -> str:
    # Integers the way Hive and Spark write them (no zero padding); strings as given.
    return "/".join(f"{n}={v}" for n, v in zip(names, values))


def read_footer(store: Store, area: str, relative: str) -> pq.FileMetaData:
    """A Parquet file's metadata, reading only its end (not the whole file
    from a remote store)."""
    tail = store.read_tail(area, relative, 64 << 10)
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise ValueError(f"{area}/{relative} is not a Parquet file (no PAR1 at its end)")
    length = struct.unpack("<I", tail[-8:-4])[0]
    if length + 8 > len(tail):
        tail = store.read_tail(area, relative, length + 8)
        if length + 8 > len(tail):
            raise ValueError(f"{area}/{relative}: the footer is longer than the file")
    # A footer alone, framed as a file, is what the metadata reader needs.
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-(length + 8):]))


def file_inputs(metadata: pq.FileMetaData | None, name: str) -> list[str]:
    """The inputs a file holds: its ``INPUTS_KEY`` list, else itself."""
    kv = (metadata.metadata or {}) if metadata is not None else {}
    if INPUTS_KEY in kv:
        return list(json.loads(kv[INPUTS_KEY]))
    return [name.removesuffix(".parquet")]


_footers: dict[tuple, list[str]] = {}


def held_inputs(store: Store, area: str, rel_dir: str, data_dir: str = "hive"
                ) -> dict[str, str]:
    """input name -> file name (relative to the partition folder
    ``<area>/<data_dir>/<rel_dir>``), for each file of the partition that
    lists its inputs (``INPUTS_KEY``; such files are named ``merged-*``).
    Only footers are read (``Store.read_tail``), once per file and size in
    this process. A file that vanished since it was listed is left out."""
    folder = "/".join(p for p in (area, data_dir, rel_dir) if p and p != ".")
    held = {}
    for name, size, _ in store.details(folder, ".parquet"):
        if "/" in name or not name.startswith(MERGED_PREFIX):
            continue
        key = (str(getattr(store, "root", "")), folder, name, size)
        if key not in _footers:
            try:
                _footers[key] = file_inputs(read_footer(store, folder, name), name)
            except FileNotFoundError:   # replaced since it was listed
                continue
        for item in _footers[key]:
            held[item] = name
    return held


class _Partition:
    def __init__(self, rel_dir: str, tmp_name: str):
        self.rel_dir = rel_dir
        self.tmp_name = tmp_name
        self.sink = None
        self.batches: list[pa.RecordBatch] = []
        self.buffered_rows = 0
        self.buffered_bytes = 0
        self.rows = 0
        self.writer: pq.ParquetWriter | None = None


class TableWriter:
    """Rows of one input into ``<area>/<data_dir>/<partition>/<name>.parquet``
    of ``store``. As a ``with`` block: commit when the block ends normally,
    abort (nothing visible) when it raises. ``tmp_prefix`` names this
    writer's process, so that ``remove_stale_temporaries`` finds what a
    killed one left.

    ``inputs``: the names of the inputs whose rows this file holds (several,
    for a ``merged-*`` file); every file written then carries them, sorted,
    as JSON under ``INPUTS_KEY``. Without it the file holds the input
    ``name``. ``commit`` writes nothing into a partition where another file
    already holds all of them (see ``commit``)."""

    def __init__(self, store: Store, area: str, name: str, schema: pa.Schema,
                 partition_schema: pa.Schema, tmp_prefix: str, data_dir: str = "hive",
                 inputs: Sequence[str] | None = None, compression: str = "snappy",
                 row_group_rows: int = ROW_GROUP_ROWS):
        self.store, self.area, self.data_dir = store, area, data_dir
        self.name = name
        self.inputs = sorted(inputs) if inputs is not None else None
        self.compression, self.row_group_rows = compression, row_group_rows
        # Partitions skipped because a merged file already holds this input.
        self.already_held: dict[str, str] = {}
        self.schema = schema if inputs is None else schema.with_metadata(
            {**(schema.metadata or {}), INPUTS_KEY: json.dumps(self.inputs).encode()})
        self.partition_names = partition_schema.names
        self.tmp_prefix = tmp_prefix
        self.partitions: dict[tuple, _Partition] = {}
        self.buffered_bytes = 0
        self.bytes_written = 0     # bytes of the Parquet files committed (for reports)

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
            tmp = f"{self.tmp_prefix}-{self.name}-{len(self.partitions)}.parquet.tmp"
            part = self.partitions[key] = _Partition(rel_dir, tmp)
        part.batches.append(data)
        part.buffered_rows += data.num_rows
        part.buffered_bytes += data.nbytes
        self.buffered_bytes += data.nbytes
        if part.buffered_rows >= self.row_group_rows:
            self._flush(part)
        while self.buffered_bytes > BUFFER_LIMIT_BYTES:
            self._flush(max(self.partitions.values(), key=lambda p: p.buffered_bytes))

    def _flush(self, part: _Partition) -> None:
        if not part.batches:
            return
        if part.writer is None:
            part.sink = self.store.write_aside(self.area, part.tmp_name)
            part.writer = pq.ParquetWriter(part.sink, self.schema, compression=self.compression)
        part.writer.write_table(pa.Table.from_batches(part.batches, self.schema),
                                row_group_size=self.row_group_rows)
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

    def _holder(self, rel_dir: str) -> str | None:
        """The file of the partition, other than this writer's own, that holds
        every input of this one (the same names are the same checksums,
        hence the same rows); None if there is none."""
        mine = f"{self.name}.parquet"
        held = held_inputs(self.store, self.area, rel_dir, self.data_dir)
        holders = {held.get(i) for i in (self.inputs or [self.name])}
        if len(holders) == 1 and None not in holders and mine not in holders:
            return holders.pop()
        return None

    def commit(self) -> dict[str, int]:
        """Make every partition file visible; return rows per partition dir.

        A partition where another file (a ``merged-*`` file of a compaction)
        already holds this writer's inputs gets nothing: the file is dropped,
        a file of this name left there by an earlier run is removed, and the
        partition is reported in ``already_held`` (partition dir -> holder)
        instead of in the result. The check runs before and again after the
        file is made visible: a compaction swapping the partition in between
        is seen by one of the two, as compaction checks after its own swap
        (a reader may see this file's rows twice only for the moment
        between its rename and its removal)."""
        for part in self.partitions.values():
            self._flush(part)
            part.writer.close()
            try:
                self.bytes_written += part.sink.tell()
            except (OSError, ValueError):   # a sink that cannot tell: not counted
                pass
            part.sink.close()
        result = {}
        for part in self.partitions.values():
            final = "/".join(p for p in (self.data_dir, part.rel_dir) if p and p != ".")
            target = f"{final}/{self.name}.parquet" if final else f"{self.name}.parquet"
            holder = self._holder(part.rel_dir)
            if holder is None:
                self.store.make_visible(self.area, part.tmp_name, target)
                holder = self._holder(part.rel_dir)     # a compaction swapped meanwhile?
            else:
                self.store.discard_aside(self.area, part.tmp_name)
            if holder is not None:
                # Also what a run killed between its rename and this check left.
                self.store.delete(self.area, target)
                self.already_held[part.rel_dir] = holder
                continue
            result[part.rel_dir] = part.rows
        self.partitions.clear()
        return result

    def abort(self) -> None:
        for part in self.partitions.values():
            if part.writer is not None:
                try:
                    part.writer.close()
                    part.sink.close()
                except Exception:  # the file is being thrown away anyway
                    pass
                self.store.discard_aside(self.area, part.tmp_name)
        self.partitions.clear()
        self.buffered_bytes = 0


def remove_stale_temporaries(store: Store, area: str, tmp_prefix: str) -> int:
    """Delete temporaries a killed writer of ``tmp_prefix`` left behind."""
    return store.remove_aside(area, tmp_prefix)
