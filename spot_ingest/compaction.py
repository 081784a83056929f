"""Compaction: rewrite the closed hours of a table into few large files.

    spot-ingest compact -t PIPELINE [--older-than 2h] [--target-size 256MB]
                        [--codec zstd|snappy] [--no-sort]

A partition is closed when none of its files changed for ``older_than``.
Its files are merged into files of about ``target_size`` (optionally sorted
on the pipeline's ``sort_by`` columns, so that engines skip row groups on a
filter), named ``merged-<digest of their inputs>.parquet``. Each merged file
lists in its Parquet metadata (``warehouse.INPUTS_KEY``) every input it
holds, so that an input delivered again is not written beside it.

The order, for one partition ``P`` (paths relative to the table):

1. ``_tmp/compact-<id>.json`` records P, the files being replaced and the
   merged files' names.
2. The merged files are written in ``_tmp/compact-<id>/`` (unseen).
3. ``_tmp/compact-<id>/`` and ``hive/P`` are swapped (``Store.exchange``):
   on a local or mounted file system that supports it this is one atomic
   step, so a reader lists either all the old files or the merged ones;
   elsewhere (NFS, HDFS) three renames, between which a reader can find the
   partition missing for a moment (never doubled).
4. What the swap moved out is settled: the replaced files are deleted; any
   other file (one written into P during steps 2-3) is moved back into P;
   then the folder and the record are removed.

A compaction killed at any point leaves the table correct, and the next run
settles its record first (step 4, after completing a half-done three-rename
swap), whichever side of the swap it stopped on. The partition's path never
changes, so its registration in a catalog stays valid. Run one compaction
of a table at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from . import pipeline as registry
from .config import IngestConfig
from .store import Store, StoreError, open_store
from .warehouse import INPUTS_KEY, MERGED_PREFIX, file_inputs, read_footer

log = logging.getLogger("spot_ingest.compaction")

DEFAULT_OLDER_THAN = 2 * 3600.0
DEFAULT_TARGET_SIZE = 256 << 20
CODECS = ("zstd", "snappy")
# Row groups of a merged file: enough of them for engines to read in parallel
# and to skip by min/max statistics on the sort column.
MERGED_ROW_GROUP_ROWS = 128 * 1024
# Test hook: seconds to pause after each step, so that a test can kill a
# compaction at every step (tests/test_compaction.py). Unset in production.
STEP_DELAY_ENV = "SPOT_INGEST_COMPACT_STEP_DELAY"


class CompactionError(Exception):
    """A partition could not be compacted; the message names it and the file."""


@dataclass
class Summary:
    partitions: int = 0          # compacted
    skipped_open: int = 0        # not closed yet
    files_in: int = 0
    files_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rows: int = 0
    failed: list[str] = field(default_factory=list)
    settled: int = 0             # records of killed compactions settled


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h`` or ``1d`` in seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found:
        raise ValueError(f"'{text}' is not a duration such as 2h, 30m, 90s or 1d")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def parse_size(text: str) -> int:
    """``256MB``, ``1GB``, ``512KB`` or a number of bytes (powers of 1024)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a size such as 256MB or 1GB")
    unit = found.group(2).rstrip("B").rstrip("I")
    return int(float(found.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30,
                                         "T": 1 << 40}[unit])


def _pause(step: str) -> None:
    delay = os.environ.get(STEP_DELAY_ENV)
    if delay:
        log.debug("step %s done", step)
        time.sleep(float(delay))


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()


# -- settling what a compaction left ------------------------------------------

def settle(store: Store, table: str, record: str) -> None:
    """Step 4 for the record ``_tmp/<record>`` (``compact-<id>.json``), from
    wherever its compaction stopped."""
    manifest = json.loads(store.read(table, f"_tmp/{record}"))
    work = f"_tmp/{record.removesuffix('.json')}"
    partition = f"hive/{manifest['partition']}"
    spare = f"{work}.swap"
    replaced, merged = set(manifest["inputs"]), set(manifest["merged"])
    # A three-rename swap stopped half way: finish it.
    if store.exists(table, spare):
        if not store.exists(table, partition):
            store.rename(table, work, partition)     # the merged files into place
        store.rename(table, spare, work)
    for name in store.list(f"{table}/{work}"):
        if "/" in name:
            continue
        if name in replaced or name in merged:
            store.delete(table, f"{work}/{name}")
            continue
        try:     # written into the partition while it was being compacted: keep it
            store.rename(table, f"{work}/{name}", f"{partition}/{name}")
            log.info("kept %s/%s, written during the compaction", partition, name)
        except StoreError:   # the same file is in the partition already
            store.delete(table, f"{work}/{name}")
    store.delete(table, work)
    store.delete(table, f"_tmp/{record}")


def settle_all(store: Store, table: str) -> int:
    """Settle every record a killed compaction of ``table`` left."""
    records = [r for r in store.list(f"{table}/_tmp", ".json")
               if re.fullmatch(r"compact-[0-9a-f]{16}\.json", r)]
    for record in records:
        settle(store, table, record)
        log.info("settled %s, left by a compaction that stopped early", record)
    return len(records)


# -- compacting ---------------------------------------------------------------

