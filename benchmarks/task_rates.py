"""Task pass rates in a benchmark run: every system answers the shipped task suites (``edge/data/tasks``)
from the same prompt ids, greedily, in its own process and runtime (the anchors' ``replies`` subcommand),
and every reply is decoded with the model's tokenizer, cut at the first stop string and graded by the
task check's own code (``edge.check.tasks``), so the systems differ only in the tokens they produce.

The transformers fp32 replies are the reference column; they are cached per model and request set.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

from edge.check import tasks


def requests(tokenizer, eos: list[int], full: bool = False) -> tuple[dict, dict]:
    """The requests file's content (``{"eos", "items"}``, items named ``suite/id``) and the suites it came from."""
    suites = tasks.load_suites(full)
    items = {}
    for name, suite in suites.items():
        for item in suite:
            kind = "code" if tasks.is_code(item) else "answer"
            ids = tokenizer.apply_chat_template(tasks.messages(item), add_generation_prompt=True, tokenize=True)
            items[f"{name}/{item['id']}"] = {
                "ids": list(ids["input_ids"] if isinstance(ids, Mapping) else ids),
                "max_new_tokens": tasks.MAX_NEW_TOKENS[kind],
                "stops": [tasks.CODE_STOP] if kind == "code" else [],
            }
    return {"eos": eos, "items": items}, suites


def grade(suites: dict, replies: Mapping[str, Mapping[str, list[int]]], tokenizer) -> dict:
    """`edge.check.tasks.run`'s result over the systems' replies (``{system: {item name: new token ids}}``);
    `tokenizer` is a `tokenizers.Tokenizer`."""
    # the "prompt" each side gets is the item's request name: its reply was generated in the anchor
    names = {
        json.dumps(tasks.messages(item)): f"{suite}/{item['id']}" for suite, items in suites.items() for item in items
    }

    def side(system: str) -> tasks.GenerateFn:
        def generate(name, max_new_tokens, stop_strings):
            return tasks.reply_text(tokenizer, replies[system][name], stop_strings)

        return generate

    return tasks.run({s: side(s) for s in replies}, lambda messages: names[json.dumps(messages)], suites)


def digest(reqs: dict) -> str:
    """A short hash of a request set (the reference's cache key)."""
    return hashlib.sha256(json.dumps(reqs, sort_keys=True).encode()).hexdigest()[:12]


def collect(system: str, reqs_path: Path, out: Path, command: Callable[[Path, Path], list], run_json) -> dict:
    """One system's replies: its anchor's ``replies`` subcommand, in a fresh process (`run_json`)."""
    run_json(command(reqs_path, out), f"task replies of {system}")
    return json.loads(out.read_text(encoding="utf-8"))
