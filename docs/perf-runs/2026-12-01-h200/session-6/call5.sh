#!/usr/bin/env bash
# Session 6, call 5 (1 x H200): v5 = v4 + flash.cu's small-grid tiling "s" (4 warps a CTA where
# tiling b's grid leaves SMs idle: a B = 1 step) and the Hopper variants trimmed to four. Checks:
# bench kernels (default, b forced, s forced), bit identity of s against b (fixture forwards,
# embedded-model images), B = 1 steps s against b interleaved, ncu of the attention kernel at
# B = 1 under each, the wgmma variants' ops and B = 1 steps; old = v2 (main's kernels).
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/v5.xz /tmp/new; unx .carry/s6/v2.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c5; mkdir -p $D
for tl in auto b s; do
  DIFFIT_ATT_TILING=$tl timeout 150 /tmp/new bench kernels --device cuda:0 --dtypes bf16,f16 > $D/kernels-$tl.md 2>&1
  echo "kernels tiling=$tl rc=$? ok=$(grep -c '| yes |' $D/kernels-$tl.md) failed=$(grep -c '| NO |' $D/kernels-$tl.md)"; grep -E "\| NO \|" $D/kernels-$tl.md | head -4
done
F=tests/fixtures
for tl in b s; do
  for dt in bf16 f16; do DIFFIT_ATT_TILING=$tl /tmp/new forward --device cuda:0 --dtype $dt --model $F/diffit_tiny_model.safetensors --input $F/diffit_tiny_golden.safetensors --prefix cfg. --guidance-scale 4.4 --output $D/fwd-$dt-$tl.safetensors > /dev/null 2>&1; done
  DIFFIT_ATT_TILING=$tl /tmp/new generate --device cuda:0 --dtype bf16 --class 7 --seed 11 --n 4 --steps 30 --output $D/gen-$tl.png > /dev/null 2>&1
  DIFFIT_ATT_TILING=$tl /tmp/new generate --device cuda:0 --dtype bf16 --class 3 --seed 5 --n 1 --steps 30 --output $D/one-$tl.png > /dev/null 2>&1
done
/tmp/old generate --device cuda:0 --dtype bf16 --class 7 --seed 11 --n 4 --steps 30 --output $D/gen-old.png > /dev/null 2>&1
for dt in bf16 f16; do cmp -s $D/fwd-$dt-b.safetensors $D/fwd-$dt-s.safetensors && echo "forward $dt b vs s: same bytes" || echo "forward $dt b vs s: DIFFER"; done
for i in 0 1 2 3; do cmp -s $D/gen-b-$i.png $D/gen-s-$i.png && cmp -s $D/gen-b-$i.png $D/gen-old-$i.png && echo "gen $i: b = s = old" || echo "gen $i: DIFFER"; done
ls $D/one-b*.png $D/one-s*.png 2>/dev/null | head -2; cmp -s $D/one-b.png $D/one-s.png && echo "one image b vs s: same bytes" || { cmp -s $D/one-b-0.png $D/one-s-0.png && echo "one image b vs s: same bytes" || echo "one image: DIFFER"; }
for r in 1 2 3; do for tl in b s; do
  DIFFIT_ATT_TILING=$tl timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --resolution 256 --batches 1 --vae-batches --json $D/b1-$tl-$r.json > $D/b1-$tl-$r.log 2>&1
  echo "B=1 $tl r$r: $(python3 -c "import json;print([x['step_ms_median'] for x in json.load(open('$D/b1-$tl-$r.json'))['steps']])")"
done; done
NCU=/usr/local/cuda/bin/ncu
for tl in b s; do
  DIFFIT_ATT_TILING=$tl timeout 120 $NCU --clock-control none --metrics gpu__time_duration.sum,smsp__inst_executed.sum --kernel-name regex:attention_80 --launch-skip 40 --launch-count 4 /tmp/new bench model --device cuda:0 --dtype bf16 --resolution 256 --batches 1 --vae-batches --warmup 1 --iters 1 > $D/ncu-b1-$tl.txt 2>&1
  echo "ncu B=1 $tl: $(grep -E 'attention_80|gpu__time_duration|inst_executed' $D/ncu-b1-$tl.txt | awk '{print $1, $NF}' | tr '\n' ' ' | cut -c1-400)"
done
for v in w1k64s2o0 w2k64s2o0; do
  DIFFIT_ATT90_VARIANT=$v timeout 60 /tmp/new bench model --device cuda:0 --dtype bf16 --ops --batches --vae-batches --iters 20 > $D/ops-$v.txt 2>&1
  echo "$v ops: $(grep -E '^fused: attention from qkv \(flash, (mma.sync|wgmma 128)' $D/ops-$v.txt | sed 's/fused: attention from qkv (flash, //;s/ -> \[[0-9,]*\]//' | tr '\n' ' ')"
  DIFFIT_ATT90_VARIANT=$v timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --resolution 256 --batches 1 --vae-batches --wgmma-attention 64 --json $D/b1-$v.json > /dev/null 2>&1
  echo "B=1 $v: $(python3 -c "import json;print([x['step_ms_median'] for x in json.load(open('$D/b1-$v.json'))['steps']])")"
done
(cd $OUT && tar czf c5.tgz c5 && rm -rf c5)
