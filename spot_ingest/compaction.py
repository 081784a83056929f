"""Compaction: rewrite the closed hours of a table into few large files.

    spot-ingest compact -t PIPELINE [--older-than 2h] [--target-size 256MB]
                        [--codec zstd|snappy] [--no-sort]

A partition is closed when none of its files changed for ``older_than``.
Its files are merged into files of about ``target_size`` (optionally sorted
on the pipeline's ``sort_by`` columns, so that engines skip row groups on a
filter), named ``merged-<digest of their inputs>.parquet``. Each merged file
lists in its Parquet metadata (``warehouse.INPUTS_KEY``) every input it
holds (the inputs of merged files it replaces included), so that an input
delivered again is not written beside it (``TableWriter.commit`` checks). A
plain file whose input a merged file of the partition already holds (left
by a writer killed before its own check) is dropped, not merged twice.

One compaction of a table runs at a time (``_tmp/compact.lock``; a lock
whose process is gone is taken over). The order, for one partition ``P``
(paths relative to the table):

1. ``_tmp/compact-<id>.json`` records P, the files being replaced and the
   merged files' names.
2. The merged files are written in ``_tmp/compact-<id>/`` (unseen).
3. ``_tmp/compact-<id>/`` and ``hive/P`` are swapped (``Store.exchange``):
   on a local or mounted file system that supports it this is one atomic
   step, so a reader lists either all the old files or the merged ones;
   elsewhere (NFS, HDFS) three renames, between the first two of which a
   reader finds the partition missing (never doubled).
4. What the swap moved out is settled: the replaced files are deleted; any
   other file (one written into P during steps 2-3) is moved back into P;
   then the folder and the record are removed.

A compaction killed at any point leaves the table correct, and the next run
settles its record first (step 4, after completing a half-done three-rename
swap), whichever side of the swap it stopped on. The partition's path never
changes, so its registration in a catalog stays valid.

What readers can still see: with the three-rename swap, the partition
missing for the moment between two renames; with any swap, a file written
into P while it was being compacted missing from the swap until step 4
moves it back (a closed partition rarely gets one).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from . import pipeline as registry
from .config import IngestConfig
from .store import Store, StoreError, open_store
from .progress import progress
from .units import parse_duration, parse_size  # noqa: F401  (the command line's)
from .warehouse import INPUTS_KEY, MERGED_PREFIX, file_inputs, read_footer

log = logging.getLogger("spot_ingest.compaction")

DEFAULT_OLDER_THAN = 2 * 3600.0
DEFAULT_TARGET_SIZE = 256 << 20
CODECS = ("zstd", "snappy")
# Row groups of a merged file: enough of them for engines to read in parallel
# and to skip by min/max statistics on the sort column.
MERGED_ROW_GROUP_ROWS = 128 * 1024
LOCK = "_tmp/compact.lock"
_RECORD_RE = re.compile(r"compact-[0-9a-f]{16}\.json")
# What a compaction killed while writing leaves in _tmp: a record or a merged
# file not yet renamed (``<name>.tmp``), or a work folder.
_LEFTOVER_RE = re.compile(r"compact-[0-9a-f]{16}(\.json\.tmp|-merged-[0-9a-f]{32}\.parquet\.tmp"
                          r"|/.+)")

# Test hooks (tests/test_compaction.py), unset in production. At each named
# step (``_step``): with PAUSE_ENV="<step>" or "<step>:<n>" (the n-th time),
# write "compaction at <step>" to stderr and wait to be killed; with
# ANNOUNCE_ENV set, write that line at every step and go on.
PAUSE_ENV = "SPOT_INGEST_COMPACT_PAUSE"
ANNOUNCE_ENV = "SPOT_INGEST_COMPACT_ANNOUNCE"
STEPS = ("locked", "record", "merged", "exchange-1", "exchange-2", "exchange-3", "swapped",
         "settling", "settled")
_seen: dict[str, int] = {}


def _step(name: str) -> None:
    pause = os.environ.get(PAUSE_ENV)
    if not pause and not os.environ.get(ANNOUNCE_ENV):
        return
    _seen[name] = _seen.get(name, 0) + 1
    want, _, nth = (pause or "").partition(":")
    if want == name and _seen[name] == int(nth or 1):
        print(f"compaction at {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    if os.environ.get(ANNOUNCE_ENV):
        print(f"compaction at {name}", file=sys.stderr, flush=True)


class CompactionError(Exception):
    """A partition could not be compacted; the message names it and the file."""


class CompactionLocked(Exception):
    """Another compaction of the table runs (or its lock was left on another host)."""


@dataclass
class Summary:
    partitions: int = 0          # compacted
    skipped_open: int = 0        # not closed yet
    files_in: int = 0
    files_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    rows: int = 0
    duplicates: int = 0          # files dropped: a merged file held their input
    failed: list[str] = field(default_factory=list)
    settled: int = 0             # records of killed compactions settled


def _digest(items) -> str:
    return hashlib.sha256(json.dumps(sorted(items)).encode()).hexdigest()


# -- one compaction of a table at a time --------------------------------------

def _process_start(pid: int) -> float | None:
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@contextlib.contextmanager
def table_lock(store: Store, table: str):
    """Hold ``<table>/_tmp/compact.lock`` for the block (``Store.create``:
    of two compactions starting together, one gets it). A lock whose process
    is gone (same host, no process of that pid and start time) is taken
    over; any other raises ``CompactionLocked`` naming its holder. Settling
    a record while its compaction still runs would delete files it is about
    to swap in: hence the lock."""
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "start": _process_start(os.getpid()), "since": time.time()}
    for attempt in (1, 2):
        if store.create(table, LOCK, json.dumps(me).encode()):
            break
        try:
            holder = json.loads(store.read(table, LOCK))
        except (OSError, ValueError, StoreError):
            if not store.exists(table, LOCK):
                continue            # released meanwhile
            holder = {}             # being written (HDFS shows a file while it is)
        pid = holder.get("pid")
        gone = (holder.get("host") == me["host"] and isinstance(pid, int) and pid > 0
                and _process_start(pid) != holder.get("start"))
        if attempt == 1 and gone:
            log.warning("taking over %s/%s, left by compaction pid %s (gone)", table, LOCK,
                        holder.get("pid"))
            store.delete(table, LOCK)
            continue
        raise CompactionLocked(
            f"another compaction of {table} holds {table}/{LOCK} (pid {holder.get('pid', '?')} "
            f"on {holder.get('host', '?')}, since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('since', 0)))}); "
            f"if none runs there, delete that file")
    else:
        raise CompactionLocked(f"could not take {table}/{LOCK}")
    try:
        _step("locked")
        yield
    finally:
        store.delete(table, LOCK)


# -- settling what a compaction left ------------------------------------------

def _move_in(store: Store, table: str, src: str, dest: str) -> None:
    """Move one file to ``dest``; if a file of that name is there already it
    is the same file (names derive from content), and ``src`` is dropped."""
    try:
        store.rename(table, src, dest)
    except StoreError:
        if not store.exists(table, dest):
            raise
        store.delete(table, src)


def _finish_swap(store: Store, table: str, work: str, partition: str, spare: str) -> None:
    """Complete a three-rename swap (``Store.exchange``) that stopped with
    the old partition folder at ``spare``."""
    nested = f"{partition}/{work.rsplit('/', 1)[-1]}"
    if store.exists(table, nested):
        # HDFS moves a folder renamed onto an existing folder into it: a
        # writer re-created the partition just before the second rename.
        store.rename(table, nested, work)
    if not store.exists(table, partition):
        store.rename(table, work, partition)
    elif store.exists(table, work):
        # A writer re-created the partition between the first two renames:
        # the merged files join what it wrote.
        for name in store.list(f"{table}/{work}"):
            if "/" not in name:
                _move_in(store, table, f"{work}/{name}", f"{partition}/{name}")
        store.delete(table, work)
    store.rename(table, spare, work)


def settle(store: Store, table: str, record: str) -> None:
    """Step 4 for the record ``_tmp/<record>`` (``compact-<id>.json``), from
    wherever its compaction stopped: before the swap the partition stays as
    it was, after it (or half way through a three-rename swap) it ends up
    with the merged files and any file written into it meanwhile.
    Idempotent: a settle killed midway is redone by the next one."""
    manifest = json.loads(store.read(table, f"_tmp/{record}"))
    ident = record.removesuffix(".json")
    work = f"_tmp/{ident}"
    partition = f"hive/{manifest['partition']}"
    spare = f"{work}.swap"
    replaced, merged = set(manifest["inputs"]), set(manifest["merged"])
    if store.exists(table, spare):
        _finish_swap(store, table, work, partition, spare)
    # Before the swap the folder holds merged files only; after it, the
    # replaced ones and any file written into the partition meanwhile.
    for name in store.list(f"{table}/{work}"):
        if "/" in name:
            continue
        if name in replaced or name in merged:
            store.delete(table, f"{work}/{name}")
        else:
            _move_in(store, table, f"{work}/{name}", f"{partition}/{name}")
            log.info("kept %s/%s/%s, written during the compaction", table, partition, name)
        _step("settling")
    store.remove_aside(table, ident)        # merged files killed while written
    store.delete(table, work)
    store.delete(table, f"_tmp/{record}")


def settle_all(store: Store, table: str) -> int:
    """Settle every record a killed compaction of ``table`` left, then remove
    what one left before writing its record (``compact-<id>.json.tmp``) or
    after deleting it; return how many records. Call it holding
    ``table_lock``: a running compaction's record must not be settled."""
    records = [r for r in store.list(f"{table}/_tmp") if _RECORD_RE.fullmatch(r)]
    for record in records:
        settle(store, table, record)
        log.info("settled %s, left by a compaction that stopped early", record)
    folders = set()
    for name in store.list(f"{table}/_tmp"):
        if not _LEFTOVER_RE.fullmatch(name):
            continue
        ident, _, inner = name.partition("/")
        if inner:
            # Only merged files, unseen, are in a work folder without a record.
            if "/" in inner or not inner.startswith(MERGED_PREFIX):
                log.warning("left %s/_tmp/%s in place: not a merged file", table, name)
                continue
            folders.add(ident)
        store.delete(table, f"_tmp/{name}")
    for ident in folders:
        if not store.list(f"{table}/_tmp/{ident}"):
            store.delete(table, f"_tmp/{ident}")
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


