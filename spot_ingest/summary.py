"""``spot-ingest summary -t PIPELINE [--since 24h] [--until TIME] [--out DIR]``:
the ingest summary picture, like the ingest summary panel of Apache Spot's
analytics UI but usable on its own. It writes, in ``DIR`` (default: the
current directory):

* ``ingest-summary-<pipeline>.png``: three panels sharing a time axis (UTC):
  rows of the table per 5 minutes by event time; files loaded, streaming
  micro-batches and input set aside per 5 minutes; the lag (records behind);
* ``ingest-summary-<pipeline>.html``: a self-contained page (the PNG inline as
  base64, a table of the numbers; no external resource);
* ``ingest-summary-<pipeline>.json``: the exact series the picture was drawn
  from.

The JSON (``"v": 1``; every time is in seconds since the epoch, UTC; keys may
be added in version 1, none removed or changed in meaning):

``v``, ``pipeline``, ``type``, ``table``
    the format version, the pipeline's name and type, its table.
``since``, ``until`` (integers)
    the range ``[since, until)``: ``since`` is the requested start rounded
    down to a multiple of ``interval_seconds``, ``until`` the requested end
    rounded up to a whole second (the last interval may end after it).
``interval_seconds``
    300.
``starts``
    the start of each interval: ``since``, ``since + 300``, ... ``< until``.
``records``
    per interval: the rows of the table whose event time
    (``Pipeline.event_seconds``) falls in it. Read from the table's Parquet
    files (only the hourly partitions that overlap the range, only the
    pipeline's ``event_time_columns``); all rows of the table, whichever
    pipeline wrote them (pipelines of one type share a table).
``files``
    per interval: worker reports ``loaded`` (a file, or a piece of one,
    ingested) of this pipeline, by the time the report was made.
``batches``
    per interval: streaming job reports ``batch`` (a micro-batch written).
``failures``
    per interval: reports ``quarantined``, ``refused`` or ``rejected`` (input
    set aside; see ``spot_ingest.reports``).
``lag``
    ``{series: [[ts, records behind], ...]}``, oldest first, from the
    reports' ``lag`` field: a worker's series is ``"partition N"`` (its topic
    partition), the streaming job's ``"stream"``.
``totals``
    ``{"records", "files", "batches", "failures"}``: the sums of the series,
    and ``failures_by_outcome`` (``{"quarantined": n, ...}``).
``outside_range``
    rows of the partitions read whose event time is before ``since`` or not
    before ``until`` (not plotted).
``no_event_time``
    rows of the partitions read without an event time (null or unreadable;
    not plotted).
``table_files_read``, ``unreadable_table_files``, ``broken_report_lines``
    Parquet files read; files of the table that are not readable Parquet
    (logged, their rows not counted); report lines that could not be read
    (cut by a crash).

The partitions are the hours of the event time in UTC (``y=/m=/d=/h=``, as
every pipeline writes them); a folder that is not such an hour is read
whatever it holds.
"""
from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import io
import json
import logging
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import pipeline as registry
from .policy import ExitCode
from .reports import SET_ASIDE, read_reports
from .store import Store, StoreError, open_store

log = logging.getLogger("spot_ingest.summary")

VERSION = 1
INTERVAL = 300
# More intervals than this are drawn as one filled outline (a histogram)
# instead of one bar each: as readable, and seconds faster for 30 days.
MAX_BARS = 600
# A file that vanishes while it is read (a compaction exchanged its
# partition): the partition is listed and read again, at most this often.
REREADS = 5


# -- the numbers -----------------------------------------------------------

def partition_hour(folder: str) -> int | None:
    """The start (epoch seconds) of the hour a partition folder
    ``y=2026/m=11/d=22/h=16`` holds; None for any other folder."""
    try:
        keys = dict(part.split("=", 1) for part in folder.split("/") if part)
        return int(dt.datetime(int(keys["y"]), int(keys["m"]), int(keys["d"]), int(keys["h"]),
                               tzinfo=dt.timezone.utc).timestamp())
    except (KeyError, ValueError):     # not y=/m=/d=/h=, or no such hour (h=25)
        return None


