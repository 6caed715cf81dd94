#!/usr/bin/env bash
# Session 4, call 4 (2 x H200): exact-size steps past 48 rows (new) against 316b3c8 (head).
# (1) determinism of new on cuda:0 (bf16 fused, graphs on and off, incl. n = 16 amid others: exact steps);
# (2) 50 steps through bench serve, random IN-256 weights, bf16, max batch 64: one GPU 256 images at 64
#     in flight, two GPUs 512 at 128, head and new interleaved.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/head.xz /tmp/head; unx .carry/s4/new.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name --format=csv,noheader | tr '\n' ' '; echo
DTYPES=bf16 FUSED=on GRAPHS="on off" timeout 240 bash scripts/gpu-determinism.sh /tmp/new $OUT/det-hashes.json > $OUT/det.txt 2>&1; echo "determinism rc=$?"; grep -v '^\s*$' $OUT/det.txt | grep -i 'graphs\|true\|false' | cut -c1-400
S="bench serve --resolution 256 --dtype bf16 --steps 50 --max-batch 64"
for b in head new head new; do
  [ -e $OUT/one-$b.json ] && b=$b-2
  RUST_LOG=diffit_server=info timeout 100 /tmp/${b%-2} $S --devices cuda:0 --images 256 --concurrency 64 --json $OUT/one-$b.json > $OUT/one-$b.txt 2> $OUT/one-$b.log; echo "one-$b rc=$?"
done
NG=$(nvidia-smi -L | wc -l)
for b in head new; do
  [ "$NG" -lt 2 ] && break
  RUST_LOG=diffit_server=info timeout 100 /tmp/$b $S --devices cuda:0,cuda:1 --images 512 --concurrency 128 --json $OUT/two-$b.json > $OUT/two-$b.txt 2> $OUT/two-$b.log; echo "two-$b rc=$?"
done
gzip $OUT/*.log
python3 - $OUT <<'PY'
import json,sys,os
o=sys.argv[1]; r={}
for b in ["head","new","head-2","new-2"]:
  for n in ["one","two"]:
    try: j=json.load(open(os.path.join(o,f"{n}-{b}.json")))
    except Exception as e: print(n,b,"missing",e); continue
    r[(n,b)]={x['path']:x['images_per_sec'] for x in j["rows"]}
    print(f"{n}-{b}", " · ".join(f"{x['path']} {x['images_per_sec']:.2f} img/s p50 {x['p50_ms']:.0f} p99 {x['p99_ms']:.0f}" for x in j["rows"]))
for b in ["head","new"]:
  if ("one",b) in r and ("two",b) in r:
    print(b, " · ".join(f"{p}: two/one = {r[('two',b)][p]/r[('one',b)][p]:.3f}" for p in r[("one",b)]))
PY
# (3) where a B = 1 guided step goes, real clocks and warm caches (ncu --clock-control none --cache-control
#     none), matmuls untuned (the heuristic's first, within 1 us of the tuned ones at B = 1, perf.md v0.25)
timeout 200 /usr/local/cuda/bin/ncu --clock-control none --cache-control none --csv --metrics gpu__time_duration.sum --print-units base --log-file $OUT/b1.csv /tmp/new bench model --device cuda:0 --resolution 256 --dtype bf16 --matmul-autotune false --batches 1 --warmup 2 --iters 3 --vae-batches 1 > $OUT/b1.txt 2>&1; echo "ncu b1 rc=$?"; tail -5 $OUT/b1.txt
gzip $OUT/b1.csv
