"""Reference side of the JS/Python comparison: run the Python qwen_edge loop and print JSON.

Reads {"artifact": path, "max_length": int|null, "cases": [{"messages": [...]} or {"text": "..."},
"max_new_tokens": int}]} on stdin; prints [{"prompt_ids", "token_ids", "text", "finish_reason"}].
Messages are rendered with the artifact's chat template (add_generation_prompt); text is encoded raw.
Generation is greedy.
"""

from __future__ import annotations

import json
import sys

from qwen_edge.artifact import Artifact
from qwen_edge.chat import ChatTemplate
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams


def main() -> None:
    request = json.load(sys.stdin)
    artifact = Artifact.open(request["artifact"], verify="size")
    gen = Generator(artifact, max_length=request.get("max_length"))
    template = None
    results = []
    for case in request["cases"]:
        if "messages" in case:
            template = template or ChatTemplate.from_tokenizer_config(artifact.tokenizer_config_path)
            prompt = template.render(case["messages"], add_generation_prompt=True)
        else:
            prompt = case["text"]
        ids = gen.encode(prompt)
        gen.reset()
        g = gen.generate(ids, SamplingParams(), case["max_new_tokens"])
        text = g.read()
        results.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "token_ids": g.token_ids,
                "text": text,
                "finish_reason": g.finish_reason,
            }
        )
    json.dump(results, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
