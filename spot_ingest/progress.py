"""Progress of long work on a terminal: files (or partitions) and records done
and the rate, drawn by tqdm on stderr. When stderr is not a terminal (a log
file, cron, a pipe) nothing is drawn: the log says what happened."""
from __future__ import annotations

import sys
from typing import TextIO


class _Quiet:
    """What a bar offers, doing nothing."""
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        pass

    def reset(self, total: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def on_terminal(stream: TextIO | None = None) -> bool:
    try:
        return (stream or sys.stderr).isatty()
    except (AttributeError, ValueError):
        return False


def progress(total: int | None = None, unit: str = "file", desc: str = "",
             stream: TextIO | None = None):
    """A tqdm bar on ``stream`` (stderr) if it is a terminal, else a quiet
    stand-in with the same ``update``, ``set_postfix_str``, ``close``."""
    stream = stream or sys.stderr
    if not on_terminal(stream):
        return _Quiet()
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, desc=desc, file=stream, dynamic_ncols=True,
                mininterval=0.5, leave=True)