class _Counts:
    def __init__(self):
        self.per_start: dict[int, int] = {}
        self.outside = self.no_time = self.files = self.unreadable = 0

    def add(self, other: "_Counts") -> None:
        for start, n in other.per_start.items():
            self.per_start[start] = self.per_start.get(start, 0) + n
        self.outside += other.outside
        self.no_time += other.no_time
        self.files += other.files
        self.unreadable += other.unreadable


def _count_file(data: bytes, name: str, plugin, since: int, until: int, into: _Counts) -> None:
    try:
        table = pq.read_table(pa.BufferReader(data), columns=list(plugin.event_time_columns))
    except (pa.ArrowException, ValueError) as exc:
        log.warning("%s/hive/%s is not a readable table file (%s); its rows are not counted",
                    plugin.table, name, exc)
        into.unreadable += 1
        return
    into.files += 1
    if table.num_rows == 0:
        return
    seconds = plugin.event_seconds(table)
    known = pc.drop_null(seconds)
    into.no_time += table.num_rows - len(known)
    inside = pc.and_(pc.greater_equal(known, since), pc.less(known, until))
    within = pc.filter(known, inside)
    into.outside += len(known) - len(within)
    if len(within):
        # since is a multiple of INTERVAL and every second here is >= since:
        # integer division is the floor.
        starts = pc.add(pc.multiply(pc.divide(pc.subtract(within, since), INTERVAL), INTERVAL),
                        since)
        for start, n in zip(*pc.value_counts(starts).flatten()):
            into.per_start[start.as_py()] = into.per_start.get(start.as_py(), 0) + n.as_py()


def event_counts(store: Store, plugin, since: int, until: int) -> _Counts:
    """Rows of ``plugin.table`` per interval start, by event time, in
    ``[since, until)`` (``since`` a multiple of ``INTERVAL``), read from the
    partitions that overlap the range."""
    area = f"{plugin.table}/hive"
    folders: dict[str, list[str]] = {}
    for name in store.list(area, ".parquet"):
        folder, _, _ = name.rpartition("/")
        folders.setdefault(folder, []).append(name)
    total = _Counts()
    for folder, names in sorted(folders.items()):
        hour = partition_hour(folder)
        if hour is not None and (hour + 3600 <= since or hour >= until):
            continue
        for attempt in range(REREADS + 1):
            part = _Counts()
            try:
                for name in names:
                    _count_file(store.read(area, name), name, plugin, since, until, part)
                break
            except FileNotFoundError:
                if attempt == REREADS:
                    raise
                log.info("a file of %s/%s went away while it was read (compacted?); reading "
                         "the partition again", area, folder)
                time.sleep(0.2 * (attempt + 1))
                inside = f"{area}/{folder}" if folder else area
                names = [f"{folder}/{n}" if folder else n
                         for n in store.list(inside, ".parquet") if "/" not in n]
        total.add(part)
    return total


def lag_series(report: dict) -> str | None:
    """The lag series a report belongs to (see the module)."""
    if report.get("role") == "stream":
        return "stream"
    if report.get("role") == "worker":
        partition = report.get("partition")
        return f"partition {report.get('worker') if partition is None else partition}"
    return None


