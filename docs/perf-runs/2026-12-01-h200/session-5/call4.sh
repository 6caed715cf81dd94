#!/usr/bin/env bash
# Session 5, call 4 (one H200): issue 15's targets, 209b717 (base) against 1f25ef5 (new: the attention and
# LayerNorm trims), one call, interleaved; the 250-step HTTP pass for both.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s5/base.xz /tmp/base; unx .carry/s5/new2.xz /tmp/new
OUT=$OUT/i15 EXTRAS=0 CHECKS=0 LOAD="old new" timeout 580 bash scripts/gpu-issue15.sh /tmp/base /tmp/new 2>&1 | tail -30
