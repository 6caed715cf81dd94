#!/usr/bin/env bash
# Session 5, call 5 (one H200): where an FP8 guided step goes (B = 64 and B = 1), kernel by kernel at real
# clocks, 1f25ef5, matmul algorithms tuned as in serving; plus the bf16 B = 1 step for comparison.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s5/new2.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c5; mkdir -p $D
NCU="/usr/local/cuda/bin/ncu --clock-control none --cache-control none --csv --metrics gpu__time_duration.sum --print-units base"
M="bench model --device cuda:0 --resolution 256 --vae-batches --warmup 1 --iters 1"
timeout 200 $NCU --log-file $D/fp8-64.csv /tmp/new $M --dtype fp8 --batches 64 > $D/fp8-64.txt 2>&1; echo "fp8 64 rc=$?"
timeout 150 $NCU --log-file $D/fp8-1.csv /tmp/new $M --dtype fp8 --batches 1 > $D/fp8-1.txt 2>&1; echo "fp8 1 rc=$?"
timeout 150 $NCU --log-file $D/bf16-1.csv /tmp/new $M --dtype bf16 --batches 1 > $D/bf16-1.txt 2>&1; echo "bf16 1 rc=$?"
python3 - $D <<'PY'
import csv, sys, os, collections, re
d = sys.argv[1]
for name in ["fp8-64", "fp8-1", "bf16-1"]:
    try:
        lines = open(os.path.join(d, name + ".csv")).read().splitlines()
        start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    except Exception as e:
        print(name, "missing", e); continue
    rows = [(r["Kernel Name"], r["Grid Size"], float(r["Metric Value"].replace(",", "")) / 1e3) for r in csv.DictReader(lines[start:]) if r.get("Metric Name") == "gpu__time_duration.sum"]
    att = [i for i, r in enumerate(rows) if r[0].startswith("attention")]
    if len(att) < 28: print(name, "too few attention kernels", len(att)); continue
    rows = rows[max(att[-28] - 3, 0):]
    agg = collections.defaultdict(lambda: [0, 0.0])
    for k, g, us in rows:
        key = (re.sub(r"<.*", "", k)[:72], g); agg[key][0] += 1; agg[key][1] += us
    tot = sum(v[1] for v in agg.values())
    print(f"\n## {name}: last step, {len(rows)} kernels, {tot/1e3:.3f} ms serialised")
    print("| kernel | grid | count | total ms | mean us |"); print("|---|---|---|---|---|")
    for (k, g), (c, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:22]:
        print(f"| {k} | {g} | {c} | {us/1e3:.3f} | {us/c:.1f} |")
PY
gzip $D/*.csv; (cd $OUT && tar czf c5.tgz c5 && rm -rf c5)
