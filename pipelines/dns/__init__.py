"""DNS pipeline: packet captures (pcap, pcapng) -> dns table, responses only.

Master: ``editcap -c pkt_num`` splits each capture into chunks, each staged and
announced on its own, so the workers decode one big capture in parallel.

Worker: ``tshark -T fields`` decodes a chunk, with two control characters as
separators: U+0001 between fields and U+0002 between the values of one
field. tshark escapes every control character inside a value (a name with a
tab prints as ``\\t``, a byte 0x01 as ``\\001``), so neither can occur in a
value: the commas of ``frame.time``, several answers, and names with quotes,
commas or tabs all parse without ambiguity (tests/test_dns.py proves it on
such names). Arrow's CSV reader parses it while tshark is still writing.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from spot_ingest.config import PipelineConfig, _coerce
from spot_ingest.pipeline import BadInputError, DamagedInputError, FilePipeline
from spot_ingest.tools import ToolRun, stream_csv
from spot_ingest.warehouse import HOURLY_PARTITIONS, hourly_partitions

log = logging.getLogger(__name__)

RESPONSES_ONLY = "dns.flags.response == 1"
TSHARK_FIELDS = ("frame.time", "frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ipv6.src",
                 "ipv6.dst", "dns.qry.name", "dns.qry.class", "dns.qry.type", "dns.flags.rcode",
                 "dns.a")
FIELD_SEPARATOR, VALUE_SEPARATOR = "\x01", "\x02"
# Printed after the table's fields and checked on every row (to_table_batch):
# a packet that is not a response never reaches the table, whatever display
# filter tshark was given.
RESPONSE_FIELD = "dns.flags.response"
_COLUMNS = [f.replace(".", "_") for f in (*TSHARK_FIELDS, RESPONSE_FIELD)]

TABLE_SCHEMA = pa.schema([
    ("frame_time", pa.string()), ("unix_tstamp", pa.int64()), ("frame_len", pa.int32()),
    ("ip_dst", pa.string()), ("ip_src", pa.string()), ("dns_qry_name", pa.string()),
    ("dns_qry_class", pa.string()), ("dns_qry_type", pa.int32()), ("dns_qry_rcode", pa.int32()),
    ("dns_a", pa.string()),
])

# process_opt is parsed as tshark 4.0 parses its command line: getopt_long
# with a leading "+" (tshark.c), so letters cluster (``-nYdns``), a value may
# be glued (``-oPREF:VALUE``, ``--display-filter=F``) or the next argument,
# and the first argument that is not an option ends the options: it and all
# after it, joined with spaces, are a display filter (as the original's
# trailing 'dns.flags.response == 1'). ``--`` ends the options too.
#
# The ALLOW-list: options that cannot write a file, cannot change which file
# is read and cannot change what is printed (the form and fields are fixed
# below); each value is checked against the pattern beside it, so no value
# can start with "-" (tshark picks --log-file out of any argument).
ALLOWED_OPTIONS = {
    # decode as: LAYER==SELECTOR,PROTOCOL, e.g. udp.port==5353,dns
    "-d": re.compile(r"[a-z0-9_.]+==[A-Za-z0-9_.:-]+,[A-Za-z0-9_.-]+"),
    # dissectors and heuristics on or off, by name
    "--enable-protocol": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
    "--disable-protocol": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
    "--enable-heuristic": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
    "--disable-heuristic": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*"),
    # a preference, MODULE.NAME:VALUE, of ALLOWED_PREF_MODULES only (below)
    "-o": re.compile(r"[a-z0-9_]+\.[a-z0-9_.]+:[A-Za-z0-9 _.,:()+-]*"),
    # a display filter, ANDed with responses only (see display_filter_problem)
    "-Y": None, "--display-filter": None,
}
_VALUE_FORMS = {"-d": "LAYER==SELECTOR,PROTOCOL (e.g. udp.port==5353,dns)",
                "-o": "MODULE.NAME:VALUE, the value of letters, digits, spaces and _.,:()+-",
                "--enable-protocol": "a protocol name", "--disable-protocol": "a protocol name",
                "--enable-heuristic": "a heuristic's name",
                "--disable-heuristic": "a heuristic's name"}
# -o may set only the preferences of these dissectors. In tshark 4.0 each of
# their preferences is a boolean, a number or a choice (tshark -G defaultprefs;
# tests/test_dns.py checks it on the installed tshark): none is a file or a
# directory, unlike tls.keylog_file (read), *.debug_file (written), gui.* or
# uat: tables, which are all outside these modules. A preference whose name
# says file, path, directory, log or debug is refused even here, in case a
# later tshark adds one; a value can hold no "/" or "~".
ALLOWED_PREF_MODULES = ("dns", "udp", "tcp", "ip", "ipv6")
_FILE_LIKE_PREF = re.compile(r"(^|[._])(file|files|filename|path|paths|dir|dirs|directory|"
                             r"folder|log|logs|debug|db|database)($|[._])|keylog|uat")
# The original's process_opt chose the output form and fields; they are fixed
# here by the table contract, so they are accepted and superseded.
SUPERSEDED_WITH_VALUE = {"-E", "-e", "-T"}
SUPERSEDED_FLAGS = {"-n", "-2", "-l", "-q", "-Q"}
_TAKES_VALUE = set(ALLOWED_OPTIONS) | SUPERSEDED_WITH_VALUE
CUT_SHORT = "cut short in the middle of a packet"
DAMAGED = "appears to be damaged or corrupt"


def _packets(capture: Path) -> int:
    """Packets in a capture file, as capinfos counts them."""
    out = subprocess.run(["capinfos", "-M", "-c", "-T", "-r", str(capture)], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL).stdout
    return int(out.split("\t")[-1]) if out.strip() else 0


_CHUNK_INDEX = re.compile(r"chunk_(\d+)_")
# editcap numbers its chunks modulo 100,000 (ringbuffer.h): after
# chunk_99999_* comes chunk_00000_* again, which sorts first and can even
# take the name of an earlier chunk. A split never makes more chunks.
MAX_CHUNKS = 100_000
# The smallest record of a capture (a pcap record header with no data): what
# bounds the packets a file of a given size can hold.
_MIN_RECORD = 16


def chunk_size(path: Path, pkt_num: int) -> int:
    """Packets per chunk for ``path``: ``pkt_num``, raised where the file could
    hold so many packets that editcap would number more than MAX_CHUNKS
    chunks. It depends on the file's size only, so a file split again (a
    master killed half-way) is cut at the same packets. A compressed file's
    packets are not bounded by its size: ``split`` stops at MAX_CHUNKS."""
    if path.name.endswith(".gz"):
        return pkt_num
    bound = path.stat().st_size // _MIN_RECORD
    return max(pkt_num, -(-bound // (MAX_CHUNKS - 1)))


def _too_many_chunks(path: Path, count: int, pkt_num: int) -> DamagedInputError:
    return DamagedInputError(
        f"{path} holds more than {count * pkt_num} packets: the first {count * pkt_num} are "
        f"loaded, in {count} chunks, the most a split makes; set pkt_num above {pkt_num} to "
        f"load such a file whole", [])


def _chunks(workdir: Path, done: set[str], count: int) -> tuple[list[Path], int]:
    """editcap's chunks in ``workdir`` not in ``done`` (``count`` chunks were
    taken) that come next, in the order written, and how many others there
    are. Order is by index from the next one expected, so that a chunk
    numbered 00000 again after 99999 comes last (``split`` takes fewer than
    MAX_CHUNKS); and only the run without a gap counts, because a directory
    listed while editcap adds files may show a chunk without the one before
    it. A capture without packets gives one chunk without an index
    (``chunk.pcapng``)."""
    found = []
    for p in workdir.iterdir():
        if p.name.startswith("chunk") and p.name not in done:
            m = _CHUNK_INDEX.match(p.name)
            found.append(((int(m.group(1)) - count) % MAX_CHUNKS if m else -1, p.name, p))
    run: list[Path] = []
    for position, _, p in sorted(found):
        if position >= 0 and position != len(run):
            break
        run.append(p)
    return run, len(found) - len(run)


def split_tshark_args(args: list[str]) -> tuple[list[tuple[str, str | None]], str]:
    """``args`` as tshark's getopt_long sees them: ([(option, value or None)],
    the display filter made of the trailing arguments). ValueError names an
    option that is neither allowed nor superseded, or a value that is missing."""
    options = []
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name not in _TAKES_VALUE:
                raise ValueError(name)
            if not eq:
                if i >= len(args):
                    raise ValueError(f"{name} needs a value")
                value = args[i]
                i += 1
            options.append((name, value))
            continue
        if not arg.startswith("-") or arg == "-":
            i -= 1                                  # the first operand ends the options
            break
        for j in range(1, len(arg)):
            opt = "-" + arg[j]
            if opt in SUPERSEDED_FLAGS:
                options.append((opt, None))
                continue
            if opt not in _TAKES_VALUE:
                raise ValueError(opt)
            value = arg[j + 1:]
            if not value:
                if i >= len(args):
                    raise ValueError(f"{opt} needs a value")
                value = args[i]
                i += 1
            options.append((opt, value))
            break
    return options, " ".join(args[i:])


def display_filter_problem(text: str) -> str | None:
    """Why a display filter from process_opt cannot stand as one operand of
    ``(dns.flags.response == 1) && (FILTER)``, or None. Outside quoted strings
    ("...", r"..." and '.' character constants, where a backslash escapes the
    next character, as tshark 4.0 reads them) its parentheses must balance and
    never close one they did not open: ``1) || (1`` would otherwise close ours
    and OR everything in. tshark then compiles the filter alone
    (``tshark_problem``), which proves the same with tshark's own parser, and
    to_table_batch drops any row that is not a response all the same."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "it holds a control character"
    depth, quote, i = 0, None, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                return "it closes a parenthesis it did not open"
        i += 1
    if quote:
        return "a quoted string is not closed"
    if depth:
        return "a parenthesis is not closed"
    return None


# A pcap file with no packet (the global header only), for tshark to read.
_EMPTY_PCAP = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
_TSHARK_CHECKS: dict[tuple[str, ...], str | None] = {}


def tshark_problem(*commands: list[str]) -> list[str | None]:
    """Run each tshark command (argument lists, no shell; each reads "-")
    on a capture without packets, all at once: tshark parses every option,
    preference and filter, compiles the filter, and has nothing to decode.
    For each, None if tshark accepts it, else its message. Where tshark is not
    installed nothing is run (None): the worker, which runs tshark, checks
    when it loads the configuration."""
    if shutil.which("tshark") is None:
        log.info("tshark is not on PATH: process_opt is checked where it runs")
        return [None for _ in commands]
    env = {**os.environ, "LC_ALL": "C"}
    runs = {}
    for cmd in commands:
        if tuple(cmd) not in _TSHARK_CHECKS and tuple(cmd) not in runs:
            runs[tuple(cmd)] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=env)
    for key, proc in runs.items():
        try:
            out, err = proc.communicate(_EMPTY_PCAP, timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines()
                 if line.strip() and not line.startswith("Running as user")]
        message = lines[0].removeprefix("tshark: ") if lines else f"exit code {proc.returncode}"
        _TSHARK_CHECKS[key] = None if proc.returncode == 0 and not out else message
    return [_TSHARK_CHECKS[tuple(cmd)] for cmd in commands]


