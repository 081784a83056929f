#!/usr/bin/env python3
"""Master of the ingest: see `python3 master_collector.py --help`."""
import sys

from spot_ingest.bootstrap import use_project_venv

use_project_venv()

from spot_ingest.cli import master_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(master_main())
