#!/usr/bin/env bash
# Session 5, call 8 (one H200): the VAE decode's kernels (a B = 8 pass, 7d4da5e): time, DRAM %, warps active,
# registers, to find memory-bound kernels short of the bus.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s5/new3.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c8; mkdir -p $D
timeout 300 /usr/local/cuda/bin/ncu --clock-control none --cache-control none --csv --print-units base \
  --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread,sm__throughput.avg.pct_of_peak_sustained_elapsed \
  --log-file $D/vae.csv /tmp/new bench model --device cuda:0 --resolution 256 --batches 1 --warmup 0 --iters 1 --vae-batches 8 > $D/vae.txt 2>&1; echo "ncu rc=$?"
python3 - $D <<'PY'
import csv, sys, os, collections, re
d = sys.argv[1]
lines = open(os.path.join(d, "vae.csv")).read().splitlines()
start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
per = collections.defaultdict(dict)
for r in csv.DictReader(lines[start:]):
    per[(int(r["ID"]), r["Kernel Name"], r["Grid Size"], r["Block Size"])][r["Metric Name"]] = float(r["Metric Value"].replace(",", ""))
ks = sorted(per.items())
# the VAE kernels: from the first GroupNorm moments kernel on
first = next(i for i, (k, m) in enumerate(ks) if k[1].startswith("gn_moments"))
ks = ks[max(first - 2, 0):]
agg = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0, 0.0, 0.0])
for (i, name, grid, block), m in ks:
    key = (re.sub(r"<.*", "", name)[:48], grid, block)
    a = agg[key]; t = m.get("gpu__time_duration.sum", 0) / 1e3
    a[0] += 1; a[1] += t; a[2] += m.get("dram__throughput.avg.pct_of_peak_sustained_elapsed", 0) * t
    a[3] += m.get("sm__warps_active.avg.pct_of_peak_sustained_active", 0) * t; a[4] = m.get("launch__registers_per_thread", 0)
    a[5] += m.get("sm__throughput.avg.pct_of_peak_sustained_elapsed", 0) * t
tot = sum(a[1] for a in agg.values())
print(f"## VAE decode kernels (passes of 8; every pass ncu saw): {len(ks)} kernels, {tot/1e3:.2f} ms serialised")
print("| kernel | grid | block | count | total ms | mean us | DRAM % | SM % | warps active % | regs |")
print("|---|---|---|---|---|---|---|---|---|---|")
for (k, g, b), a in sorted(agg.items(), key=lambda kv: -kv[1][1])[:30]:
    print(f"| {k} | {g} | {b} | {a[0]} | {a[1]/1e3:.3f} | {a[1]/a[0]:.1f} | {a[2]/a[1]:.0f} | {a[5]/a[1]:.0f} | {a[3]/a[1]:.0f} | {a[4]:.0f} |")
PY
gzip $D/vae.csv; (cd $OUT && tar czf c8.tgz c8 && rm -rf c8)
