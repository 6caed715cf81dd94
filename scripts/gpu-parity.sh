#!/usr/bin/env bash
# Fixture parity of one CUDA build (on the GPU machine, from the repository root, LD_LIBRARY_PATH set):
# the DiffiT forward and guided forward in f32 (≤ 1e-4) and bf16 (≤ 2e-2) and the VAE decode in f32
# (≤ 1e-4) against tests/fixtures, one line each.
#   scripts/gpu-parity.sh BINARY
set -u
BIN=${1:?binary}
F=tests/fixtures; G=$F/diffit_tiny_golden.safetensors
for dt in f32 bf16; do
  tol=1e-4; [ "$dt" = bf16 ] && tol=2e-2
  for p in fwd cfg; do
    extra=(); [ $p = cfg ] && extra=(--guidance-scale 4.4)
    "$BIN" forward --device cuda:0 --dtype $dt --model $F/diffit_tiny_model.safetensors --input $G --prefix $p. \
      "${extra[@]}" --output /tmp/$p-$dt.safetensors > /dev/null 2>&1
    echo "parity $p $dt: $(python3 scripts/compare_safetensors.py /tmp/$p-$dt.safetensors out $G $p.out $tol 2>&1 | tail -1)"
  done
done
"$BIN" decode --device cuda:0 --vae $F/vae_tiny_model.safetensors --input $F/vae_tiny_golden.safetensors --output /tmp/dec.safetensors > /dev/null 2>&1
echo "parity decode f32: $(python3 scripts/compare_safetensors.py /tmp/dec.safetensors decoded $F/vae_tiny_golden.safetensors decoded 1e-4 2>&1 | tail -1)"
