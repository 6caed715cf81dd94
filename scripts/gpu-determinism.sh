#!/usr/bin/env bash
# Determinism on a GPU: for bf16 and f32, with the fused kernels on and off, a live server answers the
# same request twice, streamed, with previews and as n = 1, and each must give the same PNG bytes.
# usage: scripts/gpu-determinism.sh BINARY        (on the GPU machine, from the repository root)
set -u
BIN=${1:?binary}
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
status=0
for dt in bf16 f32; do
  for fused in on off; do
    "$BIN" serve --host 127.0.0.1 --port 8094 --device cuda:0 --dtype $dt --fused-kernels $fused > /tmp/serve.log 2>&1 &
    SP=$!
    for _ in $(seq 1 120); do curl -sf localhost:8094/readyz > /dev/null && break; sleep 0.5; done
    python3 - "$dt" "$fused" <<'PY' || status=1
import hashlib, json, sys, urllib.request
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
b = {"class_label": 7, "n": 16, "steps": 25, "seed": 1000}
first = run(b)
checks = {"same twice": run(b) == first,
          "streamed": run({**b, "stream": True}) == first,
          "with previews": run({**b, "stream": True, "preview": True}) == first,
          "n = 1 alone": run({**b, "n": 1})[0] == first[0]}
print(sys.argv[1], "fused", sys.argv[2], checks)
sys.exit(0 if all(checks.values()) else 1)
PY
    kill -TERM $SP; wait $SP
  done
done
exit $status
