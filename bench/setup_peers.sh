#!/usr/bin/env bash
# Build/install miaotui's benchmark peers into a cache OUTSIDE the repo.
#
#   bench/setup_peers.sh            # everything (llama.cpp tools + peer venv)
#   bench/setup_peers.sh llama      # only the llama.cpp native tools
#   bench/setup_peers.sh venv       # only the peer Python venv
#   bench/setup_peers.sh llama-bg   # start the llama.cpp build in the background, log in the cache
#
# Cache: ${MIAOTUI_PEERS:-$HOME/.cache/miaotui/peers}
#   src/llama_cpp_python-0.3.36/vendor/llama.cpp   sources (from the PyPI sdist)
#   llama.cpp-build/                               cmake build dir
#   bin/                                           llama-bench, llama-server, ... (copied)
#   build-llama.log                                build log (appended)
#   venv/                                          torch 2.13.0+cpu, transformers, ctranslate2, gguf
#   models/                                        converted models (HF export, CTranslate2 int8)
#
# Idempotent: every step is skipped when its result already exists. CPU only, -j2.
set -uo pipefail

CACHE="${MIAOTUI_PEERS:-$HOME/.cache/miaotui/peers}"
LCP_VERSION="0.3.36"
TORCH_VERSION="2.13.0"
JOBS="${JOBS:-2}"
TARGETS=(llama-bench llama-server llama-perplexity llama-batched-bench llama-cli llama-simple llama-lookup)

mkdir -p "$CACHE/src" "$CACHE/bin" "$CACHE/models"
log() { printf '[setup_peers] %s\n' "$*" >&2; }

case "$CACHE" in
/work/main | /work/main/*)
    log "refusing to install into the repo ($CACHE): set MIAOTUI_PEERS elsewhere"
    exit 2
    ;;
esac

build_llama() {
    local src="$CACHE/src/llama_cpp_python-$LCP_VERSION"
    local lsrc="$src/vendor/llama.cpp"
    local bdir="$CACHE/llama.cpp-build"
    local missing=()
    for t in "${TARGETS[@]}"; do [ -x "$CACHE/bin/$t" ] || missing+=("$t"); done
    if [ ${#missing[@]} -eq 0 ]; then
        log "llama.cpp tools already built in $CACHE/bin"
        return 0
    fi
    if [ ! -f "$lsrc/CMakeLists.txt" ]; then
        local sdist="$CACHE/src/llama_cpp_python-$LCP_VERSION.tar.gz"
        if [ ! -f "$sdist" ]; then
            log "downloading llama-cpp-python==$LCP_VERSION sdist"
            pip download --no-deps --no-binary :all: "llama-cpp-python==$LCP_VERSION" \
                -d "$CACHE/src" || return 1
        fi
        tar -xzf "$sdist" -C "$CACHE/src" || return 1
    fi
    if [ ! -f "$bdir/CMakeCache.txt" ]; then
        # No network: no prebuilt web UI download, no npm UI build, no HTTPS. Static binaries so
        # that the copies in bin/ are self-contained.
        log "configuring llama.cpp (CPU, Release, GGML_NATIVE=ON)"
        cmake -S "$lsrc" -B "$bdir" \
            -DCMAKE_BUILD_TYPE=Release \
            -DGGML_NATIVE=ON \
            -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
            -DBUILD_SHARED_LIBS=OFF \
            -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
            -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
            -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF || return 1
    fi
    # One target at a time so that a failure keeps the others; they share libggml/libllama,
    # which is compiled once by the first.
    local rc=0
    for t in "${missing[@]}"; do
        log "building $t (-j$JOBS)"
        if cmake --build "$bdir" --config Release -j"$JOBS" --target "$t"; then
            cp -f "$bdir/bin/$t" "$CACHE/bin/$t" && log "ok: $CACHE/bin/$t"
        else
            log "FAILED: $t (the others are kept)"
            rc=1
        fi
    done
    return $rc
}

build_venv() {
    local venv="$CACHE/venv"
    if [ -f "$venv/.installed" ]; then
        log "peer venv already installed: $venv"
        return 0
    fi
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" || return 1
    local py="$venv/bin/python"
    "$py" -m pip install -q --upgrade pip || true
    # torch first, pinned: the CPU wheel lies in /opt/wheels (pip's find-links). An unpinned torch
    # would pull a multi-GB CUDA build.
    "$py" -m pip install -q "torch==$TORCH_VERSION" || return 1
    "$py" -c "import torch, sys; v=torch.__version__; print('torch', v); sys.exit(0 if '+cpu' in v or not torch.version.cuda else 1)" || {
        log "torch in the peer venv is not a CPU build"
        return 1
    }
    # Same transformers as the main .venv (5.23.0); ctranslate2 4.8.x.
    "$py" -m pip install -q "torch==$TORCH_VERSION" "transformers==5.23.0" "ctranslate2>=4.8,<4.9" \
        gguf numpy sentencepiece tokenizers safetensors accelerate psutil || return 1
    "$py" -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|ctranslate2|gguf|numpy|tokenizers) ' >&2
    touch "$venv/.installed"
}

what="${1:-all}"
case "$what" in
llama) build_llama ;;
llama-bg)
    nohup "$0" llama >>"$CACHE/build-llama.log" 2>&1 &
    log "llama.cpp build started in the background (pid $!), log: $CACHE/build-llama.log"
    ;;
venv) build_venv ;;
all)
    # The llama.cpp build (10-40 min) runs in the background while the venv installs.
    log "building llama.cpp in the background, log: $CACHE/build-llama.log"
    build_llama >>"$CACHE/build-llama.log" 2>&1 &
    llama_pid=$!
    rc=0
    build_venv || rc=1
    wait "$llama_pid" || {
        log "llama.cpp: some targets failed, see $CACHE/build-llama.log"
        rc=1
    }
    ls "$CACHE/bin" >&2
    exit $rc
    ;;
*)
    echo "usage: $0 [all|llama|llama-bg|venv]" >&2
    exit 2
    ;;
esac
