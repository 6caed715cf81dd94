#!/usr/bin/env bash
# The playground page in a real browser and the official OpenAI SDK, against a built server:
#
#   tests/browser/run.sh [path/to/diffit-server]      (default target/debug/diffit-server)
#
# Installs what it lacks, each only when missing: Debian's chromium and chromium-driver
# (apt-get; needs root), and selenium + openai from PyPI in a venv (pinned in requirements.txt,
# under $DIFFIT_BROWSER_TOOLS, default ~/.cache/diffit-browser-tools). Loopback only. Set
# SCREENSHOT=docs/playground.png to refresh the README's screenshot.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${1:-$ROOT/target/debug/diffit-server}
TOOLS=${DIFFIT_BROWSER_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/diffit-browser-tools}
REQS=$ROOT/tests/browser/requirements.txt
export PIP_DISABLE_PIP_VERSION_CHECK=1

die() { printf 'browser tests: FAILED: %s\n' "$*" >&2; exit 1; }
[ -x "$BIN" ] || die "no server binary at '$BIN' (cargo build first)"

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "need chromium and chromium-driver: run as root on Debian, or install them"
  echo "==> apt-get install chromium chromium-driver"
  apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
    || die "apt-get install chromium chromium-driver failed"
fi
/usr/bin/chromium --version
/usr/bin/chromedriver --version | head -1

PY=$(command -v python3) || die "python3 missing"
VENV=$TOOLS/venv
stamp="$(sha256sum "$REQS" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$VENV/.stamp" 2>/dev/null || true)" != "$stamp" ]; then
  echo "==> venv $VENV: pip install -r tests/browser/requirements.txt"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || die "python3 -m venv failed"
  "$VENV/bin/pip" install -q --no-input -r "$REQS" || die "pip install failed"
  echo "$stamp" > "$VENV/.stamp"
fi

echo "==> playground page in headless Chromium"
"$VENV/bin/python" "$ROOT/tests/browser/playground.py" --bin "$BIN" ${SCREENSHOT:+--screenshot "$SCREENSHOT"}
echo "==> OpenAI Python SDK"
"$VENV/bin/python" "$ROOT/tests/sdk/openai_images.py" --bin "$BIN"
