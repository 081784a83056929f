#!/usr/bin/env python3
"""Worker of the ingest: see `python worker.py --help`."""
import sys

from spot_ingest.cli import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
