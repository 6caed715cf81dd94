#!/usr/bin/env bash
# conv-halo call 2: the 4-warp halo tiling checked and profiled; tilings and thresholds, two rounds interleaved.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/conv/head.xz /tmp/old & unx .carry/conv/new.xz /tmp/new; wait
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
R=$OUT/r; mkdir -p $R; T0=$(date +%s)
RUST_LOG=warn timeout 90 /tmp/new bench kernels --device cuda:0 --dtypes bf16,f16 > $R/kernels.md 2>&1; echo "kernels rc=$? $(( $(date +%s)-T0 ))s"
echo "cases $(grep -c '| yes |' $R/kernels.md) not-ok $(grep '|' $R/kernels.md | grep -v '^| fused\|^|---\|| yes |' | wc -l)"; grep "Halo128W4" $R/kernels.md | awk -F'|' '{print $2,$3,$4}' | head -20
M="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --vae-batches 8 --warmup 0 --iters 1"
RUST_LOG=warn timeout 70 /usr/local/cuda/bin/ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats -k regex:conv3x3_halo -c 2 /tmp/new $M --conv-tiling halo128-w4 > $R/ncu-new-halo128w4.txt 2>&1
echo "ncu rc=$? $(( $(date +%s)-T0 ))s"; grep -E "conv3x3|Duration|L2 Cache Throughput|Compute \(SM\) Throughput|L1/TEX Cache Throughput" $R/ncu-new-halo128w4.txt
B="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --vae-batches 8,64"
for round in 1 2; do
for v in old: new:halo128 new:halo128-w4 new:halo256 new:halo128:256 new:halo128-w4:256 new:gather; do
  IFS=: read b t c <<< "$v"; extra=(); [ -n "$t" ] && extra+=(--conv-tiling $t); [ -n "${c:-}" ] && extra+=(--implicit-gemm-conv-max-cout $c)
  f=$R/model-${v//:/_}-r$round
  RUST_LOG=warn timeout 60 /tmp/$b $B "${extra[@]}" --json $f.json > $f.txt 2>&1
  echo "r$round $v rc=$? $(( $(date +%s)-T0 ))s $(grep -o 'images: [0-9]*, passes: \[[^]]*\], ms_median: [0-9.]*, images_per_sec: [0-9.]*' $f.txt | sed 's/passes: \[[^]]*\], //' | tr '\n' ' ')"
done; done
bash scripts/gpu-parity.sh /tmp/new > $R/parity-new.txt 2>&1; cat $R/parity-new.txt
tar czf $OUT/call2.tgz -C $OUT r
