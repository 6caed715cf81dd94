#!/usr/bin/env bash
# Determinism on a GPU: for bf16 and f32, with the fused kernels on and off and with CUDA-graph steps
# on and off, a live server answers the same request twice, streamed, with previews, as n = 1 alone
# and amid concurrent requests of other samplers and guidance settings (n = 16 amid them takes steps
# of more than 48 network rows, which run unpadded), and each must give the same PNG bytes; then the
# images must also be the same with graphs on and off.
# usage: scripts/gpu-determinism.sh BINARY [HASHES.json]   (on the GPU machine, from the repository root)
#   GRAPHS="on off" (default) picks the --cuda-graphs settings; GRAPHS=default passes none (older builds);
#   DTYPES="bf16 f32" and FUSED="on off" (defaults) narrow the other two.
#   HASHES.json, when given, receives every first-image hash, to compare binaries.
set -u
BIN=${1:?binary}
HASHES=${2:-/tmp/determinism-hashes.json}
GRAPHS=${GRAPHS:-on off}
DTYPES=${DTYPES:-bf16 f32}
FUSED=${FUSED:-on off}
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
status=0
echo '{}' > "$HASHES"
for dt in $DTYPES; do
  for fused in $FUSED; do
    for graphs in $GRAPHS; do
      flag=()
      [ "$graphs" != default ] && flag=(--cuda-graphs "$graphs")
      "$BIN" serve --host 127.0.0.1 --port 8094 --device cuda:0 --dtype $dt --fused-kernels $fused \
        --max-batch 32 "${flag[@]}" > /tmp/serve.log 2>&1 &
      SP=$!
      for _ in $(seq 1 120); do curl -sf localhost:8094/readyz > /dev/null && break; sleep 0.5; done
      python3 - "$dt" "$fused" "$graphs" "$HASHES" <<'PY' || status=1
import hashlib, json, sys, threading, urllib.request
def run(body):
    req = urllib.request.Request("http://127.0.0.1:8094/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text = urllib.request.urlopen(req, timeout=600).read().decode()
    if body.get("stream"):
        events = [json.loads(l[6:]) for l in text.splitlines() if l.startswith("data: ")]
        images = events[-1]["images"]
    else:
        images = json.loads(text)["images"]
    return [hashlib.sha1(im["b64_png"].encode()).hexdigest() for im in images]
def amid(body):
    others = [{"class_label": 1, "n": 3, "steps": 12, "sampler": "ddim"},
              {"class_label": 2, "steps": 40, "sampler": "dpm-solver++"},
              {"class_label": 3, "n": 2, "steps": 7, "guidance_scale": 1.0},
              {"class_label": 4, "n": 5, "steps": 30, "guidance_schedule": "constant"}]
    threads = [threading.Thread(target=run, args=(o,)) for o in others]
    for t in threads:
        t.start()
    got = run(body)
    for t in threads:
        t.join()
    return got
dt, fused, graphs, path = sys.argv[1:5]
b = {"class_label": 7, "n": 16, "steps": 25, "seed": 1000}
first = run(b)
checks = {"same twice": run(b) == first,
          "streamed": run({**b, "stream": True}) == first,
          "with previews": run({**b, "stream": True, "preview": True}) == first,
          "n = 1 alone": run({**b, "n": 1})[0] == first[0],
          "n = 1 amid others": amid({**b, "n": 1})[0] == first[0],
          "n = 4 amid others": amid({**b, "n": 4}) == first[:4],
          # 27 images, ≈ 40-55 rows: past 48 rows, steps off the buckets run at their own size.
          "n = 16 amid others": amid(b) == first}
print(dt, "fused", fused, "graphs", graphs, checks, flush=True)
with open(path) as f:
    hashes = json.load(f)
hashes[f"{dt} fused {fused} graphs {graphs}"] = first
with open(path, "w") as f:
    json.dump(hashes, f, indent=1)
sys.exit(0 if all(checks.values()) else 1)
PY
      grep -m3 -i "graph" /tmp/serve.log
      kill -TERM $SP; wait $SP
    done
  done
done
# Graphs on and off: the same images.
python3 - "$HASHES" <<'PY' || status=1
import json, sys
h = json.load(open(sys.argv[1]))
ok = True
for key in sorted(k for k in h if k.endswith("graphs on")):
    off = key[: -len("on")] + "off"
    if off in h:
        same = h[key] == h[off]
        ok &= same
        print(key[: -len(" graphs on")], "graphs on == off:", same)
sys.exit(0 if ok else 1)
PY
exit $status
