"""Run the repository's scripts (``master_collector.py``, ``worker.py``) with the
project's virtual environment, without the user activating it.

``scripts/setup.sh`` installs everything into ``.venv/`` at the repository root.
A script started with any other interpreter (``python3 worker.py ...``) re-runs
itself with ``.venv/bin/python``; without that environment it says how to make
it instead of failing on the first missing import. Standard library only: it
runs before any dependency can be imported.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV = REPO_ROOT / ".venv"


def use_project_venv() -> None:
    venv_python = VENV / "bin" / "python"
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if venv_python.exists() and not in_venv:
        os.execv(str(venv_python), [str(venv_python), *sys.argv])
    try:
        import kafka  # noqa: F401  (the first dependency any command needs)
    except ImportError:
        from .policy import ExitCode    # standard library only, too
        sys.stderr.write(f"spot-ingest is not set up for {sys.executable}: run "
                         f"{REPO_ROOT / 'scripts' / 'setup.sh'} first\n")
        sys.exit(ExitCode.CONFIG)
