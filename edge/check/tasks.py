"""Whether an artifact still solves tasks its fp32 reference solves: pass rates per suite, side by side.

The suites ship in ``edge/data/tasks`` (one JSON list per suite): Python coding problems with unit
tests, and short English, Chinese and French tasks with checkable answers (arithmetic word problems,
extraction, translation with accepted variants). Items marked ``"full": true`` run only in the full
form. Both sides decode greedily from the same prompt token ids (the artifact's chat template,
thinking off): the artifact through the runtime's loop (`ChatSession` over `Generator`), the reference
with transformers' ``generate``. Code runs in a separate Python process, in a temporary directory,
with a time limit; never in the calling process. A coding item may carry a ``preamble`` (imports and
helpers its prompt shows) that runs before the reply's code.

A pass rate over a hundred-odd items moves by whole items: near-tied greedy choices decide single items
either way, so every comparison with the reference also gives the items gained and lost and a 95 %
interval of the paired difference (`paired_change`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edge import DATA_DIR, report
from qwen_edge.errors import QwenEdgeError

TASKS_DIR = DATA_DIR / "tasks"
CODE_SUFFIX = "Reply with only the code, in one ```python block."
CODE_STOP = "\n```\n"  # the end of the first fenced block: what follows is commentary both sides would pay for
MAX_NEW_TOKENS = {"code": 384, "answer": 128}
TIME_LIMIT_S = 10.0
RESAMPLES = 10_000  # bootstrap resamples of the items for the interval of a paired difference
_MEMORY_LIMIT = 1 << 30  # bytes of address space for a solution's process (POSIX)
# rendered prompt (a qwen_edge ChatPrompt: .ids), max new tokens, stop strings -> reply text (without the stop string)
GenerateFn = Callable[[Any, int, Sequence[str]], str]


class TaskCheckError(QwenEdgeError):
    """An artifact whose pass rate falls further below its reference's than the profile allows."""


@dataclass(frozen=True)
class Outcome:
    """One solution's run: passed, and why not (the last line of its error output, or the time limit)."""

    passed: bool
    detail: str = ""


def load_suites(full: bool = False) -> dict[str, list[dict]]:
    """The shipped suites by name (``chinese``, ``english``, ``french``, ``python``); the default form
    leaves out the items marked full."""
    suites = {}
    for path in sorted(TASKS_DIR.glob("*.json")):
        items = json.loads(path.read_text(encoding="utf-8"))
        suites[path.stem] = [item for item in items if full or not item.get("full")]
    return suites


def _limit_resources() -> None:  # runs in the child before exec
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT, _MEMORY_LIMIT))


def run_python(code: str, tests: str, time_limit: float = TIME_LIMIT_S) -> Outcome:
    """Run ``code`` then ``tests`` (asserts) in a fresh isolated interpreter, in a temporary directory
    that is removed afterwards; the process group is killed at ``time_limit`` seconds."""
    with tempfile.TemporaryDirectory(prefix="qwen-edge-task-") as tmp:
        program = os.path.join(tmp, "solution_test.py")
        with open(program, "w", encoding="utf-8") as f:
            f.write(f"{code}\n\n{tests}\n")
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", program],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, so anything it forks dies with it
            preexec_fn=_limit_resources if os.name == "posix" else None,
        )
        try:
            _, err = proc.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Outcome(False, f"time limit of {time_limit:g} s exceeded")
        finally:
            _kill(proc)
    if proc.returncode == 0:
        return Outcome(True)
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return Outcome(False, lines[-1] if lines else f"exit status {proc.returncode}")


def _kill(proc: subprocess.Popen) -> None:
    if os.name == "posix":
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    else:
        proc.kill()
    proc.wait()


_FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(reply: str, entry_point: str) -> str:
    """The code of a reply: the first fenced block defining ``entry_point`` (else the first block),
    or the whole reply when it has no fence."""
    blocks = _FENCE.findall(reply)
    if not blocks:
        return reply
    return next((b for b in blocks if re.search(rf"\bdef\s+{re.escape(entry_point)}\b", b)), blocks[0])


