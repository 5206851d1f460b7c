"""Task pass rates in a benchmark run: every system answers the shipped task suites (``edge/data/tasks``)
from the same prompt ids, greedily, in its own process and runtime (the anchors' ``replies`` subcommand),
and every reply is decoded with the model's tokenizer, cut at the first stop string and graded by the
task check's own code (``edge.check.tasks``), so the systems differ only in the tokens they produce.

The transformers fp32 replies are the reference column. Every side's replies are cached per request
(`cached_replies`; a system's by what its replies depend on, `run.py`'s `_replies_key`), so a run that adds a
suite or a system computes only the new replies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Mapping

from edge.check import tasks


def requests(tokenizer, eos: list[int], suites: Mapping[str, list]) -> dict:
    """The requests file's content (``{"eos", "items"}``, items named ``suite/id``) for task suites
    (`edge.check.tasks.load_suites`' form)."""
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
    return {"eos": eos, "items": items}


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


def _key(eos: list[int], request: Mapping) -> str:
    """A request's cache key: its prompt ids, limit and stop strings, and the eos ids."""
    return hashlib.sha256(json.dumps([eos, request], sort_keys=True).encode()).hexdigest()


def cached_replies(reqs: dict, cache: Path, replies_of: Callable[[dict, Callable[[dict], None]], dict]) -> dict:
    """The replies to ``reqs`` from ``cache`` (a JSON file of request key -> new token ids), with those it
    lacks asked of ``replies_of(requests holding only them, keep)`` (-> their replies by name) and added to
    it. ``replies_of`` hands ``keep`` the replies it has when it fails, so that a re-run asks only for the rest."""
    known = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    keys = {name: _key(reqs["eos"], r) for name, r in reqs["items"].items()}
    missing = {name: r for name, r in reqs["items"].items() if keys[name] not in known}

    def keep(got: dict) -> None:
        known.update({keys[name]: ids for name, ids in got.items() if name in missing})
        tmp = cache.with_name(cache.name + ".partial")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        tmp.replace(cache)

    if missing:
        keep(replies_of({"eos": reqs["eos"], "items": missing}, keep))
    return {name: known[keys[name]] for name in reqs["items"]}
