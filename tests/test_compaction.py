"""Compaction (spot-ingest compact) on tables made by real ingest runs of
real nfcapd files: fewer files, the same rows, re-delivery never doubles, and
a compaction killed at any step never shows a reader missing or doubled rows."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import REPO, STORES, kill_group
from reference import flow_reference_rows, flow_table_rows
from test_end_to_end import drop
from spot_ingest.compaction import STEP_DELAY_ENV
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


def _signature(table: pa.Table) -> tuple:
    return (table.num_rows, sum(table.column("ibyt").to_pylist()),
            sum(table.column("ipkt").to_pylist()), len(set(table.column("sip").to_pylist())))


class Reader(threading.Thread):
    """Reads the table over and over, as an analyst's query would, and keeps
    every answer that differs from the expected one."""

    def __init__(self, hive: Path, expected: tuple):
        super().__init__(daemon=True)
        self.hive, self.expected = hive, expected
        self.reads = self.retries = 0
        self.wrong: list[tuple] = []
        self.stop = threading.Event()
        self.go = threading.Event()
        self.idle = threading.Event()
        self.go.set()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.go.is_set():
                self.idle.set()
                self.go.wait()
                continue
            self.idle.clear()
            try:
                table = ds.dataset(self.hive, format="parquet", partitioning="hive",
                                   exclude_invalid_files=False).to_table()
            except (FileNotFoundError, pa.ArrowInvalid, OSError):
                self.retries += 1    # a file went between listing and reading: ask again
                continue
            self.reads += 1
            if _signature(table) != self.expected:
                self.wrong.append(_signature(table))

    def pause(self) -> None:
        self.go.clear()
        self.idle.wait(30)

    def resume(self) -> None:
        self.go.set()


def test_compaction_killed_at_random_points_never_shows_readers_wrong_rows(make_env, twelve,
                                                                          tmp_path):
    env = make_env("flow", store="local")
    for f in twelve:
        drop(env, f, f.name)
    once(env)
    originals = tmp_path / "originals"
    shutil.copytree(env.hive, originals)
    expected = _signature(env.table())
    reader = Reader(env.hive, expected)
    reader.start()
    rng = random.Random(20261122)
    left_midway = 0
    try:
        for attempt in range(12):
            proc = subprocess.Popen([sys.executable, "-m", "spot_ingest.cli", "compact", "-t",
                                     env.pipeline, "-c", str(env.config), "--older-than", "0"],
                                    cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env={**os.environ, STEP_DELAY_ENV: "0.5"},
                                    start_new_session=True)
            try:
                proc.wait(timeout=rng.uniform(1.0, 3.2))
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                proc.wait()
            left_midway += bool(list((env.warehouse / "flow" / "_tmp").glob("compact-*.json")))
            # The next run settles what the killed one left, and finishes.
            compact(env)
            assert all(len(v) == 1 for v in files_per_partition(env.hive).values())
            assert not list((env.warehouse / "flow" / "_tmp").glob("compact-*"))
            # Back to twelve files for the next attempt (the reader waits meanwhile).
            reader.pause()
            shutil.rmtree(env.hive)
            shutil.copytree(originals, env.hive)
            reader.resume()
    finally:
        reader.stop.set()
        reader.resume()
        reader.join(30)
    assert reader.wrong == [], f"a reader saw {reader.wrong[:3]}, not {expected}"
    assert reader.reads >= 50
    assert left_midway >= 3, "kills landed in the middle of a compaction"
    assert flow_table_rows(env.table()) == flow_reference_rows(twelve)