_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _to_float(token: str) -> float:
    if "," in token and "." in token:  # 1,234.5
        token = token.replace(",", "")
    elif "," in token:  # 2,50 (decimal comma) or 1,234 (thousands)
        parts = token.split(",")
        token = "".join(parts) if all(len(p) == 3 for p in parts[1:]) else "".join(parts[:-1]) + "." + parts[-1]
    return float(token)


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (decimal point or comma, thousands separators), or None."""
    found = _NUMBER.findall(text)
    return _to_float(found[-1]) if found else None


def normalize(text: str) -> str:
    """Casefolded NFKC text with punctuation and symbols dropped and whitespace collapsed, so accepted
    variants match whatever the model wraps them in."""
    text = unicodedata.normalize("NFKC", text).casefold().replace("’", "'")
    text = "".join(" " if unicodedata.category(c)[0] in "PSZ" and c not in "'@-" else c for c in text)
    return " ".join(text.split())


def check_answer(item: Mapping[str, Any], reply: str) -> bool:
    """Whether ``reply`` answers a text item: its last number equals ``number``, or it contains one of
    the ``accept`` variants and none of the ``reject`` ones (after `normalize`)."""
    if "number" in item:
        value = last_number(reply)
        return value is not None and abs(value - float(item["number"])) < 1e-6
    text = f" {normalize(reply)} "
    if any(normalize(r) in text for r in item.get("reject", ())):
        return False
    return any(normalize(a) in text for a in item["accept"])


def is_code(item: Mapping[str, Any]) -> bool:
    """Whether an item is a coding problem (graded by its unit tests) rather than a checkable answer."""
    return "tests" in item


def messages(item: Mapping[str, Any]) -> list[dict]:
    """The one-turn conversation an item asks."""
    text = f"{item['prompt']} {CODE_SUFFIX}" if is_code(item) else item["prompt"]
    return [{"role": "user", "content": text}]


def grade(item: Mapping[str, Any], reply: str) -> Outcome:
    """Whether a reply passes an item: a coding item's extracted code passes its tests, a text item's answer checks."""
    if is_code(item):
        code = extract_code(reply, item["entry_point"])
        return run_python(f"{item['preamble']}\n{code}" if item.get("preamble") else code, item["tests"])
    passed = check_answer(item, reply)
    return Outcome(passed, "" if passed else "wrong answer")


def artifact_generator(chat) -> GenerateFn:
    """Greedy replies from an artifact through the runtime's loop (a qwen_edge `ChatSession`)."""

    def generate(prompt, max_new_tokens: int, stop_strings: Sequence[str]) -> str:
        return chat.generate(prompt, max_new_tokens=max_new_tokens, stop_strings=stop_strings).read()

    return generate


def reference_replier(
    model, tokenizer, eos_token_ids: Sequence[int]
) -> Callable[[Sequence[int], int, Sequence[str]], list[int]]:
    """Greedy new token ids from a transformers CausalLM (plain argmax: no repetition penalty) after prompt
    ids, stopping at an eos id (not included) or once the reply, decoded with ``tokenizer`` (a
    `tokenizers.Tokenizer`), holds a stop string."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopText(StoppingCriteria):
        def __init__(self, start: int, stops: Sequence[str]):
            self.start, self.stops = start, stops

        def __call__(self, input_ids, scores, **kwargs):
            text = tokenizer.decode(input_ids[0, self.start :].tolist(), skip_special_tokens=True)
            return torch.tensor([any(s in text for s in self.stops)], dtype=torch.bool)

    eos = list(eos_token_ids)

    def reply(ids: Sequence[int], max_new_tokens: int, stop_strings: Sequence[str]) -> list[int]:
        inp = torch.tensor([list(ids)], dtype=torch.long)
        with torch.inference_mode():
            out = model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                do_sample=False,
                repetition_penalty=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos[0] if eos else None,
                stopping_criteria=StoppingCriteriaList([StopText(inp.shape[1], stop_strings)]),
            )
        new = out[0, inp.shape[1] :].tolist()
        return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]

    return reply


def reply_text(tokenizer, token_ids: Sequence[int], stop_strings: Sequence[str]) -> str:
    """A reply's text as the runtime's loop returns it: decoded without special tokens, cut at a stop string."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    cut = min((text.find(s) for s in stop_strings if s in text), default=len(text))
    return text[:cut]


def reference_generator(model, tokenizer, eos_token_ids: Sequence[int]) -> GenerateFn:
    """Greedy replies from a transformers CausalLM (`reference_replier`), as text cut like the runtime's."""
    reply = reference_replier(model, tokenizer, eos_token_ids)

    def generate(prompt, max_new_tokens: int, stop_strings: Sequence[str]) -> str:
        return reply_text(tokenizer, reply(prompt.ids, max_new_tokens, stop_strings), stop_strings)

    return generate


