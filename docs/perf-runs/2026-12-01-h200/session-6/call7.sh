#!/usr/bin/env bash
# Session 6, call 7 (1 x H200): v6 = v5 + GroupNorm + SiLU written straight as im2col columns for
# the VAE's im2col-path ResNet convolutions (gn_silu_im2col3x3_v). bench kernels (f32, bf16, f16);
# bit identity against the two-op path (DIFFIT_GN_IM2COL=0) on the embedded model with every 3×3
# convolution on the im2col path (--implicit-gemm-conv false) and by default; the decode's
# images/s at B = 8 and 64, fused against unfused (same binary) and v5, interleaved twice.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/v6.xz /tmp/new; unx .carry/s6/v5.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c7; mkdir -p $D
timeout 200 /tmp/new bench kernels --device cuda:0 --dtypes f32,bf16,f16 > $D/kernels.md 2>&1
echo "kernels rc=$? ok=$(grep -c '| yes |' $D/kernels.md) failed=$(grep -c '| NO |' $D/kernels.md)"; grep -E "\| NO \|" $D/kernels.md | head -4; grep 'im2col3x3 \[' $D/kernels.md | grep 'group_norm' | head -12
for imp in false true; do for fu in 0 1; do
  DIFFIT_GN_IM2COL=$fu /tmp/new generate --device cuda:0 --dtype bf16 --implicit-gemm-conv $imp --class 7 --seed 11 --n 4 --steps 30 --output $D/gen-$imp-$fu.png > $D/gen-$imp-$fu.log 2>&1 || tail -2 $D/gen-$imp-$fu.log
done
for i in 0 1 2 3; do cmp -s $D/gen-$imp-0-$i.png $D/gen-$imp-1-$i.png && echo "implicit=$imp image $i: fused = unfused" || echo "implicit=$imp image $i: DIFFER"; done; done
/tmp/old generate --device cuda:0 --dtype bf16 --implicit-gemm-conv false --class 7 --seed 11 --n 4 --steps 30 --output $D/gen-old.png > /dev/null 2>&1
for i in 0 1 2 3; do cmp -s $D/gen-old-$i.png $D/gen-false-1-$i.png && echo "image $i: new fused = v5" || echo "image $i: new fused differs from v5"; done
for r in 1 2; do for a in old u f; do
  X=/tmp/new; F=1; [ $a = old ] && X=/tmp/old; [ $a = u ] && F=0
  DIFFIT_GN_IM2COL=$F timeout 120 $X bench model --device cuda:0 --dtype bf16 --batches --vae-batches 8,64 > $D/vae-$a-$r.log 2>&1
  echo "$a r$r: $(grep -E 'DecodeRow' $D/vae-$a-$r.log | sed 's/DecodeRow //;s/passes: \[[0-9, ]*\], //' | tr '\n' ' ')"
done; done
(cd $OUT && tar czf c7.tgz c7 && rm -rf c7)
