#!/usr/bin/env bash
# Session 4, call 6 (one H200): issue 15's targets, 316b3c8 (head) against 31607c5 (new = main's code at the
# stop: exact-size steps past 48 rows, the halo-tiled VAE convolution), one call, interleaved.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/head.xz /tmp/head; unx .carry/s4/new.xz /tmp/new
OUT=$OUT/i15 EXTRAS=0 CHECKS=0 LOAD="new" timeout 560 bash scripts/gpu-issue15.sh /tmp/head /tmp/new 2>&1 | tail -28
