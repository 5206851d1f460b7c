"""Build the tiny random Qwen artifacts the JS runtime tests run on (tests/tiny_models.py, `qwen-edge build`).

Usage: python make_tiny_artifact.py OUT_DIR  -> prints a JSON object {name: artifact path}.
The artifacts are the conformance suite's native ones (tests/conformance/make_conformance.py), built
through the CLI from recipe files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "conformance"))

from make_conformance import ARTIFACTS, build_artifacts  # noqa: E402

VARIANTS = ("qwen2-fp32", "qwen3-int4")  # native fp32 Qwen2 (untied), native int4 Qwen3 (tied)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    built = build_artifacts(out, {name: ARTIFACTS[name] for name in VARIANTS})
    print(json.dumps({name: str(path) for name, path in built.items()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
