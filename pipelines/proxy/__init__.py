"""Proxy pipeline: Blue Coat ProxySG access logs (W3C ELFF) -> proxy table.

Unlike flow and dns, no file crosses the bus: the master publishes the log's
lines themselves, in messages of at most ``kafka.message_size`` bytes, and a
Spark Structured Streaming job (``job.py``) parses them into the table.

A message never splits a line and holds only consecutive lines of one file
under one ``#Fields:`` header, which travels with it (Kafka header
``spot.fields``), so any message parses on its own. A ``.gz`` log is
decompressed as a stream; it is read whole once first, so that a corrupt or
truncated one is set aside (``BadInputError``) before any of it is published.

A log may be offered again after it grew (a writer that paused longer than
``settle_seconds``). How far each file was published is remembered in a small
ledger (``<local_staging>/published/<pipeline>/<device>-<inode>.json``, written
with fsync and an atomic rename), with digests of its first bytes and of the
bytes before that point, which tell a grown file from a new one that reuses
the inode; only the lines after that point are published. Only whole lines
are published, except a last line without newline in a file that did not
change while it was read (the file is final).

Determinism: a message's id is derived from the file's identity (device,
inode, digest of its first bytes) and the byte offset where the message
starts; before publishing, the ledger records where the planned run of
messages ends, so a master killed half-way cuts the same messages again after
a restart, byte for byte. The job names each message's output after a digest
of its content and all its headers (``output_name``): a repeated message
replaces its own output, never doubles, and a forged message can only write a
file of its own.
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
from typing import Iterator

import pyarrow as pa

from spot_ingest.pipeline import BadInputError, Pipeline

log = logging.getLogger("spot_ingest.proxy")

# The formats of what the job takes from a message's headers, as the master
# makes them (anchored by the users: re.fullmatch here, ^...$ in Spark).
MESSAGE_ID_PATTERN = "[0-9a-f]{24}-[0-9]{6}"
RUN_ID_PATTERN = "[0-9a-f]{8,32}"          # uuid4().hex, or a prefix of one
MAX_FIELDS = 1000
MAX_FIELDS_ERROR = 500

# The field order of the original Spot proxy table, used for a log that
# carries no #Fields: header.
ORIGINAL_FIELDS = (
    "date time c-ip cs-host cs-method cs(User-Agent) rs(Content-Type) time-taken cs-username "
    "cs-auth-group x-exception-id sc-filter-result cs-categories cs(Referer) sc-status s-action "
    "cs-uri-scheme cs-uri-port cs-uri-path cs-uri-query cs-uri-extension s-ip sc-bytes cs-bytes "
    "x-virus-id x-bluecoat-application-name x-bluecoat-application-operation")

# table column -> ELFF field name (None: computed)
COLUMNS = (
    ("p_date", "date"), ("p_time", "time"), ("clientip", "c-ip"), ("host", "cs-host"),
    ("reqmethod", "cs-method"), ("useragent", "cs(User-Agent)"),
    ("resconttype", "rs(Content-Type)"), ("duration", "time-taken"),
    ("username", "cs-username"), ("authgroup", "cs-auth-group"),
    ("exceptionid", "x-exception-id"), ("filterresult", "sc-filter-result"),
    ("webcat", "cs-categories"), ("referer", "cs(Referer)"), ("respcode", "sc-status"),
    ("action", "s-action"), ("urischeme", "cs-uri-scheme"), ("uriport", "cs-uri-port"),
    ("uripath", "cs-uri-path"), ("uriquery", "cs-uri-query"),
    ("uriextension", "cs-uri-extension"), ("serverip", "s-ip"), ("scbytes", "sc-bytes"),
    ("csbytes", "cs-bytes"), ("virusid", "x-virus-id"),
    ("bcappname", "x-bluecoat-application-name"),
    ("bcappoper", "x-bluecoat-application-operation"), ("fulluri", None),
)
INT_COLUMNS = {"duration", "scbytes", "csbytes"}
TABLE_SCHEMA = pa.schema([(c, pa.int32() if c in INT_COLUMNS else pa.string()) for c, _ in COLUMNS])
STRING_PARTITIONS = pa.schema([("y", pa.string()), ("m", pa.string()), ("d", pa.string()),
                               ("h", pa.string())])
# A rejected line (line_no, line), or a rejected message (line_no and line
# NULL); both with the Kafka record they came in.
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("line_no", pa.int64()),
                            ("reason", pa.string()), ("line", pa.string()),
                            ("kafka_partition", pa.int32()), ("kafka_offset", pa.int64())])

HEADER_OVERHEAD = 1024   # room for the Kafka record's headers and framing
HEAD_BYTES = 64 << 10    # the ledger's digest of a file's first bytes covers this many
TAIL_BYTES = 4 << 10     # ... and of the bytes before the published offset
PRUNE_SECONDS = 7 * 86400   # a ledger entry of a file gone this long is removed


@dataclass
class Message:
    """Consecutive lines of one file under one header, ready to publish."""
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass
class SetAside:
    """A line that cannot be published (longer than a message may be)."""
    line_no: int
    data: bytes
    reason: str


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def message_id(sha256: str, index: int) -> str:
    """``<24 hex digits>-<6 digits>`` (MESSAGE_ID_PATTERN)."""
    return f"{sha256[:24]}-{index % 1_000_000:06d}"


def output_name(value: bytes | None, headers) -> str:
    """The name the job gives a message's output (``part-<name>.parquet``,
    ``rejects-<name>.parquet``): SHA-256 over the digest of the value and the
    digests of every header's key and value, in sorted order, so that no
    shift of bytes between value and headers gives the same name. Must equal
    ``job.OUTPUT_NAME`` (the same in Spark SQL) for headers as the job sees
    them (values decoded as UTF-8 with replacement)."""
    pairs = sorted((k, (v or b"").decode("utf-8", "replace")) for k, v in headers)
    text = hashlib.sha256(value or b"").hexdigest() + "".join(
        hashlib.sha256(k.encode()).hexdigest() + hashlib.sha256(v.encode()).hexdigest()
        for k, v in pairs)
    return hashlib.sha256(text.encode()).hexdigest()


def parse_fields(body: bytes) -> tuple[str, str | None]:
    """What follows ``#Fields:`` -> (the names, separated by single spaces;
    what is wrong with the header, or None)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return " ".join(body.decode("utf-8", "replace").split()), \
            "the #Fields: header is not valid UTF-8"
    names = text.split()
    problem = None
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in text):
        problem = "the #Fields: header holds a control character (e.g. a NUL byte)"
    elif not names:
        problem = "the #Fields: header names no field"
    elif len(names) > MAX_FIELDS:
        problem = f"the #Fields: header names {len(names)} fields, more than {MAX_FIELDS}"
    else:
        twice = [n for n, c in collections.Counter(names).items() if c > 1]
        if twice:
            problem = f"the #Fields: header names {', '.join(twice)} more than once"
    if problem and len(problem) > MAX_FIELDS_ERROR:
        problem = problem[:MAX_FIELDS_ERROR - 3] + "..."
    return " ".join(names), (_printable(problem) if problem else None)


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


