#!/usr/bin/env bash
# Session 4, call 3 (2 x H200): where HTTP loses to the engine on two GPUs. 316b3c8, random IN-256 weights, bf16,
# 50 steps, max batch 64; one GPU 256 images at 64 in flight, two GPUs 512 at 128; INFO logs (per-job admission,
# queue wait, engine, batch sizes) kept for the timeline.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/head.xz /tmp/head
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name --format=csv,noheader | tr '\n' ' '; nproc; echo
S="bench serve --resolution 256 --dtype bf16 --steps 50 --max-batch 64"
RUST_LOG=diffit_server=info timeout 100 /tmp/head $S --devices cuda:0 --images 256 --concurrency 64 --json $OUT/one.json > $OUT/one.txt 2> $OUT/one.log; echo "one rc=$?"
RUST_LOG=diffit_server=info timeout 100 /tmp/head $S --devices cuda:0,cuda:1 --images 512 --concurrency 128 --json $OUT/two.json > $OUT/two.txt 2> $OUT/two.log; echo "two rc=$?"
python3 - $OUT <<'PY'
import json,sys,os
o=sys.argv[1]; r={}
for n in ["one","two"]:
    try: j=json.load(open(os.path.join(o,n+".json")))
    except Exception as e: print(n,"missing",e); continue
    r[n]={x['path']:x['images_per_sec'] for x in j["rows"]}
    print(n, " · ".join(f"{x['path']} {x['images_per_sec']:.2f} img/s p50 {x['p50_ms']:.0f} p99 {x['p99_ms']:.0f}" for x in j["rows"]))
if len(r)==2:
    for p in r["one"]: print(f"{p}: two/one = {r['two'][p]/r['one'][p]:.3f}")
PY
gzip $OUT/*.log; ls -la $OUT
