"""Shared conformance cases (tests/conformance/cases.json) on the Python runtime.

runtimes/js/test/conformance.test.js runs the same cases on the JavaScript runtime under the same test
names. tests/conformance/make_conformance.py builds the artifacts (a native fp32 Qwen2, a native int4
Qwen3 and an olive-built plain-operator fp32 Qwen3 with a growing cache and position_ids) and computes
what each case must give: for fp32 artifacts the transformers fp32 model's greedy tokens, for int4 ones
the Python loop's (checked against the fp32 model in test_int4_follows_reference).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_edge import Artifact, ChatSession, Generator, SamplingParams
from qwen_edge.chat import ChatTemplate
from qwen_edge.contract import GraphLayout

HERE = Path(__file__).parent
MAKE = HERE / "conformance" / "make_conformance.py"
sys.path.insert(0, str(MAKE.parent))

from make_conformance import ARTIFACTS, load_cases  # noqa: E402

CASES = load_cases()
CASE_IDS = [case["id"] for case in CASES]
ARTIFACT_NAMES = list(dict.fromkeys(case["artifact"] for case in CASES))
QUANTIZED_IDS = [case["id"] for case in CASES if ARTIFACTS[case["artifact"]]["precision"]["weights"] != "fp32"]
# int4 vs fp32, teacher-forced along the int4 tokens (measured: ranks <= 3, 67-100% rank 0 per case)
INT4_MAX_RANK = 5
INT4_MIN_TOP1 = 0.5


@pytest.fixture(scope="session")
def conformance(tmp_path_factory) -> dict:
    """make_conformance.py's output: {"artifacts": {name: {...}}, "cases": [...]}, built once per session."""
    out = tmp_path_factory.mktemp("conformance")
    proc = subprocess.run([sys.executable, str(MAKE), str(out)], capture_output=True, text=True, cwd=HERE.parent)
    if proc.returncode != 0:
        pytest.fail(f"make_conformance.py failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", pytrace=False)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def runtime(conformance):
    """`runtime(name) -> (Generator, ChatTemplate, ChatSession)`: one generator per artifact, kept across cases
    (the cases of an artifact run in order on it, so shared prefixes are reused from the cache)."""
    opened = {}

    def get(name: str):
        if name not in opened:
            artifact = Artifact.open(conformance["artifacts"][name]["path"])
            gen = Generator(artifact)
            opened[name] = gen, ChatTemplate.from_tokenizer_config(artifact.tokenizer_config_path), ChatSession(gen)
        return opened[name]

    return get


def _case(conformance, case_id: str) -> dict:
    return next(case for case in conformance["cases"] if case["id"] == case_id)


@pytest.mark.parametrize("name", ARTIFACT_NAMES)
def test_artifact_layout(conformance, name):
    info = conformance["artifacts"][name]
    artifact = Artifact.open(info["path"], verify="size")
    layout = GraphLayout.of(artifact.root, artifact.manifest)
    assert {"kv_cache": layout.kv_cache, "position_ids": layout.position_ids} == info["layout"]


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_conformance(conformance, runtime, case_id):
    case = _case(conformance, case_id)
    gen, template, chat = runtime(case["artifact"])
    if "messages" in case["prompt"]:
        prompt = template.render(case["prompt"]["messages"], add_generation_prompt=True)
        assert chat.prompt(case["prompt"]["messages"]).ids == case["prompt_ids"], "ChatSession prompt ids"
    else:
        prompt = case["prompt"]["text"]
    assert prompt == case["prompt_text"], "rendered prompt"
    ids = gen.encode(prompt)
    assert ids == case["prompt_ids"], "prompt ids"
    g = gen.generate(ids, SamplingParams(), case["max_new_tokens"])
    text = "".join(g)
    assert g.token_ids == case["token_ids"], "generated ids"
    assert text == case["text"], "streamed text"
    assert g.finish_reason == case["finish_reason"], "finish reason"


@pytest.mark.parametrize("case_id", QUANTIZED_IDS)
def test_int4_follows_reference(conformance, case_id):
    """The int4 expectations are the Python loop's. Quantization may change any greedy token (the first one
    too, on some prompts), so the check is on ranks: fed the int4 model's own tokens, the transformers fp32
    model ranks each of them (and the stop token) among its top few, and most of them first. A broken
    quantization or graph picks tokens of rank ~300 of 600."""
    case = _case(conformance, case_id)
    assert case["expected_from"] == "python-loop"
    ranks = case["reference"]["ranks"]
    assert len(ranks) == len(case["token_ids"]) + (case["finish_reason"] == "stop") > 0
    assert max(ranks) <= INT4_MAX_RANK, f"fp32 ranks of the int4 tokens: {ranks}"
    assert ranks.count(0) >= INT4_MIN_TOP1 * len(ranks), f"fp32 ranks of the int4 tokens: {ranks}"
