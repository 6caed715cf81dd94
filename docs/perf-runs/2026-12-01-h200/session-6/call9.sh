#!/usr/bin/env bash
# Session 6, call 9 (1 x H200): the session's HEAD (4bd34b0) checked as a whole: bench kernels in
# every dtype (fp8 included), fixture parity, determinism (bf16 fused on, graphs on and off: a sample
# alone runs tiling s, amid others tiling b, and must give the same bytes), then the B = 1 / 16 / 64
# steps, IN-512 and the VAE against v5's numbers for the record.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/head.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c9; mkdir -p $D
timeout 240 /tmp/new bench kernels --device cuda:0 > $D/kernels.md 2>&1
echo "kernels (all dtypes) rc=$? ok=$(grep -c '| yes |' $D/kernels.md) failed=$(grep -c '| NO |' $D/kernels.md)"; grep -E "\| NO \|" $D/kernels.md | head -4
bash scripts/gpu-parity.sh /tmp/new
DTYPES=bf16 FUSED=on GRAPHS="on off" timeout 300 bash scripts/gpu-determinism.sh /tmp/new > $D/determinism.txt 2>&1; echo "determinism rc=$?"; grep -ciE 'false|differ|fail' $D/determinism.txt; tail -12 $D/determinism.txt
timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --resolution 256 --batches 1,16,64 --vae-batches 64 --json $D/m256.json > $D/m256.log 2>&1
timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --resolution 512 --batches 16 --vae-batches --json $D/m512.json > $D/m512.log 2>&1
python3 - $D <<'PY'
import json,sys
d=sys.argv[1]
a=json.load(open(f"{d}/m256.json")); b=json.load(open(f"{d}/m512.json"))
print("steps", {x["images"]:round(x["step_ms_median"],3) for x in a["steps"]}, "IN-512", {x["images"]:round(x["step_ms_median"],2) for x in b["steps"]})
print("decode", [(x["images"], round(x["images_per_sec"],1)) for x in a["decode"]])
PY
(cd $OUT && tar czf c9.tgz c9 && rm -rf c9)
