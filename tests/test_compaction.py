"""Compaction (spot-ingest compact) on tables made by real ingest runs of
real nfcapd files: fewer files, the same rows, re-delivery never doubles, a
damaged file stops its partition only, and a compaction SIGKILLed at any
step never shows a reader missing or doubled rows.

The kills use the test hooks of spot_ingest.compaction: PAUSE_ENV makes the
compaction say "compaction at <step>" on stderr and wait there to be killed;
ANNOUNCE_ENV makes it say so at every step and go on (then it is killed a
random few milliseconds later, wherever it is)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import REPO, STORES, kill_group
from reference import flow_reference_rows, flow_table_rows
from test_end_to_end import drop
from spot_ingest.compaction import ANNOUNCE_ENV, LOCK, PAUSE_ENV
from spot_ingest.pipelines.flow.sample import make_nfcapd_file
from spot_ingest.warehouse import INPUTS_KEY


@pytest.fixture(scope="module")
def twelve(tmp_path_factory) -> list[Path]:
    """Twelve nfcapd files of one run of a router (one per 5 minutes, as rotated)."""
    root = tmp_path_factory.mktemp("twelve")
    return [make_nfcapd_file(root / f"nfcapd.2026112210{i * 5:02d}", 400 + 50 * i, seed=300 + i)
            for i in range(12)]


def once(env) -> subprocess.CompletedProcess:
    result = subprocess.run([str(REPO / "start_standalone_ingest.sh"), env.pipeline, "2", "--once",
                             "-c", str(env.config)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def compact(env, *args, check=True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "spot_ingest.cli", "compact", "-t", env.pipeline,
                           "-c", str(env.config), "--older-than", "0", *args],
                          capture_output=True, text=True, timeout=300, cwd=REPO, **kw)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def files_per_partition(hive: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for f in sorted(hive.rglob("*.parquet")):
        if "_tmp" not in f.parts:
            found.setdefault(str(f.parent.relative_to(hive)), []).append(f.name)
    return found


@pytest.mark.parametrize("store", STORES, indirect=True)
def test_twelve_files_become_one_and_a_redelivered_file_does_not_double(env, twelve):
    for f in twelve:
        drop(env, f, f.name)
    once(env)
    expected = flow_reference_rows(twelve)
    assert flow_table_rows(env.table()) == expected
    before = files_per_partition(env.hive)
    assert sum(len(v) for v in before.values()) >= 12

    done = compact(env)
    after = files_per_partition(env.hive)
    assert set(after) == set(before)
    assert all(len(names) == 1 and names[0].startswith("merged-") for names in after.values()), after
    assert flow_table_rows(env.table()) == expected
    assert f"-> {len(after)} files" in done.stdout
    merged = next(env.hive.rglob("merged-*.parquet"))
    meta = pq.read_metadata(merged)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    sips = pq.read_table(merged, columns=["sip"]).column("sip").to_pylist()
    assert sips == sorted(sips), "rows are sorted on sip"
    held = set(json.loads(meta.metadata[INPUTS_KEY]))
    assert held == {n.removesuffix(".parquet") for n in
                    before[str(merged.parent.relative_to(env.hive))]}
    assert not list(env.warehouse.rglob("compact-*"))

    # One of the twelve delivered again after its hour was compacted.
    drop(env, twelve[3], twelve[3].name)
    result = once(env)
    assert flow_table_rows(env.table()) == expected
    assert files_per_partition(env.hive) == after
    logs = "".join(env.log(f"{env.pipeline}-worker-{i}.log") for i in (0, 1))
    assert "already held by" in logs, result.stdout
    # Nothing left to compact.
    assert "compacted 0 partition(s)" in compact(env).stdout


class Reader(threading.Thread):
    """Reads the table over and over, as an analyst's query would (DuckDB's
    ``read_parquet`` over the hive folder, and pyarrow.dataset, by turns),
    and keeps every answer that differs from the first: row count and a
    multiset digest of all rows (the sum of the rows' hashes). A file that
    went between listing and reading makes it ask again; an empty listing
    is an answer (rows missing)."""

    def __init__(self, hive: Path):
        super().__init__(daemon=True)
        self.hive = hive
        self.con = duckdb.connect()
        self.expected = (self.duckdb(), self.arrow())
        self.reads = self.retries = 0
        self.wrong: list[tuple] = []
        self.stop = threading.Event()
        self.go = threading.Event()
        self.idle = threading.Event()
        self.go.set()

    def duckdb(self) -> tuple:
        try:
            return tuple(self.con.execute(
                f"SELECT count(*), sum(hash(t)::HUGEINT) FROM read_parquet("
                f"'{self.hive}/**/*.parquet', hive_partitioning=true) t").fetchone())
        except duckdb.IOException as exc:
            if "No files found" in str(exc):
                return (0, None)
            raise FileNotFoundError(str(exc)) from None

    def arrow(self) -> tuple:
        rows = ds.dataset(self.hive, format="parquet", partitioning="hive",
                          exclude_invalid_files=False).to_table()
        if rows.num_rows == 0:
            return (0, None)
        return tuple(duckdb.sql("SELECT count(*), sum(hash(t)::HUGEINT) FROM rows t").fetchall()[0])

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.go.is_set():
                self.idle.set()
                self.go.wait()
                continue
            self.idle.clear()
            which = self.reads % 2
            try:
                answer = self.duckdb() if which == 0 else self.arrow()
            except (FileNotFoundError, pa.ArrowInvalid, OSError):
                self.retries += 1    # a file went between listing and reading: ask again
                continue
            except Exception as exc:     # noqa: BLE001 - the test reports it
                self.wrong.append(("error", repr(exc)))
                continue
            self.reads += 1
            if answer != self.expected[which]:
                self.wrong.append(answer)

    def pause(self) -> None:
        self.go.clear()
        self.idle.wait(30)

    def resume(self) -> None:
        self.go.set()


def start_compaction(env, hook: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "spot_ingest.cli", "compact", "-t",
                             env.pipeline, "-c", str(env.config), "--older-than", "0"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **hook}, start_new_session=True)


def wait_for_step(proc: subprocess.Popen, step: str) -> bool:
    """Read the compaction's stderr until it reports ``step``; False if it
    ended first."""
    for line in proc.stderr:
        if line.strip() == f"compaction at {step}":
            return True
    return False


def kill(proc: subprocess.Popen) -> None:
    kill_group(proc.pid)
    proc.wait()
    proc.stderr.close()


# Where the kills land: (step, n-th time, mode). "at": killed while waiting
# at the step; "after": killed a random 0-300 ms after it announced the step.
STEPS_WITH_RECORD = ("record", "merged", "swapped", "settling")


def kill_points(rng: random.Random, count: int) -> list[tuple[str, int, str]]:
    points = [("record", 1, "at"), ("merged", 1, "at"), ("swapped", 1, "at"),
              ("settling", rng.randint(1, 12), "at"), ("locked", 1, "after"),
              ("merged", 1, "after")]
    steps = ("locked", "record", "merged", "swapped", "settling", "settled")
    while len(points) < count:
        step = rng.choice(steps)
        points.append((step, rng.randint(1, 12) if step == "settling" else 1,
                       rng.choice(("at", "after"))))
    return points


def test_compaction_killed_at_random_points_never_shows_readers_wrong_rows(make_env, twelve,
                                                                          tmp_path):
    env = make_env("flow", store="local")
    for f in twelve:
        drop(env, f, f.name)
    once(env)
    reference = flow_reference_rows(twelve)
    assert flow_table_rows(env.table()) == reference
    originals = tmp_path / "originals"
    shutil.copytree(env.hive, originals)
    aside = env.warehouse / "flow" / "_tmp"
    reader = Reader(env.hive)
    assert reader.expected[0][0] == len(reference)
    reader.start()
    rng = random.Random(20261122)
    points = kill_points(rng, 12)
    try:
        for step, nth, mode in points:
            if mode == "at":
                proc = start_compaction(env, {PAUSE_ENV: f"{step}:{nth}"})
                assert wait_for_step(proc, step), f"the compaction never reached {step}"
            else:
                proc = start_compaction(env, {ANNOUNCE_ENV: "1"})
                assert wait_for_step(proc, step), f"the compaction never reached {step}"
                try:
                    proc.wait(timeout=rng.uniform(0, 0.3))
                except subprocess.TimeoutExpired:
                    pass
            kill(proc)
            if mode == "at" and step in STEPS_WITH_RECORD:
                assert list(aside.glob("compact-*.json")), f"killed at {step}: its record is left"
            # The next run takes over the lock, settles what the killed one
            # left, and finishes: one file per hour, the same rows, nothing aside.
            done = compact(env)
            assert all(len(v) == 1 and v[0].startswith("merged-")
                       for v in files_per_partition(env.hive).values()), done.stdout
            assert flow_table_rows(env.table()) == reference, f"after a kill at {step}"
            assert not list(aside.glob("compact*")), list(aside.iterdir())
            # Back to twelve files for the next kill (the reader waits meanwhile).
            reader.pause()
            shutil.rmtree(env.hive)
            shutil.copytree(originals, env.hive)
            reader.resume()
    finally:
        reader.stop.set()
        reader.resume()
        reader.join(30)
    assert reader.wrong == [], f"a reader saw {reader.wrong[:3]}, not {reader.expected}"
    assert reader.reads >= 50, (reader.reads, reader.retries)


def test_a_damaged_file_stops_its_partition_only_and_the_exit_code_says_so(make_env, twelve):
    env = make_env("flow", store="local")
    for f in twelve[:4]:
        drop(env, f, f.name)
    once(env)
    before = files_per_partition(env.hive)
    rel_dir, names = max(before.items(), key=lambda item: len(item[1]))
    bad = env.hive / rel_dir / names[1]
    content = bytearray(bad.read_bytes())
    content[4:len(content) // 2] = b"\xab" * (len(content) // 2 - 4)      # pages garbled
    bad.write_bytes(bytes(content))
    done = compact(env, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"flow/hive/{rel_dir}/{names[1]}" in done.stderr
    assert "1 partition(s) failed" in done.stdout
    assert files_per_partition(env.hive)[rel_dir] == names, "the partition is left as it was"
    assert bad.read_bytes() == bytes(content)
    assert not list((env.warehouse / "flow" / "_tmp").glob("compact*"))


def test_hdfs_compaction_killed_between_its_renames_is_finished_by_the_next_run(
        make_env, twelve, tmp_path):
    """WebHDFS has no atomic swap: three renames. A compaction killed between
    them (the partition moved away, or the merged files in place and the old
    ones not yet moved into the work folder) is finished by the next run."""
    env = make_env("flow", store="hdfs")
    for f in twelve[:6]:
        drop(env, f, f.name)
    once(env)
    reference = flow_reference_rows(twelve[:6])
    originals = tmp_path / "originals"
    shutil.copytree(env.hive, originals)
    for step in ("exchange-1", "exchange-2", "settling"):
        proc = start_compaction(env, {PAUSE_ENV: step})
        assert wait_for_step(proc, step), f"the compaction never reached {step}"
        kill(proc)
        rel_dir = next(iter(files_per_partition(originals)))
        if step == "exchange-1":     # the window: the partition is away
            assert not (env.hive / rel_dir).exists()
        else:
            assert flow_table_rows(env.table()) == reference
        assert (env.warehouse / "flow" / LOCK).exists()
        compact(env)
        assert all(len(v) == 1 for v in files_per_partition(env.hive).values())
        assert flow_table_rows(env.table()) == reference, f"after a kill at {step}"
        assert not list((env.warehouse / "flow" / "_tmp").glob("compact*"))
        shutil.rmtree(env.hive)
        shutil.copytree(originals, env.hive)
