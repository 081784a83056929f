"""Find capture files in a collector directory and decide when one is finished.

Files are found two ways: a scan at start (so files that arrived while the
master was down are not forgotten) and watchdog events afterwards. A file is
taken only when it is complete:

* its name matches ``supported_files`` and is not a working name: hidden
  files, ``*.tmp``, ``*.part``, or a pipeline's ``working_names`` (the file
  its collector is still writing);
* it arrived by a rename (how collectors rotate), or its size and mtime have not
  changed for ``settle_seconds``;
* and no process on this host has it open for writing (a writer that pauses
  longer than the settle time is still not taken early).
"""
from __future__ import annotations

import fnmatch
import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer

log = logging.getLogger(__name__)

WORKING_SUFFIXES = (".tmp", ".part", ".partial", "~", ".swp")


def is_candidate_name(name: str, supported: tuple[str, ...], working: tuple[str, ...] = ()) -> bool:
    if name.startswith(".") or name.endswith(WORKING_SUFFIXES):
        return False
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in working):
        return False
    for pattern in supported:
        if any(c in pattern for c in "*?["):
            if fnmatch.fnmatchcase(name, pattern):
                return True
        elif name.startswith(pattern) or name.endswith(pattern):
            # The original's entries are plain prefixes or suffixes.
            return True
    return False


def open_for_writing(paths: set[str]) -> set[str]:
    """Those of ``paths`` that a process we can see has open for writing."""
    busy: set[str] = set()
    if not paths:
        return busy
    for proc in psutil.process_iter():
        try:
            for f in proc.open_files():
                if f.path in paths and f.mode in ("w", "a", "r+", "a+"):
                    busy.add(f.path)
        except (psutil.Error, OSError):
            continue
    return busy


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    stable_since: float
    renamed_in: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, events: queue.Queue):
        self.events = events

    def on_created(self, event):
        if not event.is_directory:
            self.events.put((event.src_path, False))

    def on_modified(self, event):
        if not event.is_directory:
            self.events.put((event.src_path, False))

    def on_closed(self, event):
        self.events.put((event.src_path, False))

    def on_moved(self, event):
        if not event.is_directory:
            self.events.put((event.dest_path, True))
        else:  # a whole directory moved in: look at what it holds
            for root, _, files in os.walk(event.dest_path):
                for name in files:
                    self.events.put((os.path.join(root, name), True))


class CollectorWatcher:
    """Yields finished files of a collector directory, each once per appearance."""

    def __init__(self, root: Path, supported: tuple[str, ...], working: tuple[str, ...],
                 settle_seconds: float, watch: bool = True):
        self.root = Path(root).resolve()
        self.supported, self.working = supported, working
        self.settle = settle_seconds
        self.seen: dict[str, _Seen] = {}
        self.ignored: set[str] = set()
        self.events: queue.Queue = queue.Queue()
        self.observer = None
        if watch:
            self.observer = Observer()
            self.observer.schedule(_Handler(self.events), str(self.root), recursive=True)
            self.observer.start()
        self._scan()

    def _scan(self) -> None:
        for dirpath, dirnames, files in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in files:
                self._note(os.path.join(dirpath, name), renamed_in=False)

    def _note(self, path: str, renamed_in: bool) -> None:
        name = os.path.basename(path)
        if not is_candidate_name(name, self.supported, self.working):
            return
        if any(part.startswith(".") for part in Path(path).relative_to(self.root).parts[:-1]):
            return
        if os.path.islink(path):
            target = os.path.realpath(path)
            if not target.startswith(str(self.root) + os.sep) and path not in self.ignored:
                log.warning("%s is a symlink to %s, outside the collector directory: not followed",
                            path, target)
                self.ignored.add(path)
                return
        entry = self.seen.get(path)
        if entry is None:
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return
            self.seen[path] = _Seen(st.st_size, st.st_mtime_ns, time.monotonic(), renamed_in)
        elif renamed_in:
            entry.renamed_in = True

    def forget(self, path: str) -> None:
        self.seen.pop(path, None)

    def requeue(self, path: str) -> None:
        """Offer ``path`` again once it has settled anew (it changed while it
        was being ingested)."""
        self.seen.pop(path, None)
        self._note(path, renamed_in=False)

    def ready(self) -> list[Path]:
        """Files that are complete now, oldest first; they stay known until forgotten."""
        while True:
            try:
                path, renamed_in = self.events.get_nowait()
            except queue.Empty:
                break
            self._note(path, renamed_in)
        now = time.monotonic()
        maybe = []
        for path, entry in list(self.seen.items()):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                del self.seen[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                entry.size, entry.mtime_ns, entry.stable_since = st.st_size, st.st_mtime_ns, now
                entry.renamed_in = False
                continue
            if entry.renamed_in or now - entry.stable_since >= self.settle:
                maybe.append((st.st_mtime_ns, path))
        busy = open_for_writing({p for _, p in maybe})
        return [Path(p) for _, p in sorted(maybe) if p not in busy]

    def pending(self) -> int:
        return len(self.seen)

    def close(self) -> None:
        if self.observer:
            self.observer.stop()
            self.observer.join(timeout=5)
