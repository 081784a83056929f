"""Running a conversion tool and streaming its text output into Arrow.

For pipelines: the engine itself runs no tool. Every program runs from an
argument list, never through a shell, so a file name is never interpreted.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pcsv

from .pipeline import BadInputError


class ToolTimeout(Exception):
    """A tool ran past the time limit the engine set for one file, and was killed."""


_limit = threading.local()


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Every ToolRun started inside this block is killed once ``seconds`` have
    passed since the block began (a hung tool, or a FIFO it waits on, must not
    hold a worker forever); the run then raises ToolTimeout."""
    _limit.deadline = time.monotonic() + seconds if seconds else None
    _limit.seconds = seconds
    try:
        yield
    finally:
        _limit.deadline = None


class ToolRun:
    """``with ToolRun(cmd) as run: ... run.stdout ...``; afterwards
    ``run.returncode`` and ``run.stderr`` hold how it ended. Leaving the block
    early (an error, or a consumer that stops reading) kills the tool; so does
    the time limit of an enclosing ``time_limit`` block."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None):
        self.cmd = cmd
        self.env = {**os.environ, "LC_ALL": "C", **(env or {})}
        self.returncode: int | None = None
        self.stderr = ""

    def __enter__(self) -> "ToolRun":
        # stderr goes to a file: a pipe could fill up and stall the tool.
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL, env=self.env, bufsize=1 << 20)
        self.stdout = self.proc.stdout
        self.timed_out = False
        self._timer = None
        deadline = getattr(_limit, "deadline", None)
        if deadline is not None:
            self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _expire(self) -> None:
        if self.proc.poll() is None:
            self.timed_out = True
            self.proc.kill()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if exc_type is not None and self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.returncode = self.proc.wait()
        self._stderr.seek(0)
        self.stderr = self._stderr.read().decode("utf-8", "replace").strip()
        self._stderr.close()
        if self.timed_out:
            raise ToolTimeout(f"{os.path.basename(self.cmd[0])} was killed after the time limit of "
                              f"{_limit.seconds:g} s for one file")


def stream_csv(stdout, tool: str, read_options: pcsv.ReadOptions,
               parse_options: pcsv.ParseOptions, convert_options: pcsv.ConvertOptions,
               to_batch: Callable[[pa.RecordBatch], pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Parse a tool's delimited output block by block (in C++, on Arrow's
    threads, while the tool is still writing) and map each block."""
    reader = pcsv.open_csv(stdout, read_options=read_options, parse_options=parse_options,
                           convert_options=convert_options)
    try:
        for raw in reader:
            if raw.num_rows:
                yield to_batch(raw)
    except pa.ArrowInvalid as exc:
        raise BadInputError(f"unexpected {tool} output: {exc}") from None
    finally:
        reader.close()
