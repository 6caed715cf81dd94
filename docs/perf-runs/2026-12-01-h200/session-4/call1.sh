#!/usr/bin/env bash
# Session 4, call 1: is cuDNN's channels-last bf16 convolution fast enough for the VAE's >= 600 images/s?
# (a) PyTorch/cuDNN convolutions at the decoder's shapes; (b) our decoder's kernels in real clocks (ncu
# --clock-control none), one pass of 8; (c) where libcudnn lives.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/head.xz /tmp/head
NV="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$NV/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
ls -d $NV/*/ ; find $NV -name 'libcudnn*.so*' | head -20
timeout 150 python3 .carry/s4/cudnn_conv.py > $OUT/cudnn.md 2>&1; echo "cudnn rc=$?"
M="bench model --device cuda:0 --resolution 256 --dtype bf16"
timeout 60 /tmp/head $M --batches 1 --warmup 1 --iters 2 --vae-batches 8,64 > $OUT/vae.txt 2>&1; echo "vae rc=$?"; tail -4 $OUT/vae.txt
timeout 150 /usr/local/cuda/bin/ncu --clock-control none --csv --metrics gpu__time_duration.sum --print-units base --log-file $OUT/vae.csv /tmp/head $M --cuda-graphs off --batches 1 --warmup 0 --iters 1 --vae-batches 8 > $OUT/vae-ncu.txt 2>&1; echo "ncu rc=$?"
python3 - $OUT/vae.csv <<'PY' > $OUT/vae-ncu.md
import csv, sys, collections, re
lines = open(sys.argv[1]).read().splitlines()
s = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
agg = collections.defaultdict(lambda: [0, 0.0])
for r in csv.DictReader(lines[s:]):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        agg[(re.sub(r"<.*", "", r["Kernel Name"])[:60], r["Grid Size"])][0] += 1
        agg[(re.sub(r"<.*", "", r["Kernel Name"])[:60], r["Grid Size"])][1] += float(r["Metric Value"]) / 1e3
print("| kernel | grid | n | total us | mean us |\n|---|---|---|---|---|")
for (k, g), (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"| {k} | {g} | {c} | {us:.0f} | {us/c:.1f} |")
PY
cat $OUT/cudnn.md; head -30 $OUT/vae-ncu.md
