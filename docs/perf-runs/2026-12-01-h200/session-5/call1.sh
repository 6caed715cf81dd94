#!/usr/bin/env bash
# Session 5, call 1 (1 x H200): where the attention and LayerNorm kernels stall, and a B = 64 step's
# kernel split at real clocks. Binary: 209b717 (= main's code).
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s5/base.xz /tmp/base
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
NCU=/usr/local/cuda/bin/ncu
D=$OUT/c1; mkdir -p $D
M="bench model --device cuda:0 --dtype bf16 --vae-batches --warmup 1 --iters 1"
prof() { # name kernel-regex skip res batch
  timeout 120 $NCU --clock-control none --set full --kernel-name regex:"$2" --launch-skip $3 --launch-count 1 \
    --print-details all --page details /tmp/base $M --resolution $4 --batches $5 > $D/$1.txt 2>&1; echo "$1 rc=$?"
}
prof att64 attention_80b 30 256 64
prof att1 attention_80b 30 256 1
prof att512 attention_80b 30 512 16
prof ln64 layer_norm_r 30 256 64
# the B = 64 step, every kernel, real clocks, warm caches
timeout 200 $NCU --clock-control none --cache-control none --csv --metrics gpu__time_duration.sum --print-units base \
  --log-file $D/b64.csv /tmp/base $M --matmul-autotune false --resolution 256 --batches 64 > $D/b64.txt 2>&1; echo "b64 split rc=$?"
python3 - $D <<'PY'
import csv, sys, os, collections, re
o = sys.argv[1]
lines = open(os.path.join(o, "b64.csv")).read().splitlines()
start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
rows = [(r["Kernel Name"], r["Grid Size"], float(r["Metric Value"]) / 1e3) for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
# the last step: from two kernels before its first attention (LayerNorm, qkv) to the end
att = [i for i, r in enumerate(rows) if r[0].startswith("attention")]
rows = rows[max(att[-28] - 2, 0):]
agg = collections.defaultdict(lambda: [0, 0.0])
for k, g, us in rows:
    agg[(re.sub(r"<.*", "", k)[:64], g)][0] += 1; agg[(re.sub(r"<.*", "", k)[:64], g)][1] += us
tot = sum(v[1] for v in agg.values())
print(f"## b64 last step: {len(rows)} kernels, {tot/1e3:.2f} ms")
for (k, g), (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:16]:
    print(f"| {k} | {g} | {c} | {us/1e3:.3f} | {us/c:.1f} |")
PY
for f in att64 att1 att512 ln64; do
  echo "== $f"; grep -E "Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps|Warp Cycles Per Issued|Executed Ipc A" $D/$f.txt | sed 's/  */ /g' | head -16
  grep -iE "stall|Est. Speedup" $D/$f.txt | sed 's/  */ /g' | head -8
done
(cd $OUT && tar czf c1.tgz c1 && rm -rf c1)
