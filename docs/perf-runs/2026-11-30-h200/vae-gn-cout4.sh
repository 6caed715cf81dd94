#!/usr/bin/env bash
# VAE: head (7c4e91b) vs a (GroupNorm finalize one warp a group + no memsets; conv_out as half-warp strips; igemm BK 32)
# vs b (same, igemm BK 64). Correctness (bench kernels, decode parity) then VAE B = 64 decode images/s interleaved.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
for b in head a b; do unx .carry/vae/$b.xz /tmp/$b; done
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
F=tests/fixtures
for b in a b; do
  /tmp/$b bench kernels --device cuda:0 --dtypes f32,bf16,f16 > $OUT/kernels-$b.md 2>&1
  echo "$b: bench kernels rc=$? pass=$(grep -c '| yes |' $OUT/kernels-$b.md) fail=$(grep -c '| NO |' $OUT/kernels-$b.md)"
  grep '| NO |' $OUT/kernels-$b.md | head -5
  grep -E 'conv3x3_small|group_norm \[2,64|implicit' $OUT/kernels-$b.md | grep -E 'bf16|f16' | head -8
  /tmp/$b decode --device cuda:0 --vae $F/vae_tiny_model.safetensors --input $F/vae_tiny_golden.safetensors --output /tmp/dec-$b.safetensors > /dev/null 2>&1
  echo "$b parity decode f32: $(python3 scripts/compare_safetensors.py /tmp/dec-$b.safetensors decoded $F/vae_tiny_golden.safetensors decoded 1e-4 2>&1 | tail -1)"
done
M="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --iters 10 --warmup 3 --vae-batches 8,64"
for r in 1 2 3; do
  for b in head a b; do
    v=$(/tmp/$b $M --json /tmp/m.json >/dev/null 2>&1; python3 -c "
import json;j=json.load(open('/tmp/m.json'));print(' · '.join(f\"B={d['images']} {d['images_per_sec']:.1f} img/s\" for d in j.get('decode',[])))")
    echo "| $r | $b | $v |"
  done
done
N="/usr/local/cuda/bin/ncu --csv --metrics gpu__time_duration.sum --print-units base -k regex:cout4|gn_finalize|gn_moments|gn_apply"
for b in head a; do
  timeout 120 $N --log-file $OUT/ncu-$b.csv /tmp/$b bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --iters 1 --warmup 0 --vae-batches 8 > /dev/null 2>&1; echo "ncu $b rc=$?"
done
python3 - $OUT <<'PY'
import csv, sys, os, collections, re
o = sys.argv[1]
for b in ["head", "a"]:
    try: lines = open(os.path.join(o, f"ncu-{b}.csv")).read().splitlines()
    except Exception as e: print(b, e); continue
    st = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if st is None: print(b, "no table"); continue
    agg = collections.defaultdict(lambda: [0, 0.0])
    for r in csv.DictReader(lines[st:]):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            k = re.sub(r"\(.*", "", r["Kernel Name"]); agg[k][0] += 1; agg[k][1] += float(r["Metric Value"].replace(",", "")) / 1e3
    print(b, " · ".join(f"{k} n={c} {us/1e3:.2f} ms ({us/c:.1f} us)" for k, (c, us) in sorted(agg.items())))
PY
