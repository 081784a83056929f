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

import logging
import shlex
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from spot_ingest.pipeline import BadInputError, Pipeline
from spot_ingest.tools import ToolRun, stream_csv

log = logging.getLogger(__name__)

RESPONSES_ONLY = "dns.flags.response == 1"
TSHARK_FIELDS = ("frame.time", "frame.time_epoch", "frame.len", "ip.src", "ip.dst", "ipv6.src",
                 "ipv6.dst", "dns.qry.name", "dns.qry.class", "dns.qry.type", "dns.flags.rcode",
                 "dns.a")
FIELD_SEPARATOR, VALUE_SEPARATOR = "\x01", "\x02"
_COLUMNS = [f.replace(".", "_") for f in TSHARK_FIELDS]

TABLE_SCHEMA = pa.schema([
    ("frame_time", pa.string()), ("unix_tstamp", pa.int64()), ("frame_len", pa.int32()),
    ("ip_dst", pa.string()), ("ip_src", pa.string()), ("dns_qry_name", pa.string()),
    ("dns_qry_class", pa.string()), ("dns_qry_type", pa.int32()), ("dns_qry_rcode", pa.int32()),
    ("dns_a", pa.string()),
])
HIVE_INT_PARTITIONS = pa.schema([("y", pa.int16()), ("m", pa.int8()), ("d", pa.int8()),
                                 ("h", pa.int8())])

# tshark options a configuration may add (decode-as, preferences, dissectors).
PASS_THROUGH_WITH_VALUE = {"-d", "-o", "--disable-protocol", "--enable-protocol",
                           "--enable-heuristic", "--disable-heuristic", "-Y"}
# The original's process_opt chose the output form and fields; they are fixed
# here by the table contract, so they are accepted and superseded.
SUPERSEDED_WITH_VALUE = {"-E", "-e", "-T"}
SUPERSEDED_FLAGS = {"-n", "-2", "-l", "-q", "-Q"}
CUT_SHORT = "cut short in the middle of a packet"


def _first(col: pa.Array) -> pa.Array:
    """The first of a field's values (a field can repeat, e.g. the addresses
    inside an ICMP error); nulls for absent fields."""
    if not pc.any(pc.match_substring(col, VALUE_SEPARATOR)).as_py():
        return col
    return pc.replace_substring_regex(col, VALUE_SEPARATOR + ".*$", "")


def _int(col: pa.Array) -> pa.Array:
    return pc.cast(_first(col), pa.int32())


def to_table_batch(raw: pa.RecordBatch) -> pa.RecordBatch:
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
        pc.cast(pc.year(ts), pa.int16()), pc.cast(pc.month(ts), pa.int8()),
        pc.cast(pc.day(ts), pa.int8()), pc.cast(pc.hour(ts), pa.int8()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=DNS.full_schema)


class DnsPipeline(Pipeline):
    type = "dns"
    table = "dns"
    schema = TABLE_SCHEMA
    partition_schema = HIVE_INT_PARTITIONS
    default_supported_files = (".pcap", ".pcapng", ".pcap.gz")
    tools = ("editcap", "tshark")

    def packages(self, tools):
        return ["tshark" for _ in tools]   # Debian's tshark brings editcap

    def parse_options(self, raw, error):
        pkt_num = raw.get("pkt_num", 650_000)
        try:
            pkt_num = int(pkt_num)
            if pkt_num <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise error("pkt_num", f"expected a positive whole number, got {pkt_num!r}") from None
        split_dir = raw.get("pcap_split_staging") or None
        try:
            args = shlex.split(raw.get("process_opt", "") or "")
        except ValueError as exc:
            raise error("process_opt", f"cannot split into arguments: {exc}") from None
        extra, filters, superseded = [], [], []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg in PASS_THROUGH_WITH_VALUE or arg in SUPERSEDED_WITH_VALUE:
                if i + 1 >= len(args):
                    raise error("process_opt", f"tshark option {arg} needs a value")
                value = args[i + 1]
                if arg == "-Y":
                    filters.append(value)
                elif arg in SUPERSEDED_WITH_VALUE:
                    superseded.append(f"{arg} {value}")
                else:
                    extra += [arg, value]
                i += 2
                continue
            if arg in SUPERSEDED_FLAGS:
                superseded.append(arg)
            elif arg.startswith("-"):
                raise error("process_opt", f"tshark option {arg} is not allowed here: the dns "
                            f"pipeline sets how tshark reads and prints (allowed: "
                            f"{', '.join(sorted(PASS_THROUGH_WITH_VALUE))}); remove it")
            elif " ".join(arg.split()) != RESPONSES_ONLY:
                filters.append(arg)           # a display filter, as the original allowed
            i += 1
        if superseded:
            log.info("pipelines: dns process_opt %s: output form and fields are set by the dns "
                     "table; ignored", " ".join(superseded))
        return {"pkt_num": pkt_num, "split_dir": split_dir, "tshark_args": tuple(extra),
                "filters": tuple(filters)}

    # -- master side -------------------------------------------------------
    def scratch_dir(self, cfg) -> Path:
        return Path(cfg.options["split_dir"]) if cfg.options["split_dir"] else cfg.local_staging

    def split(self, path: Path, workdir: Path, cfg) -> list[Path]:
        # editcap names chunks <prefix>_<5-digit index>_<timestamp>.<ext>.
        result = subprocess.run(["editcap", "-c", str(cfg.options["pkt_num"]), str(path),
                                 str(workdir / "chunk.pcapng")], capture_output=True,
                                stdin=subprocess.DEVNULL)
        message = result.stderr.decode("utf-8", "replace").strip()
        if result.returncode != 0:
            raise BadInputError(f"editcap could not read {path}: {message}")
        if CUT_SHORT in message:
            log.warning("%s is truncated: the packets before the cut are kept (%s)", path, message)
        return sorted(p for p in workdir.iterdir() if p.name.startswith("chunk"))

    # -- worker side -------------------------------------------------------
    def tshark_command(self, path: Path, cfg) -> list[str]:
        opts = cfg.options if cfg is not None else self.parse_options({}, None)
        display = RESPONSES_ONLY
        for extra in opts["filters"]:
            display = f"({display}) && ({extra})"
        cmd = ["tshark", "-n", "-r", str(path), "-Y", display, "-T", "fields",
               "-E", f"separator={FIELD_SEPARATOR}", "-E", f"aggregator={VALUE_SEPARATOR}",
               "-E", "occurrence=a", "-E", "quote=n", *opts["tshark_args"]]
        for f in TSHARK_FIELDS:
            cmd += ["-e", f]
        return cmd

    def convert(self, path: Path, cfg=None) -> Iterator[pa.RecordBatch]:
        with ToolRun(self.tshark_command(path, cfg), {"TZ": "UTC"}) as run:
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
