#!/usr/bin/env bash
# Create .venv with qwen-edge and its build and test extras (CPU torch pinned to 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[build,test]'
