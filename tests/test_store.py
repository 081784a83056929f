"""The store's checks and housekeeping, in-process (no broker, no tools)."""
from __future__ import annotations

import os
import time

import pytest

from spot_ingest.store import (MARKER, LocalStore, RefusedInput, StoreUnavailable, bounded_name,
                               set_aside)


@pytest.fixture
def store(tmp_path):
    s = LocalStore(str(tmp_path / "store"))
    s.mark()
    return s


def stage(store, tmp_path, name: str, content: bytes, when: float = 1763700000):
    src = tmp_path / "src" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(content)
    return store.stage(src, "flow", name, when)


def test_staged_location_is_relative_and_opens(store, tmp_path):
    staged = stage(store, tmp_path, "nfcapd.1", b"x" * 100)
    assert not staged.location.startswith("/")
    rel = store.staged_relative(staged.location, "flow")
    assert rel == staged.location
    assert store.staged_relative(str(store.root / rel), "flow") == rel   # older masters
    assert store.staged_relative(rel.replace("/binary/", "/binary/./"), "flow") == rel
    fd = store.open_staged(rel)
    try:
        assert os.read(fd, 200) == b"x" * 100
    finally:
        os.close(fd)


@pytest.mark.parametrize("location, reason", [
    ("/etc/passwd", "outside the store"),
    ("flow/hive/y=2026/part.parquet", "not under flow/binary/"),
    ("dns/binary/20261121/01/x", "not under flow/binary/"),
    ("flow/binary/../hive/x", "'..'"),
    ("flow/binary/2026 1121/x", "'2026 1121'"),
    ("", "empty"),
    ("flow/binary/" + "a" * 5000, "too long"),
])
def test_staged_paths_that_no_master_makes_are_refused(store, location, reason):
    with pytest.raises(RefusedInput, match=reason):
        store.staged_relative(location, "flow")


def test_missing_file_is_gone_only_while_the_store_is_there(store):
    with pytest.raises(RefusedInput, match="is not in the store"):
        store.open_staged("flow/binary/20261121/01/nope")
    (store.root / MARKER).unlink()
    with pytest.raises(StoreUnavailable, match="is not reachable"):
        store.open_staged("flow/binary/20261121/01/nope")


def test_symlinks_directories_and_fifos_are_refused(store, tmp_path):
    staged = stage(store, tmp_path, "nfcapd.1", b"data")
    folder = (store.root / staged.location).parent
    os.symlink(tmp_path / "src" / "nfcapd.1", folder / "link")
    os.mkfifo(folder / "fifo")
    os.symlink(folder, folder.parent / "linked-dir")
    cases = {f"{folder.relative_to(store.root)}/link": "cannot be opened safely",
             f"{folder.relative_to(store.root)}/fifo": "not a regular file",
             f"{folder.parent.relative_to(store.root)}/linked-dir/fifo": "cannot be opened safely",
             str(folder.relative_to(store.root)): "not a regular file"}
    for rel, reason in cases.items():
        with pytest.raises(RefusedInput, match=reason):
            store.open_staged(rel)


def test_long_names_are_cut_and_stay_unique():
    a, b = "n" * 300 + "a", "n" * 300 + "b"
    assert len(bounded_name(a)) <= 180 and bounded_name(a) != bounded_name(b)
    assert bounded_name("short") == "short"


def test_set_aside_never_overwrites(tmp_path):
    first = set_aside(tmp_path / "q", "same", b"one", "first reason")
    second = set_aside(tmp_path / "q", "same", b"two", "second reason")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    assert "second reason" in (tmp_path / "q" / f"{second.name}.reason.txt").read_text()


def test_retention_removes_only_old_files_whose_rows_are_in(store, tmp_path):
    loaded = stage(store, tmp_path, "nfcapd.loaded", b"a" * 10)
    waiting = stage(store, tmp_path, "nfcapd.waiting", b"b" * 10)
    store.mark_loaded("flow", loaded.sha256)
    assert store.expire_staged("flow", 1) == 0, "nothing is a day old yet"
    later = time.time() + 2 * 86400
    assert store.expire_staged("flow", 1, now=later) == 1
    assert not (store.root / loaded.location).exists()
    assert (store.root / waiting.location).exists(), "a file never loaded is kept"
