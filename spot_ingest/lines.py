"""The line protocol: how a log of text lines crosses the topic.

The master cuts a log into messages (``cut``), the streaming job checks and
loads them (``spot_ingest.streaming``); this module owns what both sides
agree on: the Kafka headers, their formats, the end-of-run marker, and the
name under which a message's rows are written.

A message holds consecutive whole lines of one file under one fields
header, joined with ``\\n``, at most ``kafka.message_size`` bytes with its
headers. Its headers:

    spot.kind          LINES (or END_OF_RUN: the master's --once run is over)
    spot.id            <24 hex digits>-<6 digits> (MESSAGE_ID_PATTERN)
    spot.source        the file's path relative to the collector directory
    spot.first_line    the line number (from 1) of the message's first line
    spot.fields        the field names that govern the lines (single spaces)
    spot.fields_error  present when the file's fields header is bad: every
                       line of the message is rejected with this reason
    spot.invalid_utf8  indexes (0-based, comma-separated) of the lines that
                       are not valid UTF-8; Spark would replace the bad bytes
                       when it reads the text, after which they cannot be told
    spot.run           (END_OF_RUN) the run id

Determinism: a message's id is derived from the file's identity (device,
inode, digest of its first bytes) and the byte offset where it starts; before
publishing, the ledger records where the planned run of messages ends, so a
master killed half-way cuts the same messages again after a restart, byte
for byte. The job names a message's output after a digest of its content and
all its headers (``output_name``): a repeated message replaces its own
output, never doubles, and a forged message can only write a file of its own.

A log may be offered again after it grew (a writer paused longer than
``settle_seconds``). How far each file was published is remembered in a small
ledger (``<state_dir>/<device>-<inode>.json``, written with fsync and an
atomic rename), with digests of its first bytes and of the bytes before that
point, which tell a grown file from a new one that reuses the inode; only
the lines after that point are published. Only whole lines are published,
except a last line without newline in a file that did not change while it
was read (the file is final). A ``.gz`` log is decompressed as a stream; it
is read whole once first, so that a corrupt or truncated one is set aside
before any of it is published.
"""
from __future__ import annotations

import collections
import gzip
import hashlib
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .logs import printable
from .pipeline import BadInputError

if TYPE_CHECKING:
    from .pipeline import RecordPipeline

log = logging.getLogger("spot_ingest.lines")

# Header names.
KIND, ID, SOURCE, FIRST_LINE = "spot.kind", "spot.id", "spot.source", "spot.first_line"
FIELDS, FIELDS_ERROR, INVALID_UTF8, RUN = ("spot.fields", "spot.fields_error",
                                           "spot.invalid_utf8", "spot.run")
LINES, END_OF_RUN = "LINES", "END_OF_RUN"

# Their formats, as the master makes them (anchored by the users:
# re.fullmatch here, ^...$ in Spark).
MESSAGE_ID_PATTERN = "[0-9a-f]{24}-[0-9]{6}"
RUN_ID_PATTERN = "[0-9a-f]{8,32}"          # uuid4().hex, or a prefix of one
FIELD_NAME_PATTERN = "[^\\x00-\\x20\\x7f]+"  # no space, no control character
MAX_FIELDS = 1000
MAX_FIELDS_ERROR = 500

HEADER_OVERHEAD = 1024   # room for the Kafka record's headers and framing
HEAD_BYTES = 64 << 10    # the ledger's digest of a file's first bytes covers this many
TAIL_BYTES = 4 << 10     # ... and of the bytes before the published offset
PRUNE_SECONDS = 7 * 86400   # a ledger entry of a file gone this long is removed


@dataclass(frozen=True)
class Message:
    """Consecutive lines of one file under one header, ready to publish."""
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass(frozen=True)
class SetAside:
    """A line that cannot be published (longer than a message may be)."""
    line_no: int
    data: bytes
    reason: str


def end_of_run(run_id: str) -> Message:
    """The marker the master publishes on every partition at the end of a
    ``--once`` run; the job stops once it saw it on all of them."""
    return Message(b"", [(KIND, END_OF_RUN.encode()), (RUN, run_id.encode())])


