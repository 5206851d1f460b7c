#!/usr/bin/env bash
# Create (or bring up to date) a virtual environment from a checked-in lock and install qwen-edge
# into it editable.
#   scripts/setup.sh [LOCK] [VENV]   LOCK: dev (default; [build,test,olive,qnn] into .venv) or
#                                    optimum ([build,test,optimum] into .venv-optimum) or
#                                    openvino ([build,test,openvino] into .venv-openvino)
# Every package, pip and the build backend included, comes from requirements/LOCK.txt with its
# sha256 (pip --require-hashes); re-resolve with scripts/lock.sh. A venv whose stamp matches its
# lock is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
lock="${1:-dev}"
req="requirements/$lock.txt"
if [ ! -f "$req" ]; then
  echo "setup.sh: no lock $req (one of: $(cd requirements && ls *.txt | grep -v lock-tools | sed 's/\.txt$//' | tr '\n' ' '))" >&2
  exit 2
fi
case "$lock" in optimum | openvino) default_venv=".venv-$lock" ;; *) default_venv=.venv ;; esac
venv="${2:-$default_venv}"
stamp="$venv/.lock.sha256"
want="$(cat "$req" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "setup.sh: installing $req into $venv" >&2
"$venv/bin/python" -m pip install -q --require-hashes --no-deps -r "$req"
# setuptools warns at length about the data folders under edge/ (package data, not packages): show
# its output only when the install fails
log="$(mktemp)"
if ! "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1; then
  cat "$log" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
# onnxruntime-openvino provides the onnxruntime module the base install names by its distribution
if [ "$lock" = openvino ]; then
  problems="$("$venv/bin/python" -m pip check | grep -v "requires onnxruntime, which is not installed" || true)"
  if [ -n "$problems" ]; then echo "$problems" >&2; exit 1; fi
else
  "$venv/bin/python" -m pip check >/dev/null
fi
echo "$want" > "$stamp"
