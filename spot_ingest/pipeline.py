"""The one interface through which a data source plugs into the engine.

A data source lives in ``pipelines/<type>/__init__.py`` and exports
``PIPELINE``, an instance of a ``Pipeline`` subclass. The engine calls it at
two places and nowhere else:

* on the master, ``split(path, workdir, cfg)`` turns one finished capture into
  the pieces that are staged and announced (default: the file itself);
* on a worker, ``convert(path, cfg)`` turns one staged piece into Arrow
  record batches of the table's columns plus its partition columns.

Contract of ``convert``:

* It yields ``pyarrow.RecordBatch`` objects whose columns are exactly
  ``schema`` followed by ``partition_schema``; batches may be any size, and
  each must be produced without holding the whole file in memory.
* It must be deterministic: the same input gives the same rows. The engine
  names output after the input's checksum, so a second run replaces the first
  (this is how "at least once" delivery becomes "effectively once" output).
* It raises ``BadInputError`` when the input itself is at fault (the tool
  cannot read it). The engine then quarantines the input with the message and
  moves on. Any other exception is taken as a fault of the environment (disk
  full, permissions, missing tool) and the work is retried without committing.
* Rows yielded before an exception are discarded by the engine: nothing of a
  failed conversion becomes visible.

A pipeline whose data is a stream of lines rather than capture files (proxy)
sets ``delivery = "records"``: the master then publishes what ``records()``
yields (messages, each a Kafka record) instead of staging the file, and
``consumer = "streaming"`` says a streaming job (``run_stream``), not
workers, loads the topic.

``split`` runs in the master's staging processes; the pieces it writes in
``workdir`` (a fresh folder under ``scratch_dir(cfg)``) are staged in order,
and the engine removes the folder afterwards. It raises ``BadInputError``
for a file it cannot split; the master then sets the file aside.
"""
from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

PIPELINES_PACKAGE = "pipelines"


class BadInputError(Exception):
    """The input file cannot be converted; it is quarantined with this message."""


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


class Pipeline:
    type: str = ""
    table: str = ""
    schema: pa.Schema
    partition_schema: pa.Schema
    default_supported_files: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    delivery = "files"        # or "records"
    consumer = "workers"      # or "streaming"

    def parse_options(self, raw: dict, error: Callable[[str, str], Exception]) -> Any:
        """Validate the keys particular to this type. ``error(key, problem)``
        builds the exception to raise. Returns the typed options."""
        return None

    def check_tools(self) -> None:
        missing = [t for t in self.tools if shutil.which(t) is None]
        if missing:
            raise ToolMissingError(
                f"the {self.type} pipeline needs {', '.join(missing)} on PATH; "
                f"install it (Debian: apt-get install {' '.join(sorted(set(self.packages(missing))))})")

    def packages(self, tools) -> list[str]:
        return list(tools)

    def scratch_dir(self, cfg) -> Path:
        """Where the master makes the ``workdir`` handed to ``split``."""
        return cfg.local_staging

    def split(self, path: Path, workdir: Path, cfg) -> list[Path]:
        return [path]

    def convert(self, path: Path, cfg) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def records(self, path: Path, relative: str, max_bytes: int, state_dir: Path | None = None):
        """delivery == "records": yield messages (``value``, ``headers``) of at
        most ``max_bytes``, or items with ``line_no``/``data``/``reason`` for
        input that must be set aside. Deterministic for the same file. Raise
        ``BadInputError`` (before yielding anything) for a file that cannot
        be read; the master sets it aside. ``state_dir``: a directory of the
        master's where the pipeline may remember how far a file was published
        (a file that grew is offered again); the master asks for the next item
        only after the broker acknowledged the previous message."""
        raise NotImplementedError

    def run_stream(self, cfg, pcfg, partitions: int, run_id: str | None,
                   fresh_topic: bool = False) -> int:
        """consumer == "streaming": run the job that loads the topic; exit code.
        ``fresh_topic``: the topic was just created on an empty broker, so
        offsets remembered from an earlier broker mean nothing."""
        raise NotImplementedError

    def make_sample(self, dest_dir: Path) -> list[Path]:
        """Write a small sample capture made with the real tools (demo)."""
        raise NotImplementedError(f"the {self.type} pipeline has no sample data")

    @property
    def full_schema(self) -> pa.Schema:
        return pa.schema(list(self.schema) + list(self.partition_schema))


def known_types() -> list[str]:
    root = Path(importlib.import_module(PIPELINES_PACKAGE).__file__).parent
    return sorted(p.name for p in root.iterdir()
                  if (p / "__init__.py").is_file() and not p.name.startswith("_"))


_loaded: dict[str, Pipeline] = {}


def load(ptype: str) -> Pipeline:
    if ptype not in _loaded:
        module = importlib.import_module(f"{PIPELINES_PACKAGE}.{ptype}")
        plugin = getattr(module, "PIPELINE", None)
        if not isinstance(plugin, Pipeline):
            raise TypeError(f"{module.__name__} does not export PIPELINE = <Pipeline instance>")
        _loaded[ptype] = plugin
    return _loaded[ptype]
