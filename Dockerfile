# syntax=docker/dockerfile:1.7
#
# diffit-server container images (see docs/deploy.md).
#
#   docker build --target gpu -t diffit-server:0.1.0-cuda .   # CUDA 13 build, sm_90a (H100/H200), default target
#   docker build --target cpu -t diffit-server:0.1.0-cpu  .   # CPU-only build on Debian 12
#
# Both images: non-root user 10001, the embedded model in /app/weights, port 8080, HEALTHCHECK on /healthz,
# `ENTRYPOINT ["diffit-server", "serve"]`; every setting comes from DIFFIT_* environment variables.
# Base images are pinned by tag; pin them by digest too (`FROM image:tag@sha256:…`) when you publish releases.
# Lint: scripts/check-deploy.sh runs hadolint on this file.

# ---------------------------------------------------------------------------------------------------------------
# CPU build: plain `cargo build --release`.
FROM rust:1.95.0-bookworm AS build-cpu
WORKDIR /src
COPY . .
# The cache mounts keep the crate registry and incremental target dir between builds; the binary is copied out
# of the mounted target dir inside the same step.
RUN --mount=type=cache,id=diffit-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=diffit-target-cpu,target=/src/target \
    cargo build --release --locked --bin diffit-server \
 && install -D -m 0755 target/release/diffit-server /out/diffit-server

# ---------------------------------------------------------------------------------------------------------------
# CUDA toolchain: CUDA 13.0 nvcc, headers and link libraries assembled from PyPI wheels by the project's own
# recipe (scripts/setup-cuda-toolchain.sh, a copy of shared/tools/setup-cuda-toolchain.sh; versions pinned there).
# This stage depends only on Cargo.lock and that script, so source edits do not re-download the toolchain.
FROM rust:1.95.0-bookworm AS cuda-toolchain
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
COPY Cargo.lock /tmp/Cargo.lock
COPY scripts/setup-cuda-toolchain.sh /usr/local/bin/setup-cuda-toolchain.sh
# The script reads the list of CUDA driver symbols from the cudarc sources in the cargo registry (to build the
# link-time libcuda stub), so fetch exactly the cudarc version that Cargo.lock names first.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN v=$(awk -F'"' '/^name = "cudarc"$/ { getline; print $2; exit }' /tmp/Cargo.lock) \
 && test -n "$v" \
 && cargo new -q --vcs none /tmp/cudarc-fetch \
 && printf 'cudarc = { version = "=%s", default-features = false }\n' "$v" >> /tmp/cudarc-fetch/Cargo.toml \
 && cargo fetch -q --manifest-path /tmp/cudarc-fetch/Cargo.toml \
 && setup-cuda-toolchain.sh /opt/cuda-toolchain \
 && rm -rf /tmp/cudarc-fetch /root/.cache/pip

# ---------------------------------------------------------------------------------------------------------------
# CUDA build: `cargo build --release --features cuda` with the toolchain's env.sh (CUDA_HOME, nvcc on PATH,
# CUDARC_CUDA_VERSION=13000). That nvcc builds candle's kernels and, through build.rs, the project's fused kernels
# (src/kernels/*/*.cu -> machine code for the capability plus its PTX, embedded in the binary; build.rs takes
# $CUDA_HOME/bin/nvcc). CUDA_COMPUTE_CAP=90 compiles them for sm_90 / sm_90a: H100/H200 only. The binary links against libcuda.so.1 through a stub; the
# real one comes from the node's driver at run time.
FROM cuda-toolchain AS build-gpu
ARG CUDA_COMPUTE_CAP=90
WORKDIR /src
COPY . .
RUN --mount=type=cache,id=diffit-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=diffit-target-gpu,target=/src/target \
    cap="${CUDA_COMPUTE_CAP}" \
 && . /opt/cuda-toolchain/env.sh \
 && export CUDA_COMPUTE_CAP="$cap" \
 && cargo build --release --locked --features cuda --bin diffit-server \
 && install -D -m 0755 target/release/diffit-server /out/diffit-server

# ---------------------------------------------------------------------------------------------------------------
# CPU runtime image.
FROM debian:bookworm-20251229-slim AS cpu
LABEL org.opencontainers.image.title="diffit-server" \
      org.opencontainers.image.description="HTTP inference server for class-conditional latent DiffiT (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# curl is only for the HEALTHCHECK below. Package versions are not pinned: the base image tag is, and security
# updates to Debian's curl must not break the build.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 diffit \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin diffit
WORKDIR /app
# The embedded default model. With DIFFIT_MODEL / DIFFIT_VAE unset the server looks for weights/ in its working
# directory and beside/above its executable: /app/weights is both. Owned by root, read-only for the server user.
COPY weights/ /app/weights/
COPY --from=build-cpu /out/diffit-server /app/bin/diffit-server
ENV PATH=/app/bin:$PATH \
    DIFFIT_HOST=0.0.0.0 \
    DIFFIT_PORT=8080 \
    DIFFIT_DEVICE=cpu
EXPOSE 8080
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${DIFFIT_PORT:-8080}/healthz || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["diffit-server", "serve"]

# ---------------------------------------------------------------------------------------------------------------
# GPU runtime image (last stage, so the default target). The CUDA 13.0 runtime base supplies libcublas,
# libcublasLt, libcurand and libnvrtc; the NVIDIA container toolkit mounts the driver's libcuda.so.1. Needs a
# driver >= 580 on the node.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04 AS gpu
LABEL org.opencontainers.image.title="diffit-server" \
      org.opencontainers.image.description="HTTP inference server for class-conditional latent DiffiT (CUDA 13, sm_90a)" \
      org.opencontainers.image.licenses="Apache-2.0"
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 diffit \
 && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home --shell /usr/sbin/nologin diffit
WORKDIR /app
COPY weights/ /app/weights/
COPY --from=build-gpu /out/diffit-server /app/bin/diffit-server
# candle's own kernels ship as PTX, which the driver compiles at a module's first use and caches on disk. Its
# default cache ($HOME/.nv, here /app/.nv) is not writable by the server (root-owned /app; read-only root in the
# manifests), which made every start compile them again: keep the cache in /tmp (an emptyDir in the manifests,
# so a restarted container finds it), capped below that volume's size. docs/deploy.md#the-kernel-jit-cache.
ENV PATH=/app/bin:$PATH \
    DIFFIT_HOST=0.0.0.0 \
    DIFFIT_PORT=8080 \
    DIFFIT_DEVICE=auto \
    CUDA_CACHE_PATH=/tmp/cuda-jit-cache \
    CUDA_CACHE_MAXSIZE=134217728
EXPOSE 8080
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null http://127.0.0.1:${DIFFIT_PORT:-8080}/healthz || exit 1"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["diffit-server", "serve"]
