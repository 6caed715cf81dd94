#!/usr/bin/env bash
# Session 6, call 1 (1 x H200): the reworked Hopper attention kernel (bias tile through the ring,
# optional intra-warpgroup overlap), six variants in one binary (v1 = working tree on 8e3b848):
# correctness of each (bench kernels, bf16 + f16 for the two defaults), op times of each against
# mma.sync at IN-256 B = 64 and IN-512 B = 16, and an ncu look at two variants.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/v1.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
D=$OUT/c1; mkdir -p $D
V="w1k64s2o0 w1k64s2o1 w1k64s3o1 w1k128s2o1 w2k64s3o1 w2k128s2o1"
timeout 150 /tmp/new bench kernels --device cuda:0 --dtypes bf16,f16 > $D/kernels-default.md 2>&1
echo "kernels default rc=$? ok=$(grep -c '| yes |' $D/kernels-default.md) failed=$(grep -c '| NO |' $D/kernels-default.md)"; grep -E "\| NO \|" $D/kernels-default.md | head -8
for v in w1k64s2o0 w1k64s2o1 w1k128s2o1 w2k64s3o1; do
  DIFFIT_ATT90_VARIANT=$v timeout 100 /tmp/new bench kernels --device cuda:0 --dtypes bf16 > $D/kernels-$v.md 2>&1
  echo "kernels $v rc=$? ok=$(grep -c '| yes |' $D/kernels-$v.md) failed=$(grep -c '| NO |' $D/kernels-$v.md)"; grep -E "\| NO \|" $D/kernels-$v.md | grep -i wgmma | head -4
done
for r in 1 2; do for v in $V; do
  DIFFIT_ATT90_VARIANT=$v timeout 60 /tmp/new bench model --device cuda:0 --dtype bf16 --ops --batches --vae-batches --iters 20 > $D/ops-$v-$r.txt 2>&1
  grep -E 'flash' $D/ops-$v-$r.txt | sed "s/^/$v r$r: /"
done; done
NCU=/usr/local/cuda/bin/ncu
for v in w1k64s3o1 w2k128s2o1; do
  DIFFIT_ATT90_VARIANT=$v timeout 90 $NCU --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --kernel-name regex:attention90 --launch-skip 3 --launch-count 1 /tmp/new bench model --device cuda:0 --dtype bf16 --ops --batches --vae-batches --iters 3 > $D/ncu-$v.txt 2>&1
  echo "ncu $v rc=$?: $(grep -E 'Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Stall' $D/ncu-$v.txt | awk '{$1=$1};1' | tr '\n' ';' | cut -c1-600)"
done
(cd $OUT && tar czf c1.tgz c1 && rm -rf c1)
