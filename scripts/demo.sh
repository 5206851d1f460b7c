#!/usr/bin/env bash
# Set up, build the default demo artifact (Qwen2.5-Coder-0.5B-Instruct, int4) offline, and answer a prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/qwen-edge build demo --out artifacts/demo
.venv/bin/qwen-edge run artifacts/demo "${1:-Write a Python function that checks whether a string is a palindrome.}"
