"""The interface through which a data source plugs into the engine.

A data source is one folder, ``pipelines/<type>/`` in the repository
(installed as ``spot_ingest.pipelines.<type>``), or a module of another
package named in the entry-point group ``spot_ingest.pipelines``. It exports
``PIPELINE``: an instance of one of the two kinds below. Do not subclass
``Pipeline`` itself: the engine decides how data travels by the kind.

``FilePipeline``: capture files (NetFlow, packet captures).
    The master stages each finished file (or the pieces ``split`` makes of
    it) in the shared store and announces it on the topic; workers fetch it
    and ``convert`` it into Arrow batches, which the engine writes as Parquet
    named after the input's checksum. Delivery: at least once from the topic,
    effectively once in the table (a second conversion of the same input
    replaces the first), provided ``convert`` is deterministic.

``RecordPipeline``: logs of text lines (web access logs, firewall logs).
    The master cuts each log into messages of whole lines (the engine's line
    protocol, ``spot_ingest.lines``) and publishes them; the streaming job
    (``spot_ingest.streaming``) parses them with the pipeline's ``parse``,
    in Spark column functions, and writes each message's rows under a digest
    of the message, so a message read twice replaces its own output.
    Delivery: exactly once in the table through Spark's checkpoint.

Every hook receives the pipeline's ``PipelineConfig``; ``cfg.options`` is
what ``parse_options`` returned for it (a frozen dataclass), read once when
the configuration is loaded.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from .config import PipelineConfig

BUILTIN_PACKAGE = "spot_ingest.pipelines"
ENTRY_POINT_GROUP = "spot_ingest.pipelines"


class BadInputError(Exception):
    """The input itself is at fault (a tool cannot read it): it is set aside
    with this message, and the rest goes on."""


class DamagedInputError(BadInputError):
    """Only part of the input is readable (``split`` found damage or a cut):
    ``pieces`` hold that part. The master stages and announces the pieces, and
    sets the original aside with this message instead of deleting it, so that
    what could not be read is kept and the loss is reported."""

    def __init__(self, message: str, pieces: list[Path]):
        super().__init__(message)
        self.pieces = pieces


class ToolMissingError(Exception):
    """An external program the pipeline needs is not installed."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a pipeline that has no keys of its own."""


OptionError = Callable[[str, str], Exception]


class Pipeline(ABC):
    """What both kinds have: a table, its schema, the files taken from the
    collector directory, the tools needed, and options. Do not subclass this:
    subclass ``FilePipeline`` or ``RecordPipeline``."""

    type: str = ""                 # the "type" of a pipeline in ingest_conf.json
    table: str = ""                # the table (and the store folder) it loads
    schema: pa.Schema              # the table's columns, in order
    partition_schema: pa.Schema    # its Hive partition columns, in order
    default_supported_files: tuple[str, ...] = ()
    # Names (fnmatch patterns) of files the collector is still writing: never taken.
    working_names: tuple[str, ...] = ()
    # Keys of the pipeline's section that name directories (a demo's sandbox
    # moves them into itself).
    directory_keys: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()    # programs that must be on PATH
    # Columns compaction sorts a partition's rows on, so that engines skip
    # row groups on the filters analysts use most (empty: not sorted).
    sort_by: tuple[str, ...] = ()
    # The columns ``event_seconds`` reads (the summary picture reads only these).
    event_time_columns: tuple[str, ...] = ("unix_tstamp",)

    def parse_options(self, raw: Mapping[str, Any], error: OptionError) -> Any:
        """Validate the keys of this type in the pipeline's section ``raw``
        and return them as a frozen dataclass (``cfg.options`` everywhere
        after). Raise ``error(key, problem)``: only this pipeline becomes
        unusable, with a message naming the file and the key. Runs once per
        process, when the configuration is loaded."""
        return NoOptions()

    def check_tools(self) -> None:
        """Raise ``ToolMissingError`` naming what to install."""
        missing = [t for t in self.tools if shutil.which(t) is None]
        if missing:
            raise ToolMissingError(
                f"the {self.type} pipeline needs {', '.join(missing)} on PATH; "
                f"install it (Debian: apt-get install {' '.join(sorted(set(self.packages(missing))))})")

    def packages(self, tools) -> list[str]:
        """The Debian packages that bring ``tools`` (for the message above)."""
        return list(tools)

    def make_sample(self, dest_dir: Path) -> list[Path]:
        """Write a small sample input made with the real tools (``--demo``)
        into ``dest_dir``; return the files. May raise ``ToolMissingError``."""
        raise NotImplementedError(f"the {self.type} pipeline has no sample data")

    def event_seconds(self, table: pa.Table) -> pa.Array:
        """When each row happened, in whole seconds since the epoch (UTC),
        from ``event_time_columns`` of ``table``; null where unknown."""
        return pc.cast(table.column(self.event_time_columns[0]), pa.int64())

    @property
    def full_schema(self) -> pa.Schema:
        return pa.schema(list(self.schema) + list(self.partition_schema))


