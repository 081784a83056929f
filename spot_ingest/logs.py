"""One log format for every process (master, workers, their pool processes)."""
from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s[%(process)d] %(name)s: %(message)s"


def setup_logging(level: int | str | None = None) -> None:
    level = level or os.environ.get("SPOT_INGEST_LOG_LEVEL", "INFO")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own
    # retry loops say what is going on once, with the consequence.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


def printable(text: str) -> str:
    """A name from outside, safe in a log line: control characters escaped,
    so that a newline in a file name cannot forge a line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
