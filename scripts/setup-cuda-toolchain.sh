#!/usr/bin/env bash
#@ Copy of the project's shared tool `shared/tools/setup-cuda-toolchain.sh` (the recipe every GPU build of
#@ diffit-server uses), kept in the repository so that `docker build --target gpu` can run it: the Docker
#@ build context holds only the repository. Lines starting with `#@` are this note; everything else must stay
#@ byte-identical to the shared original (scripts/check-deploy.sh compares them when ../shared is present).
# Assemble a CUDA 13.0 build toolchain (nvcc + headers + link libs) from PyPI wheels, no GPU/driver needed.
# Usage: setup-cuda-toolchain.sh DEST   (then: source DEST/env.sh; cargo build --release --features cuda)
# The binary it builds targets sm_90a (H100/H200) and needs, on the GPU machine, the driver's libcuda.so.1 and the
# CUDA 13 libraries that the machine's Python venv ships:
#   export LD_LIBRARY_PATH="$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')/cu13/lib:/usr/local/nvidia/lib64:$LD_LIBRARY_PATH"
# nvcc 13.0 is pinned on purpose: PTX from a newer nvcc fails to load on the 580 driver.
set -euo pipefail
DEST=$(mkdir -p "${1:?usage: $0 DEST}" && cd "$1" && pwd)
WHL=$(mktemp -d)
python3 -m pip download --no-deps -q -d "$WHL" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
X=$(mktemp -d)
for w in "$WHL"/*.whl; do (cd "$X" && python3 -m zipfile -e "$w" .); done
cp -a "$X"/nvidia/cu13/. "$DEST"/ && rm -rf "$X" "$WHL"
chmod +x "$DEST"/bin/* "$DEST"/nvvm/bin/*          # zipfile -e drops exec bits
cd "$DEST"/lib
for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do ln -sf "$l" "${l%%.so*}.so"; done
cd "$DEST" && ln -sfn lib lib64
# link-time stub for the driver library (cudarc uses dynamic-linking => -lcuda). Never ship/use it at runtime:
# every entry point returns CUDA_ERROR_STUB_LIBRARY (34).
mkdir -p lib/stubs
printf '%s\n' cuInit cuDriverGetVersion cuDeviceGet cuDeviceGetCount cuDeviceGetName cuDeviceGetAttribute \
  cuDevicePrimaryCtxRetain cuDevicePrimaryCtxRelease_v2 cuCtxGetCurrent cuCtxSetCurrent cuCtxDestroy_v2 \
  cuCtxSynchronize cuGetErrorString cuGetErrorName cuModuleLoad cuModuleLoadData cuModuleUnload cuModuleGetFunction \
  cuLaunchKernel cuStreamCreate cuStreamDestroy_v2 cuStreamSynchronize cuStreamWaitEvent cuStreamIsCapturing \
  cuEventCreate cuEventDestroy_v2 cuEventRecord cuEventSynchronize cuMemAlloc_v2 cuMemFree_v2 cuMemAllocAsync \
  cuMemFreeAsync cuMemsetD8Async cuMemcpyPeerAsync cuMemcpyDtoDAsync_v2 cuMemcpyDtoHAsync_v2 cuMemcpyHtoDAsync_v2 \
  > lib/stubs/libcuda.syms
# add every driver symbol cudarc can reference, when its source is in the cargo registry (run `cargo fetch` first)
ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs >/dev/null 2>&1 ||
  echo "warning: cudarc sources not found in the cargo registry; run 'cargo fetch' in the project first, then rerun" >&2
for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs; do
  [ -f "$f" ] && grep -ohE '^\s+fn (cu[A-Za-z0-9_]+)\(' "$f" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' >> lib/stubs/libcuda.syms
done
sort -u -o lib/stubs/libcuda.syms lib/stubs/libcuda.syms
awk '{print "int " $1 "(void){return 34;}"}' lib/stubs/libcuda.syms > lib/stubs/libcuda_stub.c
cc -O2 -shared -fPIC -Wl,-soname,libcuda.so.1 -o lib/stubs/libcuda.so lib/stubs/libcuda_stub.c
cat > "$DEST"/env.sh <<ENV
export CUDA_HOME=$DEST            # cudarc link search: \$CUDA_HOME/{lib,lib/stubs,lib64}; cudaforge finds bin/nvcc
export PATH=$DEST/bin:\$PATH
export CUDA_COMPUTE_CAP=90        # no nvidia-smi here; cudaforge turns 90 into sm_90a (H100 only)
export CUDARC_CUDA_VERSION=13000  # pin cudarc's CUDA API level to 13.0 (driver 580)
ENV
"$DEST"/bin/nvcc --version | tail -2
echo "ok: source $DEST/env.sh"