def _responses(flags: pa.Array) -> pa.Array | None:
    """Which rows are DNS responses: a value of dns.flags.response is 1
    (tshark 4.0 prints booleans as 1/0, later ones as True/False). None when
    all are."""
    flags = pc.fill_null(flags, "")
    if pc.all(pc.equal(flags, "1")).as_py():
        return None
    return pc.match_substring_regex(flags, f"(^|{VALUE_SEPARATOR})(1|[Tt]rue|TRUE)"
                                           f"({VALUE_SEPARATOR}|$)")


def _first(col: pa.Array) -> pa.Array:
    """The first of a field's values (a field can repeat, e.g. the addresses
    inside an ICMP error); nulls for absent fields."""
    if not pc.any(pc.match_substring(col, VALUE_SEPARATOR)).as_py():
        return col
    return pc.replace_substring_regex(col, VALUE_SEPARATOR + ".*$", "")


def _int(col: pa.Array) -> pa.Array:
    return pc.cast(_first(col), pa.int32())


def to_table_batch(raw: pa.RecordBatch) -> pa.RecordBatch:
    responses = _responses(raw.column(RESPONSE_FIELD.replace(".", "_")))
    if responses is not None:
        raw = raw.filter(responses)
    f = {name: raw.column(name) for name in _COLUMNS}
    epoch = pc.cast(pc.floor(pc.cast(_first(f["frame_time_epoch"]), pa.float64())), pa.int64())
    ts = pc.cast(epoch, pa.timestamp("s"))
    columns = [
        _first(f["frame_time"]),
        epoch,
        _int(f["frame_len"]),
        pc.coalesce(_first(f["ip_dst"]), _first(f["ipv6_dst"])),
        pc.coalesce(_first(f["ip_src"]), _first(f["ipv6_src"])),
        _first(f["dns_qry_name"]),
        _first(f["dns_qry_class"]),
        _int(f["dns_qry_type"]),
        _int(f["dns_flags_rcode"]),
        pc.replace_substring(f["dns_a"], VALUE_SEPARATOR, ","),
        *hourly_partitions(ts),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=DNS.full_schema)


