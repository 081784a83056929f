#!/usr/bin/env python3
"""Worker of the ingest: see `python3 worker.py --help`."""
import sys

from spot_ingest.bootstrap import use_project_venv

use_project_venv()

from spot_ingest.cli import worker_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(worker_main())
