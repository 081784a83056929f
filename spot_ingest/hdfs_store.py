"""The store on HDFS, through WebHDFS (or HttpFS) with HdfsCLI.

The layout and the guarantees are those of ``LocalStore`` (``spot_ingest.store``);
what differs is how each is kept on a file system that is not POSIX:

* WebHDFS RENAME answers HTTP 200 ``{"boolean": false}`` (no error) when the
  destination exists or its parent is missing, and moves the source *into*
  an existing directory. HdfsCLI turns the ``false`` into an ``HdfsError``
  with no ``exception``; ``_rename`` tells it from a RemoteException. Every
  rename here looks at the destination first: a directory there is refused,
  never renamed into.
* There is no atomic replace. "Replace" is delete, then rename; a crash in
  between leaves the destination missing, never doubled, and the input it
  came from is still announced and uncommitted, so it is written again.
* CREATE is a PUT answered by a 307 to a datanode (HdfsCLI follows it) and
  ``overwrite`` defaults to false: temporaries carry this process's id and
  a random part, so nothing ever writes over another writer's file.
* Errors arrive as RemoteException JSON (``HdfsError.exception``);
  connection errors, timeouts and StandbyException/RetriableException/
  SafeModeException become ``StoreUnavailable`` (waited for, logged), the
  rest a ``StoreError`` naming the URL and the path.

The tools need local files: ``fetch`` copies a staged file to a bounded local
scratch folder (``hdfs.scratch_dir``) for the time of a ``with`` block, and
``prefetch`` does it ahead of time (the worker fetches the next file while
this one converts). Table files are written in scratch, uploaded to
``<table>/_tmp/`` and renamed into place. A killed process's scratch files
are removed by the next process that opens the store.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from .config import HdfsConfig, StoreLocation
from .policy import RetryLater
from .store import (COPY_CHUNK, MARKER, RefusedInput, SourceFile, StagedCopy, StagedFile,
                    StoreError, StoreUnavailable, bounded_name, check_staged_location,
                    safe_name, staged_final_name)

log = logging.getLogger(__name__)

# Answers that mean "not now" rather than "no".
_RETRIABLE = ("StandbyException", "RetriableException", "SafeModeException")


class ScratchFull(RetryLater):
    """The local scratch folder has no room for a file now (others are in use)."""


def _pid_alive(pid: int) -> bool:
    import psutil
    return psutil.pid_exists(pid)


def _session():
    """A requests session in which ``hdfs.verify`` (a CA bundle, or false)
    wins over REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE: requests lets those
    replace a session's own setting, so a configured CA was silently
    ignored where they are set (they are, on this Debian)."""
    import requests

    class Session(requests.Session):
        def merge_environment_settings(self, url, proxies, stream, verify, cert):
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if self.verify is not True:
                settings["verify"] = self.verify
            return settings
    return Session()


class HdfsStore:
    """The store under ``hdfs_app_path`` on HDFS (see ``spot_ingest.store.Store``)."""

    prefetches = True

    def __init__(self, location: StoreLocation):
        assert location.hdfs is not None
        self.hdfs: HdfsConfig = location.hdfs
        self.root = PurePosixPath(location.path)
        self.scratch = self.hdfs.scratch_dir
        self.login = None
        self.client = self._client()
        self._aside: dict[tuple[str, str], Path] = {}
        self._lock = threading.Lock()
        self._clean_scratch()

    def __repr__(self) -> str:
        return f"HdfsStore({self.where(self.root)})"

    def _client(self):
        session = _session()
        session.verify = self.hdfs.verify
        if self.hdfs.kerberos is not None:
            from hdfs.ext.kerberos import KerberosClient

            from .kerberos import KeytabLogin
            self.login = KeytabLogin(self.hdfs.kerberos, self.scratch / "kerberos")
            self.login.ensure()   # and before every call (``_call``): renewed before it expires
            return KerberosClient(self.hdfs.url, timeout=self.hdfs.timeout, session=session,
                                  **self.login.hdfs_client_kwargs())
        from hdfs import InsecureClient
        return InsecureClient(self.hdfs.url, user=self.hdfs.user, timeout=self.hdfs.timeout,
                              session=session)

    # -- paths and calls -----------------------------------------------------
    def _path(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def where(self, path: str | PurePosixPath) -> str:
        """An HDFS path as messages name it: the URL and the path."""
        return self.hdfs.describe(str(path))

    def _call(self, what: str, path: str, fn, *args, **kwargs):
        """One HdfsCLI call, its failures turned into the store's errors."""
        import requests
        import urllib3
        from hdfs.util import HdfsError
        if self.login is not None:
            self.login.ensure()
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as exc:   # will not fix itself: say what to check
            found = re.search(r"certificate verify failed: ([^('\"]+)", str(exc))
            raise StoreError(f"TLS with HDFS at {self.hdfs.url} failed ({what} {path}): "
                             f"{found.group(1).strip() if found else type(exc).__name__}; "
                             f"check hdfs.verify (now {self.hdfs.verify})") from None
        # urllib3's errors: a connection that breaks in the middle of a body.
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as exc:
            raise StoreUnavailable(f"HDFS at {self.hdfs.url} is not reachable ({what} {path}): "
                                   f"{type(exc).__name__}") from None
        except HdfsError as exc:
            if exc.exception in _RETRIABLE:
                raise StoreUnavailable(f"HDFS at {self.hdfs.url} cannot {what} {path} now "
                                       f"({exc.exception}: {exc.message})") from None
            if "Authentication failure" in str(exc):
                who = (f"Kerberos principal {self.hdfs.kerberos.principal}"
                       if self.hdfs.kerberos else f"user {self.hdfs.user or '(none)'}")
                raise StoreError(f"HDFS at {self.hdfs.url} refused the {who} "
                                 f"({what} {path}): check hdfs.kerberos / hdfs.user") from None
            raise StoreError(f"HDFS {what} {self.where(path)} failed: "
                             f"{exc.exception or 'error'}: {exc.message}") from None

    def _status(self, path: str) -> dict | None:
        return self._call("look at", path, self.client.status, path, strict=False)

    def _rename(self, src: str, dest: str, *, replace: bool) -> bool:
        """Rename ``src`` to the file name ``dest``; True if done. An existing
        file there is deleted first when ``replace`` (else False is returned);
        a directory there is an error (WebHDFS would move ``src`` into it)."""
        from hdfs.util import HdfsError
        for _ in range(5):
            status = self._status(dest)
            if status is not None:
                if status["type"] == "DIRECTORY":
                    raise StoreError(f"{self.where(dest)} is a directory, where a file belongs")
                if not replace:
                    return False
                self._call("delete", dest, self.client.delete, dest)
            try:
                self._call("rename to " + dest, src, self.client.rename, src, dest)
                return True
            except StoreError as exc:
                cause = exc.__context__
                if isinstance(cause, HdfsError) and cause.exception is None:
                    continue   # {"boolean": false}: it appeared meanwhile, or its parent went
                raise
        raise StoreError(f"could not rename {self.where(src)} to {dest}: the destination keeps "
                         f"appearing (another writer?)")

    def _write(self, path: str, data, *, overwrite: bool) -> None:
        self._call("write", path, self.client.write, path, data=data, overwrite=overwrite)

    def _makedirs(self, path: str) -> None:
        self._call("create folder", path, self.client.makedirs, path)

    # -- local scratch ---------------------------------------------------------
    def _scratch_file(self, kind: str, name: str) -> Path:
        folder = self.scratch / kind
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{os.getpid()}-{uuid.uuid4().hex[:12]}-{bounded_name(name, 120)}"

    def _clean_scratch(self) -> None:
        """Remove what killed processes of this host left in scratch."""
        for kind in ("fetched", "prefetched", "aside"):
            folder = self.scratch / kind
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                pid = p.name.split("-", 1)[0]
                if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                    p.unlink(missing_ok=True)

    def _room_for(self, size: int, what: str) -> None:
        """Raise ``ScratchFull`` unless ``size`` more bytes fit in scratch."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        limit = self.hdfs.scratch_max_bytes
        if limit is not None:
            used = sum(p.stat().st_size for p in self.scratch.glob("*/*") if p.is_file())
            if used + size > limit:
                raise ScratchFull(f"no room for {what} ({size} bytes) in {self.scratch}: "
                                  f"{used} of hdfs.scratch_max_bytes={limit} in use", 5.0)
        free = shutil.disk_usage(self.scratch).free
        if size + (64 << 20) > free:
            raise ScratchFull(f"no room for {what} ({size} bytes) in {self.scratch}: "
                              f"{free} bytes free on its disk", 30.0)

    # -- the marker ------------------------------------------------------------
    def mark(self) -> None:
        marker = self._path(MARKER)
        if self._status(marker) is None:
            self._makedirs(str(self.root))
            self._write(marker, b"spot-ingest store: workers treat a missing file as gone only "
                                b"while this marker is visible\n", overwrite=True)

    def check_reachable(self) -> None:
        if self._status(self._path(MARKER)) is None:
            raise StoreUnavailable(f"the store {self.where(self.root)} is not ready ({MARKER} is "
                                   f"missing; has a master started?)")

    # -- staging ---------------------------------------------------------------
    def staged_relative(self, location: str, ptype: str) -> str:
        return check_staged_location(location, ptype, str(self.root))

    def stage(self, source: Path, ptype: str, relative_name: str,
              collected_at: float) -> StagedFile:
        """Upload ``source`` to ``<ptype>/_incoming/``, hashing it on the way,
        then rename it to its final name (the checksum in it): visible only
        when complete. The same content staged again lands on the same name."""
        incoming = self._path(ptype, "_incoming")
        tmp = f"{incoming}/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        with SourceFile(source) as src:   # opened (or refused) before anything is sent
            try:
                self._write(tmp, iter(src), overwrite=False)
                final = self._path(ptype, staged_final_name(relative_name, src.sha256,
                                                            collected_at))
                self._makedirs(str(PurePosixPath(final).parent))
                if not self._rename(tmp, final, replace=False):
                    # The same content is there already (its name holds the checksum).
                    self._call("delete", tmp, self.client.delete, tmp)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.client.delete(tmp)
                raise
        return StagedFile(str(PurePosixPath(final).relative_to(self.root)), src.size, src.sha256)

    def clean_incoming(self, ptype: str) -> int:
        """Remove partial uploads that killed masters of this host left."""
        incoming = self._path(ptype, "_incoming")
        names = self._call("list", incoming, self.client.list, incoming) \
            if self._status(incoming) else []
        prefix, removed = f"{socket.gethostname()}-", 0
        for name in names:
            pid = name[len(prefix):].split("-")[0] if name.startswith(prefix) else ""
            if pid.isdigit() and not _pid_alive(int(pid)):
                self._call("delete", f"{incoming}/{name}", self.client.delete, f"{incoming}/{name}")
                removed += 1
        return removed

    # -- reading a staged file ---------------------------------------------------
    def _checked_status(self, relative: str) -> dict:
        path = self._path(relative)
        status = self._status(path)
        if status is None:
            self.check_reachable()
            raise RefusedInput(f"staged file {relative} is not in the store "
                               f"{self.where(self.root)}")
        if status["type"] != "FILE":
            raise RefusedInput(f"staged path {relative} is not a regular file "
                               f"({status['type'].lower()})")
        return status

    def prefetch(self, relative: str) -> Path | None:
        """Copy a staged file to scratch ahead of its ``fetch`` (which then
        takes the copy instead of downloading); the copy's path, or None
        when it cannot be made now (``fetch`` will then download itself)."""
        try:
            status = self._checked_status(relative)
            return self._download(relative, status, kind="prefetched")
        except (RefusedInput, StoreError, RetryLater, OSError) as exc:
            log.debug("no prefetch of %s: %s", relative, exc)
            return None

    def _download(self, relative: str, status: dict, kind: str = "fetched") -> Path:
        size = status["length"]
        self._room_for(size, f"staged file {relative}")
        local = self._scratch_file(kind, PurePosixPath(relative).name)
        path = self._path(relative)
        try:
            with open(local, "wb") as out:
                def copy():
                    with self.client.read(path) as reader:
                        shutil.copyfileobj(reader, out, COPY_CHUNK)
                self._call("read", path, copy)
            if local.stat().st_size != size:
                raise StoreUnavailable(f"read {local.stat().st_size} of the {size} bytes of "
                                       f"{self.where(path)}; will read it again", 5.0)
        except BaseException:
            local.unlink(missing_ok=True)
            raise
        return local

    @contextlib.contextmanager
    def fetch(self, relative: str, prefetched: Path | None = None) -> Iterator[StagedCopy]:
        """A checked staged file in local scratch for the block (the
        prefetched copy when there is one), removed after."""
        status = self._checked_status(relative)
        local = None
        if prefetched is not None and prefetched.parent == self.scratch / "prefetched":
            with contextlib.suppress(OSError):
                # Taken over under this process's name: the killed-process
                # cleanup then knows whose it is.
                claimed = self._scratch_file("fetched", PurePosixPath(relative).name)
                os.rename(prefetched, claimed)
                if claimed.stat().st_size == status["length"]:
                    local = claimed
                else:
                    claimed.unlink()
        if local is None:
            local = self._download(relative, status)
        try:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
            try:
                yield StagedCopy(local, fd)
            finally:
                os.close(fd)
        finally:
            local.unlink(missing_ok=True)

    def discard_prefetched(self, copy: Path) -> None:
        """Remove a prefetched copy no fetch took."""
        if copy.parent == self.scratch / "prefetched":
            copy.unlink(missing_ok=True)

    # -- setting aside -----------------------------------------------------------
    def _unique_name(self, folder: str, name: str) -> str:
        for n in range(10_000):
            candidate = f"{folder}/{name if n == 0 else f'{name}.{n}'}"
            if self._status(candidate) is None:
                return candidate
        raise StoreError(f"{self.where(folder)}: no free name for {name}")

    def quarantine(self, relative: str, ptype: str, reason: str) -> str:
        """Move a checked staged file aside within the store, with a note."""
        day = time.strftime("%Y%m%d", time.gmtime())
        folder = self._path(ptype, "quarantine", day)
        self._makedirs(folder)
        name = bounded_name(safe_name(PurePosixPath(relative).name))
        src = self._path(relative)
        while True:
            dest = self._unique_name(folder, name)
            if self._rename(src, dest, replace=False):
                break
        self._write(f"{dest}.reason.txt", (
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\nstaged as: {relative}\n"
            f"{reason}\n").encode(), overwrite=True)
        return self.where(dest)

    def refuse(self, ptype: str, topic: str, partition: int, offset: int, reason: str,
               record: dict) -> str:
        """Keep a refused announcement as a dead-letter record with its reason."""
        day = time.strftime("%Y%m%d", time.gmtime())
        folder = self._path(ptype, "refused", day)
        dest = f"{folder}/{safe_name(topic)}-p{partition}-o{offset}.json"
        tmp = f"{folder}/.{PurePosixPath(dest).name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        self._write(tmp, (json.dumps({
            "refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "topic": topic, "partition": partition, "offset": offset, "reason": reason,
            "record": record}, indent=1, default=str) + "\n").encode(), overwrite=False)
        self._rename(tmp, dest, replace=True)
        return self.where(dest)

    # -- retention -----------------------------------------------------------------
    def mark_loaded(self, ptype: str, sha256: str) -> None:
        self._write(self._path(ptype, "_loaded", sha256[:16]), b"", overwrite=True)

    def expire_staged(self, ptype: str, older_than_days: float, now: float | None = None) -> int:
        """As ``LocalStore.expire_staged``: staged files past retention whose
        rows are in the table are removed; the rest is kept."""
        cutoff_ms = ((now or time.time()) - older_than_days * 86400) * 1000
        binary, loaded = self._path(ptype, "binary"), self._path(ptype, "_loaded")
        if self._status(binary) is None:
            return 0
        markers = dict(self._call("list", loaded, self.client.list, loaded, status=True)) \
            if self._status(loaded) else {}
        removed = 0
        walked = self._call("list", binary,
                            lambda: list(self.client.walk(binary, status=True, ignore_missing=True)))
        for (dirpath, _), _, files in reversed(walked):
            for name, status in files:
                if status["modificationTime"] < cutoff_ms and name.split("-", 1)[0] in markers:
                    self._call("delete", f"{dirpath}/{name}", self.client.delete,
                               f"{dirpath}/{name}")
                    removed += 1
            if dirpath != binary and not self._call("list", dirpath, self.client.list, dirpath):
                self._call("delete", dirpath, self.client.delete, dirpath)
        for name, status in markers.items():
            if status["modificationTime"] < cutoff_ms:
                self._call("delete", f"{loaded}/{name}", self.client.delete, f"{loaded}/{name}")
        return removed

    # -- tables ----------------------------------------------------------------------
    def table_root(self, table: str) -> Path:
        """Where the streaming job keeps its checkpoint: on the driver's host
        (scratch), as Spark's own HDFS client is not used by this store."""
        return self.scratch / "checkpoints" / safe_name(str(self.root)) / table

    def write_aside(self, area: str, name: str) -> BinaryIO:
        """A scratch file to write a table file into; ``make_visible`` uploads it."""
        import pyarrow as pa
        local = self._scratch_file("aside", name)
        with self._lock:
            self._aside[(area, name)] = local
        return pa.OSFile(str(local), mode="wb")

    def make_visible(self, area: str, name: str, final: str) -> None:
        """Upload the scratch file to ``<area>/_tmp/<name>``, then rename it to
        ``<area>/<final>``, replacing an earlier file of that name (delete,
        then rename: a crash between leaves it missing, and the input that
        made it is not committed, so it is written again)."""
        with self._lock:
            local = self._aside.pop((area, name))
        tmp, dest = self._path(area, "_tmp", name), self._path(area, final)
        try:
            with open(local, "rb") as data:
                self._write(tmp, data, overwrite=True)
            self._makedirs(str(PurePosixPath(dest).parent))
            self._rename(tmp, dest, replace=True)
        finally:
            local.unlink(missing_ok=True)

    def discard_aside(self, area: str, name: str) -> None:
        with self._lock:
            local = self._aside.pop((area, name), None)
        if local is not None:
            local.unlink(missing_ok=True)

    def remove_aside(self, area: str, prefix: str) -> int:
        """Delete what writers of ``prefix`` (killed processes) left in ``<area>/_tmp``."""
        tmp = self._path(area, "_tmp")
        if self._status(tmp) is None:
            return 0
        removed = 0
        for name in self._call("list", tmp, self.client.list, tmp):
            if name.startswith(f"{prefix}-"):
                self._call("delete", f"{tmp}/{name}", self.client.delete, f"{tmp}/{name}")
                removed += 1
        return removed

    def read(self, area: str, relative: str) -> bytes:
        path = self._path(area, relative)

        def whole():
            with self.client.read(path) as reader:
                return reader.read()
        return self._call("read", path, whole)

    def details(self, area: str, suffix: str = "") -> list[tuple[str, int, float]]:
        base = self._path(area)
        if self._status(base) is None:
            return []
        found = []
        walked = self._call("list", base, lambda: list(
            self.client.walk(base, ignore_missing=True, status=True)))
        for (dirpath, _), _, files in walked:
            rel = PurePosixPath(dirpath).relative_to(base)
            if "_tmp" in rel.parts:
                continue
            for name, st in files:
                if name.endswith(suffix):
                    found.append((str(rel / name) if str(rel) != "." else name, st["length"],
                                  st["modificationTime"] / 1000.0))
        return sorted(found)

    def read_tail(self, area: str, relative: str, nbytes: int) -> bytes:
        path = self._path(area, relative)
        status = self._status(path)
        if status is None:
            raise StoreError(f"{self.where(path)} is gone")
        offset = max(0, status["length"] - nbytes)

        def tail():
            with self.client.read(path, offset=offset, length=status["length"] - offset) as r:
                return r.read()
        return self._call("read", path, tail)

    def exists(self, area: str, relative: str) -> bool:
        return self._status(self._path(area, relative)) is not None

    def delete(self, area: str, relative: str) -> None:
        path = self._path(area, relative)
        self._call("delete", path, self.client.delete, path, recursive=True)

    def rename(self, area: str, src: str, dest: str) -> None:
        source, target = self._path(area, src), self._path(area, dest)
        self._makedirs(str(PurePosixPath(target).parent))
        if not self._rename(source, target, replace=False):
            raise StoreError(f"cannot move {self.where(source)} to {target}: it exists")

    def create(self, area: str, relative: str, data: bytes) -> bool:
        """Write ``data`` to a new file; False (nothing written) if a file of
        that name exists (HDFS create without overwrite: one creator wins)."""
        from hdfs.util import HdfsError
        path = self._path(area, relative)
        self._makedirs(str(PurePosixPath(path).parent))

        def create():
            try:
                self.client.write(path, data=data, overwrite=False)
                return True
            except HdfsError as exc:
                if exc.exception == "FileAlreadyExistsException":
                    return False
                raise
        return self._call("create", path, create)

    def append(self, area: str, relative: str, data: bytes) -> None:
        """WebHDFS APPEND; the first call creates the file."""
        if not self.create(area, relative, data):
            path = self._path(area, relative)
            self._call("append to", path, self.client.write, path, data=data, append=True)

    def exchange(self, area: str, a: str, b: str, step=None) -> bool:
        """WebHDFS has no atomic swap: three renames (see ``Store``); between
        the first two, readers find ``b`` missing. A ``b`` re-created by a
        writer meanwhile makes the second fail (``_rename`` refuses to move a
        folder onto a folder); ``compaction.settle`` then finishes."""
        first, second = self._path(area, a), self._path(area, b)
        spare = first + ".swap"
        for src, dest, name in ((second, spare, "exchange-1"), (first, second, "exchange-2"),
                                (spare, first, "exchange-3")):
            if not self._rename(src, dest, replace=False):
                raise StoreError(f"cannot move {self.where(src)} to {dest}: it exists")
            if step is not None:
                step(name)
        return False

    def list(self, area: str, suffix: str = "") -> list[str]:
        base = self._path(area)
        if self._status(base) is None:
            return []
        found = []
        walked = self._call("list", base,
                            lambda: list(self.client.walk(base, ignore_missing=True)))
        for dirpath, _, files in walked:
            rel = PurePosixPath(dirpath).relative_to(base)
            if "_tmp" in rel.parts:
                continue
            found += [str(rel / f) if str(rel) != "." else f for f in files if f.endswith(suffix)]
        return sorted(found)
