#!/usr/bin/env bash
# Session 4, call 5 (2 x H200): two GPUs against one through HTTP, 316b3c8 (head) vs 31607c5 (new: exact-size
# steps past 48 rows, 753ed77, and the halo-tiled VAE convolution). Random IN-256 weights, bf16, 50 steps, max batch 64; one GPU 256 images at 64 in flight,
# two GPUs 512 at 128, as in call 3.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/head.xz /tmp/head; unx .carry/s4/new.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name --format=csv,noheader | tr '\n' ' '; echo
S="bench serve --resolution 256 --dtype bf16 --steps 50 --max-batch 64"
D=$OUT/c5; mkdir -p $D
for b in new head; do
  RUST_LOG=diffit_server=info timeout 100 /tmp/$b $S --devices cuda:0 --images 256 --concurrency 64 --json $D/one-$b.json > $D/one-$b.txt 2> $D/one-$b.log; echo "one-$b rc=$?"
  RUST_LOG=diffit_server=info timeout 100 /tmp/$b $S --devices cuda:0,cuda:1 --images 512 --concurrency 128 --json $D/two-$b.json > $D/two-$b.txt 2> $D/two-$b.log; echo "two-$b rc=$?"
done
gzip $D/*.log
python3 - $D <<'PY'
import json,sys,os
o=sys.argv[1]; r={}
for b in ["head","new"]:
  for n in ["one","two"]:
    try: j=json.load(open(os.path.join(o,f"{n}-{b}.json")))
    except Exception as e: print(n,b,"missing",e); continue
    r[(n,b)]={x['path']:x['images_per_sec'] for x in j["rows"]}
    print(f"{n}-{b}", " · ".join(f"{x['path']} {x['images_per_sec']:.2f} img/s p50 {x['p50_ms']:.0f} p99 {x['p99_ms']:.0f}" for x in j["rows"]))
for b in ["head","new"]:
  if ("one",b) in r and ("two",b) in r:
    print(b, " · ".join(f"{p}: two/one = {r[('two',b)][p]/r[('one',b)][p]:.3f}" for p in r[("one",b)]))
PY
(cd $OUT && tar czf c5.tgz c5 && rm -rf c5)
