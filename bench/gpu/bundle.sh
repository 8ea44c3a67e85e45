#!/usr/bin/env bash
# Builds what the GPU check (bench/gpu/check.sh) needs into .gpu/bundle.tar.xz (git-ignored,
# well under the device tool's 64 MiB): the stripped server and benchmark binaries, the three
# demo models, and MiniLM's traced graph from the Hugging Face fixtures with its weights zeroed
# (refilled on the GPU machine). Run here, then on a lent GPU machine:
#   run carry=[".gpu"]  command="bash bench/gpu/check.sh"
# Needs .venv and the fixtures (make setup hf-fixtures).
set -euo pipefail
cd "$(dirname "$0")/../.."
export LIBTORCH_USE_PYTORCH=1 PATH="$PWD/.venv/bin:$PATH"
cargo build --release --bin aiaas --bin aiaas-bench
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin" "$stage/models"
strip -o "$stage/bin/aiaas" target/release/aiaas
strip -o "$stage/bin/aiaas-bench" target/release/aiaas-bench
cp -r models/regressor models/text-classifier models/image-cnn "$stage/models/"
mkdir -p "$stage/models/minilm"
cp .fixtures/hf/minilm/{model.pt,model.toml,tokenizer.json} "$stage/models/minilm/"
.venv/bin/python bench/gpu/weights.py zero "$stage/models/minilm/model.pt"
mkdir -p .gpu
tar -C "$stage" -cJf .gpu/bundle.tar.xz .
ls -la .gpu/bundle.tar.xz