def _plan_inputs(store: Store, folder: str, files: list[tuple[str, int]]
                 ) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each file's inputs (from its footer), and the plain files to drop
    (file -> the merged file that holds its input). Raises
    ``CompactionError`` naming a file whose footer cannot be read."""
    inputs: dict[str, list[str]] = {}
    for name, _ in files:
        try:
            inputs[name] = file_inputs(read_footer(store, folder, name), name)
        except (OSError, ValueError, StoreError, pa.ArrowException) as exc:
            raise CompactionError(f"{folder}/{name}: cannot read its footer: {exc}") from None
    held = {i: name for name, items in inputs.items() if name.startswith(MERGED_PREFIX)
            for i in items}
    duplicates = {}
    for name, items in inputs.items():
        # A plain file holds exactly the rows of its one input: if a merged
        # file holds that input too, these rows are there already.
        if not name.startswith(MERGED_PREFIX) and len(items) == 1 and items[0] in held:
            duplicates[name] = held[items[0]]
    return inputs, duplicates


def compact_partition(store: Store, plugin: registry.Pipeline, rel_dir: str,
                      files: list[tuple[str, int]], target_size: int, codec: str,
                      sort: bool) -> tuple[int, int, int, int]:
    """Steps 1-4 for one partition (hold ``table_lock``); returns (files
    out, bytes out, rows, duplicate files dropped). ``CompactionError``
    (naming the file) if a file cannot be read: the partition is left as it
    was."""
    table = plugin.table
    folder = f"{table}/hive/{rel_dir}"
    inputs, duplicates = _plan_inputs(store, folder, files)
    for name, holder in sorted(duplicates.items()):
        log.warning("%s/%s: dropped, its rows are in %s already", folder, name, holder)
    plan = []
    for group in _bins(sorted(f for f in files if f[0] not in duplicates), target_size):
        held = sorted({i for name, _ in group for i in inputs[name]})
        plan.append((group, held, f"{MERGED_PREFIX}{_digest(held)[:32]}.parquet"))
    ident = _digest([rel_dir] + [n for n, _ in files])[:16]
    record, work = f"compact-{ident}.json", f"_tmp/compact-{ident}"
    manifest = {"partition": rel_dir, "inputs": sorted(n for n, _ in files),
                "merged": [m for _, _, m in plan], "started": time.time()}
    with store.write_aside(table, f"{record}.tmp") as sink:
        sink.write(json.dumps(manifest).encode())
    store.make_visible(table, f"{record}.tmp", f"_tmp/{record}")
    _step("record")
    rows = 0
    sort_keys = [(c, "ascending") for c in getattr(plugin, "sort_by", ())] if sort else []
    for group, held, merged in plan:
        parts = []
        for name, _ in group:
            try:
                parts.append(pq.read_table(pa.BufferReader(store.read(folder, name)),
                                           schema=plugin.schema))
            except (OSError, StoreError, pa.ArrowException) as exc:
                settle(store, table, record)     # not swapped: drops the merged files
                raise CompactionError(f"{folder}/{name}: cannot read it: {exc}") from None
        data = pa.concat_tables(parts)
        if sort_keys:
            data = data.sort_by(sort_keys)
        schema = plugin.schema.with_metadata({**(plugin.schema.metadata or {}),
                                              INPUTS_KEY: json.dumps(held).encode()})
        tmp = f"compact-{ident}-{merged}.tmp"
        with store.write_aside(table, tmp) as sink:
            with pq.ParquetWriter(sink, schema, compression=codec) as writer:
                writer.write_table(data.replace_schema_metadata(schema.metadata),
                                   row_group_size=MERGED_ROW_GROUP_ROWS)
        store.make_visible(table, tmp, f"{work}/{merged}")
        rows += data.num_rows
        del data, parts
        _step("merged")
    out_bytes = sum(size for _, size, _ in store.details(f"{table}/{work}", ".parquet"))
    try:
        store.exchange(table, work, f"hive/{rel_dir}", step=_step)
    except (OSError, StoreError) as exc:
        if not store.exists(table, f"{work}.swap"):     # nothing moved
            settle(store, table, record)
            raise CompactionError(f"{folder}: could not swap in the merged files: {exc}") from None
        # Half way through three renames (a writer re-created the folder
        # between two): settle finishes the swap.
        log.warning("%s: the swap stopped half way (%s); finishing it", folder, exc)
    _step("swapped")
    settle(store, table, record)
    _step("settled")
    return len(plan), out_bytes, rows, len(duplicates)


def compact(cfg: IngestConfig, pipeline_name: str, older_than: float = DEFAULT_OLDER_THAN,
            target_size: int = DEFAULT_TARGET_SIZE, codec: str = "zstd", sort: bool = True,
            now: float | None = None) -> Summary:
    """Compact every closed partition of the pipeline's table (see
    ``compact_table``)."""
    plugin = registry.load(cfg.pipeline(pipeline_name).type)
    return compact_table(open_store(cfg.store), plugin, older_than, target_size, codec, sort, now)


def compact_table(store: Store, plugin: registry.Pipeline,
                  older_than: float = DEFAULT_OLDER_THAN, target_size: int = DEFAULT_TARGET_SIZE,
                  codec: str = "zstd", sort: bool = True, now: float | None = None) -> Summary:
    """Compact every closed partition of ``plugin.table`` that has more files
    than its size calls for, holding the table's lock (``CompactionLocked``
    if another compaction holds it) after settling what a killed one left.
    A partition that fails (an unreadable file) is logged, named in
    ``Summary.failed`` and left as it was; the others go on. ``StoreError``
    (the store unreachable) stops the run: run it again, nothing is lost."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r}: one of {', '.join(CODECS)}")
    table = plugin.table
    with table_lock(store, table):
        summary = Summary(settled=settle_all(store, table))
        depth = len(plugin.partition_schema)
        partitions: dict[str, list[tuple[str, int, float]]] = {}
        for relative, size, mtime in store.details(f"{table}/hive", ".parquet"):
            parts = relative.split("/")
            if len(parts) == depth + 1 and not any(p.startswith((".", "_")) for p in parts):
                partitions.setdefault("/".join(parts[:-1]), []).append((parts[-1], size, mtime))
        now = time.time() if now is None else now
        todo = sorted(partitions)
        with progress(len(todo), "partition", f"compact {table}") as bar:
            for done, rel_dir in enumerate(todo, 1):
                bar.update(1)
                _compact_one(store, plugin, rel_dir, partitions[rel_dir], done, len(todo),
                             older_than, target_size, codec, sort, now, summary)
                bar.set_postfix_str(f"{summary.rows:,} rows, {summary.partitions} compacted")
    return summary


