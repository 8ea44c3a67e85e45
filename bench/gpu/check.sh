#!/usr/bin/env bash
# The GPU check: on a lent GPU machine (bench/gpu/bundle.sh first, here), from the repository
# root:  bash bench/gpu/check.sh    (DEVICE=cpu SECS=1 for a dry run on any machine)
# Writes results (summary.md, results.json, logs, nvidia-smi) under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/aiaas-gpu}"
mkdir -p "$OUT"
if [ -z "${AIAAS_NO_TORCH_PATH:-}" ]; then
  torch_lib=$(python3 -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
  export LD_LIBRARY_PATH="$torch_lib:${LD_LIBRARY_PATH:-}"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# python's tarfile (lzma in the standard library): the machine may have no xz program
python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
  .gpu/bundle.tar.xz "$work" || { echo "cannot extract .gpu/bundle.tar.xz (make gpu-bundle)"; exit 1; }
python3 bench/gpu/weights.py fill "$work/models/minilm/model.pt" || exit 1
(nvidia-smi || echo "no nvidia-smi") > "$OUT/nvidia-smi-before.txt" 2>&1
python3 bench/gpu/check.py --work "$work" --out "$OUT" --device "${DEVICE:-cuda:0}" \
  --seconds "${SECS:-6}" 2>&1 | tee "$OUT/check.log"
status=${PIPESTATUS[0]}
(nvidia-smi || echo "no nvidia-smi") > "$OUT/nvidia-smi-after.txt" 2>&1
exit "$status"
