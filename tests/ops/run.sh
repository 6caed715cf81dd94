#!/usr/bin/env bash
# Operational checks of a built diffit-server (GitHub issue 5, "Must show"), against real tools,
# on the loopback interface only (127.0.0.1), each step bounded in requests and time:
#
#   1 prometheus  a real Prometheus scrapes /metrics every 1 s and sees the images counter rise;
#                 promtool check metrics lints a live scrape
#   2 load        8 x max-batch concurrent clients, 200 requests: no 5xx, every PNG decodes, p50/p99
#   3 overload    bursts past a small queue: 429 + Retry-After, accepted == completed
#   4 faults      killed clients free their samples; SIGTERM drains and exits 0; broken weights
#                 and a bad --vae fail start-up naming the tensor/path
#   5 hostile     explicit bad input (4xx with clear messages) + schemathesis on openapi.yaml
#   6 soak        3,000 requests at steady concurrency: RSS floor and plateau after warm-up
#   7 slowloris   slowloris + descriptor flood (bounded) while /healthz and generate are timed
#   8 drain       SIGTERM with held partial requests: the drain ends within its timeout
#   9 names       a 1,860-name model with hostile names; hostile class names stay cheap
#  10 zombie      bad metadata / duration settings: non-zero exit at once, never half-alive
#
#   tests/ops/run.sh [path/to/diffit-server]      (default target/debug/diffit-server; build it first)
#
# Builds nothing. Installs, each only when missing (later runs reuse them):
#   - Debian: python3 + python3-venv (apt-get install); prometheus + promtool from Debian's
#     `prometheus` package, taken out with `apt-get download` + `dpkg-deb -x` (installing the
#     package would also create a service and try to start a Prometheus server). Set PROMETHEUS /
#     PROMTOOL to use your own binaries.
#   - PyPI, in a venv: schemathesis 4.32.5 and its dependencies, pinned in tests/ops/requirements.txt.
# Tools live in $DIFFIT_OPS_TOOLS (default ~/.cache/diffit-ops-tools); logs and per-step JSON
# results in $DIFFIT_OPS_OUT (default target/ops; scratch, server logs and schemathesis reports in
# its work/). OPS_STEPS="load soak" runs a subset.
# Prints PASS/FAIL per step and exits 1 if any step failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${1:-$ROOT/target/debug/diffit-server}
TOOLS=${DIFFIT_OPS_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/diffit-ops-tools}
OUT=${DIFFIT_OPS_OUT:-$ROOT/target/ops}
STEPS=${OPS_STEPS:-prom load overload faults hostile soak slowloris drain names zombie}
REQS=$ROOT/tests/ops/requirements.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '==> %s\n' "$*"; }
die() { printf 'ops: FAILED: %s\n' "$*" >&2; exit 1; }

T_START=$(date +%s)
[ -x "$BIN" ] || die "no executable server binary at '$BIN' (build it: cargo build, or pass its path)"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
"$BIN" --version >/dev/null 2>&1 || die "'$BIN' does not run"

APT_UPDATED=
apt_update_once() {
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
  fi
}
need_root_apt() {
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "need $*: run as root on Debian, or install them"
  fi
}

# --- Debian: python3 with venv ---------------------------------------------------------------------
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
if [ -z "$PY" ] || ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
  need_root_apt python3 python3-venv
  apt_update_once
  log "apt-get install python3 python3-venv"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-venv \
    >/dev/null || die "apt-get install python3 python3-venv failed"
  PY=/usr/bin/python3
fi

# --- Debian: prometheus + promtool -----------------------------------------------------------------
mkdir -p "$TOOLS" "$OUT"
PROMETHEUS=${PROMETHEUS:-}
PROMTOOL=${PROMTOOL:-}
if [ -z "$PROMETHEUS" ] || [ -z "$PROMTOOL" ]; then
  if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    PROMETHEUS=$(command -v prometheus)
    PROMTOOL=$(command -v promtool)
  else
    PROMETHEUS=$TOOLS/prometheus/usr/bin/prometheus
    PROMTOOL=$TOOLS/prometheus/usr/bin/promtool
    if [ ! -x "$PROMETHEUS" ] || [ ! -x "$PROMTOOL" ]; then
      need_root_apt "prometheus and promtool"
      log "prometheus: apt-get download prometheus + dpkg-deb -x (no service installed)"
      dl=$(mktemp -d)
      chmod 0777 "$dl"   # apt's sandbox user writes the download here
      (cd "$dl" && apt-get download -qq prometheus 2>/dev/null) \
        || { apt_update_once; (cd "$dl" && apt-get download -qq prometheus); } \
        || die "apt-get download prometheus failed"
      rm -rf "$TOOLS/prometheus"
      dpkg-deb -x "$dl"/prometheus_*.deb "$TOOLS/prometheus" || die "dpkg-deb -x failed"
      rm -rf "$dl"
    fi
  fi
