#!/usr/bin/env bash
# Session 6, calls 13 and 14 (1 x H200), run inline as the tool's command: scripts/gpu-determinism.sh
# (bf16, fused on) once per line below, g2 = the decode-graph build, old = head.xz (4bd34b0's code).
# Call 13 (DIFFIT_ATT_TILING forces the attention tiling; GRAPHS=on):
#   new b: 'n = 4 amid others' False (all else True); new s: all True; old auto: all True; new auto: all True.
# Call 14: old on: all True; new off: 'n = 4 amid others' False; old on: all True; new off: all True;
#   old off: 'n = 4 amid others' False.
set -u; unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }; unx .carry/s6/g2.xz /tmp/new; unx .carry/s6/head.xz /tmp/old; export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
for c in "new b" "new s" "old auto" "new auto"; do set -- $c; echo "== $1 tiling=$2"; DIFFIT_ATT_TILING=$2 DTYPES=bf16 FUSED=on GRAPHS=on timeout 100 bash scripts/gpu-determinism.sh /tmp/$1 2>&1 | grep -E '^bf16'; done
for c in "old on" "new off" "old on" "new off" "old off"; do set -- $c; echo "== $1 graphs=$2"; DTYPES=bf16 FUSED=on GRAPHS=$2 timeout 60 bash scripts/gpu-determinism.sh /tmp/$1 2>&1 | grep -E '^bf16'; done