@dataclass(frozen=True)
class DnsOptions:
    """The dns pipeline's options: packets per chunk (``pkt_num``), where the
    master splits (``pcap_split_staging``), and what ``process_opt`` adds to
    tshark: allowed options and display filters (each ANDed with responses)."""
    pkt_num: int = 100_000
    split_dir: str | None = None
    tshark_args: tuple[str, ...] = ()
    filters: tuple[str, ...] = ()


class DnsPipeline(FilePipeline):
    type = "dns"
    table = "dns"
    schema = TABLE_SCHEMA
    partition_schema = HOURLY_PARTITIONS
    sort_by = ("dns_qry_name",)
    default_supported_files = (".pcap", ".pcapng", ".pcap.gz")
    directory_keys = ("pcap_split_staging",)
    tools = ("editcap", "tshark")

    def packages(self, tools):
        return ["tshark" for _ in tools]   # Debian's tshark brings editcap

    def parse_options(self, raw, error) -> DnsOptions:
        pkt_num = raw.get("pkt_num", 100_000)
        try:
            pkt_num = _coerce(pkt_num, "pos_int")
        except (TypeError, ValueError):
            raise error("pkt_num", f"expected a positive whole number, "
                                   f"got {json.dumps(pkt_num)}") from None
        split_dir = raw.get("pcap_split_staging") or None
        try:
            args = shlex.split(raw.get("process_opt", "") or "")
        except ValueError as exc:
            raise error("process_opt", f"cannot split into arguments: {exc}") from None
        try:
            options, trailing = split_tshark_args(args)
        except ValueError as exc:
            what = str(exc)
            if " " not in what:
                what = (f"{what} is not allowed here: the dns pipeline sets how tshark reads and "
                        f"prints (allowed: {', '.join(sorted(ALLOWED_OPTIONS))} and a display "
                        f"filter); remove it")
            raise error("process_opt", f"tshark option {what}") from None
        extra, filters, superseded = [], [trailing], []
        for opt, value in options:
            if opt in SUPERSEDED_WITH_VALUE or opt in SUPERSEDED_FLAGS:
                superseded.append(opt if value is None else f"{opt} {value}")
            elif opt in ("-Y", "--display-filter"):
                filters.append(value)
            else:
                if opt == "-o":
                    name = value.partition(":")[0].strip()
                    if (name.split(".")[0] not in ALLOWED_PREF_MODULES
                            or _FILE_LIKE_PREF.search(name.lower())):
                        raise error("process_opt", f"tshark preference {name} (-o {value}) is "
                                    f"not allowed: -o may set only preferences of "
                                    f"{', '.join(ALLOWED_PREF_MODULES)} that name no file, "
                                    f"directory or log; remove it")
                if not ALLOWED_OPTIONS[opt].fullmatch(value):
                    raise error("process_opt", f"tshark option {opt} '{value}': expected "
                                               f"{_VALUE_FORMS[opt]}")
                extra += [opt, value]
        # Blank filters and the original's own "dns.flags.response == 1" add nothing.
        filters = [f for f in filters if f.strip() and " ".join(f.split()) != RESPONSES_ONLY]
        for text in filters:
            problem = display_filter_problem(text)
            if problem:
                raise error("process_opt", f"display filter '{text}' cannot be combined with "
                                           f"'{RESPONSES_ONLY}': {problem}")
        if superseded:
            log.info("pipelines: dns process_opt %s: output form and fields are set by the dns "
                     "table; ignored", " ".join(superseded))
        opts = DnsOptions(pkt_num, split_dir, tuple(extra), tuple(filters))
        if extra or filters:
            # Each filter alone, then the worker's own command: tshark's own
            # parser proves each filter one whole expression, and takes every option.
            alone = [["tshark", "-n", "-r", "-", "-Y", text] for text in filters]
            worker = self.tshark_command(Path("-"), opts)
            problems = tshark_problem(*alone, worker)
            for text, problem in zip(filters, problems):
                if problem:
                    raise error("process_opt", f"tshark refuses the display filter '{text}': "
                                               f"{problem}")
            if problems[-1]:
                raise error("process_opt", f"tshark refuses it: {problems[-1]}")
        return opts

    # -- master side -------------------------------------------------------
    def scratch_dir(self, cfg: PipelineConfig) -> Path:
        return Path(cfg.options.split_dir) if cfg.options.split_dir else cfg.local_staging

    def split(self, path: Path, workdir: Path, cfg: PipelineConfig) -> Iterator[Path]:
        """``editcap -c pkt_num``, each chunk yielded as soon as editcap has
        begun the next one (it closes a chunk before it opens the next) or
        has exited, so that the master stages and announces it, and workers
        decode it, while editcap goes on splitting the rest.

        The chunks are the same bytes at every split of the same capture
        (editcap writes no time of its own into them), so a master killed
        half-way stages them again under the same names. Closing the
        generator early stops editcap."""
        # editcap names chunks <prefix>_<index>_<time of the first packet>.<ext>
        errors = workdir / "editcap.stderr"
        started = time.monotonic()
        pkt_num = chunk_size(path, cfg.options.pkt_num)
        if pkt_num != cfg.options.pkt_num:
            log.info("%s: chunks of %d packets instead of pkt_num %d: a file of %d bytes could "
                     "otherwise need more than %d chunks", path, pkt_num, cfg.options.pkt_num,
                     path.stat().st_size, MAX_CHUNKS - 1)
        with open(errors, "wb") as err:
            proc = subprocess.Popen(["editcap", "-c", str(pkt_num), str(path),
                                     str(workdir / "chunk.pcapng")], stdout=subprocess.DEVNULL,
                                    stderr=err, stdin=subprocess.DEVNULL)
        yielded: set[str] = set()
        count = 0
        try:
            while True:
                finished = proc.poll() is not None
                chunks, after_gap = _chunks(workdir, yielded, count)
                if finished:
                    break
                for chunk in chunks[:-1]:      # the newest may still be written
                    if count == MAX_CHUNKS - 1:
                        raise _too_many_chunks(path, count, pkt_num)
                    yielded.add(chunk.name)
                    count += 1
                    yield chunk
                if len(chunks) <= 1 and not after_gap:   # after a gap, list again at once
                    # editcap writes a chunk in milliseconds: look often (a
                    # listing of a folder of a few files costs microseconds).
                    time.sleep(0.01)
        finally:
            if proc.poll() is None:            # the caller stopped early
                proc.kill()
                proc.wait()
        message = errors.read_text("utf-8", "replace").strip()
        if proc.returncode != 0:
            raise BadInputError(f"editcap could not read {path}: {message}")
        if after_gap:   # listed after editcap exited: nothing was being added
            raise RuntimeError(f"editcap left {after_gap} chunk(s) of {path} out of sequence "
                               f"in {workdir}; the file is split again later")
        log.debug("editcap split %s into %d chunk(s) of up to %d packets in %.2f s", path,
                  count + len(chunks), pkt_num, time.monotonic() - started)
        # editcap exits 0 on a damaged or truncated capture, keeping only the
        # packets before the damage: say so, and let the master keep the original.
        damaged = CUT_SHORT in message or DAMAGED in message
        kept = (count + len(chunks) - 1) * pkt_num + _packets(chunks[-1]) \
            if damaged and chunks else 0
        for chunk in chunks:
            if count == MAX_CHUNKS - 1:
                raise _too_many_chunks(path, count, pkt_num)
            yielded.add(chunk.name)
            count += 1
            yield chunk
        if damaged:
            raise DamagedInputError(
                f"{path} is damaged or truncated: {kept} packet(s) before the damage are "
                f"loaded, the rest of its {path.stat().st_size} bytes is not "
                f"({' '.join(message.split())})", [])

    # -- worker side -------------------------------------------------------
    def tshark_command(self, path: Path, opts: DnsOptions | None = None) -> list[str]:
        opts = opts or DnsOptions()
        display = RESPONSES_ONLY
        for extra in opts.filters:
            display = f"({display}) && ({extra})"
        cmd = ["tshark", "-n", "-r", str(path), "-Y", display, "-T", "fields",
               "-E", f"separator={FIELD_SEPARATOR}", "-E", f"aggregator={VALUE_SEPARATOR}",
               "-E", "occurrence=a", "-E", "quote=n", *opts.tshark_args]
        for f in (*TSHARK_FIELDS, RESPONSE_FIELD):
            cmd += ["-e", f]
        return cmd

    def convert(self, path: Path, cfg: PipelineConfig | None = None) -> Iterator[pa.RecordBatch]:
        with ToolRun(self.tshark_command(path, cfg.options if cfg else None), {"TZ": "UTC"}) as run:
            if run.stdout.peek(1):
                yield from stream_csv(
                    run.stdout, "tshark",
                    pcsv.ReadOptions(column_names=_COLUMNS, block_size=4 << 20),
                    pcsv.ParseOptions(delimiter=FIELD_SEPARATOR, quote_char=False,
                                      double_quote=False, escape_char=False),
                    pcsv.ConvertOptions(column_types={c: pa.string() for c in _COLUMNS},
                                        strings_can_be_null=True, null_values=[""]),
                    to_table_batch)
        message = "\n".join(line for line in run.stderr.splitlines()
                            if line.strip() and not line.startswith("Running as user"))
        if CUT_SHORT in message:
            log.warning("%s is truncated: the packets before the cut are kept (%s)", path, message)
        elif run.returncode != 0:
            raise BadInputError(f"tshark could not read {path}: "
                                f"{message or f'exit code {run.returncode}'}")

    def make_sample(self, dest_dir: Path) -> list[Path]:
        from .sample import make_dns_capture
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        path, _ = make_dns_capture(Path(dest_dir) / f"dns-{stamp}.pcap", 2000, seed=7)
        return [path]


DNS = PIPELINE = DnsPipeline()