fi
"$PROMETHEUS" --version 2>&1 | head -1
"$PROMTOOL" --version 2>&1 | head -1

# --- PyPI: schemathesis in a venv ------------------------------------------------------------------
VENV=$TOOLS/venv
stamp="$(sha256sum "$REQS" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$VENV/.stamp" 2>/dev/null || true)" != "$stamp" ]; then
  log "venv $VENV: pip install -r tests/ops/requirements.txt"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install -q --no-input -r "$REQS" || die "pip install failed"
  echo "$stamp" > "$VENV/.stamp"
fi
"$VENV/bin/schemathesis" --version
T_TOOLS=$(date +%s)
echo "tools ready in $((T_TOOLS - T_START)) s; server: $BIN ($("$BIN" --version 2>&1 | head -1))"
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), $(uname -sr)"

# --- steps -----------------------------------------------------------------------------------------
# Scratch per step (server and Prometheus logs, broken weight files, schemathesis reports), kept
# after the run for inspection and cleared at the start of the next.
WORK=$OUT/work
rm -rf "$WORK"
mkdir -p "$WORK"

PASSED=()
FAILED=()
OPS=("$VENV/bin/python" "$ROOT/tests/ops/ops.py")
HARDENING=("$VENV/bin/python" "$ROOT/tests/ops/hardening.py")

step() {  # step NAME LIMIT_SECONDS TITLE ARGS...
  local name=$1 limit=$2 title=$3
  shift 3
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  log "$name: $title"
  local t0 rc=0
  t0=$(date +%s)
  local script=("${OPS[@]}")
  case " slowloris drain names zombie " in *" $name "*) script=("${HARDENING[@]}") ;; esac
  timeout --kill-after=10 "$limit" "${script[@]}" "$name" --bin "$BIN" --workdir "$WORK/$name" \
    --results "$OUT/$name.json" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
  local dt=$(($(date +%s) - t0))
  if [ "$rc" = 0 ]; then
    PASSED+=("$name")
    printf 'PASS  %s (%d s)\n\n' "$name" "$dt"
  else
    FAILED+=("$name")
    [ "$rc" = 124 ] && echo "    (killed after its $limit s limit)"
    printf 'FAIL  %s (%d s, exit %s; log %s)\n\n' "$name" "$dt" "$rc" "$OUT/$name.log"
  fi
}

step prom 120 "Prometheus scrape + promtool check metrics" \
  --prometheus "$PROMETHEUS" --promtool "$PROMTOOL"
step load 240 "200 requests at 32 concurrent clients (max batch 4)" --requests 200
step overload 180 "bursts of 40 against max batch 2, max queue 4"
step faults 180 "killed clients, SIGTERM drain, broken weights, bad --vae"
step hostile 360 "explicit hostile input + schemathesis" \
  --schemathesis "$VENV/bin/schemathesis" --max-examples 30 --st-timeout 150
step soak 600 "3,000 requests, steps 2, concurrency 8: RSS plateau" --requests 3000
step slowloris 240 "slowloris (4,000) + descriptor flood (6,000) while /healthz and generate are timed"
step drain 120 "SIGTERM with held partial requests and long generations: bounded drain"
step names 180 "a 1,860-name model with hostile names; hostile class names"
step zombie 180 "bad metadata and settings: start-up fails fast"

T_END=$(date +%s)
echo "ops: ${#PASSED[@]} passed (${PASSED[*]:-none}), ${#FAILED[@]} failed (${FAILED[*]:-none}); \
$((T_END - T_START)) s in all ($((T_END - T_TOOLS)) s of steps); results in $OUT"
[ "${#FAILED[@]}" = 0 ]
