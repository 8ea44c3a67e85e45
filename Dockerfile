# syntax=docker/dockerfile:1
# Multi-stage build: torch==2.11.0 from PyPI provides libtorch; the runtime stage carries the
# binary, the libtorch shared libraries and the models. See README "Deploying".
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rust:1.95-bookworm AS builder
ARG TORCH_INDEX
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --index-url "${TORCH_INDEX}" torch==2.11.0
ENV LIBTORCH_USE_PYTORCH=1 PATH=/opt/venv/bin:$PATH
COPY . .
RUN cargo build --release --bin aiaas

FROM debian:bookworm-slim
COPY --from=builder /opt/venv/lib/python3.11/site-packages/torch/lib /opt/venv/lib/python3.11/site-packages/torch/lib
COPY --from=builder /src/target/release/aiaas /usr/local/bin/aiaas
COPY models /models
USER 65532:65532
ENV AIAAS_MODELS=/models AIAAS_PORT=8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/aiaas"]
