"""Constrained decoding (qwen_edge.constrain) on the tiny models: every token inside the mask, every output valid."""

import json
import sys

import numpy as np
import pytest

from qwen_edge import cli
from qwen_edge.artifact import Artifact
from qwen_edge.chat import ChatSession
from qwen_edge.constrain import Constraint, Grammar, load_grammar, validate
from qwen_edge.errors import QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

# bounded strings and numbers, so a random model reaches the end of the object within the token limit
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tag": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tag", "ok"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None},
}
LIST = {
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": 1,
    "maxItems": 4,
    "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": None},
}


@pytest.fixture(scope="module")
def gen(tiny_artifact):
    return Generator(Artifact.open(tiny_artifact("qwen2")), max_length=256)


def recorded(constraint: Constraint) -> list:
    """Record every mask the sampler asks for."""
    masks, mask = [], constraint.mask
    constraint.mask = lambda: masks.append(mask()) or masks[-1]
    return masks


@pytest.mark.parametrize("schema", [PERSON, LIST], ids=["object", "array"])
@pytest.mark.parametrize("seed", range(4))
def test_every_token_is_allowed_and_the_output_validates(gen, schema, seed):
    constraint = Constraint(Grammar.json_schema(schema), gen)
    masks = recorded(constraint)
    out = gen.generate(gen.encode("A person:"), SamplingParams(temperature=1.0, seed=seed), 150, constraint=constraint)
    text = out.read()
    assert out.finish_reason == "stop", text
    assert all(mask[token] for mask, token in zip(masks, out.token_ids))
    assert len(masks) == len(out.token_ids) + 1  # the last pick was an eos token, allowed once the object closed
    assert any(masks[-1][e] for e in gen.eos_token_ids)
    jsonschema.validate(json.loads(text), schema)


def test_regex_and_lark(gen):
    for grammar, check in [
        (Grammar("regex", "[0-9]{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[3] == "-" and t[:3].isdigit()),
        (Grammar("lark", 'start: "yes" | "no" | "maybe"'), lambda t: t in ("yes", "no", "maybe")),
    ]:
        for seed in range(3):
            text = gen.generate(
                gen.encode("Q:"), SamplingParams(1.0, seed=seed), 40, constraint=Constraint(grammar, gen)
            )
            assert check(text.read()), (grammar, text.text)


def test_unconstrained_greedy_output_is_unchanged(gen):
    ids = gen.encode("The quick brown fox")
    plain = gen.generate(ids, SamplingParams(), 20)
    plain.read()
    again = gen.generate(ids, SamplingParams(), 20, constraint=None)
    again.read()
    assert again.token_ids == plain.token_ids


def test_chat_streaming_stop_strings_and_cache_reuse(tiny_artifact):
    chat = ChatSession(Generator(Artifact.open(tiny_artifact("qwen2")), max_length=256), system="Answer in JSON.")
    params = SamplingParams(temperature=0.8, seed=3)
    for turn in range(2):
        pieces = list(chat.send(f"Person {turn}?", params, 150, grammar=Grammar.json_schema(PERSON)))
        assert chat.last.finish_reason == "stop"
        jsonschema.validate(json.loads("".join(pieces)), PERSON)
    assert chat.last.stats.reused_tokens > 0  # the second turn kept the first one's cache
    # a stop string ends a constrained reply early, like any other
    text = "".join(chat.send("Again", params, 150, stop_strings=['"age"'], grammar=Grammar.json_schema(PERSON)))
    assert '"age"' not in text and text.startswith("{")


def test_thinking_is_left_free_and_the_grammar_follows_it(tiny_artifact):
    gen = Generator(Artifact.open(tiny_artifact("qwen3")), max_length=256)
    tok = gen.tokenizer
    think, end = tok.token_to_id("<think>"), tok.token_to_id("</think>")
    grammar = Grammar.json_schema(PERSON)
    inside = Constraint(grammar, gen, (think, end, True))
    assert inside.mask() is None
    inside.accept([*gen.encode("hmm, let me see"), end, *gen.encode("\n\n")])  # the newlines after </think> pass
    fresh = Constraint(grammar, gen)
    assert np.array_equal(inside.mask(), fresh.mask())
    first = Constraint(grammar, gen, (think, end, False))
    assert first.mask()[think] and not fresh.mask()[think]  # a reply may open its thinking first
    first.accept([think])
    assert first.mask() is None
    # with a thinking budget the forced close passes through the gate too
    chat = ChatSession(gen, thinking_budget=3)
    prompt = chat.prompt([{"role": "user", "content": "hi"}])
    out = chat.generate(prompt, SamplingParams(1.0, seed=0), 200, grammar=grammar)
    text = out.read()
    jsonschema.validate(json.loads(text.rsplit("</think>", 1)[-1]), PERSON)


def test_bad_grammars_are_one_line_errors(gen, tmp_path):
    with pytest.raises(QwenEdgeError, match="lark is not usable"):
        validate(Grammar("lark", "start: foo("), gen)
    with pytest.raises(QwenEdgeError, match="regex is not usable"):
        validate(Grammar("regex", "[a-"))
    with pytest.raises(QwenEdgeError, match="kind must be one of"):
        Grammar("gbnf", "x")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(QwenEdgeError, match="not valid JSON"):
        load_grammar(json_schema=str(bad))
    with pytest.raises(QwenEdgeError, match="give one of"):
        load_grammar(regex="a", lark=str(bad))
    with pytest.raises(QwenEdgeError, match="cannot read"):
        load_grammar(json_schema=str(tmp_path / "missing.json"))


def test_missing_llguidance_names_the_extra(gen, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(QwenEdgeError, match=r"qwen-edge\[constrained\]"):
        Grammar("regex", "a").compile()


def test_cli_run_flags(tiny_artifact, tmp_path, capsys):
    art = str(tiny_artifact("qwen2"))
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(PERSON))
    assert cli.main(["run", art, "A person", "--json-schema", str(schema), "--temperature", "1", "--seed", "1",
                     "--max-new-tokens", "150"]) == 0  # fmt: skip
    jsonschema.validate(json.loads(capsys.readouterr().out), PERSON)
    assert cli.main(["run", art, "Q", "--regex", "[0-9]{4}", "--no-chat-template", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip().isdigit()
    lark = tmp_path / "g.lark"
    lark.write_text('start: "on" | "off"')
    assert cli.main(["run", art, "Q", "--grammar", str(lark), "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out.strip() in ("on", "off")
    assert cli.main(["run", art, "Q", "--grammar", str(tmp_path / "none.lark")]) == 2
    assert "cannot read" in capsys.readouterr().err
