#!/usr/bin/env bash
# The FP8 quality gate (issue 15) for the embedded Fashion-MNIST model, on a GPU:
#   scripts/fp8-gate.sh BINARY OUTDIR [RUN=extra flags ...]
# generates 1,000 images (100 a class, seeds 1000·class + 0..99, the model's default sampler) in
# bf16 and in each FP8 run, then scores them with scripts/fp8_gate.py (accuracy and Fréchet
# distance with training/classifier.safetensors, per-image PSNR against bf16). The runs default
# to `fp8` (every block layer in FP8) and `fp8-edge1` (first and last block in bf16). Needs the
# Fashion-MNIST test split (FMNIST_DIR, else training/fmnist.py's search) and torch. Exit status:
# non-zero when a run fails the gate.
set -euo pipefail
BIN=$1
OUT=$2
shift 2
RUNS=("$@")
[ ${#RUNS[@]} -gt 0 ] || RUNS=("fp8=" "fp8-edge1=--fp8-bf16-edge-blocks 1")
DEVICE=${DEVICE:-cuda:0}
mkdir -p "$OUT"

# One run: every class, two generate calls of 50 images each (generate makes at most 64).
generate_run() {
    local name=$1 dtype=$2 extra=$3
    mkdir -p "$OUT/$name"
    for c in 0 1 2 3 4 5 6 7 8 9; do
        for start in 0 50; do
            # shellcheck disable=SC2086
            "$BIN" generate --class "$c" --n 50 --seed $((1000 * c + start)) --dtype "$dtype" \
                --device "$DEVICE" $extra -o "$OUT/$name/c$c-s$start.png" >/dev/null
        done
    done
}

# The runs are independent and the model is small: generate them side by side on the one GPU.
pids=()
generate_run bf16 bf16 "" & pids+=($!)
names=()
for spec in "${RUNS[@]}"; do
    name=${spec%%=*}
    names+=("$name")
    generate_run "$name" fp8 "${spec#*=}" & pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
python3 "$(dirname "$0")/fp8_gate.py" --dir "$OUT" --base bf16 --runs "${names[@]}" \
    --json "$OUT/gate.json" ${FMNIST_DIR:+--data "$FMNIST_DIR"}
