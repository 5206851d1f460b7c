#!/usr/bin/env bash
# Re-resolve every dependency lock (requirements/*.txt, benchmarks/envs/*.txt), show what changed,
# and run the test suite on the new locks. Upgrades happen here, on purpose, and are tested.
#   scripts/lock.sh               newest versions the ranges admit, then the tests
#   scripts/lock.sh --no-upgrade  re-compile after editing a range, other pins kept, then the tests
#   scripts/lock.sh --no-test     only re-resolve and show the changes
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=(--upgrade)
run_tests=1
for arg in "$@"; do
  case "$arg" in
    --no-upgrade) upgrade=() ;;
    --no-test) run_tests=0 ;;
    *) echo "usage: $0 [--no-upgrade] [--no-test]" >&2; exit 2 ;;
  esac
done

tools=.venv-lock
if [ ! -x "$tools/bin/uv" ]; then
  python3 -m venv "$tools"
  "$tools/bin/python" -m pip install -q --require-hashes --no-deps -r requirements/lock-tools.txt
fi
old="$(mktemp -d)"
trap 'rm -rf "$old"' EXIT
locks=(requirements/dev.txt requirements/optimum.txt requirements/arm64.txt requirements/openvino.txt
       requirements/lock-tools.txt
       benchmarks/envs/genai.txt benchmarks/envs/llamacpp.txt benchmarks/envs/optimum.txt)
for lock in "${locks[@]}"; do
  mkdir -p "$old/$(dirname "$lock")"
  [ -f "$lock" ] && cp "$lock" "$old/$lock"
done

# CPython 3.11 on x86-64 Linux (glibc 2.35 tags: onnxruntime-qnn ships no older ones); torch's CPU
# build comes from /opt/wheels, where this machine kind keeps it.
compile() {
  local out="$1"; shift
  echo "locking $out" >&2
  "$tools/bin/uv" pip compile -q "$@" "${upgrade[@]}" --generate-hashes --find-links /opt/wheels \
    --python-version 3.11 --python-platform "${platform:-x86_64-manylinux_2_35}" \
    --custom-compile-command "bash scripts/lock.sh" -o "$out"
}
compile requirements/dev.txt pyproject.toml requirements/tools.in --extra build --extra test --extra olive --extra qnn
compile requirements/optimum.txt pyproject.toml requirements/tools.in --extra build --extra test --extra optimum
compile requirements/openvino.txt pyproject.toml requirements/tools.in --extra build --extra test --extra openvino \
  --override requirements/openvino-overrides.txt
compile requirements/lock-tools.txt requirements/lock-tools.in
# the runtime alone on aarch64 (scripts/arm64: run under qemu-user)
platform=aarch64-manylinux_2_28 compile requirements/arm64.txt pyproject.toml
for name in genai llamacpp optimum; do
  compile "benchmarks/envs/$name.txt" "benchmarks/envs/$name.in" requirements/tools.in
done

python3 - "$old" "${locks[@]}" <<'PY'
import re, sys
from pathlib import Path
old, locks = Path(sys.argv[1]), sys.argv[2:]
pin = re.compile(r"^([A-Za-z0-9_.-]+)==(\S+)", re.M)
changes = []
for lock in locks:
    before = dict(pin.findall((old / lock).read_text())) if (old / lock).exists() else {}
    after = dict(pin.findall(Path(lock).read_text()))
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            changes.append(f"  {lock:32} {name:28} {before.get(name, '-')} -> {after.get(name, '-')}")
print("changes:", *(changes or ["  none"]), sep="\n")
PY
if [ "$run_tests" = 1 ]; then
  bash scripts/test.sh
fi