class ProxyPipeline(Pipeline):
    type = "proxy"
    table = "proxy"
    schema = TABLE_SCHEMA
    partition_schema = STRING_PARTITIONS
    default_supported_files = (".log", ".log.gz", ".txt")
    tools = ()
    delivery = "records"
    consumer = "streaming"

    def records(self, path: Path, relative: str, max_bytes: int,
                state_dir: Path | None = None) -> Iterator[Message | SetAside]:
        """Cut a log into messages of at most ``max_bytes``, never splitting a
        line. With ``state_dir`` (the master's ledger), publish only what was
        not published before, and record progress there; the engine asks for
        the next item only once the broker acknowledged the previous message,
        so what is recorded after a ``yield`` is published."""
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
                         "offset": 0, "line": 1, "fields": ORIGINAL_FIELDS, "fields_error": None,
                         "tail_from": 0, "tail": _sha(b""), "pending": None}
            elif state["offset"] or state["pending"] is not None:
                log.info("%s: bytes up to %d (line %d) were published before; going on from there",
                         relative, state["offset"], state["line"])
            state["path"] = os.fsdecode(path)
            identity = f"{st.st_dev}:{st.st_ino}:{state['head']}"
            save = (lambda s: ledger.save(key, s)) if ledger is not None else (lambda s: None)
            if state["pending"] is not None:
                # A master stopped in the middle of these messages: cut them
                # again exactly as before (the same ids and the same bytes).
                yield from self._offer(f, state, min(state["pending"], length), relative,
                                       max_bytes, identity, save)
            yield from self._offer(f, state, last_nl, relative, max_bytes, identity, save)
            if state["offset"] < length and (gz or _unchanged(path, st)):
                # A last line without newline, in a file that did not change
                # while it was read: the file is final, the line complete.
                yield from self._offer(f, state, length, relative, max_bytes, identity, save)
            if gz:
                f.close()

    def _offer(self, f, state: dict, end: int, relative: str, max_bytes: int, identity: str,
               save) -> Iterator[Message | SetAside]:
        """Publish the content from ``state["offset"]`` to ``end``; ``state``
        is recorded before (where the run ends) and after (how far it went)."""
        start = state["offset"]
        if end <= start:
            if state["pending"] is not None:
                state["pending"] = None
                save(state)
            return
        state["pending"] = end
        save(state)
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
            sha = hashlib.sha256(f"{identity}:{msg_start}".encode()).hexdigest()
            headers = [
                ("spot.kind", b"LINES"), ("spot.id", message_id(sha, first).encode()),
                ("spot.source", source), ("spot.first_line", str(first).encode()),
                ("spot.fields", fields.encode())]
            if fields_error:
                headers.append(("spot.fields_error", fields_error.encode()))
            if bad:
                # Spark turns bad bytes into U+FFFD when it reads the text, so the
                # lines to reject are named here, where the bytes are still raw.
                headers.append(("spot.invalid_utf8", ",".join(bad).encode()))
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
            if line.startswith(b"#") or not line.strip() or len(line) > limit:
                # Anything that is not a data line ends the current message,
                # so a message is always a run of consecutive lines.
                msg = flush()
                if msg:
                    yield msg
                if line.startswith(b"#Fields:"):
                    fields, fields_error = parse_fields(line[len(b"#Fields:"):])
                    limit = budget()
                    if fields_error:
                        # The lines under it are published and the job rejects
                        # every one with this reason: they land in the rejects
                        # with their line numbers and are counted, where setting
                        # them aside here would make one file per line.
                        log.warning("%s line %d: %s; every line under it is rejected",
                                    relative, n, fields_error)
                elif len(line) > limit and not line.startswith(b"#"):
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
        save(state)

    def run_stream(self, cfg, pcfg, partitions: int, run_id: str | None,
                   fresh_topic: bool = False) -> int:
        from .job import run
        return run(cfg, pcfg, partitions, run_id, fresh_topic)

    def make_sample(self, dest_dir: Path) -> list[Path]:
        from .sample import write_log
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        return [write_log(Path(dest_dir) / f"proxy-{stamp}.log", 5000, seed=7)]


PROXY = PIPELINE = ProxyPipeline()