def message_id(sha256: str, index: int) -> str:
    """``<24 hex digits>-<6 digits>`` (MESSAGE_ID_PATTERN)."""
    return f"{sha256[:24]}-{index % 1_000_000:06d}"


def output_name(value: bytes | None, headers) -> str:
    """The name the job gives a message's output (``part-<name>.parquet``,
    ``rejects-<name>.parquet``): SHA-256 over the digest of the value and the
    digests of every header's key and value, in sorted order, so that no
    shift of bytes between value and headers gives the same name. Must equal
    ``streaming.OUTPUT_NAME`` (the same in Spark SQL) for headers as the job
    sees them (values decoded as UTF-8 with replacement)."""
    pairs = sorted((k, (v or b"").decode("utf-8", "replace")) for k, v in headers)
    text = hashlib.sha256(value or b"").hexdigest() + "".join(
        hashlib.sha256(k.encode()).hexdigest() + hashlib.sha256(v.encode()).hexdigest()
        for k, v in pairs)
    return hashlib.sha256(text.encode()).hexdigest()


def check_fields(body: bytes, what: str = "the fields header") -> tuple[str, str | None]:
    """Field names as a fields header gives them -> (the names, separated by
    single spaces; what is wrong with them, or None). ``what`` names the
    header in the problem (e.g. "the #Fields: header")."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return " ".join(body.decode("utf-8", "replace").split()), \
            f"{what} is not valid UTF-8"
    names = text.split()
    problem = None
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
        problem = f"{what} holds a control character (e.g. a NUL byte)"
    elif not names:
        problem = f"{what} names no field"
    elif len(names) > MAX_FIELDS:
        problem = f"{what} names {len(names)} fields, more than {MAX_FIELDS}"
    else:
        twice = [n for n, c in collections.Counter(names).items() if c > 1]
        if twice:
            problem = f"{what} names {', '.join(twice)} more than once"
    if problem and len(problem) > MAX_FIELDS_ERROR:
        problem = problem[:MAX_FIELDS_ERROR - 3] + "..."
    return " ".join(names), (printable(problem) if problem else None)


# -- the master's side: cutting a log into messages ------------------------------

def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_at(f, pos: int, n: int) -> bytes:
    f.seek(pos)
    return f.read(n) if n > 0 else b""


def _last_newline(f, end: int) -> int:
    """The offset just after the last newline before ``end`` (0 if none)."""
    pos = end
    while pos > 0:
        n = min(1 << 16, pos)
        pos -= n
        chunk = _read_at(f, pos, n)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return pos + i + 1
    return 0


def _scan_gzip(raw, relative: str) -> tuple[int, int]:
    """Decompress a whole .gz once, as a stream, to check it: (length of its
    content, offset after its last newline). A corrupt or truncated file is
    bad input: nothing of it may be published."""
    total = last_nl = 0
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as g:
            while chunk := g.read(1 << 20):
                i = chunk.rfind(b"\n")
                if i >= 0:
                    last_nl = total + i + 1
                total += len(chunk)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise BadInputError(f"{relative} is not a readable gzip file ({exc}); none of its "
                            f"lines was published") from None
    return total, last_nl


class _Ledger:
    """How far each file was published: one small JSON file per file
    (``<device>-<inode>.json``), replaced atomically, so the staging
    processes never write the same entry at once."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def load(self, key: str) -> dict | None:
        try:
            state = json.loads((self.dir / f"{key}.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ledger entry %s is unreadable (%s); the file is published from its start",
                        self.dir / f"{key}.json", exc)
            return None
        return state if isinstance(state, dict) and state.get("version") == 1 else None

    def save(self, key: str, state: dict) -> None:
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{key}.json")
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def prune(self) -> None:
        """Forget files gone (or replaced) for PRUNE_SECONDS, and temporaries
        a killed master left."""
        now = time.time()
        for tmp in self.dir.glob(".*.tmp"):
            try:
                if now - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
            except OSError:
                continue
        for entry in self.dir.glob("*.json"):
            try:
                if now - entry.stat().st_mtime < PRUNE_SECONDS:
                    continue
                state = json.loads(entry.read_text(encoding="utf-8"))
                try:
                    alive = os.stat(state["path"]).st_ino == state["ino"]
                except (OSError, KeyError, TypeError):
                    alive = False
                if not alive:
                    entry.unlink()
            except (OSError, ValueError):
                continue


def _same_file(f, state: dict, length: int) -> bool:
    """Whether the content holds, where the ledger says, the bytes that were
    published (not a new file that reuses the inode)."""
    try:
        if length < state["offset"] or length < state["head_len"]:
            return False
        if _sha(_read_at(f, 0, state["head_len"])) != state["head"]:
            return False
        tail = _read_at(f, state["tail_from"], state["offset"] - state["tail_from"])
        return _sha(tail) == state["tail"]
    except (KeyError, TypeError):
        return False


def _unchanged(path: Path, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def cut(path: Path, relative: str, max_bytes: int, rules: RecordPipeline,
        state_dir: Path | None = None) -> Iterator[Message | SetAside]:
    """Cut a log into messages of at most ``max_bytes``, never splitting a
    line; ``rules`` (the pipeline) says which lines are comments and which
    comments declare field names. With ``state_dir`` (the master's ledger),
    publish only what was not published before, and record progress there.
    The caller asks for the next item only once the broker acknowledged the
    previous message, so what is recorded after a ``yield`` is published.
    Raises ``BadInputError`` (before yielding anything) for a log that
    cannot be read (a corrupt .gz)."""
    path = Path(path)
    ledger = _Ledger(state_dir) if state_dir is not None else None
    if ledger is not None:
        ledger.prune()
    with open(path, "rb") as raw:   # streamed: logs can be far larger than memory
        st = os.fstat(raw.fileno())
        gz = raw.read(2) == b"\x1f\x8b" or path.name.endswith(".gz")
        raw.seek(0)
        if gz:
            length, last_nl = _scan_gzip(raw, relative)
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw, mode="rb")
        else:
            length, f = st.st_size, raw
            last_nl = _last_newline(f, length)
        key = f"{st.st_dev}-{st.st_ino}"
        state = ledger.load(key) if ledger is not None else None
        if state is not None and not _same_file(f, state, length):
            log.info("%s is not the file published before under its inode (its first bytes "
                     "differ, or it is shorter): published from its start", relative)
            state = None
        if state is None:
            head = _read_at(f, 0, min(HEAD_BYTES, length))
            state = {"version": 1, "path": os.fsdecode(path), "dev": st.st_dev,
                     "ino": st.st_ino, "head_len": len(head), "head": _sha(head),
                     "offset": 0, "line": 1, "fields": rules.default_fields, "fields_error": None,
                     "tail_from": 0, "tail": _sha(b""), "pending": None}
        elif state["offset"] or state["pending"] is not None:
            log.info("%s: bytes up to %d (line %d) were published before; going on from there",
                     relative, state["offset"], state["line"])
        state["path"] = os.fsdecode(path)
        identity = f"{st.st_dev}:{st.st_ino}:{state['head']}"
        save = (lambda s: ledger.save(key, s)) if ledger is not None else (lambda s: None)
        cutter = _Cutter(f, state, relative, max_bytes, identity, save, rules)
        if state["pending"] is not None:
            # A master stopped in the middle of these messages: cut them
            # again exactly as before (the same ids and the same bytes).
            yield from cutter.offer(min(state["pending"], length))
        yield from cutter.offer(last_nl)
        if state["offset"] < length and (gz or _unchanged(path, st)):
            # A last line without newline, in a file that did not change
            # while it was read: the file is final, the line complete.
            yield from cutter.offer(length)
        if gz:
            f.close()


class _Cutter:
    def __init__(self, f, state: dict, relative: str, max_bytes: int, identity: str,
                 save: Callable[[dict], None], rules: RecordPipeline):
        self.f, self.state, self.relative, self.max_bytes = f, state, relative, max_bytes
        self.identity, self.save, self.rules = identity, save, rules

    def offer(self, end: int) -> Iterator[Message | SetAside]:
        """Publish the content from ``state["offset"]`` to ``end``; ``state``
        is recorded before (where the run ends) and after (how far it went)."""
        f, state, relative, max_bytes = self.f, self.state, self.relative, self.max_bytes
        comment = self.rules.comment_prefix
        start = state["offset"]
        if end <= start:
            if state["pending"] is not None:
                state["pending"] = None
                self.save(state)
            return
        state["pending"] = end
        self.save(state)
        log.info("publishing %s: bytes %d-%d, from line %d", relative, start, end, state["line"])
        source = relative.encode("utf-8", "surrogateescape")
        fields, fields_error = state["fields"], state["fields_error"]
        line_no = state["line"]
        lines: list[bytes] = []
        bad: list[str] = []
        size = first = msg_start = 0
        recent: collections.deque[bytes] = collections.deque()
        recent_len = 0

        def budget() -> int:
            return max(1024, max_bytes - HEADER_OVERHEAD - len(source) - len(fields)
                       - len(fields_error or ""))

        def flush():
            nonlocal lines, bad, size
            if not lines:
                return None
            sha = hashlib.sha256(f"{self.identity}:{msg_start}".encode()).hexdigest()
            headers = [
                (KIND, LINES.encode()), (ID, message_id(sha, first).encode()),
                (SOURCE, source), (FIRST_LINE, str(first).encode()),
                (FIELDS, fields.encode())]
            if fields_error:
                headers.append((FIELDS_ERROR, fields_error.encode()))
            if bad:
                headers.append((INVALID_UTF8, ",".join(bad).encode()))
            msg = Message(b"\n".join(lines), headers)
            lines, bad, size = [], [], 0
            return msg

        f.seek(start)
        pos = start
        limit = budget()
        while pos < end:
            raw = f.readline(end - pos)
            if not raw:
                break    # the file became shorter than it was
            line_start, pos = pos, pos + len(raw)
            recent.append(raw)
            recent_len += len(raw)
            while recent_len - len(recent[0]) >= TAIL_BYTES:
                recent_len -= len(recent.popleft())
            line = raw.rstrip(b"\r\n")
            n, line_no = line_no, line_no + 1
            is_comment = bool(comment) and line.startswith(comment)
            if is_comment or not line.strip() or len(line) > limit:
                # Anything that is not a data line ends the current message,
                # so a message is always a run of consecutive lines.
                msg = flush()
                if msg:
                    yield msg
                header = self.rules.fields_header(line) if is_comment else None
                if header is not None:
                    fields, fields_error = header
                    limit = budget()
                    if fields_error:
                        # The lines under it are published and the job rejects
                        # every one with this reason: they land in the rejects
                        # with their line numbers and are counted, where setting
                        # them aside here would make one file per line.
                        log.warning("%s line %d: %s; every line under it is rejected",
                                    relative, n, fields_error)
                elif len(line) > limit and not is_comment:
                    yield SetAside(n, line, f"line {n} of {relative} is {len(line)} bytes, longer "
                                   f"than a message may be (kafka.message_size {max_bytes} "
                                   f"bytes); set aside, not truncated")
                continue
            extra = 0
            if not line.isascii() and not _is_utf8(line):
                extra = len(str(len(lines))) + 1
            if size + len(line) + 1 + extra > limit:
                msg = flush()
                if msg:
                    yield msg
            if not lines:
                first, msg_start = n, line_start
            if extra:
                bad.append(str(len(lines)))
            lines.append(line)
            size += len(line) + 1 + extra
        msg = flush()
        if msg:
            yield msg
        tail = b"".join(recent)
        state.update(offset=pos, line=line_no, fields=fields, fields_error=fields_error,
                     tail_from=pos - len(tail), tail=_sha(tail), pending=None)
        self.save(state)
