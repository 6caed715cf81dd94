#!/usr/bin/env bash
# Call 5: where the stuck FP8 start-up waits. Fresh JIT cache each run; the build synchronises the device at its
# end and logs around the thread's return and the join; DIFFIT_BUILD_INLINE=1 builds on the calling thread.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/exp.xz /tmp/exp
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/d5; mkdir -p $D; T0=$(date +%s)
for run in T1 I1 T2 I2 T3; do
  [ $(( $(date +%s) - T0 )) -gt 200 ] && break
  inline=(); [ "${run:0:1}" = I ] && inline=(DIFFIT_BUILD_INLINE=1)
  err=$D/$run.err
  env "${inline[@]}" CUDA_CACHE_PATH=/tmp/jc5-$run RUST_LOG=diffit_server=debug /tmp/exp bench serve --device cuda:0 --resolution 256 --steps 2 --dtype fp8 --images 8 --concurrency 8 --max-batch 8 > $D/$run.txt 2> $err &
  pid=$!; s=$(date +%s); ready=""
  while kill -0 $pid 2>/dev/null; do
    grep -q "ready in" $err && { ready=$(grep -o 'ready in [0-9.]*[a-z]*' $err); break; }
    [ $(( $(date +%s) - s )) -ge 50 ] && break
    sleep 1
  done
  if [ -z "$ready" ] && kill -0 $pid 2>/dev/null; then
    for t in /proc/$pid/task/*; do echo "$(basename $t) state=$(awk '{print $3}' $t/stat) wchan=$(cat $t/wchan 2>/dev/null) u=$(awk '{print $14}' $t/stat) s=$(awk '{print $15}' $t/stat)"; done > $D/$run.threads
    echo "$run STUCK at $(( $(date +%s) - s )) s; last: $(grep -v 'block built' $err | tail -2 | cut -c30-140 | tr '\n' '|'); gpu $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader); $(grep -c 'state=R' $D/$run.threads) running"
    kill -9 $pid; wait $pid 2>/dev/null
  else
    wait $pid; echo "$run rc=$? $ready; $(grep -o 'synchronised\|build thread returning\|build threads joined' $err | tr '\n' ' ')"
  fi
done
(cd $OUT && tar czf d5.tgz d5 && rm -rf d5)
