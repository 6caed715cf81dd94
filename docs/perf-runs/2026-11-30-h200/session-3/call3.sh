#!/usr/bin/env bash
# Call 3: start-up cost of the driver's JIT (cold vs warm cache, old vs new), FP8 start-ups timed end to end,
# correctness of new (bench kernels, fixture parity, determinism incl. FP8/f32).
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/new.xz /tmp/new; unx .carry/lead/old.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
L=$OUT/logs; mkdir -p $L
now() { python3 -c 'import time; print("%.1f" % time.time())'; }
start1() { # tag bin dtype cache
  local tag=$1 bin=$2 dt=$3 cache=$4 t0=$(now)
  CUDA_CACHE_PATH=$cache RUST_LOG=info timeout 150 $bin bench serve --device cuda:0 --resolution 256 --steps 2 --dtype $dt --images 8 --concurrency 8 --max-batch 8 > $L/$tag.txt 2> $L/$tag.err
  local rc=$? t1=$(now)
  echo "$tag rc=$rc wall $(python3 -c "print('%.1f' % ($t1 - $t0))") s; $(grep -o 'ready in [0-9.]*s' $L/$tag.err); warm-up $(grep -o 'warm-up done.*elapsed=[0-9.]*' $L/$tag.err | grep -o '[0-9.]*$' | head -1) s; http $(grep '^| http' $L/$tag.txt | cut -d'|' -f6)"
}
for b in old new; do
  start1 $b-bf16-cold /tmp/$b bf16 /tmp/jc-$b
  start1 $b-bf16-warm /tmp/$b bf16 /tmp/jc-$b
done
start1 new-fp8-cold /tmp/new fp8 /tmp/jc-new-fp8
for i in 1 2 3 4; do start1 new-fp8-warm$i /tmp/new fp8 /tmp/jc-new-fp8; done
du -sh /tmp/jc-* | tr '\n' ' '; echo
/tmp/new bench kernels --device cuda:0 --dtypes f32,bf16,f16,fp8 > $L/kernels.md 2>&1
echo "bench kernels rc=$? pass=$(grep -c '| yes |' $L/kernels.md) fail=$(grep -c '| NO |' $L/kernels.md)"; grep '| NO |' $L/kernels.md
bash scripts/gpu-parity.sh /tmp/new
DTYPES="bf16 f32 fp8" FUSED=on GRAPHS="on off" timeout 300 bash scripts/gpu-determinism.sh /tmp/new $L/det-hashes.json > $L/det1.txt 2>&1; echo "determinism (bf16 f32 fp8, fused, graphs on/off) rc=$?"; tail -12 $L/det1.txt
DTYPES="bf16" FUSED=off GRAPHS="off" timeout 120 bash scripts/gpu-determinism.sh /tmp/new $L/det-hashes2.json > $L/det2.txt 2>&1; echo "determinism (bf16 unfused) rc=$?"; tail -4 $L/det2.txt
cd $OUT && tar czf logs.tgz logs && rm -rf logs
