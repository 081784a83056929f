"""``spot-ingest reassign -t PIPELINE --from A --to B``: the backlog of a
worker that is gone for good, moved to another worker's partition, keeping
the commit rule (README: On a cluster, "A worker host lost for good").

1. The records of partition A between the worker group's committed offset
   and the end are read, and each (its value and headers, so a signature
   stays valid) is published to partition B, each acknowledged by the broker
   (acks=all). End-of-run markers are not moved: they belong to A's reader.
2. If A's committed offset moved meanwhile, A's worker is running: nothing is
   committed, and the command says so (the copies on B are harmless: a file
   loaded twice lands on the same output name, so no row is doubled).
3. Only then is A's offset committed at the end read in step 1, and A is
   marked retired in the store (``<table>/_workers/<pipeline>/retired-A.json``):
   the master's balancer sends it no new work until a worker A starts again
   (it removes the mark and says so).

A crash at any point is repaired by running the command again: records
already copied are copied again, and loading them again changes nothing.
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
    records: int = 0
    markers: int = 0
    first: int | None = None
    end: int = 0


def reassign(cfg: IngestConfig, pcfg: PipelineConfig, source: int, target: int,
             store: Store) -> Moved:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from .bus import END_OF_RUN, Announcement, await_ack, group_id
    from .kafka_security import client_kwargs
    if isinstance(registry.load(pcfg.type), registry.RecordPipeline):
        raise ReassignError(f"pipeline {pcfg.name} ({pcfg.type}) is read by one streaming job "
                            f"from every partition: there is no worker backlog to move")
    if source == target:
        raise ReassignError("--from and --to name the same partition")
    kafka = cfg.kafka
    consumer = KafkaConsumer(**client_kwargs(kafka), group_id=group_id(pcfg.name),
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             client_id=f"spot-reassign-{pcfg.name}", max_poll_records=200)
    producer = None
    try:
        partitions = consumer.partitions_for_topic(pcfg.topic)
        if partitions is None:
            raise ReassignError(f"topic {pcfg.topic} does not exist")
        for p in (source, target):
            if p not in partitions:
                raise ReassignError(f"topic {pcfg.topic} has no partition {p} "
                                    f"(partitions 0-{max(partitions)})")
        src = TopicPartition(pcfg.topic, source)
        consumer.assign([src])
        committed = consumer.committed(src, timeout_ms=10_000)
        start = committed if committed is not None else consumer.beginning_offsets([src])[src]
        end = consumer.end_offsets([src])[src]
        moved = Moved(end=end)
        if start < end:
            producer = KafkaProducer(**client_kwargs(kafka), acks="all", linger_ms=0, retries=5,
                                     max_request_size=max(kafka.message_size, 1_000_000),
                                     client_id=f"spot-reassign-{pcfg.name}")
            consumer.seek(src, start)
            while consumer.position(src) < end:
                for record in consumer.poll(timeout_ms=2000).get(src, []):
                    if record.offset >= end:
                        break
                    try:
                        is_marker = Announcement.decode(record.value).kind == END_OF_RUN
                    except Exception:   # not an announcement: B's worker refuses it as A's would
                        is_marker = False
                    if is_marker:
                        moved.markers += 1
                        continue
                    await_ack(producer.send(pcfg.topic, record.value, partition=target,
                                            headers=list(record.headers or [])),
                              f"copy of offset {record.offset}")
                    moved.first = record.offset if moved.first is None else moved.first
                    moved.records += 1
        held = consumer.committed(src, timeout_ms=10_000)
        if held != committed:
            raise ReassignError(
                f"partition {source}'s committed offset moved from {start} to {held} while its "
                f"backlog was copied: its worker is running. Stop it (or make sure its host is "
                f"gone) and run this again; the {moved.records} record(s) copied to partition "
                f"{target} load once (a file loaded twice lands on the same output)")
        meta = json.dumps({"t": round(time.time(), 3), "reassigned_to": target,
                           "host": socket.gethostname()}, separators=(",", ":"))
        consumer.commit({src: OffsetAndMetadata(end, meta, -1)})
        retire(store, pcfg, source, target)
        return moved
    finally:
        if producer is not None:
            producer.close(timeout=10)
        consumer.close(autocommit=False)


def main(argv=None) -> int:
    import argparse

    from .cli import _common, _load
    from .logs import setup_logging
    from .policy import ExitCode
    from .store import StoreError, open_store
    parser = argparse.ArgumentParser(prog="spot-ingest reassign", description=
        "Move the backlog of a worker that is gone for good to another worker's partition "
        "(README: On a cluster). Stop the worker of --from first.")
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
    print(f"{pcfg.name}: moved {moved.records} record(s) of partition {args.source} "
          + (f"(offsets {moved.first} to {moved.end - 1}) " if moved.records else "")
          + f"to partition {args.target}"
          + (f"; {moved.markers} end-of-run marker(s) left" if moved.markers else "")
          + f"; partition {args.source} committed at {moved.end} and retired: the master sends it "
            f"no new work until a worker {args.source} starts again")
    return ExitCode.OK
