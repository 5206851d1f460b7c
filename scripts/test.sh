#!/usr/bin/env bash
# Set up (from the locks in requirements/) and run the default test suites; extra arguments go to pytest in .venv only (e.g. -m real_model,
# which runs only the Python real-model tests).
# Lint and format checks (ruff) first. Without arguments: the JavaScript runtime's tests, the Python suite in .venv (with the Olive and QNN
# extras), then the Optimum backend's tests in .venv-optimum (optimum-onnx needs transformers <4.58).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
# The browser tests drive Debian's Chromium (never a browser download): installed when missing.
if [ ! -x /usr/bin/chromium ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
(cd runtimes/js && npm ci --no-audit --no-fund --loglevel=error && QWEN_EDGE_PYTHON="$PWD/../../.venv/bin/python" npm test)
.venv/bin/python -m pytest -q
bash scripts/setup.sh optimum
exec .venv-optimum/bin/python -m pytest -q tests/test_backend_optimum.py
