#!/usr/bin/env bash
# Session 6, call 3 (1 x H200): v3 = v2 + flash.cu (mma.sync) copying whole blocks without the
# source-size operand and widening bias pairs in registers; two more attention shapes in bench
# kernels (N = 192 hd 64, N = 200 hd 72) to locate the non-overlapped variants' error at N = 200
# hd 64; the multi-tile path checked; mma.sync op old (v2) against new (v3) interleaved; ncu stall
# reasons and per-instruction samples of w2k64s2o0 and of the mma.sync kernel at IN-256 B = 64.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/v2.xz /tmp/old; unx .carry/s6/v3.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c3; mkdir -p $D
timeout 150 /tmp/new bench kernels --device cuda:0 --dtypes bf16,f16 > $D/kernels-default.md 2>&1
echo "kernels default rc=$? ok=$(grep -c '| yes |' $D/kernels-default.md) failed=$(grep -c '| NO |' $D/kernels-default.md)"; grep -E "\| NO \|" $D/kernels-default.md | head -8
for v in w2k64s2o0 w1k64s2o0; do
  DIFFIT_ATT90_VARIANT=$v timeout 100 /tmp/new bench kernels --device cuda:0 --dtypes bf16 > $D/kernels-$v.md 2>&1
  echo "kernels $v rc=$? ok=$(grep -c '| yes |' $D/kernels-$v.md) failed=$(grep -c '| NO |' $D/kernels-$v.md)"; grep -E "\| NO \|" $D/kernels-$v.md | grep -i wgmma | head -6
done
DIFFIT_WGMMA_TILES_PER_CTA=2 DIFFIT_ATT90_VARIANT=w2k128s2o1 timeout 100 /tmp/new bench kernels --device cuda:0 --dtypes bf16 > $D/kernels-multitile.md 2>&1
echo "kernels multi-tile rc=$? ok=$(grep -c '| yes |' $D/kernels-multitile.md) failed=$(grep -c '| NO |' $D/kernels-multitile.md)"; grep -E "\| NO \|" $D/kernels-multitile.md | head -4
# flash.cu outputs bit for bit: forward of the tiny fixture (mma.sync path)
F=tests/fixtures
for b in old new; do for dt in bf16 f16; do
  /tmp/$b forward --device cuda:0 --dtype $dt --model $F/diffit_tiny_model.safetensors --input $F/diffit_tiny_golden.safetensors --prefix cfg. --guidance-scale 4.4 --output $D/fwd-$dt-$b.safetensors > /dev/null 2>&1
done; /tmp/$b generate --device cuda:0 --dtype bf16 --class 7 --seed 11 --n 4 --steps 30 --output $D/gen-$b.png > /dev/null 2>&1; done
for dt in bf16 f16; do cmp -s $D/fwd-$dt-old.safetensors $D/fwd-$dt-new.safetensors && echo "forward $dt: same bytes" || echo "forward $dt: DIFFER"; done
cmp -s $D/gen-old.png $D/gen-new.png && echo "generate: same bytes" || echo "generate: DIFFER"
for r in 1 2 3; do for b in old new; do
  timeout 60 /tmp/$b bench model --device cuda:0 --dtype bf16 --ops --batches --vae-batches --iters 20 > $D/ops-$b-$r.txt 2>&1
  echo "$b r$r: $(grep -E '^fused: attention from qkv \(flash, (mma.sync|wgmma 128)' $D/ops-$b-$r.txt | sed 's/fused: attention from qkv (flash, //;s/) \[/ [/;s/ -> \[[0-9,]*\]//' | tr '\n' ' ')"
done; done
NCU=/usr/local/cuda/bin/ncu
M="bench model --device cuda:0 --dtype bf16 --ops --batches --vae-batches --iters 2"
STALL='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$'
for k in "wg attention90 w2k64s2o0" "mma attention_80b w2k64s2o0"; do set -- $k
  DIFFIT_ATT90_VARIANT=$3 timeout 120 $NCU --clock-control none --metrics "$STALL",smsp__inst_executed.sum,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active --kernel-name regex:$2 --launch-skip 2 --launch-count 1 /tmp/new $M > $D/ncu-stall-$1.txt 2>&1
  echo "== $1"; grep -E 'stalled|inst_executed|duration|warps_active|issue_active' $D/ncu-stall-$1.txt | awk '{print $1, $NF}' | sort -k2 -g -r | head -14
  DIFFIT_ATT90_VARIANT=$3 timeout 150 $NCU --clock-control none --section SourceCounters --section WarpStateStats --kernel-name regex:$2 --launch-skip 2 --launch-count 1 -o $D/rep-$1 /tmp/new $M > /dev/null 2>&1
  timeout 60 $NCU -i $D/rep-$1.ncu-rep --page source --csv --print-source sass > $D/sass-$1.csv 2>&1; echo "sass csv $1: $(wc -l < $D/sass-$1.csv) lines"; head -c 300 $D/sass-$1.csv; echo
done
(cd $OUT && tar czf c3.tgz c3 && rm -rf c3)
