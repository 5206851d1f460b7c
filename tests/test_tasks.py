"""The task-accuracy check (edge.check.tasks): the sandboxed code runner, answer checking, the shipped
suites, and the report an artifact and its fp32 reference get, on tiny models."""

from __future__ import annotations

import json
import os
import time

import pytest

from edge.check import tasks
from qwen_edge import cli
from qwen_edge.artifact import Artifact


@pytest.fixture(scope="module")
def suites():
    return tasks.load_suites(full=True)


def test_shipped_suites_are_small_by_default_and_well_formed(suites):
    default = tasks.load_suites()
    assert set(default) == {"python", "english", "chinese", "french"}
    assert len(default["python"]) == 10 and sum(len(default[n]) for n in ("english", "chinese", "french")) == 12
    assert all(len(suites[n]) > len(default[n]) for n in suites)
    ids = [item["id"] for items in suites.values() for item in items]
    assert len(ids) == len(set(ids))
    for name, items in suites.items():
        for item in items:
            if name == "python":
                assert {"prompt", "entry_point", "tests", "solution"} <= set(item)
            else:
                assert ("number" in item) != ("accept" in item), item["id"]


def test_every_shipped_solution_passes_its_tests_and_a_wrong_one_fails(suites):
    for item in suites["python"]:
        assert tasks.run_python(item["solution"], item["tests"]) == tasks.Outcome(True), item["id"]
    wrong = tasks.run_python("def count_vowels(s):\n    return 0\n", suites["python"][0]["tests"])
    assert not wrong.passed and "AssertionError" in wrong.detail
    broken = tasks.run_python("def count_vowels(s) return 0\n", suites["python"][0]["tests"])
    assert not broken.passed and "SyntaxError" in broken.detail


