"""One log format for every process (master, workers, their pool processes):
plain text by default, or one JSON object per line (``log_format: "json"``
or ``--log-format json``). A line about a file carries its name and
checksum: in the text, and as the ``file`` and ``sha256`` fields of JSON."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"
ENV_FORMAT = "SPOT_INGEST_LOG_FORMAT"   # children started by the launcher inherit it
FILE_FIELDS = ("file", "sha256")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "process", "pid", "logger", "message"}``, plus
    ``file`` and ``sha256`` on lines about a file, ``error`` with a stack."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "process": record.processName, "pid": record.process,
               "logger": record.name, "message": record.getMessage()}
        for key in FILE_FIELDS:
            if getattr(record, key, None) is not None:
                out[key] = getattr(record, key)
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: int | str | None = None, fmt: str | None = None) -> None:
    level = level or os.environ.get("SPOT_INGEST_LOG_LEVEL", "INFO")
    fmt = fmt or os.environ.get(ENV_FORMAT) or "text"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Pool processes (forked or spawned) log the same way.
    os.environ[ENV_FORMAT] = fmt
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own
    # retry loops say what is going on once, with the consequence.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


def about(name: str, sha256: str | None) -> dict:
    """``extra=`` for a log line about a file (the JSON fields)."""
    return {"file": printable(name), "sha256": sha256}


def checksum(sha256: str | None) -> str:
    """A checksum as text lines name it."""
    return f"sha256 {sha256[:16]}" if sha256 else "sha256 unknown"


def printable(text: str) -> str:
    """A name from outside, safe in a log line: control characters escaped,
    so that a newline in a file name cannot forge a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
