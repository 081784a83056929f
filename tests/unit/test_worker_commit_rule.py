"""The worker's commit rule, in-process and in milliseconds: a fake pipeline
that yields fixed batches, fails, or says "bad input" on cue, a fake
partition in memory, the real Worker, TableWriter and LocalStore.

The rule under test (spot_ingest/worker.py): the committed offset is always
that of the oldest announcement whose output is not in place; files that
cannot be converted are set aside and passed; refused records are passed;
a failure of the environment is retried and holds the offset back.
"""
from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spot_ingest import pipeline as registry
from spot_ingest.bus import Announcement
from spot_ingest.config import IngestConfig, KafkaConfig, PipelineConfig
from spot_ingest.store import LocalStore
from spot_ingest.worker import Worker

SCHEMA = pa.schema([("value", pa.int64())])
PARTS = pa.schema([("h", pa.int8())])


class FakePipeline(registry.FilePipeline):
    """Each staged file's text says what convert does: 'rows N', 'bad', 'fail
    rows N' (fails the first time), or 'wait NAME rows N' (blocks until the
    test releases NAME); words after N make contents differ."""
    type = table = "fake"
    schema, partition_schema = SCHEMA, PARTS
    failed: set = set()
    gates: dict[str, threading.Event] = {}

    def check_tools(self) -> None:
        pass

    def convert(self, path: Path, cfg):
        words = path.read_text().split()
        if words[0] == "bad":
            raise registry.BadInputError(f"{path.name} is not fake data")
        if words[0] == "fail":
            if path.name not in self.failed:
                self.failed.add(path.name)
                raise OSError("disk full (on cue)")
            words = words[1:]
        if words[0] == "wait":
            assert self.gates[words[1]].wait(10), "the test never released the gate"
            words = words[2:]
        n = int(words[1]) if len(words) > 1 else 1
        yield pa.RecordBatch.from_arrays([pa.array(range(n), pa.int64()),
                                          pa.array([1] * n, pa.int8())],
                                         schema=pa.schema(list(SCHEMA) + list(PARTS)))


@dataclass
class Record:
    offset: int
    value: bytes
    headers: list


class FakePartition:
    """One partition in memory: poll hands out records, commit keeps offsets."""

    def __init__(self):
        self.records: list[Record] = []
        self.position = 0
        self.commits: list[int] = []
        self.lock = threading.Lock()

    def add(self, value: bytes) -> int:
        with self.lock:
            self.records.append(Record(len(self.records), value, []))
            return len(self.records) - 1

    def poll(self, timeout_ms: int = 0) -> list:
        with self.lock:
            out = self.records[self.position:self.position + 16]
            self.position += len(out)
        if not out:
            time.sleep(0.005)
        return out

    def committed(self, timeout_ms=None):
        with self.lock:
            return self.commits[-1] if self.commits else None

    def commit(self, offset: int, metadata: str = "") -> None:
        with self.lock:
            self.commits.append(offset)

    def ping(self, timeout_ms: int = 0) -> None:
        pass

    def close(self) -> None:
        pass


class InProcessWorker(Worker):
    def __init__(self, cfg, partition: FakePartition, run_id: str):
        super().__init__(cfg, "fake_test", 0, run_id=run_id)
        self.partition = partition

    def _connect(self):
        return self.partition

    def _new_reader(self):
        return self.partition

    def _new_pool(self):
        return ThreadPoolExecutor(max_workers=self.processes)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setitem(registry._loaded, "fake", FakePipeline())
    FakePipeline.failed, FakePipeline.gates = set(), {}
    pcfg = PipelineConfig("fake_test", "fake", tmp_path / "collector", tmp_path / "staging", "",
                          ("*",), "t", 2, 0.0, None, True, None)
    cfg = IngestConfig(tmp_path / "c.json", "db", str(tmp_path / "store"), 1, 1.0, {},
                       KafkaConfig("127.0.0.1", 9), {"fake_test": pcfg})
    store = LocalStore(cfg.hdfs_app_path)
    store.mark()
    return cfg, store, tmp_path


def announce(partition: FakePartition, store: LocalStore, tmp_path: Path, name: str,
             text: str, **override) -> int:
    src = tmp_path / "src" / name
    src.parent.mkdir(exist_ok=True)
    src.write_text(text)
    staged = store.stage(src, "fake", name, time.time())
    ann = Announcement("fake_test", "fake", staged.location, staged.size, staged.sha256, name,
                       int(time.time() * 1000), "test")
    for key, value in override.items():
        setattr(ann, key, value)
    return partition.add(ann.encode())


def run(cfg, partition, timeout: float = 20) -> tuple[int, InProcessWorker]:
    partition.add(Announcement.end_of_run("fake_test", "fake", "run1", "test").encode())
    worker = InProcessWorker(cfg, partition, "run1")
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("code", worker.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        worker.stopping = True
        raise AssertionError("the worker did not finish its run")
    return done["code"], worker


def rows(store: LocalStore) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows
               for f in (store.root / "fake" / "hive").rglob("*.parquet"))


