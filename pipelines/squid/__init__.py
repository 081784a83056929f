"""Squid pipeline: Squid's native ``access.log`` format -> squid table.

A record pipeline (``spot_ingest.pipeline.RecordPipeline``): the master
publishes the log's lines, the streaming job runs ``parse`` on them. This
folder is all there is to the source: no engine file names it.

The input: one line per transaction, squid's ``logformat squid`` (the
default of ``access_log``), ten fields separated by spaces::

    time elapsed remotehost code/status bytes method URL rfc931 peerstatus/peerhost type
    1795323492.571      2 127.0.0.1 TCP_MISS/200 307501 GET http://h/big.bin?kb=300 -
        HIER_DIRECT/10.0.0.7 application/octet-stream

(one line, folded here). ``time`` is seconds.milliseconds since the epoch,
``elapsed`` milliseconds (right-aligned: several spaces may precede it),
``-`` an empty value. The format has no header or comment lines. Squid logs
URLs without their query string unless configured with ``strip_query_terms
off``; with its default, ``uriquery`` is always empty.

One quirk seen with the real squid 5.7: the user name (``rfc931``, taken from
proxy authentication) is logged without escaping its spaces (``bob smith``,
even ``a  b``), so a line may have more than ten fields. Such a line is read
as ten: the first seven fields, the last two, and the user name in between
(exactly as written, spaces kept), provided every other field is well formed;
a line with fewer than ten fields is rejected.

The table, column by column (``-`` becomes the empty string in every string
column, as in the proxy table; a number that cannot be read rejects the
line, so numeric columns are never NULL in a loaded row, except ``uriport``):

==============  ========  ====================================================
column          type      from
==============  ========  ====================================================
p_date          string    ``time``, UTC, ``yyyy-MM-dd``            [proxy]
p_time          string    ``time``, UTC, ``HH:mm:ss``              [proxy]
unix_tstamp     int64     ``time``, whole seconds since the epoch
unix_tstamp_ms  int64     ``time``, milliseconds since the epoch (exact)
duration        int32     ``elapsed``, milliseconds                [proxy]
clientip        string    ``remotehost``                           [proxy]
resultcode      string    ``code`` (TCP_MISS, TCP_DENIED, ...)
respcode        int32     ``status`` (HTTP status; 0: none sent)   [proxy*]
scbytes         int64     ``bytes``, sent to the client            [proxy*]
reqmethod       string    ``method``                               [proxy]
fulluri         string    ``URL`` as logged                        [proxy*]
urischeme       string    the URL's scheme ("" for CONNECT)        [proxy]
host            string    the URL's host (IPv6 without brackets)   [proxy]
uriport         int32     the URL's port, else the scheme's        [proxy*]
                          (http 80, https 443, ftp 21), else NULL
uripath         string    the URL's path                           [proxy]
uriquery        string    the URL's query, with its ``?``          [proxy]
username        string    ``rfc931``                               [proxy]
hierarchy       string    ``peerstatus`` (HIER_DIRECT, HIER_NONE, ...)
serverip        string    ``peerhost``                             [proxy]
resconttype     string    ``type`` (squid logs it without          [proxy]
                          parameters: no ``; charset=``)
==============  ========  ====================================================

[proxy]: the proxy table's column of the same name holds the same thing
(``duration`` is also milliseconds: Blue Coat's ``time-taken``; ``uriquery``
keeps the ``?`` as Blue Coat's ``cs-uri-query`` does). [proxy*]: same meaning,
different form: ``respcode`` is an integer (a string in the proxy table),
``scbytes`` an int64 (int32 there: one download of 2 GiB would not fit),
``uriport`` an integer (a string there), and ``fulluri`` is the URL squid
logged (``http://host:port/path?query``, ``host:port`` for CONNECT,
``error:...`` for a request squid could not read), while the proxy table
builds it from host, path and query because ELFF logs no whole URL. A query
over both tables casts these. The URL is split only when it has the form
``scheme://authority/...`` or, for CONNECT, ``host:port``; other forms (squid's
``error:`` pseudo-URLs) leave scheme, host, path and query empty.

Why a table of its own rather than rows in the proxy table: squid's native
format lacks most of what the proxy table holds (Blue Coat's categories,
user agent, referer, filter result, action, auth group, exception id, client
bytes, application name and operation, virus id), and has what that table
has no column for (squid's result code and hierarchy, millisecond times).
Loaded into the proxy table, these rows would be mostly empty, and
analytics reading that table would take the empty fields for facts (no
category, no user agent).

Partitions ``y``, ``m``, ``d``, ``h``: zero-padded strings from p_date and
p_time (``y=2026/m=11/d=22/h=05``), the proxy table's layout and types, so
that one query over both line-based tables prunes partitions the same way.

Rejects (``reject`` column, never an exception): fewer than ten fields, a
timestamp that is not ``seconds.milliseconds`` (or after the year 9999), an
elapsed time, status or byte count that is not a non-negative integer,
``code/status`` or ``peerstatus/peerhost`` not of that form, a method that is
not a word, or lines sent under other field names than squid's (a record
that did not come from this pipeline's master).

Files taken from the collector directory (``default_supported_files``):
``access.log.*`` and ``access.log-*``, the names under which a log is
finished: ``squid -k rotate`` renames ``access.log`` to ``access.log.0``,
``.1``, ...; Debian's logrotate makes ``access.log.1`` and ``access.log.2.gz``
(``.gz`` is decompressed by the engine), ``access.log-YYYYMMDD`` with
``dateext``. Not ``access.log`` itself: squid keeps writing it. Another
naming is set per pipeline with ``supported_files``.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from spot_ingest.pipeline import RecordPipeline

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

# Squid's own names for the fields of its native format (squid's FAQ, "access.log").
NATIVE_FIELDS = ("time", "elapsed", "remotehost", "code/status", "bytes", "method", "URL",
                 "rfc931", "peerstatus/peerhost", "type")
N_FIELDS = len(NATIVE_FIELDS)

TABLE_SCHEMA = pa.schema([
    ("p_date", pa.string()), ("p_time", pa.string()), ("unix_tstamp", pa.int64()),
    ("unix_tstamp_ms", pa.int64()), ("duration", pa.int32()), ("clientip", pa.string()),
    ("resultcode", pa.string()), ("respcode", pa.int32()), ("scbytes", pa.int64()),
    ("reqmethod", pa.string()), ("fulluri", pa.string()), ("urischeme", pa.string()),
    ("host", pa.string()), ("uriport", pa.int32()), ("uripath", pa.string()),
    ("uriquery", pa.string()), ("username", pa.string()), ("hierarchy", pa.string()),
    ("serverip", pa.string()), ("resconttype", pa.string()),
])
STRING_PARTITIONS = pa.schema([("y", pa.string()), ("m", pa.string()), ("d", pa.string()),
                               ("h", pa.string())])
# Columns of the table shared with the proxy table (same name, same meaning;
# see the module docstring for the four whose type or form differs).
PROXY_COLUMNS = ("p_date", "p_time", "duration", "clientip", "respcode", "scbytes", "reqmethod",
                 "fulluri", "urischeme", "host", "uriport", "uripath", "uriquery", "username",
                 "serverip", "resconttype")

MAX_SECONDS = 253402300799          # 9999-12-31 23:59:59 UTC: p_date keeps four digits
DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}
SHOWN = 100                         # characters of a bad value quoted in a reject reason

# Regular expressions (Java syntax, as Spark runs them).
TOKEN_RE = r"\S+"
# The user name of a line with more than ten fields: between the seventh
# field and the last two, each side one separator, spaces inside kept.
USER_RE = r"^\s*(?:\S+\s+){6}\S+\s(.*)\s\S+\s+\S+\s*$"
TIME_RE = r"^[0-9]{1,12}\.[0-9]{3}$"
UINT_RE = r"^[0-9]{1,9}$"           # fits an int32
BYTES_RE = r"^[0-9]{1,18}$"         # fits an int64
CODE_STATUS_RE = r"^([A-Z][A-Z0-9_]*)/([0-9]{3})$"
HIER_PEER_RE = r"^([A-Z][A-Z0-9_]*)/(\S+)$"
METHOD_RE = r"^(-|[A-Za-z][A-Za-z0-9_-]*)$"
URL_RE = r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([^?#]*)(\?[^#]*)?"
CONNECT_RE = r"^(\[[^\]]*\]|[^:/?#\[\]]+):([0-9]{1,5})$"


class SquidPipeline(RecordPipeline):
    """Squid's native access.log lines -> the ``squid`` table (see the module
    docstring for the columns, rejects and file names)."""

    type = "squid"
    table = "squid"
    schema = TABLE_SCHEMA
    partition_schema = STRING_PARTITIONS
    sort_by = ("host",)
    default_supported_files = ("access.log.*", "access.log-*")
    tools = ()                        # parse runs in Spark; squid is needed only for the sample
    comment_prefix = b"#"             # the native format has none: no line of squid's starts so
    default_fields = " ".join(NATIVE_FIELDS)

    def make_sample(self, dest_dir: Path) -> list[Path]:
        """An access.log written by a real squid (``sample.py``) for 200
        requests through it, as ``dest_dir/access.log.0``. Raises
        ``ToolMissingError`` when squid is not installed."""
        from .sample import make_access_log
        return [make_access_log(Path(dest_dir), 200).path]

    def parse(self, messages: DataFrame) -> DataFrame:
        """Messages of squid lines -> one row per line (the contract is
        ``RecordPipeline.parse``'s).

        Each message is cut into lines and each line into its fields in one
        expression (a ``transform`` over the split lines), so the tokenizer
        runs once per line; the conversions and checks then read the
        exploded fields. A rejected line keeps ``line`` and its reason, and
        every table and partition column is NULL. A record without lines
        (``value`` NULL) gives one row with ``pos``, ``line``, ``reject`` and
        every table column NULL: it is no line, so there is nothing to reject
        (the engine knows what the record is)."""
        from pyspark.sql import functions as F

        engine_cols = [F.col(_quoted(c)) for c in messages.columns]

        def tok(t: Column, i: int) -> Column:
            return F.try_element_at(t, F.lit(i))

        def fields_of(line: Column) -> Column:
            t = F.regexp_extract_all(line, F.lit(TOKEN_RE), 0)
            return F.struct(line.alias("line"), t.alias("t"))

        def named(r: Column) -> Column:
            line, t = r["line"], r["t"]
            n = F.size(t)
            return F.struct(
                line.alias("line"), n.alias("n"),
                *[tok(t, i + 1).alias(f"f{i}") for i in range(7)],
                F.when(n == N_FIELDS, tok(t, 8))
                 .when(n > N_FIELDS, F.regexp_extract(line, USER_RE, 1)).alias("f7"),
                F.when(n >= N_FIELDS, F.try_element_at(t, n - 1)).alias("f8"),
                F.when(n >= N_FIELDS, F.try_element_at(t, n)).alias("f9"))

        # One expression per message: split into lines, each line cut once.
        rows = F.transform(F.transform(F.split(F.col("value"), "\n"), fields_of), named)
        exploded = messages.select(*engine_cols, F.posexplode_outer(rows).alias("pos", "_sq"))
        s = F.col("_sq")
        f = [s[f"f{i}"] for i in range(N_FIELDS)]
        tstamp, elapsed, client, code_status, nbytes, method, url, user, hier_peer, ctype = f

        def shown(c: Column) -> Column:
            return F.concat(F.lit("'"), F.substring(c, 1, SHOWN), F.lit("'"))

        def bad(what: str, c: Column) -> Column:
            return F.concat(F.lit(f"bad {what} "), shown(c))

        secs = F.substring_index(tstamp, ".", 1).try_cast("bigint")
        reject = (
            F.when(F.col("value").isNull(), F.lit(None).cast("string"))
            .when(F.col("fields").isNull() | (F.col("fields") != F.lit(self.default_fields)),
                  F.concat(F.lit("not squid's native format: the lines come under the fields '"),
                           F.substring(F.coalesce(F.col("fields"), F.lit("")), 1, SHOWN),
                           F.lit("'")))
            .when(s["n"] < N_FIELDS,
                  F.concat(F.lit(f"expected {N_FIELDS} fields, found "), s["n"].cast("string")))
            .when(~tstamp.rlike(TIME_RE) | (secs > MAX_SECONDS), bad("timestamp", tstamp))
            .when(~elapsed.rlike(UINT_RE), bad("elapsed time", elapsed))
            .when(~code_status.rlike(CODE_STATUS_RE), bad("code/status", code_status))
            .when(~nbytes.rlike(BYTES_RE), bad("byte count", nbytes))
            .when(~method.rlike(METHOD_RE), bad("method", method))
            .when(~hier_peer.rlike(HIER_PEER_RE), bad("peerstatus/peerhost", hier_peer)))

        # Stage 1: checks, the timestamp's parts and the URL's parts, each once.
        is_connect = method == F.lit("CONNECT")

        def url_part(group: int) -> Column:     # CONNECT's host:port has no scheme, path, query
            return F.when(is_connect, F.lit("")).otherwise(F.regexp_extract(url, URL_RE, group))

        checked = exploded.select(
            *engine_cols, "pos", s["line"].alias("line"), reject.alias("reject"),
            secs.alias("_secs"),
            F.substring_index(tstamp, ".", -1).try_cast("bigint").alias("_ms"),
            *[c.alias(f"_f{i}") for i, c in enumerate(f)],
            url_part(1).alias("_scheme"),
            # host[:port] of the URL, without user:password@
            F.regexp_replace(F.when(is_connect, url).otherwise(F.regexp_extract(url, URL_RE, 2)),
                             r"^[^@]*@", "").alias("_hostport"),
            url_part(3).alias("_path"), url_part(4).alias("_query"))

        # Stage 2: the table's columns.
        ok = F.col("reject").isNull() & F.col("value").isNotNull()

        def text(name: str) -> Column:          # "-" means empty
            c = F.col(name)
            return F.when(c == "-", F.lit("")).otherwise(c)

        hostport = F.col("_hostport")
        port_text = F.regexp_extract(hostport, CONNECT_RE, 2)
        host = F.when(hostport.startswith("["), F.regexp_extract(hostport, r"^\[([^\]]*)\]", 1)) \
            .otherwise(F.regexp_extract(hostport, r"^[^:]*", 0))
        default_port = F.lit(None).cast("int")
        for scheme, number in DEFAULT_PORTS.items():
            default_port = F.when(F.lower(F.col("_scheme")) == scheme, F.lit(number)) \
                .otherwise(default_port)
        # Integer arithmetic on the seconds: no time zone is involved.
        p_date = F.date_from_unix_date(F.expr("CAST(_secs DIV 86400 AS INT)")).cast("string")
        p_time = F.format_string("%02d:%02d:%02d", F.expr("CAST(_secs % 86400 DIV 3600 AS INT)"),
                                 F.expr("CAST(_secs % 3600 DIV 60 AS INT)"),
                                 F.expr("CAST(_secs % 60 AS INT)"))
        columns: dict[str, Column] = {
            "p_date": p_date,
            "p_time": p_time,
            "unix_tstamp": F.col("_secs"),
            "unix_tstamp_ms": F.col("_secs") * 1000 + F.col("_ms"),
            "duration": F.col("_f1").try_cast("int"),
            "clientip": text("_f2"),
            "resultcode": F.regexp_extract(F.col("_f3"), CODE_STATUS_RE, 1),
            "respcode": F.regexp_extract(F.col("_f3"), CODE_STATUS_RE, 2).try_cast("int"),
            "scbytes": F.col("_f4").try_cast("bigint"),
            "reqmethod": text("_f5"),
            "fulluri": text("_f6"),
            "urischeme": F.col("_scheme"),
            "host": host,
            "uriport": F.when(port_text != "", port_text.try_cast("int")).otherwise(default_port),
            "uripath": F.col("_path"),
            "uriquery": F.col("_query"),
            "username": text("_f7"),
            "hierarchy": F.regexp_extract(F.col("_f8"), HIER_PEER_RE, 1),
            "serverip": F.when(F.regexp_extract(F.col("_f8"), HIER_PEER_RE, 2) == "-", F.lit(""))
                         .otherwise(F.regexp_extract(F.col("_f8"), HIER_PEER_RE, 2)),
            "resconttype": text("_f9"),
        }
        assert list(columns) == TABLE_SCHEMA.names
        table_cols = [F.when(ok, expr).cast(_spark_type(TABLE_SCHEMA.field(name).type)).alias(name)
                      for name, expr in columns.items()]
        loaded = checked.select(*engine_cols, "pos", "line", "reject", *table_cols)
        return loaded.select(
            *engine_cols, "pos", "line", "reject", *TABLE_SCHEMA.names,
            F.substring("p_date", 1, 4).alias("y"), F.substring("p_date", 6, 2).alias("m"),
            F.substring("p_date", 9, 2).alias("d"), F.substring("p_time", 1, 2).alias("h"))


def _quoted(name: str) -> str:
    """A column name as Spark reads it literally (dots and backticks included)."""
    return "`" + name.replace("`", "``") + "`"


def _spark_type(t: pa.DataType) -> str:
    if t == pa.string():
        return "string"
    if t == pa.int32():
        return "int"
    if t == pa.int64():
        return "bigint"
    raise TypeError(f"no Spark type for {t}")


PIPELINE = SquidPipeline()
