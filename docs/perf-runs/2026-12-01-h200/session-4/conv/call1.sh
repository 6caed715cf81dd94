#!/usr/bin/env bash
# conv-halo call 1: correctness of the halo kernels, ncu of old vs new, one round of bench model.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/conv/head.xz /tmp/old & unx .carry/conv/new.xz /tmp/new; wait
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T0=$(date +%s)
RUST_LOG=warn timeout 90 /tmp/new bench kernels --device cuda:0 --dtypes bf16,f16 > $R/kernels.md 2>&1; echo "kernels rc=$? $(( $(date +%s)-T0 ))s"
grep -c "| ok\|yes" $R/kernels.md; grep -i "conv3x3_implicit" $R/kernels.md | head -60; grep -iv "ok |\|yes |" $R/kernels.md | grep "|" | grep -v "^| fused\|^|---" | head
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu=$NCU"
M="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --vae-batches 8 --warmup 0 --iters 1"
for v in old:gather new:halo256 new:halo128; do
  b=${v%%:*}; t=${v##*:}; extra=(); [ $b = new ] && extra=(--conv-tiling $t)
  k=conv3x3_igemm; [ $t != gather ] && k=conv3x3_halo
  RUST_LOG=warn timeout 70 $NCU --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats -k regex:$k -c 2 /tmp/$b $M "${extra[@]}" > $R/ncu-$b-$t.txt 2>&1
  echo "ncu $v rc=$? $(( $(date +%s)-T0 ))s"
  grep -E "conv3x3|Duration|Memory Throughput|DRAM Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Dynamic Shared|Block Limit (Registers|Shared)" $R/ncu-$b-$t.txt | head -40
done
B="bench model --device cuda:0 --resolution 256 --dtype bf16 --batches 1 --vae-batches 8,64"
for v in old: new:halo256 new:halo128 new:halo256:512 new:halo128:512; do
  IFS=: read b t c <<< "$v"; extra=(); [ -n "$t" ] && extra+=(--conv-tiling $t); [ -n "${c:-}" ] && extra+=(--implicit-gemm-conv-max-cout $c)
  RUST_LOG=warn timeout 90 /tmp/$b $B "${extra[@]}" --json $R/model-${v//:/_}.json > $R/model-${v//:/_}.txt 2>&1
  echo "model $v rc=$? $(( $(date +%s)-T0 ))s"; grep -iE "vae|decode" $R/model-${v//:/_}.txt | head -4
done
tar czf $OUT/call1.tgz -C $OUT r
