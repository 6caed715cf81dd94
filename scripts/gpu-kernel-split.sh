#!/usr/bin/env bash
# Where a guided step or a VAE decode goes, kernel by kernel (Nsight Compute at the GPU's own clocks, warm
# caches; on the GPU machine, from the repository root, LD_LIBRARY_PATH set):
#   scripts/gpu-kernel-split.sh BINARY step BATCH [DTYPE] [RESOLUTION]   the last of two guided steps
#   scripts/gpu-kernel-split.sh BINARY vae BATCH [DTYPE] [RESOLUTION]    the warm-up and one timed decode
# METRICS adds ncu metrics to the time (e.g. dram__throughput.avg.pct_of_peak_sustained_elapsed); each one
# replays every kernel, so keep it short for a step (hundreds of kernels, more with the matmul autotuning).
# Kernels are serialised and run at the clocks ncu sees: the timed B = 64 step runs power-capped and
# longer (docs/perf.md v0.31). The CSV is kept in ${SPLIT_OUT:-/tmp}/split-WHAT-BATCH-DTYPE.csv.
set -eu
BIN=${1:?binary}; WHAT=${2:?step or vae}; B=${3:?batch}; DT=${4:-bf16}; RES=${5:-256}
NCU=${NCU:-/usr/local/cuda/bin/ncu}
M="gpu__time_duration.sum${METRICS:+,$METRICS}"
LOG=${SPLIT_OUT:-/tmp}/split-$WHAT-$B-$DT.csv
case $WHAT in
  step) ARGS=(--batches "$B" --vae-batches --warmup 1 --iters 1); SPLIT=(--last-step "${DEPTH:-28}") ;;
  # The decode alone (no DiffiT built); untuned matmuls, so ncu sees only the decode's own launches.
  vae) ARGS=(--batches --vae-batches "$B" --warmup 1 --iters 1 --matmul-autotune false); SPLIT=(--runs 2) ;;
  *) echo "WHAT must be step or vae" >&2; exit 2 ;;
esac
"$NCU" --clock-control none --cache-control none --csv --print-units base --metrics "$M" --log-file "$LOG" \
  "$BIN" bench model --device cuda:0 --resolution "$RES" --dtype "$DT" "${ARGS[@]}" > "$LOG.out" 2>&1 \
  || { echo "ncu failed: $(tail -3 "$LOG.out")" >&2; exit 1; }
python3 "$(dirname "$0")/ncu_split.py" "$LOG" "${SPLIT[@]}" --top "${TOP:-24}"
