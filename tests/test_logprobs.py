"""Per-token logprobs on tiny artifacts: log_softmax of the model's logits (the runner's rows and
transformers fp32), greedy token = top-1, independent of the sampling settings, plain == speculative,
token pieces as bytes, and the server's chat and completions shapes (official openai client, streaming, 400s)."""

from __future__ import annotations

import http.client
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from serving import serving
from transformers import AutoModelForCausalLM

from qwen_edge.artifact import Artifact
from qwen_edge.chat import CLOSE_THINKING, ChatSession
from qwen_edge.errors import QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.logprobs import TokenText
from qwen_edge.sampling import SamplingParams
from qwen_edge.server import ChatServer, Engine
from qwen_edge.speculative import PromptLookup

openai = pytest.importorskip("openai")

PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n" * 2
TOP = 5


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def gen(request, tiny_artifact):
    family = request.param
    return Generator(Artifact.open(tiny_artifact(family, tied=family == "qwen3")), max_length=160)


def _run(gen: Generator, prompt, params=SamplingParams(), n: int = 24, logprobs: int | None = TOP):
    gen.reset()
    result = gen.generate(prompt, params, n, stop_token_ids=(), logprobs=logprobs)
    result.read()
    return result


def _check_entries(result, expected: np.ndarray, atol: float) -> None:
    """`expected[i]`: the log-probabilities over the vocabulary at generated token i."""
    assert len(result.logprobs) == len(result.token_ids) == len(expected)
    for entry, token, want in zip(result.logprobs, result.token_ids, expected):
        assert entry.token == token
        np.testing.assert_allclose(entry.logprob, want[token], atol=atol)
        ids, values = [i for i, _ in entry.top], [lp for _, lp in entry.top]
        np.testing.assert_allclose(values, want[ids], atol=atol)
        np.testing.assert_allclose(values, np.sort(want)[::-1][:TOP], atol=atol)  # the N most likely
        assert len(entry.top) == TOP and sum(np.exp(lp) for _, lp in entry.top) <= 1 + 1e-9
        assert all(a[1] >= b[1] for a, b in zip(entry.top, entry.top[1:]))


def test_logprobs_are_the_log_softmax_of_the_runners_logits(gen):
    prompt = gen.encode(PROMPT)
    result = _run(gen, prompt)
    rows = gen.logits([*prompt, *result.token_ids])[len(prompt) - 1 : -1]
    _check_entries(result, _log_softmax(rows), atol=1e-4)
    for entry in result.logprobs:  # greedy: the token is the model's top-1
        assert entry.top[0][0] == entry.token and entry.top[0][1] == entry.logprob


def test_logprobs_match_transformers_fp32(gen, tiny_model):
    family = gen.artifact.model.family
    prompt = gen.encode(PROMPT)
    result = _run(gen, prompt)
    model = AutoModelForCausalLM.from_pretrained(tiny_model(family, tied=family == "qwen3"), dtype=torch.float32)
    with torch.no_grad():
        rows = model.eval()(torch.tensor([[*prompt, *result.token_ids]])).logits[0].numpy()
    _check_entries(result, _log_softmax(rows[len(prompt) - 1 : -1]), atol=1e-3)


def test_logprobs_are_the_models_distribution_whatever_the_sampling(gen):
    prompt = gen.encode(PROMPT)
    params = SamplingParams(temperature=1.3, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=3)
    result = _run(gen, prompt, params)
    rows = gen.logits([*prompt, *result.token_ids])[len(prompt) - 1 : -1]
    _check_entries(result, _log_softmax(rows), atol=1e-4)


def test_logprobs_off_costs_nothing_and_changes_no_token(gen):
    prompt = gen.encode(PROMPT)
    off, on = _run(gen, prompt, logprobs=None), _run(gen, prompt)
    assert off.logprobs is None and off.token_ids == on.token_ids and off.text == on.text
    assert _run(gen, prompt, logprobs=0).logprobs[0].top == ()


def test_speculative_logprobs_equal_the_plain_loops(gen):
    prompt = gen.encode(PROMPT)
    gen.speculator = None
    plain = _run(gen, prompt, n=40)
    gen.speculator = PromptLookup(k=4)
    try:
        spec = _run(gen, prompt, n=40)
    finally:
        gen.speculator = None
    assert spec.stats.accepted > 0 and spec.token_ids == plain.token_ids
    for a, b in zip(plain.logprobs, spec.logprobs):
        assert a.token == b.token and [i for i, _ in a.top] == [i for i, _ in b.top]
        np.testing.assert_allclose(
            [a.logprob, *(lp for _, lp in a.top)], [b.logprob, *(lp for _, lp in b.top)], atol=1e-4
        )