def series(store: Store, plugin, pipeline: str, since: float, until: float,
           ptype: str | None = None) -> dict:
    """The JSON of the module docstring, for ``[since, until)``."""
    since = int(since) // INTERVAL * INTERVAL
    until = max(int(math.ceil(until)), since + 1)
    starts = list(range(since, until, INTERVAL))
    index = {s: i for i, s in enumerate(starts)}
    counts = event_counts(store, plugin, since, until)
    files, batches, failures = [0] * len(starts), [0] * len(starts), [0] * len(starts)
    by_outcome: dict[str, int] = {}
    lag: dict[str, list] = {}
    found = read_reports(store, plugin.table, since, until)
    for r in found.reports:
        if r.get("pipeline") != pipeline:
            continue
        i = index.get(int(float(r["ts"])) // INTERVAL * INTERVAL)
        if i is None:
            continue
        outcome = r.get("outcome")
        if outcome == "loaded" and r.get("role") == "worker":
            files[i] += 1
        elif outcome == "batch":
            batches[i] += 1
        elif outcome in SET_ASIDE:
            failures[i] += 1
            by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
        name = lag_series(r)
        if name is not None and isinstance(r.get("lag"), (int, float)):
            lag.setdefault(name, []).append([r["ts"], r["lag"]])
    records = [counts.per_start.get(s, 0) for s in starts]
    return {
        "v": VERSION, "pipeline": pipeline, "type": ptype or plugin.type, "table": plugin.table,
        "since": since, "until": until, "interval_seconds": INTERVAL, "starts": starts,
        "records": records, "files": files, "batches": batches, "failures": failures,
        "lag": dict(sorted(lag.items(), key=lambda kv: _series_order(kv[0]))),
        "totals": {"records": sum(records), "files": sum(files), "batches": sum(batches),
                   "failures": sum(failures), "failures_by_outcome": dict(sorted(by_outcome.items()))},
        "outside_range": counts.outside, "no_event_time": counts.no_time,
        "table_files_read": counts.files, "unreadable_table_files": counts.unreadable,
        "broken_report_lines": found.broken_lines,
    }


def _series_order(name: str):
    kind, _, number = name.partition(" ")
    return (kind, int(number) if number.isdigit() else 0, number)


# -- the picture -----------------------------------------------------------

def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _bars(ax, data: dict, values: list[int], bottom: list[int], color: str, label: str) -> None:
    """Per-interval counts: a bar each, or, for many intervals, one filled
    outline (the same shape without gaps) with a line of at least a pixel
    through each interval that has something, so that a lone busy interval
    narrower than a pixel still shows."""
    import matplotlib.dates as mdates
    if len(values) <= MAX_BARS:
        ax.bar([_when(s) for s in data["starts"]], values, bottom=bottom,
               width=dt.timedelta(seconds=INTERVAL * 0.9), align="edge", color=color,
               linewidth=0, label=label)
        return
    edges = mdates.date2num([_when(s) for s in data["starts"]]
                            + [_when(data["starts"][-1] + INTERVAL)])
    top = [b + v for b, v in zip(bottom, values)]
    ax.stairs(top, edges, baseline=bottom, fill=True, color=color, linewidth=0, label=label)
    busy = [i for i, v in enumerate(values) if v]
    if busy:
        ax.vlines([(edges[i] + edges[i + 1]) / 2 for i in busy], [bottom[i] for i in busy],
                  [top[i] for i in busy], colors=color, linewidth=1)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=13,
            color="#718096")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")     # before pyplot: no display, whatever MPLBACKEND says
    import matplotlib.pyplot as plt
    return plt


