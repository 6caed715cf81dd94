#!/usr/bin/env bash
# Kernel time split (Nsight Compute, gpu__time_duration per kernel) of guided steps at B = 1 and 64 and a
# VAE decode, main 7c4e91b, graphs off (so each kernel is its own launch).
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/new.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
N="/usr/local/cuda/bin/ncu --csv --metrics gpu__time_duration.sum --print-units base"
M="bench model --device cuda:0 --resolution 256 --dtype bf16 --cuda-graphs off"
timeout 200 $N --log-file $OUT/b1.csv /tmp/new $M --batches 1 --warmup 1 --iters 2 --vae-batches > $OUT/b1.txt 2>&1; echo "b1 rc=$?"
timeout 200 $N --log-file $OUT/b64.csv /tmp/new $M --batches 64 --warmup 0 --iters 1 --vae-batches > $OUT/b64.txt 2>&1; echo "b64 rc=$?"
timeout 150 $N --log-file $OUT/vae.csv /tmp/new $M --batches 1 --warmup 0 --iters 1 --vae-batches 64 > $OUT/vae.txt 2>&1; echo "vae rc=$?"
tail -3 $OUT/b1.txt
python3 - $OUT <<'PY'
import csv, sys, os, collections, re
o = sys.argv[1]
def load(name):
    p = os.path.join(o, name + ".csv")
    rows = []
    try:
        lines = open(p).read().splitlines()
    except Exception as e:
        print(name, "missing", e); return rows
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        print(name, "no table:", "\n".join(lines[:5])); return rows
    for r in csv.DictReader(lines[start:]):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((r["Kernel Name"], r["Grid Size"], r["Block Size"], float(r["Metric Value"]) / 1e3))
    return rows
for name in ["b1", "b64", "vae"]:
    rows = load(name)
    if not rows: continue
    agg = collections.defaultdict(lambda: [0, 0.0])
    for k, g, b, us in rows:
        key = (re.sub(r"<.*", "", k)[:70], g)
        agg[key][0] += 1; agg[key][1] += us
    tot = sum(v[1] for v in agg.values())
    print(f"\n## {name}: {len(rows)} kernels, {tot/1e3:.2f} ms in all")
    print("| kernel | grid | count | total ms | mean us |")
    print("|---|---|---|---|---|")
    for (k, g), (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:28]:
        print(f"| {k} | {g} | {c} | {us/1e3:.3f} | {us/c:.1f} |")
PY
