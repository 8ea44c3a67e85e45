# syntax=docker/dockerfile:1
#
# aiaas container image. Two variants from one file (docs/DEPLOYMENT.md):
#   docker build -t aiaas:cpu .                                 # CPU-only libtorch
#   docker build -t aiaas:cuda --build-arg TORCH_VARIANT=cuda .  # CUDA 13 libtorch + NVIDIA libraries
#                                                               # (about 3.7 GB of shared libraries)
#
# libtorch comes from the PyPI wheel torch==2.11.0, as in development (.ci/setup-torch.sh):
#   cpu  : torch==2.11.0+cpu from https://download.pytorch.org/whl/cpu
#   cuda : torch==2.11.0 from PyPI (CUDA 13; libtorch_cuda.so finds the nvidia-* wheels' libraries
#          through its own RPATH $ORIGIN/../../nvidia/...)
# build.rs bakes libtorch's folder into the binary as an absolute RUNPATH, so the runtime stage
# puts the libraries at the very same path as in the builder: /opt/venv/lib/python3.11/site-packages.

ARG TORCH_VARIANT=cpu

# Rust toolchain, copied into the Python-based builder below (the builder needs both).
FROM rust:1.95-bookworm AS rust

# ---------------------------------------------------------------------------------------------
FROM python:3.11-bookworm AS builder
ARG TORCH_VARIANT
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=rust /usr/local/cargo /usr/local/cargo
COPY --from=rust /usr/local/rustup /usr/local/rustup
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/cargo/bin:$PATH \
    LIBTORCH_USE_PYTORCH=1

# torch first: the largest layer, rebuilt only when the variant changes.
RUN python3 -m venv /opt/venv \
    && case "${TORCH_VARIANT}" in \
         cpu)  pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.11.0+cpu" ;; \
         cuda) pip install --no-cache-dir "torch==2.11.0" ;; \
         *)    echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
       esac

WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY bench ./bench
RUN cargo build --release --locked --bin aiaas

# Stage exactly what the runtime needs under /rootfs, at the paths the binary expects:
# libtorch (torch/lib, less the Python bindings) and, for CUDA, the nvidia-* wheels' lib folders.
WORKDIR /opt/venv/lib/python3.11/site-packages
RUN SITE="${PWD}" \
    && test -f torch/lib/libtorch_cpu.so \
    && mkdir -p "/rootfs${SITE}/torch" /rootfs/usr/local/bin \
    && cp -a torch/lib "/rootfs${SITE}/torch/lib" \
    && rm -rf "/rootfs${SITE}/torch/lib/libtorch_python.so" "/rootfs${SITE}/torch/lib/libshm_windows" \
    && if [ -d nvidia ]; then \
         find nvidia -mindepth 2 -maxdepth 2 -type d -name lib -exec cp -a --parents {} "/rootfs${SITE}/" \; ; \
       fi \
    && cp /src/target/release/aiaas /rootfs/usr/local/bin/aiaas \
    && readelf -d /rootfs/usr/local/bin/aiaas | grep -q "RUNPATH.*${SITE}/torch/lib"

# ---------------------------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
ARG TORCH_VARIANT
LABEL org.opencontainers.image.title="aiaas" \
      org.opencontainers.image.description="AI inference as a service: TorchScript models behind a REST API (libtorch ${TORCH_VARIANT})" \
      org.opencontainers.image.licenses="Apache-2.0"

# The binary needs glibc, libstdc++ and libgcc_s (all in bookworm-slim); libgomp ships in torch/lib.
COPY --from=builder /rootfs/ /
# The bundled models; mount your own repository over /models (or set AIAAS_MODELS).
COPY models /models

# Configuration is by environment (every flag has an AIAAS_* variable; see `aiaas --help`).
# NVIDIA_DRIVER_CAPABILITIES is read by the NVIDIA container toolkit (CUDA variant); harmless on CPU.
ENV AIAAS_HOST=0.0.0.0 \
    AIAAS_PORT=8080 \
    AIAAS_GRPC_PORT=8081 \
    AIAAS_MODELS=/models \
    AIAAS_LOG_FORMAT=json \
    AIAAS_SHUTDOWN_TIMEOUT=30 \
    NO_COLOR=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Unprivileged, numeric (so Kubernetes' runAsNonRoot can verify it); needs no home or writable
# paths besides /tmp.
USER 65532:65532
EXPOSE 8080 8081

# Ready = models loaded and warmed up. No curl/wget in the image: bash (part of every Debian base)
# speaks HTTP/1.0 over /dev/tcp and we compare the status line. Kubernetes ignores HEALTHCHECK and
# uses the probes in deploy/k8s instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${AIAAS_PORT:-8080} && printf 'GET /health/ready HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]

# SIGTERM: stop accepting, finish in-flight requests (at most AIAAS_SHUTDOWN_TIMEOUT s), exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/aiaas"]
