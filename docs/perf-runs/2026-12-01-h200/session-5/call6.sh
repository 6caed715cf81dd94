#!/usr/bin/env bash
# Session 5, call 6 (one H200): the row kernels as raw packs (LayerNorm at four blocks an SM; FP8 quantisation
# with the row in registers, fc2's 4608-wide input included) on top of 1f25ef5 (new = new3.xz) against
# 209b717 (base). Outputs compared byte for byte (bf16, f16, fp8); bench kernels' FP8 errors compared digit
# for digit with base's.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s5/base.xz /tmp/base; unx .carry/s5/new3.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c6; mkdir -p $D
timeout 200 /tmp/new bench kernels --device cuda:0 --dtypes f32,bf16,f16,fp8 > $D/kernels-new.md 2>&1; echo "bench kernels rc=$? ok=$(grep -c '| yes |' $D/kernels-new.md) failed=$(grep -c '| NO |' $D/kernels-new.md)"; grep -E "\| NO \|" $D/kernels-new.md | head -5
timeout 100 /tmp/base bench kernels --device cuda:0 --dtypes fp8 > $D/kernels-fp8-base.md 2>&1
timeout 100 /tmp/new bench kernels --device cuda:0 --dtypes fp8 > $D/kernels-fp8-new.md 2>&1
python3 - $D <<'PY'
import sys,re
d=sys.argv[1]
def rows(f): return {l.split('|')[1].strip(): l.split('|')[3].strip() for l in open(f) if l.startswith('| fp8')}
b,n=rows(d+"/kernels-fp8-base.md"),rows(d+"/kernels-fp8-new.md")
same=[k for k in b if k in n and b[k]==n[k]]; diff=[(k,b[k],n.get(k)) for k in b if k in n and b[k]!=n[k]]
print(f"fp8 cases: base {len(b)}, new {len(n)}, same error digits {len(same)}, different {len(diff)}"); [print("  differ:",x) for x in diff[:6]]
print("  new only:", [k for k in n if k not in b])
PY
bash scripts/gpu-parity.sh /tmp/new > $D/parity-new.txt 2>&1; cat $D/parity-new.txt
F=tests/fixtures
for b in base new; do
  for dt in bf16 f16 fp8; do
    /tmp/$b forward --device cuda:0 --dtype $dt --model $F/diffit_tiny_model.safetensors --input $F/diffit_tiny_golden.safetensors --prefix cfg. --guidance-scale 4.4 --output $D/fwd-$dt-$b.safetensors > /dev/null 2>&1
  done
  for dt in bf16 fp8; do /tmp/$b generate --device cuda:0 --dtype $dt --class 3 --seed 5 --n 4 --steps 30 --output $D/gen-$dt-$b.png > /dev/null 2>&1 || echo "generate $dt $b failed"; done
done
for dt in bf16 f16 fp8; do cmp -s $D/fwd-$dt-base.safetensors $D/fwd-$dt-new.safetensors && echo "forward $dt: same bytes" || echo "forward $dt: DIFFER"; done
for f in $D/gen-*-base*.png; do g=${f/base/new}; cmp -s $f $g && echo "$(basename $f): same bytes" || echo "$(basename $f): DIFFER"; done
NCU=/usr/local/cuda/bin/ncu; M="bench model --device cuda:0 --vae-batches --warmup 1 --iters 1 --resolution 256"
for b in base new; do
  for c in "ln64 layer_norm_r 60 bf16 64" "ln1 layer_norm_r 60 bf16 1" "q64 fp8_quant_ 30 fp8 64" "lnq64 fp8_ln_quant 60 fp8 64"; do
    set -- $c
    timeout 60 $NCU --clock-control none --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed --kernel-name regex:"$2" --launch-skip $3 --launch-count 4 /tmp/$b $M --dtype $4 --batches $5 > $D/ncu-$1-$b.txt 2>&1
    echo "$1 $b: $(grep -E '^  [a-z_0-9]+_bf16|gpu__time_duration|dram__' $D/ncu-$1-$b.txt | awk '{print $1"="$NF}' | tr '\n' ' ')"
  done
done
for r in 1 2; do for b in base new; do
  timeout 120 /tmp/$b bench model --device cuda:0 --dtype bf16 --resolution 256 --batches 1,16,64 --vae-batches --json $D/bf16-$b-$r.json > /dev/null 2>&1 || echo "bf16 $b $r failed"
  timeout 120 /tmp/$b bench model --device cuda:0 --dtype fp8 --resolution 256 --batches 1,16,64 --vae-batches --json $D/fp8-$b-$r.json > /dev/null 2>&1 || echo "fp8 $b $r failed"
done; done
python3 - $D <<'PY'
import json,sys
d=sys.argv[1]
print("| run | bf16 B=1 | B=16 | B=64 | fp8 B=1 | B=16 | B=64 |"); print("|---|---|---|---|---|---|---|")
for r in (1,2):
  for b in ("base","new"):
    try:
      s={x["images"]:x["step_ms_median"] for x in json.load(open(f"{d}/bf16-{b}-{r}.json"))["steps"]}
      t={x["images"]:x["step_ms_median"] for x in json.load(open(f"{d}/fp8-{b}-{r}.json"))["steps"]}
      print(f"| {b} r{r} | {s[1]:.3f} | {s[16]:.2f} | {s[64]:.2f} | {t[1]:.3f} | {t[16]:.2f} | {t[64]:.2f} |")
    except Exception as e: print(b,r,"missing",e)
PY
rm -f $D/*.safetensors; (cd $OUT && tar czf c6.tgz c6 && rm -rf c6)