def draw(data: dict) -> bytes:
    """The PNG (1100 x 850 pixels) of ``data`` (``series``)."""
    fig = figure(data)
    plt = _pyplot()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def figure(data: dict):
    """The matplotlib figure of ``data`` (Agg: no display needed)."""
    plt = _pyplot()
    import matplotlib.dates as mdates
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    utc = dt.timezone.utc
    totals = data["totals"]
    fig, (top, middle, bottom) = plt.subplots(
        3, 1, figsize=(11, 8.5), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]})
    nothing = not (totals["records"] or totals["files"] or totals["batches"]
                   or totals["failures"] or data["lag"])
    fig.suptitle(f"spot-ingest {data['pipeline']} ({data['table']} table): "
                 f"{_utc(data['since'])} to {_utc(data['until'])}"
                 + ("  (no data)" if nothing else ""), fontsize=13)

    zeros = [0] * len(data["starts"])
    _bars(top, data, data["records"], zeros, "#2b6cb0", "records")
    aside = [f"{data['outside_range']:,} outside the range"] if data["outside_range"] else []
    aside += [f"{data['no_event_time']:,} without a time"] if data["no_event_time"] else []
    aside += [f"{data['unreadable_table_files']:,} unreadable file(s)"
              ] if data["unreadable_table_files"] else []
    top.set_title(f"rows of the {data['table']} table by event time: {totals['records']:,}"
                  + (f" (not shown: {', '.join(aside)})" if aside else ""),
                  fontsize=10, loc="left")
    top.set_ylabel("records / 5 min")
    if not totals["records"]:
        _empty(top, "no data: no rows with an event time in this range")

    base = zeros
    shown = [("files", "#38a169", "files loaded"), ("batches", "#319795", "micro-batches"),
             ("failures", "#e53e3e", "set aside")]
    for key, color, label in shown:
        if totals[key] or key == "failures" or (key == "files" and not totals["batches"]):
            _bars(middle, data, data[key], base, color, f"{label} ({totals[key]:,})")
            base = [b + v for b, v in zip(base, data[key])]
    why = ", ".join(f"{n} {k}" for k, n in totals["failures_by_outcome"].items())
    middle.set_title("ingested, by the time of the report" + (f"; set aside: {why}" if why else ""),
                     fontsize=10, loc="left")
    kinds = [k for k, n in (("files", totals["files"]), ("batches", totals["batches"])) if n]
    middle.set_ylabel(f"{', '.join(kinds or ['files'])} / 5 min")
    middle.legend(loc="best", fontsize=9, framealpha=0.9)
    if not (totals["files"] or totals["batches"] or totals["failures"]):
        _empty(middle, "no data: no file or batch reported in this range")

    palette = ["#805ad5", "#dd6b20", "#3182ce", "#d53f8c", "#2f855a", "#b7791f"]
    for n, (name, points) in enumerate(data["lag"].items()):
        bottom.plot([_when(t) for t, _ in points], [v for _, v in points],
                    drawstyle="steps-post", marker="." if len(points) < 200 else None,
                    markersize=4, linewidth=1.2, color=palette[n % len(palette)],
                    label=f"{name} (max {max(v for _, v in points):,})")
    bottom.set_title("lag: records not yet finished, as reported", fontsize=10, loc="left")
    bottom.set_ylabel("records behind")
    if data["lag"]:
        bottom.legend(loc="best", fontsize=9, framealpha=0.9,
                      ncol=max(1, math.ceil(len(data["lag"]) / 4)))
    else:
        _empty(bottom, "no data: no lag reported in this range")

    locator = mdates.AutoDateLocator(tz=utc, minticks=4, maxticks=10)
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=utc))
    bottom.set_xlim(_when(data["since"]), _when(data["until"]))
    bottom.set_xlabel("time (UTC)")
    for ax in (top, middle, bottom):
        ax.grid(axis="y", alpha=0.3)
        ax.grid(axis="x", alpha=0.15)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
        ax.set_ylim(bottom=0, top=max(1, ax.get_ylim()[1] * 1.08))
        ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def page(data: dict, png: bytes) -> str:
    """The HTML page: the picture inline and the numbers (no external resource)."""
    esc = html.escape
    totals = data["totals"]
    title = esc(f"spot-ingest {data['pipeline']} ({data['table']} table): "
                f"{_utc(data['since'])} to {_utc(data['until'])}")
    rows = "".join(
        f"<tr><td>{esc(_utc(s))}</td><td>{r:,}</td><td>{f:,}</td><td>{b:,}</td><td>{x:,}</td></tr>"
        for s, r, f, b, x in zip(data["starts"], data["records"], data["files"],
                                 data["batches"], data["failures"]) if r or f or b or x)
    lag = "".join(f"<tr><td>{esc(name)}</td><td>{len(points):,}</td>"
                  f"<td>{max(v for _, v in points):,}</td><td>{points[-1][1]:,}</td></tr>"
                  for name, points in data["lag"].items())
    why = ", ".join(f"{n:,} {esc(k)}" for k, n in totals["failures_by_outcome"].items())
    notes = [f"{data['outside_range']:,} row(s) of the partitions read outside the range"
             ] if data["outside_range"] else []
    notes += [f"{data['no_event_time']:,} row(s) without an event time"
              ] if data["no_event_time"] else []
    notes += [f"{data['broken_report_lines']:,} report line(s) unreadable"
              ] if data["broken_report_lines"] else []
    notes += [f"{data['unreadable_table_files']:,} table file(s) unreadable"
              ] if data["unreadable_table_files"] else []
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>"
        "body{font-family:sans-serif;margin:2em;color:#1a202c}"
        "img{max-width:100%;height:auto}"
        "table{border-collapse:collapse;margin:1em 0}"
        "td,th{padding:2px 12px;text-align:right;border-bottom:1px solid #e2e8f0}"
        "th{background:#f7fafc}td:first-child,th:first-child{text-align:left}"
        "</style></head><body>\n"
        f"<h1>{title}</h1>\n"
        f"<img alt='ingest summary of {esc(data['pipeline'])}' width='1100' "
        f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>\n"
        "<h2>Totals</h2><table>"
        f"<tr><th>rows of the {esc(data['table'])} table by event time</th>"
        f"<td>{totals['records']:,}</td></tr>"
        f"<tr><th>files loaded</th><td>{totals['files']:,}</td></tr>"
        f"<tr><th>micro-batches</th><td>{totals['batches']:,}</td></tr>"
        f"<tr><th>set aside</th><td>{totals['failures']:,}{' (' + why + ')' if why else ''}"
        "</td></tr></table>\n"
        + (f"<p>Not shown: {esc('; '.join(notes))}.</p>\n" if notes else "")
        + ("<h2>Lag (records behind)</h2><table><tr><th>series</th><th>reports</th>"
           f"<th>max</th><th>last</th></tr>{lag}</table>\n" if lag else "")
        + "<h2>Per 5 minutes (UTC; intervals with something only)</h2>"
        + (f"<table><tr><th>from</th><th>records</th><th>files</th><th>micro-batches</th>"
           f"<th>set aside</th></tr>{rows}</table>\n" if rows else "<p>no data</p>\n")
        + "</body></html>\n")


