#!/usr/bin/env bash
# conv-halo call 3 (final): the committed binary (default halo128, threshold 128) against main 316b3c8.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/conv/head.xz /tmp/old & unx .carry/conv/new.xz /tmp/new; wait
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
R=$OUT/r; mkdir -p $R; T0=$(date +%s)
RUST_LOG=warn timeout 90 /tmp/new bench kernels --device cuda:0 > $R/kernels.md 2>&1; echo "kernels rc=$? $(( $(date +%s)-T0 ))s"
echo "cases ok $(grep -c '| yes |' $R/kernels.md) not-ok $(grep '|' $R/kernels.md | grep -v '^| fused\|^|---\|| yes |' | wc -l)"; grep '|' $R/kernels.md | grep -v '^| fused\|^|---\|| yes |' | head
B="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --vae-batches 8,64"
for round in 1 2 3; do for b in old new; do
  f=$R/model-$b-r$round
  RUST_LOG=warn timeout 60 /tmp/$b $B --json $f.json > $f.txt 2>&1
  echo "r$round $b rc=$? $(( $(date +%s)-T0 ))s $(grep -o 'images: [0-9]*, passes: \[[^]]*\], ms_median: [0-9.]*, images_per_sec: [0-9.]*' $f.txt | sed 's/passes: \[[^]]*\], //' | tr '\n' ' ')"
done; done
bash scripts/gpu-parity.sh /tmp/new > $R/parity-new.txt 2>&1; cat $R/parity-new.txt
DTYPES=bf16 FUSED=on GRAPHS=on timeout 150 bash scripts/gpu-determinism.sh /tmp/new $R/det-hashes.json > $R/det.txt 2>&1; echo "determinism rc=$? $(( $(date +%s)-T0 ))s"; grep -i 'true\|false' $R/det.txt | cut -c1-300
tar czf $OUT/call3.tgz -C $OUT r
