"""Constrained decoding on a real artifact: JSON validity without and with the schema, and the per-token cost.

    python benchmarks/constrained.py ARTIFACT [--reps 3] [--out results/constrained-DATE.json]

For each of the 20 prompt x schema cases the chat reply is generated greedily twice, interleaved:
free (the share of replies that `json.loads` and validate against the schema) and held to the schema
(qwen_edge.constrain). The overhead is decode time per token with the constraint against without, on
the same prompts in the same run, and the time the loop waited for the mask (what was not hidden
behind the model's forward pass). The cases are also the real-model test's (tests/test_constrained_real.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "email": {"type": "string"}},
    "required": ["name", "age", "email"],
    "additionalProperties": False,
}
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "country": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
    },
    "required": ["city", "country", "population"],
    "additionalProperties": False,
}
TODO = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "priority": {"enum": ["low", "medium", "high"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "done": {"type": "boolean"},
    },
    "required": ["title", "priority", "tags", "done"],
    "additionalProperties": False,
}
FUNCTION = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z_][a-z0-9_]*$"},
        "args": {"type": "array", "items": {"type": "string"}, "maxItems": 6},
        "returns": {"type": "string"},
    },
    "required": ["name", "args", "returns"],
    "additionalProperties": False,
}
REVIEW = {
    "type": "object",
    "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "summary": {"type": "string", "maxLength": 200},
    },
    "required": ["rating", "sentiment", "summary"],
    "additionalProperties": False,
}
CASES = [
    (PERSON, "Invent a fictional person and give their name, age and email as JSON."),
    (PERSON, "Return JSON for a software engineer named Ana who is 31, with an email address."),
    (PERSON, "Describe the user 'bob', aged 45, as a JSON object with name, age and email."),
    (PERSON, "Give me a sample customer record in JSON."),
    (CITY, "Give the capital of France, its country and population as JSON."),
    (CITY, "What is the largest city in Japan? Answer as JSON with city, country and population."),
    (CITY, "JSON for Nairobi: city, country, population."),
    (CITY, "Describe a big city in Brazil as JSON."),
    (TODO, "Create a to-do item for buying groceries as JSON."),
    (TODO, "Make a high-priority task to fix the login bug, tagged backend and urgent, as JSON."),
    (TODO, "A finished low-priority chore as a JSON to-do item."),
    (TODO, "Turn 'prepare the quarterly report' into a JSON task."),
    (FUNCTION, "Describe a Python function that adds two numbers as JSON: name, args, returns."),
    (FUNCTION, "JSON signature for a function that reads a file and returns its lines."),
    (FUNCTION, "Describe the function is_palindrome(s) as JSON."),
    (FUNCTION, "Give a JSON description of a function that sorts a list of users by age."),
    (REVIEW, "Review this: 'The battery lasts two days and the screen is great.' Answer as JSON."),
    (REVIEW, "Rate the sentence 'Terrible service, never again.' as a JSON review."),
    (REVIEW, "Summarize 'It works, nothing special.' as a JSON review with rating and sentiment."),
    (REVIEW, "Give a JSON review of a coffee shop you would give four stars."),
]
# tool calls: (user message, the function the call must name)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "the city name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. 2 * (3 + 4)"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "web_search",
            "description": "Search the web",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "max_results": {"type": "integer", "minimum": 1}},
                "required": ["query"],
            },
        },
    },
]
TOOL_CASES = [
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it raining in Tokyo? Use celsius.", "get_weather"),
    ("What is 1234 * 5678?", "calculator"),
    ("Compute (17 + 25) / 3 for me.", "calculator"),
    ("Search the web for the latest onnxruntime release notes.", "web_search"),
    ("Find news articles about small language models on phones.", "web_search"),
]
# fill-in-the-middle: (prefix, suffix, how the infill must start); the demo model derails on some prefixes,
# e.g. one ending in `return ` (its infill then ignores the prefix), so these are ones it completes
FIM_CASES = [
    ("def add(a, b):\n    ", "\n\n\nprint(add(2, 3))\n", "return a + b"),
    ("import math\n\n\ndef circle_area(r):\n    return math.", " * r ** 2\n", "pi"),
    ('def greet(name):\n    print(f"Hello, {', '}!")\n', "name}"),
    ("def factorial(n):\n    if n == 0:\n        return 1\n    return n * ", "\n", "factorial(n - 1)"),
]


def valid(text: str, schema: dict) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    from qwen_edge.artifact import Artifact
    from qwen_edge.chat import ChatSession
    from qwen_edge.constrain import Constraint, Grammar
    from qwen_edge.generator import Generator
    from qwen_edge.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--reps", type=int, default=1, help="passes over the cases (interleaved free/constrained)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    gen = Generator(Artifact.open(args.artifact, verify="size"), max_length=1024)
    chat = ChatSession(gen)
    t = time.perf_counter()
    Constraint(Grammar.json_object(), gen)  # builds the cached llguidance vocabulary
    vocab_s = time.perf_counter() - t
    free_ok = held_ok = 0
    per_token = {"free": [], "constrained": []}
    waits = []
    for rep in range(args.reps):
        for schema, user in CASES:
            prompt = chat.prompt([{"role": "user", "content": user}])
            for mode in ("free", "constrained") if rep % 2 == 0 else ("constrained", "free"):
                gen.reset()  # the same prefill work for both
                constraint = None
                if mode == "constrained":
                    constraint = Constraint(Grammar.json_schema(schema), gen)
                    inner = constraint.mask

                    def timed(inner=inner):
                        t0 = time.perf_counter()
                        m = inner()
                        waits.append(time.perf_counter() - t0)
                        return m

                    constraint.mask = timed
                out = gen.generate(prompt.ids, SamplingParams(), args.max_new_tokens, constraint=constraint)
                text = out.read()
                if out.stats.new_tokens > 1:
                    per_token[mode].append(out.stats.decode_s / (out.stats.new_tokens - 1))
                print(f"{mode:11} {out.stats.new_tokens:4} tokens  {text[:60]!r}", file=sys.stderr, flush=True)
                if rep == 0:
                    ok = valid(text, schema)
                    free_ok += ok and mode == "free"
                    held_ok += ok and mode == "constrained"
    free_ms = statistics.median(per_token["free"]) * 1000
    held_ms = statistics.median(per_token["constrained"]) * 1000
    result = {
        "artifact": str(args.artifact),
        "machine": platform.node(),
        "loadavg": os.getloadavg(),
        "cases": len(CASES),
        "reps": args.reps,
        "valid_free": free_ok / len(CASES),
        "valid_constrained": held_ok / len(CASES),
        "decode_ms_per_token_free": round(free_ms, 2),
        "decode_ms_per_token_constrained": round(held_ms, 2),
        "overhead": round(held_ms / free_ms - 1, 4),
        "mask_wait_ms_median": round(statistics.median(waits) * 1000, 3),
        "mask_wait_ms_mean": round(statistics.mean(waits) * 1000, 3),
        "vocabulary_build_s": round(vocab_s, 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