# -- the command -----------------------------------------------------------

def parse_time(text: str) -> float:
    """``--until``: epoch seconds, or ``YYYY-MM-DD[THH:MM[:SS]]`` in UTC (a
    trailing ``Z`` or ``+00:00`` allowed; a space for the ``T`` too)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text.removesuffix("Z").replace(" ", "T", 1))
    except ValueError:
        raise ValueError(f"'{text}' is not a time such as 2026-11-22T18:00 (UTC) or epoch "
                         f"seconds") from None
    if when.tzinfo is not None and when.utcoffset() != dt.timedelta(0):
        raise ValueError(f"'{text}': give the time in UTC")
    return when.replace(tzinfo=dt.timezone.utc).timestamp()


def main(argv=None) -> int:
    from .cli import _common, _load
    from .logs import setup_logging
    from .units import parse_duration
    parser = argparse.ArgumentParser(prog="spot-ingest summary", description=
        "Write the ingest summary picture (PNG), a page with it and its numbers (HTML) and "
        "the series it was drawn from (JSON): records per 5 minutes by event time, files "
        "and failures per 5 minutes, lag; times in UTC.")
    _common(parser)
    parser.add_argument("--since", default="24h", metavar="AGE",
                        help="how far back from --until: 30m, 24h, 7d (default 24h)")
    parser.add_argument("--until", "--at", default=None, metavar="TIME",
                        help="end of the range: YYYY-MM-DDTHH:MM (UTC) or epoch seconds "
                             "(default: now)")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="where to write ingest-summary-PIPELINE.png/.html/.json "
                             "(default: the current directory)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        span = parse_duration(args.since)
        if span <= 0:
            raise ValueError(f"--since {args.since}: the range must be longer than 0")
        until = time.time() if args.until is None else parse_time(args.until)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = _load(args, check_paths=False)
    pcfg = cfg.pipeline(args.type)
    plugin = registry.load(pcfg.type)
    try:
        data = series(open_store(cfg.store), plugin, pcfg.name, until - span, until, pcfg.type)
    except (StoreError, OSError) as exc:
        log.error("cannot read the %s table or its reports: %s", plugin.table, exc)
        return ExitCode.ERROR
    png = draw(data)
    out = Path(args.out)
    paths = [out / f"ingest-summary-{pcfg.name}.{ext}" for ext in ("png", "html", "json")]
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, content in zip(paths, (png, page(data, png).encode(),
                                         (json.dumps(data, indent=1) + "\n").encode())):
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(content)
            tmp.replace(path)       # a page being served is never half-written
    except OSError as exc:
        log.error("cannot write the summary to %s: %s", out, exc)
        return ExitCode.ERROR
    totals = data["totals"]
    print(f"{pcfg.name}, {_utc(data['since'])} to {_utc(data['until'])}: "
          f"{totals['records']} records, {totals['files']} files"
          + (f", {totals['batches']} micro-batches" if totals["batches"] else "")
          + f", {totals['failures']} set aside")
    for path in paths:
        print(path)
    return ExitCode.OK
