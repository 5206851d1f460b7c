"""qwen-edge side of the fidelity contract: every position's logits of token sequences -> float32 npz.

Runs in the project venv. Speed is measured with the user-facing `qwen-edge bench`, not here.

    python benchmarks/anchors/qwen_edge_anchor.py logits --model ARTIFACT --ids IDS.json --out OUT.npz
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common.add_logits_args(sub.add_parser("logits"), "artifact directory written by `qwen-edge build`")
    args = parser.parse_args(argv)
    from edge.check.fidelity import scorer
    from qwen_edge.artifact import Artifact
    from qwen_edge.errors import QwenEdgeError

    try:
        result = common.write_logits(args.ids, args.out, scorer(Artifact.open(args.model, verify="size")))
    except QwenEdgeError as e:
        common.fail(str(e))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
