#!/usr/bin/env bash
# Set up and run the default test suites (Python, then the JavaScript runtime's); extra arguments go to pytest
# (e.g. -m real_model, which runs only the Python real-model tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then
  (cd runtimes/js && npm ci --no-audit --no-fund --loglevel=error && QWEN_EDGE_PYTHON="$PWD/../../.venv/bin/python" npm test)
fi
exec .venv/bin/python -m pytest -q "$@"
