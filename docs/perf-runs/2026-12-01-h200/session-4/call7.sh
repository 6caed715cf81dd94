#!/usr/bin/env bash
# Session 4, call 7 (one H200): the review refactor 209b717 (next_step_scale; the conv launcher's plan per
# tiling) against 31607c5: bench kernels, fixture parity, bench model (steps and VAE) interleaved.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s4/new.xz /tmp/prev; unx .carry/s4/final.xz /tmp/final
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
timeout 200 /tmp/final bench kernels --device cuda:0 --dtypes f32,bf16,f16,fp8 > $OUT/kernels.md 2>&1
echo "bench kernels rc=$? pass=$(grep -c '| yes |' $OUT/kernels.md) fail=$(grep -c '| NO |' $OUT/kernels.md)"; grep '| NO |' $OUT/kernels.md | head
timeout 120 bash scripts/gpu-parity.sh /tmp/final 2>&1 | tail -8
M="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1,64 --iters 10 --warmup 3 --vae-batches 8,64"
for r in 1 2; do for b in prev final; do
  echo "== $b r$r"; timeout 90 /tmp/$b $M 2>/dev/null | grep -E '^\| (1|8|64) \|'
done; done
