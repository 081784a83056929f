"""The tests' reference readers: the same inputs the pipelines read, read again
with another tool or parser, and the pipelines' tables read back into rows of
the same shape, so that a test can compare the two row by row.

A reader here must not share the pipeline's own parsing: where the pipeline
reads nfdump's or tshark's output in a format of its own choosing with
pyarrow's csv reader, or cuts Blue Coat lines with a Spark regular
expression, the reference asks the tool for another output format (nfdump's
``-o csv``, tshark's ``-T json``) or parses with Python's csv module (Blue
Coat) or str.split and urllib.parse (squid). What
the readers take from the pipelines is only the tables' column lists (for
the proxy, also which log field fills a column and which columns are
integers).

Imported by the test modules as ``from reference import ...`` (pytest puts
tests/ on sys.path, and conftest.py puts the repository there).
"""
from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import struct
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.dataset as ds

from spot_ingest.pipelines.dns import TABLE_SCHEMA as DNS_TABLE_SCHEMA
from spot_ingest.pipelines.proxy import COLUMNS as PROXY_COLUMNS
from spot_ingest.pipelines.proxy import INT_COLUMNS as PROXY_INT_COLUMNS


# -- flow: nfdump's own csv export ------------------------------------------

def nfdump_csv(path: Path) -> list[dict]:
    """nfdump's own csv export of a file (``nfdump -o csv``, read by Python's
    csv module): not the output format the flow pipeline asks nfdump for, nor
    the pyarrow reader it parses that with."""
    out = subprocess.run(["nfdump", "-r", str(path), "-o", "csv"], check=True,
                         capture_output=True, text=True, env={**os.environ, "TZ": "UTC"}).stdout
    lines = out.splitlines()
    # nfdump 1.7 appends an empty line and a "Summary" block after the records.
    end = next((i for i, line in enumerate(lines) if line.strip() in ("", "Summary")), len(lines))
    return list(csv.DictReader(io.StringIO("\n".join(lines[:end]))))


FLOW_COMPARE = {  # table column -> nfdump csv column
    "sip": "sa", "dip": "da", "sport": "sp", "dport": "dp", "proto": "pr", "flag": "flg",
    "ipkt": "ipkt", "ibyt": "ibyt", "opkt": "opkt", "obyt": "obyt", "input": "in",
    "output": "out", "sas": "sas", "das": "das", "rip": "ra", "fwd": "fwd", "stos": "stos",
    "dtos": "dtos", "dir": "dir",
}


def flow_reference_rows(paths) -> list[tuple]:
    """The flows in the nfcapd files per nfdump's csv export (nfdump_csv), as
    sorted tuples comparable with flow_table_rows: FLOW_COMPARE's columns,
    then treceived and tdur."""
    rows = []
    for path in paths:
        for r in nfdump_csv(path):
            values = []
            for col, src in FLOW_COMPARE.items():
                v = r[src].strip()
                if col in ("sip", "dip", "proto", "flag", "rip"):
                    values.append(v)
                else:
                    n = int(v)
                    if col in ("sas", "das") and n > 2**31 - 1:
                        n -= 2**32
                    values.append(n)
            values.append(r["tr"][:19])
            # The table's tdur is a FLOAT (32 bits), as in Spot's flow table.
            values.append(round(struct.unpack("f", struct.pack("f", float(r["td"])))[0], 3))
            rows.append(tuple(values))
    return sorted(rows)


def flow_table_rows(table: pa.Table) -> list[tuple]:
    """A flow table (pyarrow Table) as the sorted tuples of flow_reference_rows."""
    cols = [table.column(c).to_pylist() for c in FLOW_COMPARE] + \
           [table.column("treceived").to_pylist(), table.column("tdur").to_pylist()]
    return sorted(tuple(v[:-1]) + (round(v[-1], 3),) for v in zip(*cols))


# -- dns: tshark's -T json ----------------------------------------------------

def dns_reference_rows(paths) -> list[tuple]:
    """The DNS responses in the captures per tshark's ``-T json`` output, read
    by Python's json module (the dns pipeline reads tshark's ``-T fields``
    with pyarrow): (time, epoch s, len, dst, src, name, class, type, rcode,
    answers), sorted by repr."""
    rows = []
    for path in paths:
        out = subprocess.run(
            ["tshark", "-n", "-r", str(path), "-Y", "dns.flags.response == 1", "-T", "json",
             "-e", "frame.time", "-e", "frame.time_epoch", "-e", "frame.len", "-e", "ip.src",
             "-e", "ip.dst", "-e", "ipv6.src", "-e", "ipv6.dst", "-e", "dns.qry.name",
             "-e", "dns.qry.class", "-e", "dns.qry.type", "-e", "dns.flags.rcode", "-e", "dns.a"],
            capture_output=True, env={**os.environ, "TZ": "UTC"}).stdout
        for pkt in json.loads(out or b"[]"):
            f = pkt["_source"]["layers"]
            first = lambda k: f.get(k, [None])[0]   # noqa: E731
            rows.append((
                first("frame.time"), int(float(first("frame.time_epoch"))), int(first("frame.len")),
                first("ip.dst") or first("ipv6.dst"), first("ip.src") or first("ipv6.src"),
                first("dns.qry.name"), first("dns.qry.class"),
                int(first("dns.qry.type")) if first("dns.qry.type") else None,
                int(first("dns.flags.rcode")) if first("dns.flags.rcode") else None,
                ",".join(f["dns.a"]) if "dns.a" in f else None))
    return sorted(rows, key=repr)


