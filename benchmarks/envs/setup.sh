#!/usr/bin/env bash
# Create (or bring up to date) the benchmark anchor venv benchmarks/envs/NAME from NAME.txt.
# Idempotent: a venv whose stamp matches its requirements file is left as it is.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${1:-}"
req="$here/$name.txt"
if [[ -z "$name" || ! -f "$req" ]]; then
  echo "usage: $0 NAME   (NAME is one of: $(cd "$here" && ls *.txt | sed 's/\.txt$//' | tr '\n' ' '))" >&2
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
"$venv/bin/python" -m pip install --upgrade pip >/dev/null
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$venv/bin/python" -m pip install -r "$req"
echo "$want" > "$stamp"
echo "$venv ready"
