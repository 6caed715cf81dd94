#!/usr/bin/env bash
# GPU correctness and speed in one go, on a machine with an NVIDIA GPU and PyTorch (for the
# comparisons): usage scripts/gpu-check.sh BINARY OUTDIR
# 1. forward (f32, bf16) and decode (f32) of the reference fixtures on cuda:0 against the
#    references; 2. bench model at 256 in bf16; peak GPU memory from nvidia-smi.
set -uo pipefail
BIN=${1:?binary}; OUTDIR=${2:?outdir}
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
F=tests/fixtures
G=$F/diffit_tiny_golden.safetensors
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUTDIR/gpu.txt"
for dt in f32 bf16; do
  tol=1e-4; [ "$dt" = bf16 ] && tol=2e-2
  "$BIN" forward --device cuda:0 --dtype "$dt" --model $F/diffit_tiny_model.safetensors --input $G --prefix fwd. --output "/tmp/fwd_$dt.safetensors" || status=1
  python3 scripts/compare_safetensors.py "/tmp/fwd_$dt.safetensors" out $G fwd.out "$tol" || status=1
  "$BIN" forward --device cuda:0 --dtype "$dt" --model $F/diffit_tiny_model.safetensors --input $G --prefix cfg. --guidance-scale 4.4 --output "/tmp/cfg_$dt.safetensors" || status=1
  python3 scripts/compare_safetensors.py "/tmp/cfg_$dt.safetensors" out $G cfg.out "$tol" || status=1
done
"$BIN" decode --device cuda:0 --vae $F/vae_tiny_model.safetensors --input $F/vae_tiny_golden.safetensors --output /tmp/dec.safetensors || status=1
python3 scripts/compare_safetensors.py /tmp/dec.safetensors decoded $F/vae_tiny_golden.safetensors decoded 1e-4 || status=1
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done ) > "$OUTDIR/mem.txt" 2>/dev/null &
MON=$!
"$BIN" bench model --resolution 256 --dtype bf16 --device cuda:0 --batches "${BATCHES:-1,4,16,32,64}" \
  --vae-batches "${VAE_BATCHES:-1,4,8}" --json "$OUTDIR/bench.json" || status=1
kill $MON
echo "peak GPU memory used (MiB): $(sort -n "$OUTDIR/mem.txt" | tail -1)"
exit $status
