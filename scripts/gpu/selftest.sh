#!/usr/bin/env bash
# Verifies the `gpu` cargo feature on a machine with an NVIDIA GPU.
#
# Two halves, because GPU machines here have CUDA but no Rust toolchain and no network:
#
#   ./scripts/gpu/selftest.sh prepare     # here: Rust static library + FAISS source + OpenBLAS
#   ./scripts/gpu/selftest.sh run [N DIM QUERIES]
#                                         # there: builds FAISS with CUDA (sm_90 by default,
#                                         # CUDA_ARCHS to change), links, runs the self-test
#
# `prepare` writes everything into .gpu/ (ignored by git; about 40 MB). The self-test builds
# Flat and IVF shards from synthetic clustered vectors, runs the same queries on the CPU
# and the GPU path, checks they agree, that filtered searches stay exact and that deletes
# reach the GPU copy, and prints a table (src/vector/gpu.rs: selftest).
set -euo pipefail
cd "$(dirname "$0")/../.."
GPU_DIR=.gpu

prepare() {
    mkdir -p "$GPU_DIR"
    # The static library: engram with FAISS linked dynamically (resolved on the GPU machine).
    CARGO_TARGET_DIR=target/gpu cargo rustc --release --lib --no-default-features --features gpu \
        --crate-type staticlib -- --print native-static-libs 2>&1 | tee "$GPU_DIR/rustc.log" | tail -3
    grep -o 'native-static-libs: .*' "$GPU_DIR/rustc.log" | tail -1 | cut -d' ' -f2- >"$GPU_DIR/native-libs.txt"
    strip --strip-debug -o "$GPU_DIR/libengram.a" target/gpu/release/libengram.a
    gzip -f -1 "$GPU_DIR/libengram.a"
    local faiss_src
    faiss_src=$(ls -d ~/.cargo/registry/src/*/faiss-sys-0.7.0 | head -1)
    tar -C "$faiss_src" -czf "$GPU_DIR/faiss-src.tar.gz" faiss
    (cd "$GPU_DIR" && apt-get download libopenblas0-pthread libgfortran5 libquadmath0)
    du -sh "$GPU_DIR"
}

run() {
    local n=${1:-1000000} dim=${2:-384} nq=${3:-200}
    local work=/tmp/engram-gpu
    mkdir -p "$work/blas"
    for d in "$GPU_DIR"/*.deb; do dpkg -x "$d" "$work/blas"; done
    local blas_dir="$work/blas/usr/lib/x86_64-linux-gnu"
    ln -sf openblas-pthread/libopenblas.so.0 "$blas_dir/libopenblas.so"
    export LD_LIBRARY_PATH="$blas_dir:$blas_dir/openblas-pthread:${LD_LIBRARY_PATH:-}"
    tar -C "$work" -xzf "$GPU_DIR/faiss-src.tar.gz"
    nvcc --version | tail -2
    local started=$SECONDS
    cmake -S "$work/faiss" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DFAISS_ENABLE_GPU=ON -DFAISS_ENABLE_C_API=ON -DFAISS_ENABLE_PYTHON=OFF -DBUILD_TESTING=OFF \
        -DBUILD_SHARED_LIBS=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90}" \
        -DBLA_VENDOR=OpenBLAS -DCMAKE_LIBRARY_PATH="$blas_dir" >"$work/cmake.log" 2>&1 \
        || { tail -40 "$work/cmake.log"; exit 1; }
    ninja -C "$work/build" -j"$(nproc)" faiss_c >"$work/ninja.log" 2>&1 \
        || { grep -B2 -A12 -m3 'error' "$work/ninja.log"; exit 1; }
    echo "FAISS with CUDA built in $((SECONDS - started)) s"
    gunzip -c "$GPU_DIR/libengram.a.gz" >"$work/libengram.a"
    local cuda=${CUDA_HOME:-/usr/local/cuda}
    # shellcheck disable=SC2046
    g++ -O2 -o "$work/selftest" scripts/gpu/selftest.c "$work/libengram.a" \
        "$work/build/c_api/libfaiss_c.a" "$work/build/faiss/libfaiss.a" \
        -L"$cuda/lib64" -L"$cuda/lib64/stubs" -lcudart -lcublas -L"$blas_dir" -lopenblas -fopenmp \
        $(sed 's/-lfaiss_c//' "$GPU_DIR/native-libs.txt")
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$work/selftest" "$n" "$dim" "$nq"
}

case "${1:-}" in
prepare) prepare ;;
run) shift; run "$@" ;;
*) sed -n '2,17p' "$0"; exit 2 ;;
esac
