"""Progress bars: drawn on a terminal (a pseudo-terminal here), silent
otherwise."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import termios

from spot_ingest.progress import progress


def test_nothing_is_drawn_when_the_output_is_not_a_terminal():
    stream = io.StringIO()
    with progress(10, "file", "flow", stream=stream) as bar:
        bar.update(4)
        bar.set_postfix_str("1,000 records")
    assert stream.getvalue() == "" and bar.n == 4


def test_a_terminal_shows_files_done_of_the_total_and_the_records():
    leader, follower = pty.openpty()
    # 24 rows, 100 columns, as a terminal window has (a new pty has 0 x 0).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with os.fdopen(follower, "w", closefd=True) as terminal:
        with progress(10, "file", "flow", stream=terminal) as bar:
            bar.update(4)
            bar.set_postfix_str("1,000 records")
            bar.refresh()
        terminal.flush()
        drawn = b""
        while select.select([leader], [], [], 0.5)[0]:   # what the terminal received
            drawn += os.read(leader, 65536)
    os.close(leader)
    drawn = drawn.decode(errors="replace")
    assert "flow" in drawn and "4/10" in drawn and "1,000 records" in drawn
