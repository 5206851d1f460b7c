#!/usr/bin/env bash
# Set up and run the default test suite; extra arguments go to pytest (e.g. -m real_model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
