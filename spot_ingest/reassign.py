"""``spot-ingest reassign -t PIPELINE --from A --to B``: the backlog of a
worker that is gone for good, moved to another worker's partition, keeping
the commit rule (README: On a cluster, "A worker host lost for good").

The operator first makes sure worker A is not running (its host is down, or
it was stopped). Then, in this one place (``reassign``):

1. Partition A's committed offset (the worker group's, read with the
   pipeline's group id, assigned, no group join) and its end are read: the
   backlog is the records in [committed, end).
2. Each of those records, its value and its headers (so that the master's
   HMAC signature, which covers the value, stays valid), is published to
   partition B and acknowledged by the broker (acks=all) before the next is
   read. End-of-run markers are not moved: a marker tells A's reader that a
   ``--once`` run is over; B got its own marker of that run from the master,
   and a copy would only be a second one.
3. A's committed offset is read again. If it moved, A's worker is running:
   nothing is committed and the command says so (the copies on B are
   harmless: a file loaded twice lands on the same output name, named after
   its checksum, so no row is doubled).
4. Only then is A's offset committed at the end read in step 1, with
   metadata naming the partition the backlog went to, and read back (another
   value: A's worker committed meanwhile, and the command says so).
5. A is marked retired in the store
   (``<table>/_workers/<pipeline>/retired-A.json``): the master's balancer
   sends it no new work until a worker A starts again (it removes the mark
   and says so).

A crash at any point is repaired by running the command again: before step
4, the records are copied again (B then holds some twice and loads each file
again onto the same output: no row doubled); after it, there is nothing
left to copy and the mark is written. What this cannot see: a worker A that
is alive but commits nothing while the command runs (busy on one long file)
and commits after step 4 moves A's offset back; it then loads its backlog
itself as well as B, which is twice the work but, for the same reason, never
twice the rows.

Record pipelines (proxy, squid) have no worker backlog: one streaming job
reads every partition; the command refuses them.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass

from . import pipeline as registry
from .config import IngestConfig, PipelineConfig
from .store import Store

log = logging.getLogger("spot_ingest.reassign")

WORKERS_DIR = "_workers"


class ReassignError(Exception):
    pass


def _mark(pcfg: PipelineConfig, partition: int) -> tuple[str, str]:
    table = registry.load(pcfg.type).table
    return f"{table}/{WORKERS_DIR}", f"{pcfg.name}/retired-{partition}.json"


def retired_partitions(store: Store, pcfg: PipelineConfig) -> set[int]:
    """Partitions whose worker is gone for good (reassigned, not back)."""
    area, relative = _mark(pcfg, 0)
    folder = relative.rsplit("/", 1)[0]
    found = set()
    for name in store.list(area, ".json"):
        stem = name.rsplit("/", 1)[-1]
        if name.startswith(folder + "/") and stem.startswith("retired-"):
            try:
                found.add(int(stem[len("retired-"):-len(".json")]))
            except ValueError:
                continue
    return found


def retire(store: Store, pcfg: PipelineConfig, partition: int, to: int) -> None:
    area, relative = _mark(pcfg, partition)
    store.delete(area, relative)
    store.create(area, relative, json.dumps({
        "partition": partition, "backlog_to": to, "time": time.time(),
        "by": socket.gethostname()}).encode())


def rejoin(store: Store, pcfg: PipelineConfig, partition: int) -> bool:
    """A worker of ``partition`` starts: not retired any more. True if it was."""
    area, relative = _mark(pcfg, partition)
    if not store.exists(area, relative):
        return False
    store.delete(area, relative)
    return True


@dataclass
class Moved:
    records: int = 0          # copied to the target partition
    markers: int = 0          # end-of-run markers left where they were
    first: int | None = None  # the first and last source offsets copied
    last: int | None = None
    start: int = 0            # the backlog: [start, end) of the source partition
    end: int = 0
    to_first: int | None = None   # where the copies landed on the target partition
    to_last: int | None = None


READ_STALL_SECONDS = 60.0    # no record read for this long: give up, commit nothing


def reassign(cfg: IngestConfig, pcfg: PipelineConfig, source: int, target: int,
             store: Store) -> Moved:
    """Move partition ``source``'s backlog to partition ``target`` (the steps
    are in the module's docstring). Raises ReassignError when it cannot or
    must not go on: before step 4 nothing was committed; at step 4's read-back
    the commit was made and another one followed it."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata

    from .bus import END_OF_RUN, Announcement, await_ack, group_id
    from .kafka_security import client_kwargs
    if isinstance(registry.load(pcfg.type), registry.RecordPipeline):
        raise ReassignError(f"pipeline {pcfg.name} ({pcfg.type}) is read by one streaming job "
                            f"from every partition: there is no worker backlog to move, nothing "
                            f"to reassign")
    if source == target:
        raise ReassignError("--from and --to name the same partition")
    if source < 0 or target < 0:
        raise ReassignError("partitions (worker ids) are numbered from 0")
    if target in retired_partitions(store, pcfg):
        raise ReassignError(f"partition {target} is retired itself (its worker is gone; see "
                            f"{_mark(pcfg, target)[1]} in the store): choose a partition whose "
                            f"worker runs")
    kafka = cfg.kafka
    consumer = producer = None
    try:
        consumer = KafkaConsumer(**client_kwargs(kafka), group_id=group_id(pcfg.name),
                                 enable_auto_commit=False, auto_offset_reset="earliest",
                                 client_id=f"spot-reassign-{pcfg.name}", max_poll_records=200)
        partitions = consumer.partitions_for_topic(pcfg.topic)
        if partitions is None:
            raise ReassignError(f"topic {pcfg.topic} does not exist")
        for p in (source, target):
            if p not in partitions:
                raise ReassignError(f"topic {pcfg.topic} has no partition {p} "
                                    f"(partitions 0-{max(partitions)})")
        src = TopicPartition(pcfg.topic, source)
        consumer.assign([src])
        # 1. the backlog
        committed = consumer.committed(src, metadata=True, timeout_ms=10_000)
        start = committed.offset if committed is not None \
            else consumer.beginning_offsets([src])[src]
        end = consumer.end_offsets([src])[src]
        moved = Moved(start=start, end=end)
        # 2. each record copied and acknowledged
        if start < end:
            producer = KafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=0, retries=5,
                                     max_request_size=max(kafka.message_size, 1_000_000),
                                     client_id=f"spot-reassign-{pcfg.name}")
            consumer.seek(src, start)
            progress = time.monotonic()
            while consumer.position(src) < end:
                records = consumer.poll(timeout_ms=2000).get(src, [])
                if records:
                    progress = time.monotonic()
                elif time.monotonic() - progress > READ_STALL_SECONDS:
                    raise ReassignError(
                        f"no record of partition {source} could be read for "
                        f"{READ_STALL_SECONDS:.0f} s (at offset {consumer.position(src)} of "
                        f"{end}); nothing committed: run this again")
                for record in records:
                    if record.offset >= end:
                        break
                    try:
                        is_marker = Announcement.decode(record.value).kind == END_OF_RUN
                    except Exception:   # not an announcement: B's worker refuses it as A's would
                        is_marker = False
                    if is_marker:
                        moved.markers += 1
                        continue
                    meta = await_ack(producer.send(pcfg.topic, record.value, partition=target,
                                                   headers=list(record.headers or [])),
                                     f"copy of offset {record.offset}")
                    moved.first = record.offset if moved.first is None else moved.first
                    moved.last = record.offset
                    moved.to_first = meta.offset if moved.to_first is None else moved.to_first
                    moved.to_last = meta.offset
                    moved.records += 1
                    log.debug("copied offset %d of partition %d to offset %d of partition %d",
                              record.offset, source, meta.offset, target)
        # 3. nobody else committed meanwhile
        held = consumer.committed(src, metadata=True, timeout_ms=10_000)
        if _key(held) != _key(committed):
            raise ReassignError(
                f"partition {source}'s committed offset moved from {start} to "
                f"{held.offset if held is not None else None} while its backlog was copied: its "
                f"worker is running. Stop it (or make sure its host is gone) and run this again; "
                f"nothing was committed, and the {moved.records} record(s) copied to partition "
                f"{target} load once (a file loaded twice lands on the same output)")
        # 4. commit the end read in step 1, and read it back
        note = json.dumps({"t": round(time.time(), 3), "reassigned_to": target,
                           "host": socket.gethostname()}, separators=(",", ":"))
        consumer.commit({src: OffsetAndMetadata(end, note, -1)})
        after = consumer.committed(src, timeout_ms=10_000)
        if after != end:
            raise ReassignError(
                f"partition {source} was committed at {end}, but the broker now holds {after}: "
                f"its worker is running and committed too. Stop it and run this again (its "
                f"files load once: a file loaded twice lands on the same output)")
        # 5. no new work for it
        retire(store, pcfg, source, target)
        return moved
    except KafkaError as exc:
        raise ReassignError(f"Kafka at {kafka.bootstrap} did not answer or refused ({exc}); "
                            f"run this again when it answers (records copied before a failure "
                            f"load once: no row is doubled)") from None
    finally:
        if producer is not None:
            producer.close(timeout=10)
        if consumer is not None:
            consumer.close(autocommit=False)


