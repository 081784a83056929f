"""Proxy pipeline: Blue Coat ProxySG access logs (W3C ELFF) -> proxy table.

Unlike flow and dns, no file crosses the bus: the master publishes the log's
lines themselves, in messages of at most ``kafka.message_size`` bytes, and a
Spark Structured Streaming job (``job.py``) parses them into the table.

A message never splits a line and holds only consecutive lines of one file
under one ``#Fields:`` header, which travels with it (Kafka header
``spot.fields``), so any message parses on its own. Its id is the file's
SHA-256 and the message's index: publishing a file again (after a crash)
produces the same messages with the same ids, and the job's output is named
after them, so a repeat replaces instead of doubling.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from spot_ingest.pipeline import Pipeline

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
REJECTS_SCHEMA = pa.schema([("source", pa.string()), ("line_no", pa.int64()),
                            ("reason", pa.string()), ("line", pa.string())])

HEADER_OVERHEAD = 1024   # room for the Kafka record's headers and framing


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


def message_id(sha256: str, index: int) -> str:
    return f"{sha256[:24]}-{index:06d}"


class ProxyPipeline(Pipeline):
    type = "proxy"
    table = "proxy"
    schema = TABLE_SCHEMA
    partition_schema = STRING_PARTITIONS
    default_supported_files = (".log", ".log.gz", ".txt")
    tools = ()
    delivery = "records"
    consumer = "streaming"

    def records(self, path: Path, relative: str, max_bytes: int) -> Iterator[Message | SetAside]:
        """Cut a log into messages of at most ``max_bytes``, never splitting a line."""
        digest = hashlib.sha256()
        with open(path, "rb") as f:   # streamed: logs can be far larger than memory
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        sha = digest.hexdigest()
        budget = max_bytes - HEADER_OVERHEAD
        fields = ORIGINAL_FIELDS
        lines: list[bytes] = []
        size = 0
        first = 0
        index = 0

        def flush():
            nonlocal lines, size, index
            if not lines:
                return None
            value = b"\n".join(lines)
            headers = [
                ("spot.kind", b"LINES"), ("spot.id", message_id(sha, index).encode()),
                ("spot.source", relative.encode("utf-8", "surrogateescape")),
                ("spot.first_line", str(first).encode()), ("spot.fields", fields.encode())]
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                # Spark turns bad bytes into U+FFFD when it reads the text, so the
                # lines to reject are named here, where the bytes are still raw.
                bad = [str(i) for i, line in enumerate(lines) if not _is_utf8(line)]
                headers.append(("spot.invalid_utf8", ",".join(bad).encode()))
            msg = Message(value, headers)
            lines, size = [], 0
            index += 1
            return msg

        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                line = raw.rstrip(b"\r\n")
                if line.startswith(b"#Fields:") or not line.strip() or line.startswith(b"#") \
                        or len(line) > budget:
                    # Anything that is not a data line ends the current message,
                    # so a message is always a run of consecutive lines.
                    msg = flush()
                    if msg:
                        yield msg
                    if line.startswith(b"#Fields:"):
                        fields = " ".join(line[len(b"#Fields:"):].decode("utf-8", "replace").split())
                    elif len(line) > budget:
                        yield SetAside(line_no, line, f"line {line_no} of {relative} is {len(line)} "
                                       f"bytes, longer than a message may be (kafka.message_size "
                                       f"{max_bytes} bytes); set aside, not truncated")
                    continue
                if size + len(line) + 1 > budget:
                    msg = flush()
                    if msg:
                        yield msg
                if not lines:
                    first = line_no
                lines.append(line)
                size += len(line) + 1
        msg = flush()
        if msg:
            yield msg

    def run_stream(self, cfg, pcfg, partitions: int, run_id: str | None,
                   fresh_topic: bool = False) -> int:
        from .job import run
        return run(cfg, pcfg, partitions, run_id, fresh_topic)

    def make_sample(self, dest_dir: Path) -> list[Path]:
        from .sample import write_log
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        return [write_log(Path(dest_dir) / f"proxy-{stamp}.log", 5000, seed=7)]


PROXY = PIPELINE = ProxyPipeline()
