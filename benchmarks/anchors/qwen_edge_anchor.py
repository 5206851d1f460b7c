"""qwen-edge side of the fidelity and task contracts: every position's logits of token sequences ->
float32 npz; greedy replies to task requests through the runtime's loop -> their new token ids.

Runs in the project venv. Speed is measured with the user-facing `qwen-edge bench`, not here.

    python benchmarks/anchors/qwen_edge_anchor.py logits --model ARTIFACT --ids IDS.json --out OUT.npz
    python benchmarks/anchors/qwen_edge_anchor.py replies --model ARTIFACT --requests REQ.json --out OUT.json
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
    common.add_replies_args(sub.add_parser("replies"), "artifact directory written by `qwen-edge build`")
    args = parser.parse_args(argv)
    from qwen_edge.artifact import Artifact
    from qwen_edge.errors import QwenEdgeError

    try:
        artifact = Artifact.open(args.model, verify="size")
        if args.cmd == "logits":
            from edge.check.fidelity import scorer

            result = common.write_logits(args.ids, args.out, scorer(artifact))
        else:
            result = common.write_replies(args.requests, args.out, _replier(artifact))
    except QwenEdgeError as e:
        common.fail(str(e))
    print(json.dumps(result), flush=True)


def _replier(artifact):
    """Greedy replies through the runtime's loop (`Generator.generate`, its default greedy sampling)."""
    from qwen_edge.generator import Generator

    generator = Generator(artifact)

    def reply_of(ids, max_new_tokens, stops, eos):
        generation = generator.generate(ids, max_new_tokens=max_new_tokens, stop_strings=stops, stop_token_ids=eos)
        generation.read()
        return generation.token_ids

    return reply_of


if __name__ == "__main__":
    main()
