#!/usr/bin/env bash
# Session 6, call 10 (1 x H200), run inline as the tool's command: the VAE at B = 64 with every 3×3
# convolution on the im2col path (now that GroupNorm + SiLU writes the columns) against the default
# (128-channel layers on the halo kernel), same binary (4bd34b0), interleaved three times. Output:
#   implicit=true  585.8 / 581.8 / 581.9 images/s; implicit=false 545.1 / 559.7 / 559.6.
set -u; python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open('.carry/s6/head.xz'), open('/tmp/new','wb'))" && chmod +x /tmp/new; export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"; for r in 1 2 3; do for imp in true false; do /tmp/new bench model --device cuda:0 --dtype bf16 --batches --vae-batches 64 --warmup 3 --iters 5 --implicit-gemm-conv $imp 2>&1 | grep DecodeRow | sed "s/^/implicit=$imp r$r: /;s/passes: \[[0-9, ]*\], //"; done; done
