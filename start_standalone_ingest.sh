#!/usr/bin/env bash
# Run a pipeline on one machine: embedded broker (if configured), master, workers.
#   ./start_standalone_ingest.sh PIPELINE WORKERS [--once] [--demo] [-c FILE]
# See README.md; `--help` lists the options.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m spot_ingest.cli standalone "$@"
