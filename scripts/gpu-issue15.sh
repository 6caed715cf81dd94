#!/usr/bin/env bash
# Issue 15's targets, old binary against new, in one call on one H200 (from the repository root):
#   scripts/gpu-issue15.sh OLD NEW
# 1. new: bench kernels (every dtype) and fixture parity (forward f32/bf16, guided; decode f32); CHECKS=0 skips;
# 2. bench model IN-256 (B = 1, 4, 16, 64; VAE B = 64), old and new interleaved twice, then new with
#    --lt-epilogue false, with --lt-gelu-epilogue false, and in fp8; IN-512 B = 16 old and new;
# 3. bench serve at 250 steps through HTTP (images/s at concurrency 64, max batch 64) old, new, new fp8;
#    and one 250-step image at a time on an idle server (p50 wall time) old and new. LOAD="new fp8"
#    (say) runs only those loaded passes.
# Raw JSON in /tmp/i15, a summary in $OUT/summary.json and the log in $OUT/log.txt; the table last.
set -u
OLD=${1:?old binary}; NEW=${2:?new binary}
OUT=${OUT:-/tmp/i15-out}
R=/tmp/i15; mkdir -p "$R" "$OUT"
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ "${CHECKS:-1}" = 1 ]; then  # CHECKS=0 skips them (run in another call)
  "$NEW" bench kernels --device cuda:0 --dtypes f32,bf16,f16,fp8 > "$R/kernels.md" 2>&1
  echo "bench kernels rc=$? pass=$(grep -c '| yes |' "$R/kernels.md") fail=$(grep -c '| NO |' "$R/kernels.md")"
  grep '| NO |' "$R/kernels.md"
  bash scripts/gpu-parity.sh "$NEW"
fi

M="bench model --device cuda:0 --iters 10 --warmup 3"
model() { # name binary args...
  local name=$1 bin=$2; shift 2
  timeout 120 "$bin" $M "$@" --json "$R/model-$name.json" > /dev/null 2>"$R/model-$name.err" || echo "bench model $name failed: $(tail -2 "$R/model-$name.err")"
}
for r in 1 2; do
  model old-$r "$OLD" --resolution 256 --dtype bf16 --batches 1,4,16,64 --vae-batches 64
  model new-$r "$NEW" --resolution 256 --dtype bf16 --batches 1,4,16,64 --vae-batches 64
done
if [ "${EXTRAS:-1}" = 1 ]; then  # EXTRAS=0 skips the epilogue comparisons
  model new-lt-off "$NEW" --resolution 256 --dtype bf16 --batches 1,16,64 --vae-batches 1 --lt-epilogue false
  model new-gelu-off "$NEW" --resolution 256 --dtype bf16 --batches 1,16,64 --vae-batches 1 --lt-gelu-epilogue false
fi
model new-fp8 "$NEW" --resolution 256 --dtype fp8 --batches 1,16,64 --vae-batches 1
model old-512 "$OLD" --resolution 512 --dtype bf16 --batches 16 --vae-batches 1
model new-512 "$NEW" --resolution 512 --dtype bf16 --batches 16 --vae-batches 1

serve() { # name binary args...
  local name=$1 bin=$2; shift 2
  RUST_LOG=warn timeout 150 "$bin" bench serve --device cuda:0 --resolution 256 --steps 250 "$@" \
    --json "$R/serve-$name.json" > /dev/null 2>"$R/serve-$name.err" || echo "bench serve $name failed: $(tail -2 "$R/serve-$name.err")"
}
for b in old new; do
  bin=$OLD; [ $b = new ] && bin=$NEW
  serve $b-one $bin --dtype bf16 --images 6 --concurrency 1 --n 1 --max-batch 64
done
# The loaded passes take ≈ 45 s each (engine, engine + PNG, HTTP at 250 steps); LOAD picks them.
for l in ${LOAD-old new fp8}; do
  case $l in
    old) serve old-load "$OLD" --dtype bf16 --images 64 --concurrency 64 --max-batch 64 ;;
    new) serve new-load "$NEW" --dtype bf16 --images 64 --concurrency 64 --max-batch 64 ;;
    fp8) serve new-fp8-load "$NEW" --dtype fp8 --images 64 --concurrency 64 --max-batch 64 ;;
  esac
done

python3 - "$R" "$OUT/summary.json" <<'PY'
import json, os, sys
R, summary = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(R, name + ".json")))
    except Exception:
        return None
out = {}
print("\n| bench model (bf16 unless said) | B=1 ms | B=4 ms | B=16 ms | B=64 ms | VAE B=64 img/s | img/s @250 (B=64) |")
print("|---|---|---|---|---|---|---|")
for name in ["old-1", "new-1", "old-2", "new-2", "new-lt-off", "new-gelu-off", "new-fp8", "old-512", "new-512"]:
    j = load("model-" + name)
    out["model-" + name] = j
    if not j:
        print(f"| {name} | missing |"); continue
    s = {x["images"]: x for x in j["steps"]}
    d = {x["images"]: x for x in j.get("decode", [])}
    cell = lambda b: f"{s[b]['step_ms_median']:.2f}" if b in s else "–"
    vae = f"{d[64]['images_per_sec']:.1f}" if 64 in d else "–"
    ips = f"{s[64]['images_per_sec_250']:.2f}" if 64 in s else "–"
    print(f"| {name} | {cell(1)} | {cell(4)} | {cell(16)} | {cell(64)} | {vae} | {ips} |")
print("\n| bench serve, 250 steps | path | images/s | p50 ms | p99 ms |")
print("|---|---|---|---|---|")
for name in ["old-one", "new-one", "old-load", "new-load", "new-fp8-load"]:
    j = load("serve-" + name)
    out["serve-" + name] = j
    if not j:
        print(f"| {name} | missing |"); continue
    for r in j["rows"]:
        print(f"| {name} | {r['path']} | {r['images_per_sec']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
json.dump(out, open(summary, "w"), indent=1)
PY