class FilePipeline(Pipeline):
    """Files staged in the store, announced, converted by workers."""

    def scratch_dir(self, cfg: PipelineConfig) -> Path:
        """Where the master makes the ``workdir`` handed to ``split``."""
        return cfg.local_staging

    def split(self, path: Path, workdir: Path, cfg: PipelineConfig
              ) -> list[Path] | Iterator[Path]:
        """Master side, in a staging process: the pieces of one finished
        capture to stage and announce, in order (default: the file itself).

        A list is staged whole, then announced. A generator has each piece
        staged and announced as soon as it is yielded (workers start while
        the rest is being split): piece k is in the store and acknowledged by
        the broker before the generator is asked for piece k + 1, so yield a
        piece only once it is complete, and as soon as it is. The engine may
        delete a piece once it has it; it closes the generator if it stops
        early (stop your tools in ``finally``); raising after some pieces
        keeps them announced.

        Pieces are written in ``workdir`` (fresh, removed by the engine
        afterwards, and at the next start if the master was killed). Must be
        deterministic: the same file gives the same pieces, byte for byte,
        in the same order. A master killed half-way (some pieces announced,
        the file still in the collector directory) splits the file again
        after a restart and stages the pieces under the same names, and the
        workers absorb the repeat only because equal pieces have equal
        checksums (so a piece's bytes must not depend on the time, the host
        or the piece's neighbours being split already). Raise
        ``BadInputError`` for a file that cannot be split (it is set aside;
        a generator before yielding anything), ``DamagedInputError`` for one
        that is only partly readable."""
        return [path]

    @abstractmethod
    def convert(self, path: Path, cfg: PipelineConfig) -> Iterator[pa.RecordBatch]:
        """Worker side, in a pool process: one staged piece -> batches whose
        columns are exactly ``schema`` then ``partition_schema``.

        * Batches may be any size; the file must never be held whole in memory.
        * Deterministic: the same input gives the same rows (output is named
          after the input's checksum, so a redo replaces, never doubles).
        * ``BadInputError``: the input is at fault; the engine sets the file
          aside (after checking it is the announced file) and commits.
          Any other exception is a fault of the environment (disk, tool
          missing): the file is retried with backoff and not committed.
        * Rows yielded before an exception are discarded: nothing of a failed
          conversion becomes visible.
        * The engine kills the conversion after ``cfg.convert_timeout``
          seconds (a hung tool); clean up with ``try/finally`` or ``with``."""


class RecordPipeline(Pipeline):
    """Logs of text lines, published as messages, loaded by a streaming job.

    The engine cuts a log into messages (``spot_ingest.lines``): a message is
    a run of consecutive whole lines of one file under one fields header,
    never more than ``kafka.message_size`` bytes; lines that begin with
    ``comment_prefix`` end the current message and are never published
    (``fields_header`` may read field names from them). It remembers how far
    each file was published, so a log that grows is published from there on.
    """

    comment_prefix: bytes = b"#"
    # The field names of lines before any fields header (single spaces), or
    # "" when the format has no named fields.
    default_fields: str = ""

    def fields_header(self, line: bytes) -> tuple[str, str | None] | None:
        """A comment line (it starts with ``comment_prefix``): if it declares
        the field names of the lines after it (W3C ``#Fields:``), return
        (names separated by single spaces, what is wrong with the header or
        None); every line under a bad header is rejected with that reason.
        Otherwise None: the comment is skipped. Master side, per comment line."""
        return None

    @abstractmethod
    def parse(self, messages: DataFrame) -> DataFrame:
        """Streaming side, on each micro-batch: messages -> one row per line.

        ``messages`` has one row per Kafka record. ``value`` (string) holds
        the lines of a message joined with ``\\n``, ``fields`` (string) the
        field names that govern them; both are NULL for a record that is not
        a message of lines (an end-of-run marker, a rejected record). Other
        columns belong to the engine: keep them all (``select("*", ...)``).

        Return one row per line, in order, with ``pos`` (the 0-based index of
        the line in its message; use ``posexplode_outer`` so that a NULL
        ``value`` gives exactly one row), ``line`` (the line), ``reject``
        (why the line cannot be loaded, or NULL), the table's columns and the
        partition columns, besides the engine's columns.

        Spark column functions only: no filter, join, aggregation or
        repartition (the engine writes each record's rows as one file and
        relies on them staying together), no Python UDF (slow), and
        deterministic. A line the pipeline cannot parse is a ``reject``
        reason, never an exception: an exception fails the micro-batch, and
        Spark would fail on it again after every restart."""


def _builtin_root() -> Path:
    return Path(importlib.import_module(BUILTIN_PACKAGE).__file__).parent


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def known_types() -> list[str]:
    """The built-in pipeline folders and the types other packages add."""
    builtin = {p.name for p in _builtin_root().iterdir()
               if (p / "__init__.py").is_file() and not p.name.startswith("_")}
    return sorted(builtin | set(_entry_points()))


_loaded: dict[str, Pipeline] = {}


def load(ptype: str) -> Pipeline:
    """The ``PIPELINE`` of a type (a built-in folder first, then an entry point)."""
    if ptype not in _loaded:
        if (_builtin_root() / ptype / "__init__.py").is_file():
            module = importlib.import_module(f"{BUILTIN_PACKAGE}.{ptype}")
            plugin = getattr(module, "PIPELINE", None)
            where = module.__name__
        else:
            ep = _entry_points().get(ptype)
            if ep is None:
                raise KeyError(f"unknown pipeline type '{ptype}'")
            plugin, where = ep.load(), f"entry point {ep.value}"
            plugin = getattr(plugin, "PIPELINE", plugin)
        if not isinstance(plugin, (FilePipeline, RecordPipeline)):
            raise TypeError(f"{where} does not export PIPELINE = <FilePipeline or "
                            f"RecordPipeline instance>")
        _loaded[ptype] = plugin
    return _loaded[ptype]
