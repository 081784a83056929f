"""The shared store where the master stages capture files for the workers.

Layout under ``hdfs_app_path`` (as in the original Spot ingest):

    <type>/binary/YYYYMMDD/HH/<sha256 prefix>-<name>    staged captures
    <type>/quarantine/YYYYMMDD/<name> + <name>.reason.txt
    <type>/_incoming/                                  partial copies (ignored)

A staged file appears under its final name only once it is complete (copy to
``_incoming``, fsync, rename), and its name carries its checksum, so staging
the same content twice lands on the same name. This module handles local
paths and ``file://`` URIs, which is also how an HDFS NFS gateway mount or
any shared filesystem is used.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

COPY_CHUNK = 1 << 20


class StoreError(Exception):
    pass


@dataclass(frozen=True)
class StagedFile:
    location: str
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    def __init__(self, location: str):
        self.root = local_root(location)

    def stage(self, source: Path, ptype: str, relative_name: str, collected_at: float) -> StagedFile:
        """Copy ``source`` into the store, hashing it on the way; return where it is."""
        incoming = self.root / ptype / "_incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        tmp = incoming / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha = digest.hexdigest()
            stamp = time.gmtime(collected_at)
            rel = Path(relative_name)
            final = (self.root / ptype / "binary" / time.strftime("%Y%m%d", stamp)
                     / time.strftime("%H", stamp) / safe_name(str(rel.parent))
                     / f"{sha[:16]}-{safe_name(rel.name)}")
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedFile(str(final), size, sha)

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

    def local_path(self, location: str) -> Path:
        """A path a worker can read the staged file from."""
        return local_root(location) if location.startswith("file://") else Path(location)

    def quarantine(self, location: str, ptype: str, reason: str) -> Path:
        """Move a staged file aside with a note saying why; return its new path."""
        src = self.local_path(location)
        day = time.strftime("%Y%m%d", time.gmtime())
        dest_dir = self.root / ptype / "quarantine" / day
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / src.name
        if src.exists():
            shutil.move(src, dest)
        note = dest_dir / f"{src.name}.reason.txt"
        note.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
                        f"staged as: {location}\n{reason}\n", encoding="utf-8")
        return dest

    def table_root(self, table: str) -> Path:
        return self.root / table