def test_forced_tokens_carry_no_logprob(tiny_artifact):
    gen = Generator(Artifact.open(tiny_artifact("qwen3", tied=True)), max_length=160)
    chat = ChatSession(gen, enable_thinking=True, thinking_budget=3)
    prompt = chat.prompt([{"role": "user", "content": "Think a little"}])
    prompt = replace(prompt, ids=[*prompt.ids, *gen.encode("<think>\n")], thinking=True)
    result = chat.generate(prompt, SamplingParams(), 12, logprobs=2)
    result.read()
    close = gen.encode(CLOSE_THINKING)
    assert result.token_ids[3 : 3 + len(close)] == close  # forced after 3 thinking tokens
    assert [e.token for e in result.logprobs] == result.token_ids
    forced = range(3, 3 + len(close))
    assert all((e.logprob is None and e.top == ()) == (i in forced) for i, e in enumerate(result.logprobs))


def test_bad_logprobs_values_are_refused(gen):
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(QwenEdgeError, match="logprobs must be an integer from 0 to 20"):
            gen.generate(gen.encode("hi"), logprobs=bad)


def test_token_pieces_are_exact_bytes(gen):
    text = TokenText(gen.tokenizer)
    ids = gen.encode("héllo 你好, world")
    assert b"".join(text(i)[1] for i in ids).decode("utf-8") == "héllo 你好, world"
    partial = gen.tokenizer.token_to_id("ä")  # the byte-level character of the lone byte 0xE4
    assert text(partial) == ("\\xe4", b"\xe4")
    end = gen.tokenizer.token_to_id("<|im_end|>")
    assert text(end) == ("<|im_end|>", b"<|im_end|>")


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_artifact):
    with serving(
        ChatServer(Engine(Generator(Artifact.open(tiny_artifact("qwen2")))), "127.0.0.1", 0, quiet=True)
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 12, "temperature": 0}


def _reference(server, prompt_ids, tokens) -> np.ndarray:
    engine = server.engine
    with engine.lock:
        return _log_softmax(engine.generator.logits([*prompt_ids, *tokens])[len(prompt_ids) - 1 : -1])


def test_chat_logprobs_shape_and_values(server, client):
    reply = client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert _text(content).startswith(reply.choices[0].message.content)
    by_bytes = _ids_by_bytes(server)
    tokens = [by_bytes[bytes(c.bytes)] for c in content]
    for c, token in zip(content, tokens):
        assert c.token == server.engine.token_text(token)[0] and len(c.top_logprobs) == 3
        assert c.top_logprobs[0].token == c.token and c.top_logprobs[0].logprob == c.logprob  # greedy
        assert sum(np.exp(t.logprob) for t in c.top_logprobs) <= 1 + 1e-9
    prompt = server.engine.chat.prompt(CHAT["messages"]).ids
    want = _reference(server, prompt, tokens)
    np.testing.assert_allclose([c.logprob for c in content], want[np.arange(len(tokens)), tokens], atol=1e-4)
    plain = client.chat.completions.create(**CHAT)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def _text(content) -> str:
    """The text the entries' bytes decode to (the tiny random model emits broken UTF-8 too)."""
    return b"".join(bytes(c.bytes) for c in content).decode("utf-8", errors="replace")


def _ids_by_bytes(server) -> dict[bytes, int]:
    """The tiny vocabulary's token ids by their bytes (each byte string is one token there)."""
    text, tok = server.engine.token_text, server.engine.generator.tokenizer
    return {text(i)[1]: i for i in range(tok.get_vocab_size(with_added_tokens=True))}


def test_chat_stream_carries_the_logprobs_of_its_deltas(client):
    whole = client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    streamed, text = [], ""
    for chunk in client.chat.completions.create(**CHAT, logprobs=True, top_logprobs=2, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.role:
            assert choice.logprobs is None
        text += choice.delta.content or ""
        if choice.logprobs is not None:
            streamed.extend(choice.logprobs.content)
    assert [(c.token, c.logprob, c.bytes) for c in streamed] == [(c.token, c.logprob, c.bytes) for c in whole]
    assert _text(streamed).startswith(text)


def test_completion_logprobs_shape(server, client):
    prompt = "def add(a, b):"
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
    lp = reply.choices[0].logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == len(prompt) and lp.text_offset == sorted(lp.text_offset)
    assert all(
        len(top) <= 2 and max(top.values()) == logprob for top, logprob in zip(lp.top_logprobs, lp.token_logprobs)
    )
    text = reply.choices[0].text
    for token, offset in zip(lp.tokens, lp.text_offset):  # each token's text sits at its offset
        assert text[offset - len(prompt) :].startswith(token) or "\\x" in token
    chunks = list(
        client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2, stream=True)
    )
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert streamed == lp.tokens and offsets == lp.text_offset
    assert client.completions.create(model="tiny", prompt=prompt, max_tokens=3).choices[0].logprobs is None


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
        ("/v1/completions", {"logprobs": 6}, "logprobs"),
        ("/v1/completions", {"logprobs": True}, "logprobs"),
    ],
)
def test_out_of_range_logprobs_are_a_400_naming_the_field(server, path, extra, param):
    body = {**CHAT, **extra} if path.endswith("chat/completions") else {"model": "tiny", "prompt": "hi", **extra}
    status, payload = _post(server, path, body)
    assert status == 400 and payload["error"]["param"] == param and f"`{param}`" in payload["error"]["message"]
