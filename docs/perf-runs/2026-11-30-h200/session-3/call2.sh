#!/usr/bin/env bash
# Call 2: (a) is the slow FP8 start-up the driver's PTX JIT? (b) whole steps with the attention tilings.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/sweep.xz /tmp/new; unx .carry/lead/old.xz /tmp/old
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
mkdir -p $OUT/r
env | grep -E '^CUDA_|^HOME' ; ls -la ~/.nv/ComputeCache 2>&1 | head -3; du -sh ~/.nv/ComputeCache 2>&1
span() { python3 - "$1" <<'PY'
import sys,re,datetime
t={}
for l in open(sys.argv[1]):
    m=re.match(r'(\S+Z)',l)
    if not m: continue
    ts=datetime.datetime.fromisoformat(m.group(1).replace('Z','+00:00'))
    t.setdefault('first',ts)
    if 'random DiffiT built' in l: t['built']=ts
    if 'random VAE decoder built' in l: t['vae']=ts
    t['last']=ts
f=lambda a,b: '%.1f'%((t[b]-t[a]).total_seconds()) if a in t and b in t else '-'
print('diffit build', f('first','built'), 's; to the last log line', f('first','last'), 's')
PY
}
run1() { # tag env...
  local tag=$1; shift
  local s=$(date +%s.%N)
  env "$@" RUST_LOG=diffit_server=debug timeout 240 /tmp/new bench model --resolution 256 --dtype fp8 --device cuda:0 --batches 1 --warmup 1 --iters 2 --vae-batches > $OUT/r/$tag.txt 2> $OUT/r/$tag.err
  echo "$tag rc=$? wall $(python3 -c "import time;print('%.1f'%(time.time()-$s))") s; $(span $OUT/r/$tag.err)"
}
run1 fp8-default-1
run1 fp8-default-2
run1 fp8-nocache CUDA_CACHE_DISABLE=1
run1 fp8-freshcache CUDA_CACHE_PATH=/tmp/jc-fresh
run1 fp8-freshcache-again CUDA_CACHE_PATH=/tmp/jc-fresh
du -sh ~/.nv/ComputeCache /tmp/jc-fresh 2>&1
# (b) steps: old vs new default vs new tilings, IN-256 and IN-512
for res in 256 512; do
  b=$([ $res = 256 ] && echo 1,16,64 || echo 16)
  for cfg in old new new:_w8m1k64s2 new:_w16m1k64s2n1 old new:_w8m1k64s2; do
    bin=/tmp/${cfg%%:*}; tl=${cfg#*:}; [ "$tl" = "$cfg" ] && tl=""
    DIFFIT_ATT_TILING=$tl $bin bench model --resolution $res --dtype bf16 --device cuda:0 --batches $b --vae-batches --json $OUT/r/step-$res-${cfg//:/-}.json > $OUT/r/step.txt 2>/dev/null
    echo "$res $cfg: $(grep -E '^\| [0-9]+ \|' $OUT/r/step.txt | awk -F'|' '{printf "B=%s %s ms; ", $2, $3}')"
  done
done
# (c) the bucket warm-up at max batch 64 (bf16, IN-256): its cost and graph memory
RUST_LOG=info timeout 200 /tmp/new bench serve --device cuda:0 --resolution 256 --steps 2 --dtype bf16 --images 64 --concurrency 64 --max-batch 64 > $OUT/r/serve.txt 2> $OUT/r/serve.err
echo "serve rc=$?"; grep -E "step buckets ready|warm-up done" $OUT/r/serve.err | cut -c1-400; grep -c "captured a CUDA graph" $OUT/r/serve.err
cd $OUT && tar czf r.tgz r && rm -rf r