def _compact_one(store: Store, plugin: registry.Pipeline, rel_dir: str, files: list,
                 done: int, count: int, older_than: float, target_size: int, codec: str,
                 sort: bool, now: float, summary: Summary) -> None:
    """One partition of ``compact_table``, counted in ``summary``."""
    table = plugin.table
    if not needs_compaction([(n, sz) for n, sz, _ in files], target_size):
        return
    if max(m for _, _, m in files) > now - older_than:
        summary.skipped_open += 1
        return
    try:
        n_out, b_out, rows, dups = compact_partition(
            store, plugin, rel_dir, [(n, s) for n, s, _ in files], target_size, codec, sort)
    except CompactionError as exc:
        log.error("%s; partition %s/hive/%s left as it is", exc, table, rel_dir)
        summary.failed.append(str(exc))
        return
    b_in = sum(s for _, s, _ in files)
    summary.partitions += 1
    summary.files_in += len(files)
    summary.files_out += n_out
    summary.bytes_in += b_in
    summary.bytes_out += b_out
    summary.rows += rows
    summary.duplicates += dups
    log.info("%s/hive/%s: %d files (%d bytes) -> %d (%d bytes), %d rows [%d/%d partitions]",
             table, rel_dir, len(files), b_in, n_out, b_out, rows, done, count)
