#!/usr/bin/env bash
# Run a pipeline on one machine: embedded broker (if configured), master, workers.
#   ./start_standalone_ingest.sh PIPELINE WORKERS [--once] [--demo] [-c FILE]
# See README.md; `--help` lists the options. Uses the .venv/ that
# scripts/setup.sh makes (no activation needed).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/.venv/bin/python"
if [[ ! -x "$python" ]]; then
  python="${PYTHON:-python3}"
  "$python" -c 'import kafka' 2>/dev/null || {
    echo "spot-ingest is not set up: run $here/scripts/setup.sh first" >&2; exit 2; }
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" -m spot_ingest.cli standalone "$@"
