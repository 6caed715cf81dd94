#!/usr/bin/env bash
# Call 6: the final binary (e59d659): two cold FP8 start-ups on the server's loading thread, fixture parity,
# and the FP8 250-step HTTP pass.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/lead/final.xz /tmp/final
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/d6; mkdir -p $D
for run in C1 C2; do
  s=$(date +%s)
  CUDA_CACHE_PATH=/tmp/jc6-$run RUST_LOG=diffit_server=debug timeout 60 /tmp/final bench serve --device cuda:0 --resolution 256 --steps 2 --dtype fp8 --images 8 --concurrency 8 --max-batch 8 > $D/$run.txt 2> $D/$run.err
  echo "$run rc=$? in $(( $(date +%s) - s )) s: $(grep -o 'ready in [0-9.]*[a-z]*' $D/$run.err); $(grep -o 'model on the device.*' $D/$run.err | cut -c1-80)"
done
bash scripts/gpu-parity.sh /tmp/final
RUST_LOG=warn timeout 170 /tmp/final bench serve --device cuda:0 --resolution 256 --steps 250 --dtype fp8 --images 64 --concurrency 64 --max-batch 64 --json $D/fp8-load.json > $D/fp8-load.txt 2> $D/fp8-load.err
echo "fp8 load rc=$?"; tail -6 $D/fp8-load.txt
(cd $OUT && tar czf d6.tgz d6 && rm -rf d6)
