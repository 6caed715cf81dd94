#!/usr/bin/env bash
# Session 6, call 8 (1 x H200): call 7 found the fused GroupNorm → im2col decode faster at B = 64
# (8 passes of 8) but slower at B = 8 (one pass, timed first after one warm-up). Here: B = 64 then
# 8 with three warm-ups, fused (v6) against unfused (DIFFIT_GN_IM2COL=0) interleaved three times,
# and the kernel split of one fused pass of 8 (ncu), to see whether the kernel or the first passes'
# allocations cost the time.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/v6.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c8; mkdir -p $D
for r in 1 2 3; do for F in 0 1; do
  DIFFIT_GN_IM2COL=$F timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --batches --vae-batches 64,8 --warmup 3 --iters 5 > $D/vae-$F-$r.log 2>&1
  echo "fused=$F r$r: $(grep -E 'DecodeRow' $D/vae-$F-$r.log | sed 's/DecodeRow //;s/passes: \[[0-9, ]*\], //;s/images_per_sec/ips/' | tr '\n' ' ')"
done; done
for F in 1 0; do
SPLIT_OUT=$D DIFFIT_GN_IM2COL=$F TOP=14 timeout 200 bash scripts/gpu-kernel-split.sh /tmp/new vae 8 > $D/vae-split-$F.md 2>&1; echo "== split fused=$F"; head -20 $D/vae-split-$F.md | grep -E 'kernels|gn_|im2col|halo|nvjet' | head -14
done
rm -f $D/*.csv $D/*.out
(cd $OUT && tar czf c8.tgz c8 && rm -rf c8)