def _key(committed) -> tuple | None:
    """What tells two reads of a committed offset apart: the offset and its
    metadata (a worker's commit carries its time)."""
    return None if committed is None else (committed.offset, committed.metadata)


def summary_line(pipeline: str, source: int, target: int, moved: Moved) -> str:
    return (f"{pipeline}: moved {moved.records} record(s) of partition {source} "
            + (f"(offsets {moved.first} to {moved.last}) " if moved.records else "")
            + f"to partition {target}"
            + (f" (offsets {moved.to_first} to {moved.to_last})" if moved.records else "")
            + (f"; {moved.markers} end-of-run marker(s) not moved (they belong to partition "
               f"{source}'s reader)" if moved.markers else "")
            + f"; partition {source} committed at {moved.end} and retired: the master sends it "
              f"no new work until a worker {source} starts again")


def main(argv=None) -> int:
    import argparse

    from .cli import _common, _load
    from .logs import setup_logging
    from .policy import ExitCode
    from .store import StoreError, open_store
    parser = argparse.ArgumentParser(prog="spot-ingest reassign", description=
        "Move the backlog of a worker that is gone for good (the records of its partition "
        "after its committed offset) to another worker's partition, then commit it and mark it "
        "retired: the master sends it no new work until that worker starts again. Stop the "
        "worker of --from first, or make sure its host is gone. Safe to run again after a "
        "failure: nothing is lost, no row doubled (README: On a cluster).")
    _common(parser)
    parser.add_argument("--from", dest="source", type=int, required=True, metavar="N",
                        help="the partition (worker id) whose worker is gone")
    parser.add_argument("--to", dest="target", type=int, required=True, metavar="M",
                        help="the partition (worker id) that takes its backlog")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    cfg = _load(args, check_paths=False)
    pcfg = cfg.pipeline(args.type)
    try:
        moved = reassign(cfg, pcfg, args.source, args.target, open_store(cfg.store))
    except (ReassignError, StoreError) as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
    print(summary_line(pcfg.name, args.source, args.target, moved))
    return ExitCode.OK
