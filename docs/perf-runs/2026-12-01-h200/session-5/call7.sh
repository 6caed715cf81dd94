#!/usr/bin/env bash
# Session 5, call 7 (one H200): bench kernels of new3 (call 6's kernels; the new FP8 case at K = 4624, a
# multiple of 16) in every dtype, and its FP8 errors digit for digit against 209b717 (base).
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s5/base.xz /tmp/base; unx .carry/s5/new3.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c7; mkdir -p $D
timeout 200 /tmp/new bench kernels --device cuda:0 --dtypes f32,bf16,f16,fp8 > $D/kernels-new.md 2>&1; echo "bench kernels rc=$? ok=$(grep -c '| yes |' $D/kernels-new.md) failed=$(grep -c '| NO |' $D/kernels-new.md)"; grep -E "\| NO \|" $D/kernels-new.md | head -5
timeout 100 /tmp/base bench kernels --device cuda:0 --dtypes fp8 > $D/kernels-fp8-base.md 2>&1
timeout 100 /tmp/new bench kernels --device cuda:0 --dtypes fp8 > $D/kernels-fp8-new.md 2>&1; echo "fp8 new rc=$?"
python3 - $D <<'PY'
import sys
d=sys.argv[1]
def rows(f): return {l.split('|')[1].strip(): l.split('|')[3].strip() for l in open(f) if l.startswith('| fp8')}
b,n=rows(d+"/kernels-fp8-base.md"),rows(d+"/kernels-fp8-new.md")
same=[k for k in b if k in n and b[k]==n[k]]; diff=[(k,b[k],n.get(k)) for k in b if k in n and b[k]!=n[k]]
print(f"fp8 cases: base {len(b)}, new {len(n)}, same error digits {len(same)}, different {len(diff)}"); [print("  differ:",x) for x in diff[:6]]
for k in n:
    if k not in b: print("  new only:", k, n[k])
PY
(cd $OUT && tar czf c7.tgz c7 && rm -rf c7)