def run(
    sides: Mapping[str, GenerateFn],
    render: Callable[[list[dict]], Any],
    suites: Mapping[str, Sequence[Mapping]] | None = None,
) -> dict[str, Any]:
    """Generate every item's reply with each side (e.g. ``{"artifact": ..., "reference": ...}``) from
    the same rendered prompt (``render(messages)``) and grade it; pass rates per suite and overall, per
    side, and each item's outcome and reply."""
    suites = load_suites() if suites is None else suites
    if not any(suites.values()):
        raise TaskCheckError("no task items given")
    result: dict[str, Any] = {"suites": {}, "items": {}}
    totals = {side: 0 for side in sides}
    work = [(name, item) for name, items in suites.items() for item in items]
    for name, item in report.current().bar(work, desc="tasks"):
        prompt = render(messages(item))
        kind = "code" if is_code(item) else "answer"
        stops = (CODE_STOP,) if kind == "code" else ()
        entry = result["items"].setdefault(name, {})[item["id"]] = {}
        for side, generate in sides.items():
            reply = generate(prompt, MAX_NEW_TOKENS[kind], stops)
            outcome = grade(item, reply)
            entry[side] = {"passed": outcome.passed, "detail": outcome.detail, "reply": reply}
    n_total = len(work)
    for name, items in suites.items():
        if not items:
            continue
        row: dict[str, Any] = {"items": len(items)}
        for side in sides:
            passed = sum(result["items"][name][item["id"]][side]["passed"] for item in items)
            totals[side] += passed
            row[side] = passed / len(items)
        result["suites"][name] = row
    result["overall"] = {"items": n_total, **{side: totals[side] / n_total for side in sides}}
    return result


def check_drop(result: Mapping[str, Any], max_drop: float | None) -> None:
    """Raise TaskCheckError when the artifact's overall pass rate is more than ``max_drop`` below the reference's."""
    if max_drop is None:
        return
    overall = result["overall"]
    drop = overall["reference"] - overall["artifact"]
    if drop > max_drop + 1e-9:
        change = f" ({paired_change(result, 'artifact', 'reference')})" if result.get("items") else ""
        raise TaskCheckError(
            f"task pass rate {overall['artifact']:.3f} is {drop:.3f} below the fp32 reference's "
            f"{overall['reference']:.3f}{change}; the profile allows {max_drop}; use int8 weights, method "
            "'mixed' or 'hqq', or a smaller block_size in the recipe"
        )


def session(artifact):
    """The artifact's `ChatSession` the check generates with (made first, so a missing provider fails
    before the reference loads)."""
    from qwen_edge.chat import ChatSession
    from qwen_edge.generator import Generator

    return ChatSession(Generator(artifact))


def check(chat, reference_model, full: bool = False, max_drop: float | None = None) -> dict[str, Any]:
    """The task check a build runs (when its profile sets ``task_check``) and `qwen-edge eval --tasks`
    runs: the artifact (``chat``, from `session`) against ``reference_model`` on the shipped suites,
    then the allowed drop. ``result`` is attached to the error so a caller can still show the rates."""
    sides = {
        "artifact": artifact_generator(chat),
        "reference": reference_generator(reference_model, chat.generator.tokenizer, chat.generator.eos_token_ids),
    }
    result = run(sides, lambda m: chat.prompt(m, enable_thinking=False), load_suites(full))
    result["form"] = "full" if full else "default"
    result["change"] = asdict(paired_change(result, "artifact", "reference"))
    try:
        check_drop(result, max_drop)
    except TaskCheckError as e:
        e.result = result
        raise
    return result


@dataclass(frozen=True)
class Change:
    """A side's pass rate minus the reference's over the same items (a fraction), the items it gained
    (passes, the reference fails) and lost, and a 95 % interval of the difference."""

    change: float
    gained: int
    lost: int
    low: float
    high: float

    def __str__(self) -> str:
        return (
            f"{100 * self.change:+.1f} points (95 % interval {100 * self.low:+.1f} to {100 * self.high:+.1f}), "
            f"+{self.gained} / -{self.lost} items"
        )


def paired_change(result: Mapping[str, Any], side: str, reference: str) -> Change:
    """`side`'s pass rate minus `reference`'s in a `run` result, with a 95 % percentile interval from
    resampling the items with replacement (both sides' outcomes of an item stay together; fixed seed)."""
    outcomes = [o for items in result["items"].values() for o in items.values()]
    if not outcomes:
        raise TaskCheckError("no task items to compare")
    diff = np.array([int(o[side]["passed"]) - int(o[reference]["passed"]) for o in outcomes], dtype=np.int8)
    picks = np.random.default_rng(0).integers(0, len(diff), size=(RESAMPLES, len(diff)), dtype=np.int32)
    low, high = np.percentile(diff[picks].mean(axis=1), [2.5, 97.5])
    return Change(float(diff.mean()), int((diff > 0).sum()), int((diff < 0).sum()), float(low), float(high))


def format_rates(result: Mapping[str, Any]) -> list[str]:
    """One line per suite and one overall: items, the artifact's and the reference's pass rates; then the
    artifact's change against the reference (`paired_change`)."""
    rows = [*result["suites"].items(), ("overall", result["overall"])]
    lines = [
        f"{name:<10} {row['items']:>3} items  artifact {row['artifact']:.1%}  reference {row['reference']:.1%}"
        for name, row in rows
    ]
    return [*lines, f"artifact - reference: {paired_change(result, 'artifact', 'reference')}"]
