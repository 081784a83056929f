"""``spot-ingest summary -t PIPELINE --since 24h [--until TIME] [--out DIR]``:
the ingest summary picture, like the panel of Apache Spot's analytics UI but
on its own. Writes ``ingest-summary-<pipeline>.png``, a self-contained
``.html`` page (the PNG inline, and the numbers) and ``.json``, the series the
picture was drawn from:

    {"v": 1, "pipeline", "table", "since", "until" (epoch seconds, UTC),
     "interval_seconds": 300,
     "starts": [epoch seconds of each 5-minute interval],
     "records": [rows of the table whose event time is in that interval],
     "files": [files loaded (or micro-batches) reported in it],
     "failures": [files set aside in it],
     "lag": [[epoch seconds, records behind], ...] (from the reports),
     "outside_range": rows of the partitions read whose event time is outside}

Records come from the table itself (the partitions that overlap the range;
only the event-time columns are read), by event time; files, failures and lag
from the ingest reports, by the time they were made.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import pipeline as registry
from .policy import ExitCode
from .reports import SET_ASIDE, read_reports
from .store import Store, open_store

INTERVAL = 300
VERSION = 1


def _partition_hour(relative: str) -> float | None:
    """The start of the hour a partition folder (y=/m=/d=/h=) holds."""
    try:
        keys = dict(part.split("=", 1) for part in relative.split("/")[:-1])
        return time.mktime((int(keys["y"]), int(keys["m"]), int(keys["d"]), int(keys["h"]),
                            0, 0, 0, 0, 0)) - time.timezone
    except (KeyError, ValueError):
        return None


def event_counts(store: Store, plugin, since: float, until: float) -> tuple[dict[int, int], int]:
    """Rows per interval start, by event time, and rows outside the range."""
    area = f"{plugin.table}/hive"
    counts: dict[int, int] = {}
    outside = 0
    for name in store.list(area, ".parquet"):
        hour = _partition_hour(name)
        if hour is not None and (hour + 3600 <= since or hour >= until):
            continue
        table = pq.read_table(pa.BufferReader(store.read(area, name)),
                              columns=list(plugin.event_time_columns))
        seconds = plugin.event_seconds(table)
        inside = pc.and_(pc.greater_equal(seconds, int(since)), pc.less(seconds, int(until)))
        inside = pc.fill_null(inside, False)
        outside += table.num_rows - pc.sum(inside).as_py() if table.num_rows else 0
        starts = pc.multiply(pc.divide(pc.filter(seconds, inside), INTERVAL), INTERVAL)
        if len(starts):
            for start, n in zip(*pc.value_counts(starts).flatten()):
                counts[start.as_py()] = counts.get(start.as_py(), 0) + n.as_py()
    return counts, outside


def series(store: Store, plugin, pipeline: str, since: float, until: float) -> dict:
    since = since // INTERVAL * INTERVAL
    starts = list(range(int(since), int(until), INTERVAL))
    counts, outside = event_counts(store, plugin, since, until)
    files = dict.fromkeys(starts, 0)
    failures = dict.fromkeys(starts, 0)
    lag = []
    for r in read_reports(store, plugin.table, since, until).reports:
        if r.get("pipeline") != pipeline:
            continue
        start = int(r["ts"]) // INTERVAL * INTERVAL
        if start not in files:
            continue
        if r.get("outcome") in ("loaded", "batch"):
            files[start] += 1
        elif r.get("outcome") in SET_ASIDE:
            failures[start] += 1
        if r.get("lag") is not None:
            lag.append([r["ts"], r["lag"]])
    return {"v": VERSION, "pipeline": pipeline, "table": plugin.table, "since": since,
            "until": until, "interval_seconds": INTERVAL, "starts": starts,
            "records": [counts.get(s, 0) for s in starts], "files": [files[s] for s in starts],
            "failures": [failures[s] for s in starts], "lag": lag, "outside_range": outside}


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def draw(data: dict) -> bytes:
    """The PNG: records, files and failures per 5 minutes, and lag."""
    import datetime as dt

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, StrMethodFormatter

    def when(ts):
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc)
    x = [when(s) for s in data["starts"]]
    width = dt.timedelta(seconds=INTERVAL * 0.9)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                              gridspec_kw={"height_ratios": [3, 2, 2]})
    fig.suptitle(f"spot-ingest: {data['pipeline']} ({data['table']} table), "
                 f"{_utc(data['since'])} to {_utc(data['until'])}", fontsize=13)
    top.bar(x, data["records"], width=width, align="edge", color="#2b6cb0")
    top.set_ylabel("records / 5 min")
    top.set_title(f"records by event time (total {sum(data['records']):,})", fontsize=10,
                  loc="left")
    middle.bar(x, data["files"], width=width, align="edge", color="#38a169",
               label=f"loaded ({sum(data['files']):,})")
    middle.bar(x, data["failures"], width=width, align="edge", color="#e53e3e",
               bottom=data["files"], label=f"set aside ({sum(data['failures']):,})")
    middle.set_ylabel("files / 5 min")
    middle.set_title("files (or micro-batches) by time ingested", fontsize=10, loc="left")
    middle.legend(loc="upper right", fontsize=9)
    if data["lag"]:
        bottom.plot([when(t) for t, _ in data["lag"]], [v for _, v in data["lag"]],
                    color="#805ad5", marker=".", linewidth=1)
    bottom.set_ylabel("records behind")
    bottom.set_title("lag (announcements or messages not yet finished)", fontsize=10,
                     loc="left")
    bottom.set_xlim(when(data["since"]), when(data["until"]))
    bottom.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M", tz=dt.timezone.utc))
    bottom.set_xlabel("time (UTC)")
    top.yaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    for ax in (top, middle, bottom):
        ax.grid(axis="y", alpha=0.3)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0, top=max(1, ax.get_ylim()[1]))
        if not any(data["records"]) and ax is top:
            ax.text(0.5, 0.5, "no data in this range", transform=ax.transAxes, ha="center",
                    va="center", fontsize=12, color="gray")
    fig.autofmt_xdate()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def page(data: dict, png: bytes) -> str:
    rows = "".join(f"<tr><td>{_utc(s)}</td><td>{r}</td><td>{f}</td><td>{x}</td></tr>"
                   for s, r, f, x in zip(data["starts"], data["records"], data["files"],
                                         data["failures"]) if r or f or x)
    title = html.escape(f"spot-ingest: {data['pipeline']}, {_utc(data['since'])} to "
                        f"{_utc(data['until'])}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;"
            f"text-align:right}}</style></head><body><h1>{title}</h1>"
            f"<img alt='ingest summary' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode()}'>"
            f"<p>{sum(data['records']):,} records, {sum(data['files']):,} files, "
            f"{sum(data['failures']):,} set aside.</p>"
            f"<table><tr><th>5 minutes from</th><th>records</th><th>files</th>"
            f"<th>set aside</th></tr>{rows}</table></body></html>\n")


def main(argv=None) -> int:
    from .cli import _common, _load
    from .logs import setup_logging
    from .units import parse_duration
    parser = argparse.ArgumentParser(prog="spot-ingest summary", description=
        "Write the ingest summary picture (PNG), a page with it (HTML) and its numbers (JSON).")
    _common(parser)
    parser.add_argument("--since", default="24h", metavar="AGE",
                        help="how far back from --until (default 24h)")
    parser.add_argument("--until", default=None, metavar="TIME",
                        help="end of the range: YYYY-MM-DDTHH:MM (UTC) or epoch seconds "
                             "(default: now)")
    parser.add_argument("--out", default=".", metavar="DIR", help="where to write (default .)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        span = parse_duration(args.since)
        until = time.time() if args.until is None else (
            float(args.until) if args.until.replace(".", "").isdigit() else
            time.mktime(time.strptime(args.until, "%Y-%m-%dT%H:%M")) - time.timezone)
    except ValueError as exc:
        parser.error(str(exc))
    cfg = _load(args, check_paths=False)
    pcfg = cfg.pipeline(args.type)
    data = series(open_store(cfg.store), registry.load(pcfg.type), pcfg.name, until - span, until)
    png = draw(data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"ingest-summary-{pcfg.name}.{ext}" for ext in ("png", "html", "json")]
    paths[0].write_bytes(png)
    paths[1].write_text(page(data, png), encoding="utf-8")
    paths[2].write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    print(f"{sum(data['records'])} records, {sum(data['files'])} files, "
          f"{sum(data['failures'])} set aside: " + ", ".join(str(p) for p in paths))
    return ExitCode.OK
