#!/usr/bin/env bash
# Call 1: (a) the FP8 start-up hang, watched with stack dumps; (b) the mma.sync attention tiling sweep.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/sweep.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
for t in gdb eu-stack pstack; do command -v $t; done
dump() { # pid tag
  local pid=$1 tag=$2
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader > $OUT/$tag.smi
  for t in /proc/$pid/task/*; do echo "$(basename $t) $(cat $t/comm) $(awk '{print $3}' $t/stat) $(cat $t/wchan 2>/dev/null) utime=$(awk '{print $14}' $t/stat)"; done > $OUT/$tag.threads
  for t in /proc/$pid/task/*; do echo "== $(basename $t) $(cat $t/comm)"; cat $t/stack 2>/dev/null; done > $OUT/$tag.kstack
  if command -v gdb >/dev/null; then timeout 60 gdb -p $pid -batch -ex "thread apply all bt" > $OUT/$tag.gdb 2>&1; fi
  if command -v eu-stack >/dev/null; then timeout 30 eu-stack -p $pid > $OUT/$tag.eustack 2>&1; fi
}
hung=0
for i in 1 2 3 4 5 6; do
  start=$(date +%s)
  RUST_LOG=diffit_server=debug /tmp/new bench serve --device cuda:0 --resolution 256 --steps 2 --dtype fp8 --images 8 --concurrency 8 --max-batch 8 > $OUT/h$i.txt 2> $OUT/h$i.err &
  pid=$!
  for s in $(seq 1 60); do sleep 0.5; kill -0 $pid 2>/dev/null || break; done
  if kill -0 $pid 2>/dev/null; then
    hung=$((hung+1))
    echo "run $i still running after 30 s; log tail:"; tail -2 $OUT/h$i.err | cut -c1-300
    dump $pid h$i-a
    if [ $hung -eq 1 ]; then sleep 30; dump $pid h$i-b; fi
    kill -9 $pid
  fi
  wait $pid; rc=$?
  echo "run $i rc=$rc in $(( $(date +%s) - start )) s: $(grep -o 'ready in.*' $OUT/h$i.err)"
done
# (b) attention tiling sweep (bf16), op level, then nothing else
start=$(date +%s)
/tmp/new bench model --resolution 256 --dtype bf16 --device cuda:0 --ops --batches 1 --iters 20 --vae-batches > $OUT/ops.txt 2> $OUT/ops.err
echo "ops rc=$? in $(( $(date +%s) - start )) s"
grep "rel err" $OUT/ops.err | awk '{print $1, $2, $7}' | sort -k3 -g | tail -4
grep "sweep" $OUT/ops.txt | grep -v "rel err"
