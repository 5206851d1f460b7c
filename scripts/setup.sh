#!/usr/bin/env bash
# Create a virtual environment with qwen-edge installed editable (CPU torch pinned to 2.13.0).
#   scripts/setup.sh [EXTRAS] [VENV]   default: build,test into .venv
# optimum-onnx pins transformers <4.58, so the [optimum] extra goes into its own venv
# (scripts/test.sh uses .venv-optimum for it).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-build,test}"
venv="${2:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[$extras]"
