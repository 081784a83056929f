"""The shared store where the master stages capture files for the workers.

Layout under ``hdfs_app_path`` (as in the original Spot ingest):

    .spot-ingest-store                                 marker: the store is there
    <type>/binary/YYYYMMDD/HH/<sha256 prefix>-<name>    staged captures
    <type>/quarantine/YYYYMMDD/<name> + <name>.reason.txt
    <type>/refused/YYYYMMDD/<topic>-p<N>-o<offset>.json announcements a worker refused
    <type>/_incoming/                                  partial copies (ignored)

A staged file appears under its final name only once it is complete (copy to
``_incoming``, fsync, rename), and its name carries its checksum, so staging
the same content twice lands on the same name. This module handles local
paths and ``file://`` URIs, which is also how an HDFS NFS gateway mount or
any shared filesystem is used.

Announcements name a staged file by its path relative to the store root, so
hosts may mount the store at different places. A worker trusts nothing in an
announcement: ``fetch`` accepts only a regular file under
``<type>/binary/``, reached without following any symlink, and everything the
worker moves or writes stays inside the store's own areas. The marker file
tells "the store is not mounted right now" (wait and retry) from "this file
is gone" (refuse the announcement with a reason).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, Iterator, Protocol

if TYPE_CHECKING:
    from .config import StoreLocation

from .policy import RetryLater

COPY_CHUNK = 1 << 20
MARKER = ".spot-ingest-store"
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_STAGED_PART_RE = re.compile(r"[A-Za-z0-9._+=@-]{1,255}")
MAX_STAGED_PATH = 4096


class StoreError(Exception):
    pass


class SourceError(StoreError):
    """The file to stage cannot be read: a fault of the file, not of the store."""


class SourceFile:
    """A file to stage, opened for reading (``SourceError`` when it cannot
    be; ``FileNotFoundError`` as is: it went away), read in chunks by
    iterating it, and hashed on the way: ``size`` and ``sha256`` once read."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = open(path, "rb")
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror}") from None
        self.digest, self.size = hashlib.sha256(), 0

    def __iter__(self) -> Iterator[bytes]:
        while True:
            try:
                chunk = self.file.read(COPY_CHUNK)
            except OSError as exc:
                raise SourceError(f"cannot read {self.path}: {exc.strerror}") from None
            if not chunk:
                return
            self.digest.update(chunk)
            self.size += len(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        return self.digest.hexdigest()

    def __enter__(self) -> "SourceFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class StoreUnavailable(RetryLater, StoreError):
    """The store is not reachable now (e.g. its mount is down): retry later,
    not sooner than ``retry_after`` seconds (a mount does not come back in two)."""

    def __init__(self, message: str, retry_after: float = 10.0):
        super().__init__(message, retry_after)


class RefusedInput(Exception):
    """An announcement (or what it names) fails a check: it is refused, with
    this reason, and the file it names is left untouched."""


@dataclass(frozen=True)
class StagedCopy:
    """A checked staged file, readable on this host (``Store.fetch``)."""
    path: Path         # where a tool reads it
    fd: int            # an open descriptor of the same file, for hashing


@dataclass(frozen=True)
class StagedFile:
    location: str      # relative to the store root
    size: int
    sha256: str


def local_root(location: str) -> Path:
    if location.startswith("file://"):
        return Path(location[len("file://"):])
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise StoreError(f"store location '{location}': scheme {scheme}:// is not supported "
                         f"yet; use a local path, a shared mount or file://")
    return Path(location)


def safe_name(name: str) -> str:
    """A file name from the outside, made safe for any tool and any store:
    the checksum prefix keeps it unique, so nothing is lost by replacing odd
    characters (spaces, quotes, newlines, non-UTF-8 bytes)."""
    if name in ("", "."):
        return "."
    return re.sub(r"[^A-Za-z0-9._+=@-]", "_", name).lstrip("-.") or "_"


def bounded_name(name: str, limit: int = 180) -> str:
    """``name`` cut to ``limit`` characters, a hash of the whole keeping it
    unique: no file system refuses it (NAME_MAX is 255 bytes)."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{name.encode()[:limit - 17].decode('utf-8', 'ignore')}+{digest}"


def check_staged_location(location: str, ptype: str, root: str) -> str:
    """An announced location as a path relative to the store root, checked:
    under ``<ptype>/binary/``, no ``..``, no odd characters. An absolute path
    is accepted only inside the store ``root`` (announcements of older masters)."""
    if not location or len(location) > MAX_STAGED_PATH or "\x00" in location:
        raise RefusedInput("staged path is empty, too long or holds a NUL byte")
    if location.startswith("file://"):
        location = location[len("file://"):]
    path = PurePosixPath(location)
    if path.is_absolute():
        if not path.is_relative_to(PurePosixPath(root)):   # lexical: ".." is refused below
            raise RefusedInput(f"staged path {location!r} is outside the store {root}")
        path = path.relative_to(root)
    parts = path.parts
    if len(parts) < 3 or parts[0] != ptype or parts[1] != "binary":
        raise RefusedInput(f"staged path {location!r} is not under {ptype}/binary/ in the store")
    for part in parts:
        if part in (".", "..") or not _STAGED_PART_RE.fullmatch(part):
            raise RefusedInput(f"staged path {location!r} has a part that no staged file has "
                               f"({part!r})")
    return str(path)


def staged_final_name(relative_name: str, sha256: str, collected_at: float) -> str:
    """Where a staged file goes under ``<type>/``: ``binary/YYYYMMDD/HH/<the
    collector folder>/<sha256 prefix>-<name>`` (the same for every store)."""
    stamp = time.gmtime(collected_at)
    rel = PurePosixPath(relative_name)
    return (f"binary/{time.strftime('%Y%m%d', stamp)}/{time.strftime('%H', stamp)}/"
            f"{bounded_name(safe_name(str(rel.parent)))}/"
            f"{sha256[:16]}-{bounded_name(safe_name(rel.name))}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_path(dest_dir: Path, name: str) -> Path:
    """``dest_dir/name``, or ``name.1``, ``name.2`` ... : never an existing file
    (the name is reserved by creating it empty, atomically)."""
    for n in range(10_000):
        candidate = dest_dir / (name if n == 0 else f"{name}.{n}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise StoreError(f"{dest_dir}: no free name for {name}")


def set_aside(dest_dir: Path, name: str, data: bytes | Path, reason: str) -> Path:
    """Put input aside in ``dest_dir`` under a name no earlier item holds, with
    ``<name>.reason.txt`` beside it; a Path is moved, bytes are written."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = unique_path(dest_dir, bounded_name(safe_name(name)))
    if isinstance(data, Path):
        os.replace(data, dest) if _same_fs(data, dest_dir) else shutil.move(data, dest)
        # A file moved in keeps the mode its writer gave it: give it ours.
        os.chmod(dest, 0o666 & ~_current_umask())
    else:
        dest.write_bytes(data)
    (dest.parent / f"{dest.name}.reason.txt").write_text(
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n{reason}\n", encoding="utf-8")
    return dest


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# Test hook: use the three-rename swap even where renameat2 works, to test
# it on any machine (tests/test_compaction.py). Unset in production.
_NO_EXCHANGE = bool(os.environ.get("SPOT_INGEST_NO_RENAME_EXCHANGE"))


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux renameat2(RENAME_EXCHANGE);
    False where the kernel or the file system cannot (then nothing moved)."""
    import ctypes
    import errno
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "renameat2", None)
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _current_umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _same_fs(a: Path, b: Path) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(b).st_dev
    except OSError:
        return False


class Store(Protocol):
    """What the engine does with the shared store, and what it may rely on.
    ``LocalStore`` (a local path, an NFS or HDFS NFS-gateway mount) and
    ``spot_ingest.hdfs_store.HdfsStore`` (HDFS through WebHDFS) implement it.

    * ``mark()`` (master, at start) makes the marker that tells a reachable
      store; ``check_reachable()`` raises ``StoreUnavailable`` without it.
    * ``stage()`` copies a file in, hashing it on the way; the staged file is
      visible under its final name only when complete, and that name carries
      the checksum, so staging the same content twice lands on one name.
    * ``staged_relative()`` and ``fetch()`` accept from an announcement only a
      regular file under ``<type>/binary/``, reached without following
      symlinks (``RefusedInput`` otherwise); a missing file is "gone" only
      while the store is reachable. ``fetch()`` makes it readable on this
      host for the time of a ``with`` block: in place for a mounted store,
      copied to local scratch for a remote one. ``prefetch()`` makes that
      copy ahead of time (None: nothing to do, or not possible now), and
      ``fetch(relative, prefetched=copy)`` takes it over;
      ``discard_prefetched()`` drops one that no fetch took.
    * ``quarantine()`` moves a checked staged file aside within the store,
      ``refuse()`` keeps a refused announcement as a dead letter; neither
      ever overwrites an earlier item or touches anything outside the store.
    * Table files (``TableWriter``) are written aside, ``write_aside(area,
      name)`` in ``<area>/_tmp/``, then ``make_visible()`` moves each durably
      and atomically to its final path in ``<area>`` (replacing the output of
      an earlier run of the same input); ``discard_aside()`` drops one,
      ``remove_aside()`` what a killed writer left; ``list()`` names what an
      area holds (``details()``: with sizes and modification times),
      ``read()`` one of them whole (small files: summaries), ``read_tail()``
      its last bytes (a Parquet footer). An area is a folder relative to the
      store root (a table).
    * Compaction (``spot_ingest.compaction``) also uses ``delete()`` (a file
      or a folder with its content), ``rename()`` (within an area, never over
      an existing name), ``create(area, relative, data)`` (a small file, only
      if no file has that name: its lock) and ``exchange(area, a, b)``, which
      swaps two folders: atomically where the file system can (Linux
      ``renameat2`` with RENAME_EXCHANGE; returns True), else by three renames
      ``b -> a.swap``, ``a -> b``, ``a.swap -> a`` (False): a reader may then
      find ``b`` missing for the moment between the first two, and a process
      killed between them leaves ``a.swap`` (``compaction.settle`` finishes
      the swap). ``step``, if given, is called after each of those renames
      (a test hook).
    * ``append(area, relative, data)`` adds ``data`` at the end of a file,
      creating it (and its folders) if missing: the ingest reports
      (``spot_ingest.reports``), one JSON line per call. Each file has one
      writing process; a line cut by a crash is skipped by readers.
    * ``table_root()`` is where Spark keeps a table's streaming checkpoint.
    * ``clean_incoming()`` and ``expire_staged()`` clean up: partial copies of
      killed masters of this host; staged files past retention whose rows are
      in the table (``mark_loaded()``).
    """

    prefetches: bool   # True: prefetch() makes local copies worth making ahead

    def mark(self) -> None: ...
    def check_reachable(self) -> None: ...
    def stage(self, source: Path, ptype: str, relative_name: str,
              collected_at: float) -> StagedFile: ...
    def staged_relative(self, location: str, ptype: str) -> str: ...
    def prefetch(self, relative: str) -> Path | None: ...
    def discard_prefetched(self, copy: Path) -> None: ...
    def fetch(self, relative: str, prefetched: Path | None = None
              ) -> contextlib.AbstractContextManager[StagedCopy]: ...
    def quarantine(self, relative: str, ptype: str, reason: str) -> Path | str: ...
    def refuse(self, ptype: str, topic: str, partition: int, offset: int, reason: str,
               record: dict) -> Path | str: ...
    def table_root(self, table: str) -> Path: ...
    def write_aside(self, area: str, name: str) -> BinaryIO: ...
    def make_visible(self, area: str, name: str, final: str) -> None: ...
    def discard_aside(self, area: str, name: str) -> None: ...
    def remove_aside(self, area: str, prefix: str) -> int: ...
    def list(self, area: str, suffix: str = "") -> list[str]: ...
    def details(self, area: str, suffix: str = "") -> list[tuple[str, int, float]]: ...
    def read(self, area: str, relative: str) -> bytes: ...
    def read_tail(self, area: str, relative: str, nbytes: int) -> bytes: ...
    def delete(self, area: str, relative: str) -> None: ...
    def exists(self, area: str, relative: str) -> bool: ...
    def rename(self, area: str, src: str, dest: str) -> None: ...
    def create(self, area: str, relative: str, data: bytes) -> bool: ...
    def append(self, area: str, relative: str, data: bytes) -> None: ...
    def exchange(self, area: str, a: str, b: str, step=None) -> bool: ...
    def clean_incoming(self, ptype: str) -> int: ...
    def mark_loaded(self, ptype: str, sha256: str) -> None: ...
    def expire_staged(self, ptype: str, older_than_days: float,
                      now: float | None = None) -> int: ...


class LocalStore(Store):
    """The store on a local path or a shared mount (see ``Store``)."""

    prefetches = False

    def __init__(self, location: str):
        self.root = local_root(location)

    # -- the marker ----------------------------------------------------------
    def mark(self) -> None:
        """Create the store's marker (the master does, at start)."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if not marker.exists():
            marker.write_text("spot-ingest store: workers treat a missing file as gone only "
                              "while this marker is visible\n", encoding="utf-8")

    def check_reachable(self) -> None:
        if not (self.root / MARKER).is_file():
            raise StoreUnavailable(f"the store {self.root} is not reachable ({MARKER} is missing; "
                                   f"is its mount up?)")

    # -- announcements -------------------------------------------------------
    def staged_relative(self, location: str, ptype: str) -> str:
        return check_staged_location(location, ptype, str(self.root))

    def open_staged(self, relative: str) -> int:
        """Open a staged file for reading without following any symlink and
        return the descriptor; refuse anything but a regular file. A missing
        file is "gone" only while the store itself is reachable."""
        flags_dir = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreUnavailable(f"the store {self.root} is not reachable: {exc.strerror}") from None
        parts = relative.split("/")
        try:
            for part in parts[:-1]:
                nxt = os.open(part, flags_dir, dir_fd=fd)
                os.close(fd)
                fd = nxt
            # O_NONBLOCK: a FIFO must not hang the open.
            file_fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                              dir_fd=fd)
        except FileNotFoundError:
            self.check_reachable()
            raise RefusedInput(f"staged file {relative} is not in the store {self.root}") from None
        except OSError as exc:   # ELOOP (a symlink), ENOTDIR, EACCES...
            raise RefusedInput(f"staged path {relative} cannot be opened safely: "
                               f"{exc.strerror}") from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(file_fd).st_mode):
            os.close(file_fd)
            raise RefusedInput(f"staged path {relative} is not a regular file")
        os.set_blocking(file_fd, True)
        return file_fd

    def refuse(self, ptype: str, topic: str, partition: int, offset: int, reason: str,
               record: dict) -> Path:
        """Keep a refused announcement as a dead-letter record with its reason."""
        day = time.strftime("%Y%m%d", time.gmtime())
        dest_dir = self.root / ptype / "refused" / day
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{safe_name(topic)}-p{partition}-o{offset}.json"
        tmp = dest_dir / f".{dest.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({
            "refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "topic": topic, "partition": partition, "offset": offset, "reason": reason,
            "record": record}, indent=1, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, dest)
        return dest

    def stage(self, source: Path, ptype: str, relative_name: str, collected_at: float) -> StagedFile:
        """Copy ``source`` into the store, hashing it on the way; return where it is."""
        incoming = self.root / ptype / "_incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = incoming / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            with SourceFile(source) as src, open(tmp, "wb") as dst:
                for chunk in src:
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            final = self.root / ptype / staged_final_name(relative_name, src.sha256, collected_at)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedFile(str(final.relative_to(self.root)), src.size, src.sha256)

    def clean_incoming(self, ptype: str) -> int:
        """Remove partial copies that a killed master of this host left behind."""
        import psutil
        removed = 0
        incoming = self.root / ptype / "_incoming"
        prefix = f"{socket.gethostname()}-"
        if incoming.is_dir():
            for p in incoming.iterdir():
                if p.name.startswith(prefix):
                    pid = p.name[len(prefix):].split("-")[0]
                    if pid.isdigit() and not psutil.pid_exists(int(pid)):
                        p.unlink(missing_ok=True)
                        removed += 1
        return removed

    # -- retention -----------------------------------------------------------
    def mark_loaded(self, ptype: str, sha256: str) -> None:
        """Record that a staged file's rows are in the table (for retention)."""
        loaded = self.root / ptype / "_loaded"
        loaded.mkdir(parents=True, exist_ok=True)
        (loaded / sha256[:16]).touch()

    def expire_staged(self, ptype: str, older_than_days: float, now: float | None = None) -> int:
        """Remove staged files older than ``older_than_days`` whose rows are in
        the table (a worker marked them loaded); return how many. Files never
        loaded (still waiting, refused, or lost announcements) are kept."""
        cutoff = (now or time.time()) - older_than_days * 86400
        binary, loaded = self.root / ptype / "binary", self.root / ptype / "_loaded"
        removed = 0
        if not binary.is_dir():
            return 0
        for dirpath, _, files in os.walk(binary, topdown=False):
            for name in files:
                path = Path(dirpath) / name
                marker = loaded / name.split("-", 1)[0]
                try:
                    if path.lstat().st_mtime < cutoff and marker.exists():
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
            if dirpath != str(binary):
                try:
                    os.rmdir(dirpath)      # only when empty
                except OSError:
                    pass
        if loaded.is_dir():
            for marker in loaded.iterdir():
                try:
                    if marker.stat().st_mtime < cutoff:
                        marker.unlink()
                except FileNotFoundError:
                    continue
        return removed

    def local_path(self, relative: str) -> Path:
        """Where a checked staged path (see ``staged_relative``) is on this host."""
        return self.root / relative

    def prefetch(self, relative: str) -> Path | None:
        """Nothing to do ahead: a mounted store is read in place."""
        return None

    def discard_prefetched(self, copy: Path) -> None:
        pass

    @contextlib.contextmanager
    def fetch(self, relative: str, prefetched: Path | None = None) -> Iterator[StagedCopy]:
        """The staged file in place, checked (``open_staged``), with its
        descriptor open for the block."""
        fd = self.open_staged(relative)
        try:
            yield StagedCopy(self.local_path(relative), fd)
        finally:
            os.close(fd)

    def quarantine(self, relative: str, ptype: str, reason: str) -> Path:
        """Move a checked staged file aside, within the store, with a note saying
        why; return its new path."""
        src = self.local_path(relative)
        day = time.strftime("%Y%m%d", time.gmtime())
        return set_aside(self.root / ptype / "quarantine" / day, src.name, src,
                         f"staged as: {relative}\n{reason}")

    def table_root(self, table: str) -> Path:
        return self.root / table

    # -- table files: written aside, then made visible -----------------------
    def write_aside(self, area: str, name: str) -> BinaryIO:
        """A new file in ``<area>/_tmp/`` to write a table file into (an
        Arrow file: Parquet is written to it without taking Python's GIL)."""
        import pyarrow as pa
        tmp = self.root / area / "_tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return pa.OSFile(str(tmp / name), mode="wb")

    def make_visible(self, area: str, name: str, final: str) -> None:
        """Move a finished file from ``<area>/_tmp/`` to ``<area>/<final>``:
        on disk first (fsync), then renamed, so readers see all of it or
        nothing; an earlier file of that name is replaced."""
        src, dest = self.root / area / "_tmp" / name, self.root / area / final
        fd = os.open(src, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)

    def discard_aside(self, area: str, name: str) -> None:
        (self.root / area / "_tmp" / name).unlink(missing_ok=True)

    def remove_aside(self, area: str, prefix: str) -> int:
        """Delete what writers of ``prefix`` (a killed process of ours) left aside."""
        tmp = self.root / area / "_tmp"
        removed = 0
        if tmp.is_dir():
            for p in tmp.glob(f"{prefix}-*"):
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def list(self, area: str, suffix: str = "") -> list[str]:
        """Files in ``area`` (not those aside), relative to it, sorted."""
        base = self.root / area
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(base)) for p in base.rglob(f"*{suffix}")
                      if p.is_file() and "_tmp" not in p.relative_to(base).parts)

    def details(self, area: str, suffix: str = "") -> list[tuple[str, int, float]]:
        """``list()`` with each file's size and modification time."""
        base = self.root / area
        found = []
        for relative in self.list(area, suffix):
            try:
                st = (base / relative).stat()
            except FileNotFoundError:   # removed since it was listed
                continue
            found.append((relative, st.st_size, st.st_mtime))
        return found

    def read(self, area: str, relative: str) -> bytes:
        return (self.root / area / relative).read_bytes()

    def read_tail(self, area: str, relative: str, nbytes: int) -> bytes:
        with open(self.root / area / relative, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - nbytes))
            return f.read()

    def exists(self, area: str, relative: str) -> bool:
        return (self.root / area / relative).exists()

    def delete(self, area: str, relative: str) -> None:
        path = self.root / area / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def rename(self, area: str, src: str, dest: str) -> None:
        source, target = self.root / area / src, self.root / area / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise StoreError(f"cannot move {source} to {target}: it exists")
        os.rename(source, target)
        _fsync_dir(target.parent)

    def create(self, area: str, relative: str, data: bytes) -> bool:
        """Write ``data`` to a new file, durably; False (nothing written) if
        a file of that name exists (O_EXCL: of two creators, one wins)."""
        path = self.root / area / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def append(self, area: str, relative: str, data: bytes) -> None:
        path = self.root / area / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def exchange(self, area: str, a: str, b: str, step=None) -> bool:
        """Swap folders ``a`` and ``b`` (see ``Store``): True when atomic."""
        first, second = self.root / area / a, self.root / area / b
        if not _NO_EXCHANGE and _rename_exchange(first, second):
            _fsync_dir(first.parent)
            _fsync_dir(second.parent)
            return True
        # No atomic swap here (NFS, some FUSE mounts): three renames. If a
        # writer re-creates ``b`` between the first two, the second fails
        # (ENOTEMPTY) and compaction.settle puts both sides together.
        spare = first.with_name(first.name + ".swap")
        for src, dest, name in ((second, spare, "exchange-1"), (first, second, "exchange-2"),
                                (spare, first, "exchange-3")):
            os.rename(src, dest)
            if step is not None:
                step(name)
        _fsync_dir(first.parent)
        _fsync_dir(second.parent)
        return False


@functools.lru_cache(maxsize=8)
def open_store(location: "StoreLocation | str") -> Store:
    """The store at ``location`` (``IngestConfig.store``): HDFS when the
    configuration has an ``hdfs`` section, else a local path, a shared mount
    or a file:// URI. One per process and location (an HDFS client keeps its
    connections and its Kerberos login)."""
    if getattr(location, "hdfs", None) is not None:
        from .hdfs_store import HdfsStore
        return HdfsStore(location)
    return LocalStore(getattr(location, "path", location))
