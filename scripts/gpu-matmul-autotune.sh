#!/usr/bin/env bash
# cuBLASLt algorithms timed per shape (--matmul-autotune), old binary against new in one call on one
# H200 (from the repository root):  scripts/gpu-matmul-autotune.sh OLD NEW
# 1. new: fixture parity (forward f32/bf16, guided; decode f32);
# 2. bench model old/new interleaved, twice: IN-256 bf16 and fp8 at B = 1, 16, 64; IN-512 B = 16;
#    the new binary logs every timed shape (DEBUG) to its .err file;
# 3. bench model --ops (fp8, B = 64 shapes) old and new; 4. new: bench kernels (every dtype);
# 5. new: the GPU determinism check in bf16, fused kernels, graphs on (DET_DTYPES, DET_GRAPHS widen it).
# Raw output in $OUT/raw, the log in $OUT/log.txt; the table last.
set -u
OLD=${1:?old binary}; NEW=${2:?new binary}
OUT=${OUT:-/tmp/lt-out}
R=$OUT/raw; mkdir -p "$R"
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
TUNE_LOG="info,diffit_server::kernels::linear::cublaslt=debug"

bash scripts/gpu-parity.sh "$NEW"

model() { # name binary args...
  local name=$1 bin=$2; shift 2
  RUST_LOG=$TUNE_LOG timeout 120 "$bin" bench model --device cuda:0 --iters 10 --warmup 3 "$@" \
    --json "$R/model-$name.json" > "$R/model-$name.out" 2>"$R/model-$name.err" \
    || echo "bench model $name failed: $(tail -2 "$R/model-$name.err")"
}
for r in 1 2; do
  for dt in bf16 fp8; do
    model old-$dt-$r "$OLD" --resolution 256 --dtype $dt --batches 1,16,64 --vae-batches
    model new-$dt-$r "$NEW" --resolution 256 --dtype $dt --batches 1,16,64 --vae-batches
  done
  model old-512-$r "$OLD" --resolution 512 --dtype bf16 --batches 16 --vae-batches
  model new-512-$r "$NEW" --resolution 512 --dtype bf16 --batches 16 --vae-batches
done
model old-ops "$OLD" --resolution 256 --dtype fp8 --batches 64 --iters 5 --vae-batches --ops
model new-ops "$NEW" --resolution 256 --dtype fp8 --batches 64 --iters 5 --vae-batches --ops

timeout 90 "$NEW" bench kernels --device cuda:0 --dtypes f32,bf16,f16,fp8 > "$R/kernels.md" 2>&1
echo "bench kernels rc=$? pass=$(grep -c '| yes |' "$R/kernels.md") fail=$(grep -c '| NO |' "$R/kernels.md")"
grep '| NO |' "$R/kernels.md"

DTYPES=${DET_DTYPES:-bf16} FUSED=on GRAPHS=${DET_GRAPHS:-on} timeout 120 scripts/gpu-determinism.sh "$NEW" "$R/determinism-hashes.json"
echo "determinism rc=$?"

echo; echo "timed shapes (new, IN-256 bf16 run 1):"
grep -h "algorithm timed" "$R/model-new-bf16-1.err" | sed 's/.*key=//' | head -40
python3 - "$R" <<'PY'
import json, os, sys
R = sys.argv[1]
def load(name):
    try:
        return json.load(open(os.path.join(R, "model-" + name + ".json")))
    except Exception:
        return None
print("\n| run | B=1 ms | B=16 ms | B=64 ms |")
print("|---|---|---|---|")
for r in (1, 2):
    for name in [f"old-bf16-{r}", f"new-bf16-{r}", f"old-fp8-{r}", f"new-fp8-{r}", f"old-512-{r}", f"new-512-{r}"]:
        j = load(name)
        if not j:
            print(f"| {name} | missing |"); continue
        s = {x["images"]: x for x in j["steps"]}
        cell = lambda b: f"{s[b]['step_ms_median']:.2f}" if b in s else "–"
        print(f"| {name} | {cell(1)} | {cell(16)} | {cell(64)} |")
PY
for b in old new; do echo "--ops $b:"; grep '^| ' "$R/model-$b-ops.out" | head -40; done