def dns_table_rows(table: pa.Table) -> list[tuple]:
    """A dns table (pyarrow Table) as tuples of its schema's columns, sorted
    as dns_reference_rows."""
    return sorted((tuple(r[c] for c in DNS_TABLE_SCHEMA.names) for r in table.to_pylist()),
                  key=repr)


# -- proxy: Blue Coat lines read by Python's csv module -----------------------

PROXY_PARTITIONING = ds.partitioning(pa.schema([(p, pa.string()) for p in "ymdh"]),
                                     flavor="hive")


def proxy_reference_rows(lines: list[str], fields: str) -> list[dict]:
    """The rows of Blue Coat log lines written in the ``#Fields:`` layout
    ``fields``, cut by Python's csv module (space-separated, double-quoted),
    not by the Spark regular expression of the proxy pipeline."""
    names = fields.split()
    rows = []
    for line in lines:
        tokens = next(csv.reader([line], delimiter=" ", quotechar='"', skipinitialspace=True))
        by_name = dict(zip(names, tokens))
        row = {}
        for col, name in PROXY_COLUMNS:
            if name is None:
                continue
            v = by_name.get(name)
            v = "" if v == "-" else v
            row[col] = (int(v) if v not in (None, "") else None) if col in PROXY_INT_COLUMNS else v
        row["fulluri"] = "".join(row[c] or "" for c in ("host", "uripath", "uriquery"))
        rows.append(row)
    return rows


def proxy_table_rows(hive: Path, files=None) -> list[dict]:
    """The proxy table under ``hive`` read back by pyarrow, partition columns
    (y, m, d, h) as strings; only the Parquet ``files`` under it if given."""
    if files is None:
        return ds.dataset(hive, format="parquet", partitioning=PROXY_PARTITIONING) \
            .to_table().to_pylist()
    return ds.dataset(files, format="parquet", partitioning=PROXY_PARTITIONING,
                      partition_base_dir=str(hive)).to_table().to_pylist()


def proxy_key(row: dict) -> tuple:
    """A proxy row, from the table or proxy_reference_rows, as comparable strings."""
    return tuple(str(row[c]) for c, _ in PROXY_COLUMNS)


def proxy_rejects(warehouse: Path) -> list[dict]:
    """The proxy pipeline's rejects table read back by pyarrow ([] if none)."""
    root = warehouse / "proxy" / "rejects"
    if not root.exists():
        return []
    return ds.dataset(root, format="parquet").to_table().to_pylist()


# -- squid ----------------------------------------------------------------------

SQUID_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}


def squid_reference_row(line: str) -> dict:
    """One line of squid's native format -> the table's row, in plain Python.

    Seven fields from the left (runs of spaces separate them: squid pads
    the elapsed time), the last two from the right, the user name between
    them as written (squid does not escape spaces in it)."""
    head = line.split(None, 7)
    assert len(head) == 8, f"not a native squid line: {line!r}"
    tstamp, elapsed, client, code_status, nbytes, method, url, rest = head
    user, hier_peer, ctype = rest.rsplit(" ", 2)
    secs, ms = tstamp.split(".")
    when = dt.datetime.fromtimestamp(int(secs), dt.timezone.utc)
    code, status = code_status.split("/")
    hier, peer = hier_peer.split("/", 1)
    scheme = host = path = query = ""
    port = None
    if method == "CONNECT":
        host, port_text = url.rsplit(":", 1)
        port = int(port_text)
    elif "://" in url:
        u = urlsplit(url)
        scheme, host, path = u.scheme, u.hostname or "", u.path
        query = "?" + u.query if u.query else ""
        port = u.port if u.port is not None else SQUID_DEFAULT_PORTS.get(scheme)

    def text(v: str) -> str:
        return "" if v == "-" else v

    row = {
        "p_date": when.strftime("%Y-%m-%d"), "p_time": when.strftime("%H:%M:%S"),
        "unix_tstamp": int(secs), "unix_tstamp_ms": int(secs) * 1000 + int(ms),
        "duration": int(elapsed), "clientip": text(client), "resultcode": code,
        "respcode": int(status), "scbytes": int(nbytes), "reqmethod": text(method),
        "fulluri": text(url), "urischeme": scheme, "host": host, "uriport": port,
        "uripath": path, "uriquery": query, "username": text(user), "hierarchy": hier,
        "serverip": text(peer), "resconttype": text(ctype),
    }
    row.update(y=when.strftime("%Y"), m=when.strftime("%m"), d=when.strftime("%d"),
               h=when.strftime("%H"))
    return row


def files_holding(root, input_name: str) -> list:
    """Table files under ``root`` that hold the input (or message) named
    ``input_name``: by their metadata list (warehouse.INPUTS_KEY), else their own name."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq
    from spot_ingest.warehouse import INPUTS_KEY
    found = []
    for f in sorted(Path(root).rglob("*.parquet")):
        if "_tmp" in f.parts:
            continue
        meta = pq.read_metadata(f).metadata or {}
        inputs = json.loads(meta[INPUTS_KEY]) if INPUTS_KEY in meta else [f.stem]
        if input_name in inputs:
            found.append(f)
    return found
