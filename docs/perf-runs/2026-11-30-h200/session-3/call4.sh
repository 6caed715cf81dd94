#!/usr/bin/env bash
# Call 4: (a) a stuck FP8 start-up caught with thread dumps (fresh JIT cache each run, DEBUG logs per block and
# module); (b) issue 15's targets, old (607c540) vs new, without the checks (call 3) and the FP8 HTTP pass.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/new.xz /tmp/new; unx .carry/lead/old.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/diag; mkdir -p $D
echo "tools: $(for t in strace perf gdb ltrace; do command -v $t; done | tr '\n' ' ')"
dump() { # pid tag
  local pid=$1 tag=$2
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader > $D/$tag.smi
  for t in /proc/$pid/task/*; do echo "$(basename $t) $(cat $t/comm) state=$(awk '{print $3}' $t/stat) wchan=$(cat $t/wchan 2>/dev/null) utime=$(awk '{print $14}' $t/stat) stime=$(awk '{print $15}' $t/stat) syscall=$(cut -d' ' -f1 $t/syscall 2>/dev/null)"; done > $D/$tag.threads
  for t in /proc/$pid/task/*; do echo "== $(basename $t) $(cat $t/comm)"; cat $t/stack 2>/dev/null; done > $D/$tag.kstack
}
T0=$(date +%s); stuck=0
for i in 1 2 3 4; do
  [ $(( $(date +%s) - T0 )) -gt 120 ] && break
  err=$D/run$i.err
  CUDA_CACHE_PATH=/tmp/jc-diag-$i RUST_LOG=diffit_server=debug /tmp/new bench serve --device cuda:0 --resolution 256 --steps 2 --dtype fp8 --images 8 --concurrency 8 --max-batch 8 > $D/run$i.txt 2> $err &
  pid=$!; s=$(date +%s); ready=""
  while kill -0 $pid 2>/dev/null; do
    grep -q "ready in" $err && { ready=$(grep -o 'ready in [0-9.]*[a-z]*' $err); break; }
    [ $(( $(date +%s) - s )) -ge 45 ] && break
    sleep 1
  done
  if [ -z "$ready" ] && kill -0 $pid 2>/dev/null; then
    stuck=$((stuck+1)); dump $pid run$i-a; sleep 10; dump $pid run$i-b
    echo "run $i STUCK at $(( $(date +%s) - s )) s; log tail: $(tail -1 $err | cut -c1-200)"
    echo "  threads (a): $(awk '{print $2, $3, $4, $5}' $D/run$i-a.threads | sort | uniq -c | sort -rn | head -6 | tr '\n' ';')"
    echo "  busy (b): $(grep -v 'utime=0 ' $D/run$i-b.threads | awk '{print $2, $3, $5, $6}' | head -4 | tr '\n' ';')"; cat $D/run$i-a.smi
    kill -9 $pid; wait $pid 2>/dev/null
  else
    wait $pid; echo "run $i rc=$? $ready in $(( $(date +%s) - s )) s"
  fi
  [ $stuck -ge 2 ] && break
done
(cd $OUT && tar czf diag.tgz diag && rm -rf diag)
EXTRAS=0 CHECKS=0 LOAD="old new" OUT=$OUT/i15 bash scripts/gpu-issue15.sh /tmp/old /tmp/new 2>&1 | tail -22
