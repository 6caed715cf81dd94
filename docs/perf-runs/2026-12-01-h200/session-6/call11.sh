#!/usr/bin/env bash
# Session 6, call 11 (1 x H200): g1 = 566abdd + the VAE's decode passes captured as CUDA graphs
# (one per latent shape, under --cuda-graphs). The decode at B = 64 and 8, graphs (auto) against
# --cuda-graphs off, same binary, interleaved three times; bit identity of graphed and direct passes
# (fixture decode in f32, embedded-model images); the capture's log line.
set -u
unx() { python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$1" "$2" && chmod +x "$2"; }
unx .carry/s6/g1.xz /tmp/new
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"
D=$OUT/c11; mkdir -p $D
for r in 1 2 3; do for g in auto off; do
  RUST_LOG=info timeout 120 /tmp/new bench model --device cuda:0 --dtype bf16 --batches --vae-batches 64,8 --warmup 3 --iters 5 --cuda-graphs $g > $D/vae-$g-$r.log 2>&1
  echo "graphs=$g r$r: $(grep -E 'DecodeRow' $D/vae-$g-$r.log | sed 's/DecodeRow //;s/passes: \[[0-9, ]*\], //;s/images_per_sec/ips/' | tr '\n' ' ')"
done; done
grep -m3 'VAE decode pass' $D/vae-auto-1.log | cut -c1-250
F=tests/fixtures
for g in on off; do
  /tmp/new decode --device cuda:0 --cuda-graphs $g --vae $F/vae_tiny_model.safetensors --input $F/vae_tiny_golden.safetensors --output $D/dec-$g.safetensors > $D/dec-$g.log 2>&1 || tail -3 $D/dec-$g.log
  /tmp/new generate --device cuda:0 --dtype bf16 --cuda-graphs $g --class 7 --seed 11 --n 4 --steps 30 --output $D/gen-$g.png > $D/gen-$g.log 2>&1 || tail -3 $D/gen-$g.log
done
cmp -s $D/dec-on.safetensors $D/dec-off.safetensors && echo "fixture decode: graphed = direct" || echo "fixture decode: DIFFER"
for i in 0 1 2 3; do cmp -s $D/gen-on-$i.png $D/gen-off-$i.png && echo "image $i: graphed = direct" || echo "image $i: DIFFER"; done
grep -c 'VAE decode pass' $D/gen-on.log $D/dec-on.log
(cd $OUT && tar czf c11.tgz c11 && rm -rf c11)
