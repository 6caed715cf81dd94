#!/usr/bin/env bash
# conv-halo call 4: 31607c5 (b9cec08 + a shared B-fragment helper) checked again; IN-512 decode old vs new.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/conv/head.xz /tmp/old & unx .carry/conv/new.xz /tmp/new; wait
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
R=$OUT/r; mkdir -p $R; T0=$(date +%s)
RUST_LOG=warn timeout 90 /tmp/new bench kernels --device cuda:0 > $R/kernels.md 2>&1; echo "kernels rc=$? $(( $(date +%s)-T0 ))s"
echo "cases ok $(grep -c '| yes |' $R/kernels.md) not-ok $(grep '|' $R/kernels.md | grep -v '^| fused\|^|---\|| yes |' | wc -l)"
for res in 256 512; do for round in 1 2; do for b in old new; do
  [ $res = 512 ] && [ $round = 2 ] && continue
  vb=8,64; [ $res = 512 ] && vb=8
  f=$R/model-$res-$b-r$round
  RUST_LOG=warn timeout 60 /tmp/$b bench model --device cuda:0 --resolution $res --dtype bf16 --batches 1 --vae-batches $vb --json $f.json > $f.txt 2>&1
  echo "$res r$round $b rc=$? $(( $(date +%s)-T0 ))s $(grep -o 'images: [0-9]*, passes: \[[^]]*\], ms_median: [0-9.]*, images_per_sec: [0-9.]*' $f.txt | sed 's/passes: \[[^]]*\], //' | tr '\n' ' ')"
done; done; done
bash scripts/gpu-parity.sh /tmp/new > $R/parity-new.txt 2>&1; cat $R/parity-new.txt
tar czf $OUT/call4.tgz -C $OUT r
