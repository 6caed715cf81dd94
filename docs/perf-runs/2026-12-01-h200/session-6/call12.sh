#!/usr/bin/env bash
# Session 6, call 12 (1 x H200): g2 = g1 + every decode pass size captured at warm-up. Determinism
# through live servers (bf16, fused on, graphs on and off: the VAE's graphs among them), the
# warm-up's log, the decode at B = 64 and 8 against head (4bd34b0's code, no decode graphs)
# interleaved twice, and one 250-step image on an idle server.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/g2.xz /tmp/new; unx .carry/s6/head.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c12; mkdir -p $D
DTYPES=bf16 FUSED=on GRAPHS="on off" timeout 300 bash scripts/gpu-determinism.sh /tmp/new > $D/determinism.txt 2>&1; echo "determinism rc=$?"; grep -E "^bf16|on == off" $D/determinism.txt; grep -m2 -E 'decode passes ready|VAE decode pass' $D/determinism.txt | cut -c1-220
for r in 1 2; do for b in old new; do
  timeout 120 /tmp/$b bench model --device cuda:0 --dtype bf16 --batches --vae-batches 64,8 --warmup 3 --iters 5 > $D/vae-$b-$r.log 2>&1
  echo "$b r$r: $(grep -E 'DecodeRow' $D/vae-$b-$r.log | sed 's/DecodeRow //;s/passes: \[[0-9, ]*\], //;s/images_per_sec/ips/' | tr '\n' ' ')"
done; done
RUST_LOG=info timeout 150 /tmp/new bench serve --device cuda:0 --resolution 256 --steps 250 --dtype bf16 --images 6 --concurrency 1 --n 1 --max-batch 64 --json $D/one.json > /dev/null 2> $D/one.err || tail -3 $D/one.err
python3 -c "import json;d=json.load(open('$D/one.json'));print('one image', [(r['path'], round(r['p50_ms'],1)) for r in d['rows']])"
grep -m1 'decode passes ready' $D/one.err | cut -c1-220
(cd $OUT && tar czf c12.tgz c12 && rm -rf c12)
