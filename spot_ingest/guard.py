"""The resource guard: a worker takes no new file while the host is short of
memory or of disk where it writes, and takes them again when there is room.
Nothing is lost meanwhile: the announcements wait on the topic, uncommitted.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import psutil

from .config import ResourceGuardConfig
from .units import format_size

log = logging.getLogger("spot_ingest.guard")


class ResourceGuard:
    """``short()`` says why no new work should start (None: go on). It
    looks at most every ``check_seconds``, and logs once when it starts
    holding work back and once when it lets go."""

    def __init__(self, cfg: ResourceGuardConfig, paths: list[Path], what: str = "worker",
                 on_change=None):
        self.cfg, self.what, self.on_change = cfg, what, on_change
        self.paths = [p for p in dict.fromkeys(paths) if p is not None]
        self.checked_at = float("-inf")
        self.reason: str | None = None
        self.since = 0.0

    def _measure(self) -> str | None:
        if self.cfg.min_free_memory:
            available = psutil.virtual_memory().available
            if available < self.cfg.min_free_memory:
                return (f"available memory is {format_size(available)}, below "
                        f"resource_guard.min_free_memory ({format_size(self.cfg.min_free_memory)})")
        if self.cfg.min_free_disk:
            for path in self.paths:
                existing = path
                while not existing.exists() and existing != existing.parent:
                    existing = existing.parent    # the folder may not be made yet
                try:
                    st = os.statvfs(existing)
                except OSError:
                    continue
                free = st.f_bavail * st.f_frsize
                if free < self.cfg.min_free_disk:
                    return (f"free space on {path} is {format_size(free)}, below "
                            f"resource_guard.min_free_disk ({format_size(self.cfg.min_free_disk)})")
        return None

    def short(self) -> str | None:
        now = time.monotonic()
        if now - self.checked_at < self.cfg.check_seconds:
            return self.reason
        self.checked_at = now
        reason = self._measure()
        if reason and not self.reason:
            self.since = now
            log.warning("%s takes no new file: %s; the files wait on the topic and are taken "
                        "when there is room again", self.what, reason)
        elif self.reason and not reason:
            log.info("%s takes new files again (held back %.0f s: %s)", self.what,
                     now - self.since, self.reason)
        if bool(reason) != bool(self.reason) and self.on_change is not None:
            self.on_change(bool(reason))
        self.reason = reason
        return reason