def test_all_loaded_and_committed_past_the_end_marker(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    for i in range(5):
        announce(part, store, tmp, f"f{i}", f"rows {10 + i}")
    code, _ = run(cfg, part)
    assert code == 0
    assert rows(store) == sum(range(10, 15))
    assert part.commits[-1] == 6, "past the five files and the marker"
    assert part.commits == sorted(part.commits)


def test_commit_never_passes_an_unfinished_file(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    FakePipeline.gates["first"] = threading.Event()
    announce(part, store, tmp, "slow", "wait first rows 3")
    for i in range(3):
        announce(part, store, tmp, f"quick{i}", f"rows 2 {i}")
    part.add(Announcement.end_of_run("fake_test", "fake", "run1", "test").encode())
    worker = InProcessWorker(cfg, part, "run1")
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while rows(store) < 6 and time.monotonic() < deadline:    # the three quick ones
        time.sleep(0.01)
    assert rows(store) == 6
    assert all(c == 0 for c in part.commits) or not part.commits, \
        "nothing is committed while offset 0 is unfinished"
    FakePipeline.gates["first"].set()
    thread.join(10)
    assert not thread.is_alive()
    assert part.commits[-1] == 5 and rows(store) == 9


def test_bad_input_is_set_aside_and_passed(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    announce(part, store, tmp, "good", "rows 4")
    announce(part, store, tmp, "broken", "bad")
    announce(part, store, tmp, "after", "rows 1")
    code, worker = run(cfg, part)
    assert code == 3 and worker.counts["quarantined"] == 1
    assert rows(store) == 5 and part.commits[-1] == 4
    reasons = list((store.root / "fake" / "quarantine").rglob("*.reason.txt"))
    assert len(reasons) == 1 and "broken is not fake data" in reasons[0].read_text()


def test_a_failing_environment_is_retried_and_holds_the_offset(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    announce(part, store, tmp, "flaky", "fail rows 2")
    announce(part, store, tmp, "fine", "rows 3")
    code, worker = run(cfg, part, timeout=30)
    assert code == 0 and rows(store) == 5
    assert FakePipeline.failed == {next(iter(FakePipeline.failed))}
    assert part.commits[-1] == 3


def test_refused_records_are_passed_and_kept(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    announce(part, store, tmp, "forged", "rows 7", sha256="f" * 64)
    announce(part, store, tmp, "escape", "rows 7", staged_path="fake/binary/../hive")
    part.add(b"not an announcement")
    announce(part, store, tmp, "real", "rows 2")
    code, worker = run(cfg, part)
    assert code == 3 and worker.counts["refused"] == 3
    assert rows(store) == 2 and part.commits[-1] == 5
    assert len(list((store.root / "fake" / "refused").rglob("*.json"))) == 3


def test_the_same_file_twice_yields_its_rows_once(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    announce(part, store, tmp, "twice", "rows 6")
    announce(part, store, tmp, "twice", "rows 6")
    code, _ = run(cfg, part)
    assert code == 0 and rows(store) == 6
    assert hashlib.sha256(b"rows 6").hexdigest()[:32] in \
        next((store.root / "fake" / "hive").rglob("*.parquet")).name


def test_unreadable_file_under_a_forged_checksum_is_refused_not_moved(setup):
    cfg, store, tmp = setup
    part = FakePartition()
    announce(part, store, tmp, "broken", "bad", sha256="e" * 64)
    code, worker = run(cfg, part)
    assert code == 3 and worker.counts == {"loaded": 0, "quarantined": 0, "refused": 1, "rows": 0}
    assert not (store.root / "fake" / "quarantine").exists()
    assert len(list((store.root / "fake" / "binary").rglob("*broken"))) == 1, "left in place"


def test_a_refusal_the_store_cannot_keep_is_never_committed_past(setup, monkeypatch):
    """The store is away (HDFS down) when a bad record must be kept as a dead
    letter, and the worker is told to stop: the record is read again at the
    next start, not committed over and lost."""
    from spot_ingest.store import StoreUnavailable
    cfg, store, tmp = setup
    part = FakePartition()
    good = announce(part, store, tmp, "f0", "rows 3")
    bad = part.add(b"not an announcement")
    part.add(b"not one either")
    worker = InProcessWorker(cfg, part, "run1")
    worker.store = store

    def away(*args, **kwargs):
        worker.stopping = True     # a stop arrives while the store is away
        raise StoreUnavailable("the store is not reachable", 0.01)
    monkeypatch.setattr(store, "refuse", away)
    advanced = []
    worker.committer = type("C", (), {"advance": lambda self, p: advanced.append(p)})()
    for record in part.records:
        worker._accept(record)
    worker.in_flight.pop(good)     # as if loaded
    worker._commit()
    assert advanced == [bad], "committed up to the refused record, not past it"
    assert worker.counts["refused"] == 0
