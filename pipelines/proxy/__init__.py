"""Proxy pipeline: Blue Coat ProxySG access logs (W3C ELFF) -> proxy table.

A record pipeline: the engine publishes the log's lines (``spot_ingest.lines``)
and its streaming runtime (``spot_ingest.streaming``) loads them with
``parse`` below. What is particular to ELFF is here: the ``#Fields:`` header
that names the fields of the lines after it (each message carries the names
it was cut under, so any message parses on its own), the original Spot field
order for a log without a header, and how a line is cut into fields (tokens
separated by single spaces, a double-quoted token may hold spaces, "-" means
empty).
"""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from spot_ingest.lines import check_fields
from spot_ingest.pipeline import RecordPipeline

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
# A token: a double-quoted value (may hold spaces) or a run of non-spaces.
TOKEN = r'"[^"]*"|[^ ]+'


class ProxyPipeline(RecordPipeline):
    type = "proxy"
    table = "proxy"
    schema = TABLE_SCHEMA
    partition_schema = STRING_PARTITIONS
    sort_by = ("host",)
    event_time_columns = ("p_date", "p_time")
    default_supported_files = (".log", ".log.gz", ".txt")
    default_fields = ORIGINAL_FIELDS


    def event_seconds(self, table: pa.Table) -> pa.Array:
        """``p_date`` and ``p_time`` (UTC) as seconds since the epoch."""
        import pyarrow.compute as pc
        moment = pc.binary_join_element_wise(table.column("p_date"), table.column("p_time"), " ")
        stamps = pc.strptime(moment, format="%Y-%m-%d %H:%M:%S", unit="s", error_is_null=True)
        return pc.cast(pc.cast(stamps, pa.int64()), pa.int64())
    def fields_header(self, line: bytes) -> tuple[str, str | None] | None:
        if line.startswith(b"#Fields:"):
            return check_fields(line[len(b"#Fields:"):], "the #Fields: header")
        return None     # #Software:, #Date: ... : comments

    def parse(self, messages):
        """Where each field sits is worked out once per message (from its
        ``fields``), then every line is cut once with a regular expression,
        in one expression: separate projections per field made Spark's
        optimizer re-run the tokenizer for every field (measured: 10x slower)."""
        from pyspark.sql import functions as F

        names = F.split("fields", " ")
        indexed = messages.select(
            "*", F.size(names).alias("_n_fields"),
            *[F.array_position(names, F.lit(name)).cast("int").alias(f"_i_{col}")
              for col, name in COLUMNS if name])
        cut = ("transform(split(value, '\\n'), l -> named_struct('line', l, "
               f"'tokens', transform(regexp_extract_all(l, '{TOKEN}', 0), "
               "t -> CASE WHEN t = '-' THEN '' "    # "-" means empty
               "WHEN startswith(t, '\"') AND length(t) > 1 THEN substr(t, 2, length(t) - 2) "
               "ELSE t END)))")
        picked = ", ".join(f"'{col}', if(_i_{col} > 0, try_element_at(r.tokens, _i_{col}), NULL)"
                           for col, name in COLUMNS if name)
        per_line = (f"transform({cut}, r -> named_struct('line', r.line, 'n_tokens', "
                    f"size(r.tokens), 'quotes', length(r.line) - length(replace(r.line, '\"', '')), "
                    f"{picked}))")
        lines = indexed.select(*messages.columns, "_n_fields",
                               F.posexplode_outer(F.expr(per_line)).alias("pos", "r"))
        fields = lines.select(*messages.columns, "_n_fields", "pos", "r.*")
        moment = F.try_to_timestamp(F.concat_ws(" ", "p_date", "p_time"),
                                    F.lit("yyyy-MM-dd HH:mm:ss"))
        reject = (F.when(F.col("quotes") % 2 == 1, F.lit("unbalanced quotes"))
                  .when(F.col("n_tokens") != F.col("_n_fields"),
                        F.concat(F.lit("expected "), F.col("_n_fields").cast("string"),
                                 F.lit(" fields, found "), F.col("n_tokens").cast("string")))
                  .when(moment.isNull() | (F.length("p_date") != 10) | (F.length("p_time") != 8),
                        F.lit("bad date or time")))
        out = []
        for col, name in COLUMNS:
            if name is None:     # fulluri = host + path + query
                out.append(F.concat_ws("", "host", "uripath", "uriquery").alias(col))
            elif col in INT_COLUMNS:
                out.append(F.expr(f"try_cast({col} AS INT)").alias(col))
            else:
                out.append(F.col(col))
        return fields.select(
            *messages.columns, "pos", "line", reject.alias("reject"), *out,
            F.substring("p_date", 1, 4).alias("y"), F.substring("p_date", 6, 2).alias("m"),
            F.substring("p_date", 9, 2).alias("d"), F.substring("p_time", 1, 2).alias("h"))

    def make_sample(self, dest_dir: Path) -> list[Path]:
        from .sample import write_log
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        return [write_log(Path(dest_dir) / f"proxy-{stamp}.log", 5000, seed=7)]


PROXY = PIPELINE = ProxyPipeline()