def _bins(files: list[tuple[str, int]], target_size: int) -> list[list[tuple[str, int]]]:
    """Consecutive groups of files of about ``target_size`` bytes together,
    each of two files or more (every file of the partition is rewritten:
    the swap replaces the whole folder)."""
    bins, current, size = [], [], 0
    for name, length in files:
        if len(current) >= 2 and size + length > target_size:
            bins.append(current)
            current, size = [], 0
        current.append((name, length))
        size += length
    if len(current) == 1 and bins:
        bins[-1] += current
    elif current:
        bins.append(current)
    return bins


def needs_compaction(files: list[tuple[str, int]], target_size: int) -> bool:
    """More files than the partition's size calls for."""
    total = sum(size for _, size in files)
    return len(files) > max(1, -(-total // target_size))


def compact_partition(store: Store, plugin: registry.Pipeline, rel_dir: str,
                      files: list[tuple[str, int]], target_size: int, codec: str,
                      sort: bool) -> tuple[int, int, int]:
    """Steps 1-4 for one partition; returns (files out, bytes out, rows)."""
    table = plugin.table
    folder = f"{table}/hive/{rel_dir}"
    plan = []
    for group in _bins(sorted(files), target_size):
        inputs = []
        for name, _ in group:
            try:
                inputs += file_inputs(read_footer(store, folder, name), name)
            except (OSError, ValueError, pa.ArrowException) as exc:
                raise CompactionError(f"{folder}/{name}: cannot read its footer: {exc}") from None
        plan.append((group, sorted(inputs), f"{MERGED_PREFIX}{_digest(inputs)[:32]}.parquet"))
    ident = _digest([rel_dir] + [n for n, _ in files])[:16]
    record, work = f"compact-{ident}.json", f"_tmp/compact-{ident}"
    manifest = {"partition": rel_dir, "inputs": sorted(n for g, _, _ in plan for n, _ in g),
                "merged": [m for _, _, m in plan], "started": time.time()}
    with store.write_aside(table, f"{record}.tmp") as sink:
        sink.write(json.dumps(manifest).encode())
    store.make_visible(table, f"{record}.tmp", f"_tmp/{record}")
    _pause("record")
    rows = 0
    sort_keys = [(c, "ascending") for c in getattr(plugin, "sort_by", ())] if sort else []
    for group, inputs, merged in plan:
        parts = []
        for name, _ in group:
            try:
                parts.append(pq.read_table(pa.BufferReader(store.read(folder, name)),
                                           schema=plugin.schema))
            except (OSError, pa.ArrowException) as exc:
                store.delete(table, f"_tmp/{record}")
                raise CompactionError(f"{folder}/{name}: cannot read it: {exc}") from None
        data = pa.concat_tables(parts)
        if sort_keys:
            data = data.sort_by(sort_keys)
        schema = plugin.schema.with_metadata({INPUTS_KEY: json.dumps(inputs).encode()})
        tmp = f"compact-{ident}-{merged}.tmp"
        with store.write_aside(table, tmp) as sink:
            with pq.ParquetWriter(sink, schema, compression=codec) as writer:
                writer.write_table(data.replace_schema_metadata(schema.metadata),
                                   row_group_size=MERGED_ROW_GROUP_ROWS)
        store.make_visible(table, tmp, f"{work}/{merged}")
        rows += data.num_rows
        _pause("merged")
    out_bytes = sum(size for _, size, _ in store.details(f"{table}/{work}", ".parquet"))
    store.exchange(table, work, f"hive/{rel_dir}")
    _pause("swapped")
    settle(store, table, record)
    _pause("settled")
    return len(plan), out_bytes, rows


def compact(cfg: IngestConfig, pipeline_name: str, older_than: float = DEFAULT_OLDER_THAN,
            target_size: int = DEFAULT_TARGET_SIZE, codec: str = "zstd", sort: bool = True,
            now: float | None = None) -> Summary:
    """Compact every closed partition of the pipeline's table."""
    plugin = registry.load(cfg.pipeline(pipeline_name).type)
    store = open_store(cfg.store)
    table = plugin.table
    summary = Summary(settled=settle_all(store, table))
    depth = len(plugin.partition_schema)
    partitions: dict[str, list[tuple[str, int, float]]] = {}
    for relative, size, mtime in store.details(f"{table}/hive", ".parquet"):
        parts = relative.split("/")
        if len(parts) == depth + 1 and not any(p.startswith((".", "_")) for p in parts):
            partitions.setdefault("/".join(parts[:-1]), []).append((parts[-1], size, mtime))
    now = time.time() if now is None else now
    todo = sorted(partitions)
    for done, rel_dir in enumerate(todo, 1):
        files = partitions[rel_dir]
        if not needs_compaction([(n, sz) for n, sz, _ in files], target_size):
            continue
        if max(m for _, _, m in files) > now - older_than:
            summary.skipped_open += 1
            continue
        try:
            n_out, b_out, rows = compact_partition(store, plugin, rel_dir,
                                                   [(n, s) for n, s, _ in files],
                                                   target_size, codec, sort)
        except CompactionError as exc:
            log.error("%s; partition %s left as it is", exc, rel_dir)
            summary.failed.append(str(exc))
            continue
        if not n_out:
            continue
        summary.partitions += 1
        summary.files_in += len(files)
        summary.files_out += n_out
        summary.bytes_in += sum(s for _, s, _ in files)
        summary.bytes_out += b_out
        summary.rows += rows
        log.info("%s/hive/%s: %d files (%d bytes) -> %d (%d bytes), %d rows [%d/%d partitions]",
                 table, rel_dir, len(files), sum(s for _, s, _ in files), n_out, b_out, rows,
                 done, len(todo))
    return summary