def test_an_infinite_loop_and_what_it_forked_are_killed_at_the_time_limit(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = (
        "import os, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    while True: time.sleep(0.05)\n"
        f"open({str(pid_file)!r}, 'w').write(str(pid))\n"
        "while True: pass\n"
    )
    start = time.monotonic()
    outcome = tasks.run_python(code, "", time_limit=1.5)
    assert not outcome.passed and "time limit" in outcome.detail
    assert time.monotonic() - start < 10
    stat = f"/proc/{int(pid_file.read_text())}/stat"
    for _ in range(50):  # dead: gone, or a zombie its new parent has not reaped yet
        if not os.path.exists(stat) or open(stat).read().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the forked child outlived the time limit")


def test_solutions_run_isolated_in_a_temporary_directory_that_is_removed(tmp_path):
    seen = tmp_path / "seen.json"
    code = (
        "import json, os, sys\n"
        "facts = {'cwd': os.getcwd(), 'files': os.listdir('.'), 'isolated': sys.flags.isolated}\n"
        f"json.dump(facts, open({str(seen)!r}, 'w'))\n"
    )
    assert tasks.run_python(code, "").passed
    facts = json.loads(seen.read_text())
    assert facts["cwd"] != os.getcwd() and facts["files"] == ["solution_test.py"] and facts["isolated"] == 1
    assert not os.path.exists(facts["cwd"])


def test_code_is_taken_from_the_fenced_block_that_defines_the_function():
    reply = "Here:\n```text\nnot code\n```\n```python\ndef f(x):\n    return x\n```\nDone."
    assert tasks.extract_code(reply, "f") == "def f(x):\n    return x\n"
    assert tasks.extract_code("def f(x):\n    return x", "f") == "def f(x):\n    return x"
    assert tasks.extract_code("```python\ndef g(): pass\n", "f") == "def g(): pass\n"  # unclosed, no match: first


@pytest.mark.parametrize(
    ("item", "reply", "passed"),
    [
        ({"number": 10}, "On lui rend 10,00 euros.", True),
        ({"number": 2.5}, "Le prix est de 2,50 €", True),
        ({"number": 1234}, "about 1,234 apples", True),
        ({"number": 18}, "7 × 24 = 168, 168 − 150 = 18", True),
        ({"number": 18}, "18 is wrong, it is 19", False),
        ({"number": 11}, "还剩11元。", True),
        ({"number": 11}, "不知道", False),
        ({"accept": ["I would like a coffee", "I'd like a coffee"]}, '"I’d like a coffee, please."', True),
        ({"accept": ["今天天气很好"]}, "今天天气很好。", True),
        ({"accept": ["où est la gare"]}, "Où est la gare ?", True),
        ({"accept": ["où est la gare"]}, "Ou est la gare", False),
        ({"accept": ["Lyon"], "reject": ["Marseille"]}, "Lyon", True),
        ({"accept": ["Lyon"], "reject": ["Marseille"]}, "Lyon ou Marseille", False),
        ({"accept": ["KX-40917"]}, "The order number is **KX-40917**.", True),
    ],
)
def test_answers_are_checked_against_numbers_and_accepted_variants(item, reply, passed):
    assert tasks.check_answer(item, reply) is passed


def test_a_preamble_runs_before_the_replys_code():
    item = {"entry_point": "f", "tests": "assert f() == [1]", "preamble": "from typing import List\n"}
    assert tasks.grade(item, "```python\ndef f() -> List[int]:\n    return [1]\n```").passed
    assert not tasks.grade({**item, "preamble": ""}, "```python\ndef f() -> List[int]:\n    return [1]\n```").passed


def _outcomes(pairs):
    """A `run` result of (artifact passed, reference passed) pairs, one item each."""
    items = {str(i): {"artifact": {"passed": a}, "reference": {"passed": r}} for i, (a, r) in enumerate(pairs)}
    return {"items": {"s": items}}


def test_the_paired_change_counts_items_and_its_interval_narrows_with_more_items():
    few = tasks.paired_change(_outcomes([(True, True)] * 8 + [(False, True)] * 2), "artifact", "reference")
    assert (few.change, few.gained, few.lost) == (-0.2, 0, 2) and few.low < few.change <= few.high <= 0
    mixed = [(True, False)] * 5 + [(False, True)] * 8 + [(True, True)] * 60 + [(False, False)] * 69
    small = tasks.paired_change(_outcomes(mixed), "artifact", "reference")
    large = tasks.paired_change(_outcomes(mixed * 4), "artifact", "reference")
    assert (
        small.change == large.change
        and (small.gained, small.lost) == (5, 8)
        and (large.gained, large.lost) == (20, 32)
    )
    assert small.low < small.change < small.high and small.low < 0 < small.high  # 3 items of 142: not resolved
    assert large.high - large.low < 0.6 * (small.high - small.low)
    assert str(small).startswith("-2.1 points (95 % interval -") and str(small).endswith("+5 / -8 items")
    same = tasks.paired_change(_outcomes([(True, True), (False, False)]), "artifact", "reference")
    assert (same.change, same.low, same.high) == (0.0, 0.0, 0.0)
    with pytest.raises(tasks.TaskCheckError, match="no task items"):
        tasks.paired_change({"items": {}}, "artifact", "reference")


def test_the_drop_a_profile_allows_fails_the_check_beyond_it():
    result = {"overall": {"items": 20, "artifact": 0.5, "reference": 0.6}}
    tasks.check_drop(result, 0.1)
    tasks.check_drop(result, None)
    with pytest.raises(tasks.TaskCheckError, match="0.100 below the fp32 reference's 0.600; the profile allows 0.05"):
        tasks.check_drop(result, 0.05)
    result = {"overall": {"items": 2, "artifact": 0.5, "reference": 1.0}, **_outcomes([(True, True), (False, True)])}
    with pytest.raises(
        tasks.TaskCheckError, match=r"1.000 \(-50.0 points \(95 % interval -100.0 to \+0.0\), \+0 / -1 items\)"
    ):
        tasks.check_drop(result, 0.1)


@pytest.fixture
def short_replies(monkeypatch):
    """Tiny random models never solve a task: a few tokens per reply keep the mechanics fast."""
    monkeypatch.setattr(tasks, "MAX_NEW_TOKENS", {"code": 16, "answer": 8})


@pytest.fixture
def first_items(monkeypatch):
    """The shipped suites cut to their first item each (the whole default form is counted above)."""
    shipped = tasks.load_suites
    monkeypatch.setattr(tasks, "load_suites", lambda full=False: {k: v[:1] for k, v in shipped(full).items()})


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_an_fp32_artifact_replies_like_its_reference(family, tiny_model, tiny_artifact, short_replies):
    from transformers import AutoModelForCausalLM

    chat = tasks.session(Artifact.open(tiny_artifact(family)))
    reference = AutoModelForCausalLM.from_pretrained(tiny_model(family), dtype="float32").eval()
    sides = {
        "artifact": tasks.artifact_generator(chat),
        "reference": tasks.reference_generator(reference, chat.generator.tokenizer, chat.generator.eos_token_ids),
    }
    subset = {name: items[:2] for name, items in tasks.load_suites().items()}
    result = tasks.run(sides, lambda m: chat.prompt(m, enable_thinking=False), subset)
    assert set(result["suites"]) == {"python", "english", "chinese", "french"} and result["overall"]["items"] == 8
    for name, row in result["suites"].items():
        assert row["items"] == len(result["items"][name]) == 2 and row["artifact"] == row["reference"]
        for outcome in result["items"][name].values():
            art, ref = outcome["artifact"], outcome["reference"]
            assert (art["passed"], art["detail"]) == (ref["passed"], ref["detail"])
            # greedy from the same ids: the same text, the random model's invalid UTF-8 included (U+FFFD)
            assert art["reply"] and art["reply"] == ref["reply"]


def test_eval_tasks_reports_the_rates_per_suite(tiny_artifact, short_replies, first_items, capsys):
    assert cli.main(["eval", str(tiny_artifact()), "--tasks", "--full", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["form"] == "full" and result["overall"]["items"] == 4
    assert {name: list(items) for name, items in result["items"].items()} == {
        name: [items[0]["id"]] for name, items in tasks.load_suites(full=True).items()
    }
    lines = tasks.format_rates(result)
    assert [line.split()[0] for line in lines] == ["chinese", "english", "french", "python", "overall", "artifact"]
    assert "artifact" in lines[-2] and "reference" in lines[-2] and "  4 items" in lines[-2]
    assert lines[-1] == "artifact - reference: +0.0 points (95 % interval +0.0 to +0.0), +0 / -0 items"


def test_a_profile_with_task_check_makes_the_build_run_it(tiny_model, tmp_path, short_replies, first_items, capsys):
    from edge.pipeline import build
    from edge.recipe import Recipe

    recipe = Recipe(
        name="tiny",
        source=str(tiny_model()),
        context_length=256,
        precision={"weights": "fp32"},
        fidelity={"max_tokens": 64},
        overrides={"task_check": {"max_drop": 0.0}},
    )
    manifest = json.loads((build(recipe, out=tmp_path / "art").out_dir / "manifest.json").read_text())
    checked = manifest["fidelity"]["tasks"]
    assert manifest["profile"]["task_check"] == {"max_drop": 0.0, "full": False}
    assert checked["form"] == "default" and checked["overall"]["items"] == 4
    assert checked["overall"]["artifact"] == checked["overall"]["reference"]
    assert checked["change"] == {"change": 0.0, "gained": 0, "lost": 0, "low": 0.0, "high": 0.0}
    assert cli.main(["inspect", str(tmp_path / "art")]) == 0
    shown = capsys.readouterr().out
    assert "  tasks: " in shown and "on 4 items (+0.0 points, 95 % interval +0.0 to +0.0; +0 / -0 items)" in shown


def test_eval_full_without_tasks_is_refused(tiny_artifact, capsys):
    assert cli.main(["eval", str(tiny_artifact()), "--full"]) == 2
    assert "add --tasks" in capsys.readouterr().err
