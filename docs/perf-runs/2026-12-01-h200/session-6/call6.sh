#!/usr/bin/env bash
# Session 6, call 6 (1 x H200): where a VAE decode pass of 8 goes, kernel by kernel (ncu, v5 =
# 0a078ba's code), the decode's images/s at B = 8 and 64, and one 250-step image at a time through
# HTTP on an idle server, old (v2: main's kernels) against new (v5: tiling s), interleaved twice.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/v5.xz /tmp/new; unx .carry/s6/v2.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c6; mkdir -p $D
SPLIT_OUT=$D METRICS=dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed TOP=40 timeout 300 bash scripts/gpu-kernel-split.sh /tmp/new vae 8 > $D/vae-split.md 2>&1; echo "split rc=$?"; cat $D/vae-split.md
rm -f $D/*.csv.out
timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --batches --vae-batches 8,64 --json $D/vae.json > $D/vae.log 2>&1; grep -iE 'images/s|decode' $D/vae.log | tail -4
for r in 1 2; do for b in old new; do
  RUST_LOG=warn timeout 150 /tmp/$b bench serve --device cuda:0 --resolution 256 --steps 250 --dtype bf16 --images 6 --concurrency 1 --n 1 --max-batch 64 --json $D/one-$b-$r.json > /dev/null 2> $D/one-$b-$r.err || echo "serve $b $r failed: $(tail -2 $D/one-$b-$r.err)"
  echo "one image $b r$r: $(python3 -c "import json;d=json.load(open('$D/one-$b-$r.json'));print({k:v for k,v in d.items() if any(s in k for s in ('p50','p99','images_per_s','engine'))})" 2>&1 | cut -c1-300)"
done; done
(cd $OUT && tar czf c6.tgz c6 && rm -rf c6)
