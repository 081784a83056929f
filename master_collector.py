#!/usr/bin/env python3
"""Master of the ingest: see `python master_collector.py --help`."""
import sys

from spot_ingest.cli import master_main

if __name__ == "__main__":
    sys.exit(master_main())
