#!/usr/bin/env bash
# Two CUDA binaries on one GPU, .carry/diffit-server-{old,new}.xz (xz-compressed so both fit the
# device tool's 64 MiB): kernel checks and fixture parity of the new one, then bench model interleaved
# old/new (twice) and bench serve once each. Run from the repository root on the GPU machine; writes to $OUT.
# Prints a short table last. Used for the issue 11 clean-up (old = 75a9a66): docs/perf-runs/2026-11-30-h200/.
set -u
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
for b in old new; do python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],\"wb\"))" .carry/diffit-server-$b.xz /tmp/$b && chmod +x /tmp/$b; done
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $OUT/gpu.txt
/tmp/new bench kernels --device cuda:0 > $OUT/kernels-new.md 2>&1; echo "bench kernels (new) rc=$? cases=$(grep -c '| yes |' $OUT/kernels-new.md) failed=$(grep -c '| NO |' $OUT/kernels-new.md)"
mkdir -p $OUT/gc && BATCHES=1,64 VAE_BATCHES=8,64 bash scripts/gpu-check.sh /tmp/new $OUT/gc > $OUT/gpucheck-new.log 2>&1; echo "gpu-check (new) rc=$?"; grep -iE "rel|max|peak|FAIL|error" $OUT/gpucheck-new.log | head -12
for r in 1 2; do for b in old new; do
  /tmp/$b bench model --resolution 256 --dtype bf16 --device cuda:0 --batches 1,16,64 --vae-batches 64 --json $OUT/model-$b-$r.json > /dev/null 2>&1 || echo "bench model $b $r failed"
done; done
for b in old new; do
  RUST_LOG=warn /tmp/$b bench serve --device cuda:0 --dtype bf16 --steps 50 --images 128 --concurrency 64 --max-batch 64 --json $OUT/serve-$b.json > /dev/null 2>&1 || echo "bench serve $b failed"
done
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
print("| binary | run | B=1 ms | B=16 ms | B=64 ms | B=64 host ms | VAE B=64 img/s |")
print("|---|---|---|---|---|---|---|")
for r in (1, 2):
    for b in ("old", "new"):
        try:
            j = json.load(open(f"{out}/model-{b}-{r}.json"))
        except Exception as e:
            print(f"| {b} | {r} | missing ({e}) |"); continue
        s = {x["images"]: x for x in j["steps"]}
        d = {x["images"]: x for x in j["decode"]}
        print(f"| {b} | {r} | {s[1]['step_ms_median']:.2f} | {s[16]['step_ms_median']:.2f} | {s[64]['step_ms_median']:.2f} | {s[64]['enqueue_ms_median']:.2f} | {d[64]['images_per_sec']:.1f} |")
for b in ("old", "new"):
    try:
        j = json.load(open(f"{out}/serve-{b}.json"))
        print(b, "serve:", ", ".join(f"{r['path']} {r['images_per_sec']:.2f} img/s" for r in j["rows"]))
    except Exception as e:
        print(b, "serve missing", e)
PY
