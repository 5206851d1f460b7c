#!/usr/bin/env bash
# Create (or bring up to date) the benchmark anchor venv benchmarks/envs/NAME from its lock NAME.txt
# (compiled from NAME.in by scripts/lock.sh; every package with its sha256).
# Idempotent: a venv whose stamp matches its lock is left as it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:-}"
req="$here/$name.txt"
if [[ -z "$name" || ! -f "$req" ]]; then
  echo "usage: $0 NAME   (NAME is one of: $(cd "$here" && ls *.in | sed 's/\.in$//' | tr '\n' ' '))" >&2
  exit 2
fi
venv="$here/$name"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  echo "$venv is up to date"
  exit 0
fi
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
# llama.cpp's native build (-march=native) segfaults in ggml's AMX matmul on Intel CPUs with AMX:
# name the SIMD extensions this CPU has (AVX-512 and its VNNI/BF16 only where present: an AMD EPYC
# without them dies of an illegal instruction otherwise) and turn every AMX kernel off.
if [[ "$name" == llamacpp && -z "${CMAKE_ARGS:-}" ]]; then
  cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  has() { [[ "$cpu_flags" == *" $1 "* ]] && echo ON || echo OFF; }
  export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$venv/bin/python" -m pip install --require-hashes -r "$req"
[[ "$name" == llamacpp ]] && echo "$CMAKE_ARGS" > "$venv/.cmake_args"
echo "$want" > "$stamp"
echo "$venv ready"
