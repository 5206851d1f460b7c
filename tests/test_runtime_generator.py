"""The KV-cached loop end to end on tiny built artifacts: cache vs recompute, chunked prefill,
sampling, stop conditions, streaming, context policy and cache reuse."""

import numpy as np
import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.errors import ArtifactError, ContextOverflowError, QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams

PROMPT = "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n"


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def artifact(request, tiny_artifact):
    return Artifact.open(tiny_artifact(request.param, tied=request.param == "qwen3"))


@pytest.fixture(scope="module")
def gen(artifact):
    return Generator(artifact)


def full_logits(gen, ids):
    """Last-position logits of `ids` computed from scratch (empty cache, whole sequence at once)."""
    info = gen.artifact.model
    n = len(ids)
    feeds = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64)}
    for i in range(info.num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, info.num_kv_heads, n, info.head_dim), np.float32)
    return gen.runner.session.run(["logits"], feeds)[0][0, -1]


def test_cached_greedy_equals_recomputing_the_full_sequence(gen):
    prompt = gen.encode(PROMPT)
    result = gen.generate(prompt, SamplingParams(), 24, stop_token_ids=())
    text = result.read()
    assert result.finish_reason == "max_tokens" and len(result.token_ids) == 24
    seq = list(prompt)
    for _ in range(24):
        seq.append(int(np.argmax(full_logits(gen, seq))))
    assert result.token_ids == seq[len(prompt) :]
    # a random model may end on an incomplete UTF-8 sequence: that tail is held back, never emitted broken
    assert text == gen.tokenizer.decode(result.token_ids)
    # the cache holds the prompt and every generated token but the last
    assert gen.position == len(prompt) + 23
    np.testing.assert_array_equal(gen.tokens, seq[:-1])


def test_cached_logits_match_recompute(gen):
    ids = gen.encode(PROMPT)
    gen.reset()
    gen.append(ids[:10])
    cached = gen.append(ids[10:11]).copy()
    np.testing.assert_allclose(cached, full_logits(gen, ids[:11]), atol=1e-4)


def test_chunked_prefill_equals_one_shot(artifact, gen):
    ids = gen.encode(PROMPT * 2)
    assert len(ids) > 40
    gen.reset()
    one_shot = gen.append(ids).copy()
    chunked_gen = Generator(artifact, prefill_chunk=7)
    chunked = chunked_gen.append(ids).copy()
    np.testing.assert_allclose(chunked, one_shot, atol=1e-4)
    a = gen.generate(ids, SamplingParams(), 12, stop_token_ids=())
    b = chunked_gen.generate(ids, SamplingParams(), 12, stop_token_ids=())
    assert a.read() == b.read() and a.token_ids == b.token_ids
    assert b.stats.reused_tokens == len(ids) - 1  # the prompt was already in the cache


def test_seeded_sampling_is_reproducible(gen):
    ids = gen.encode("Hello, world!")
    params = SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=7)

    def run(p):
        gen.reset()
        r = gen.generate(ids, p, 30, stop_token_ids=())
        r.read()
        return r.token_ids

    first = run(params)
    assert run(params) == first
    assert run(SamplingParams(temperature=1.5, top_k=50, top_p=0.95, seed=8)) != first


def test_repetition_penalty_is_applied_to_the_sequence(gen):
    ids = gen.encode("Hello")
    gen.reset()
    plain = gen.generate(ids, SamplingParams(), 20, stop_token_ids=())
    plain.read()
    penalized = gen.generate(ids, SamplingParams(repetition_penalty=50.0), 20, stop_token_ids=())
    penalized.read()
    # a huge penalty forbids repeats as long as unseen tokens have positive logits
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids)) or len(set(plain.token_ids)) == 20


def test_stop_string_is_not_emitted_and_ends_generation(gen):
    ids = gen.encode(PROMPT)
    full = gen.generate(ids, SamplingParams(), 30, stop_token_ids=())
    text = full.read()
    assert len(text) > 12
    stop = text[5:9]
    expected = text[: text.index(stop)]
    result = gen.generate(ids, SamplingParams(), 30, stop_strings=[stop, "never-there"], stop_token_ids=())
    pieces = list(result)
    assert "".join(pieces) == expected == result.text
    assert result.finish_reason == "stop"
    # a stop string that never completes: the held-back text is released at the end
    never = text[-3:] + "\x00"
    result = gen.generate(ids, SamplingParams(), 30, stop_strings=[never], stop_token_ids=())
    assert result.read() == text and result.finish_reason == "max_tokens"


def test_stop_token_ends_generation_and_is_not_emitted(gen):
    ids = gen.encode(PROMPT)
    free = gen.generate(ids, SamplingParams(), 20, stop_token_ids=())
    free.read()
    stop_id = free.token_ids[6]
    first = free.token_ids.index(stop_id)
    result = gen.generate(ids, SamplingParams(), 20, stop_token_ids=[stop_id])
    result.read()
    assert result.finish_reason == "stop" and result.token_ids == free.token_ids[:first]


def test_streaming_chinese_never_yields_broken_characters(gen):
    text = "你好，世界！今天天气很好。量化可以让模型在手机上运行。"
    chinese = gen.encode(text)
    assert len(chinese) > 20  # many characters take several byte-level tokens in the tiny vocabulary
    forced = iter([chinese])

    def force_chinese(token):  # after the first sampled token, force the Chinese text through the loop
        return next(forced, None)

    result = gen.generate(
        gen.encode("Hi"), SamplingParams(), 1 + len(chinese), on_token=force_chinese, stop_token_ids=()
    )
    pieces = list(result)
    assert result.text.endswith(text)
    assert "".join(pieces) == gen.tokenizer.decode(result.token_ids)
    assert all("\ufffd" not in p for p in pieces if any(c in p for c in text))
    assert len(pieces) < len(chinese)  # tokens that complete no character yield nothing


def test_prompt_that_does_not_fit_raises_with_the_numbers(artifact):
    small = Generator(artifact, max_length=32)
    ids = list(range(10, 42))
    with pytest.raises(
        ContextOverflowError,
        match=r"prompt has 32 tokens; with 5 new tokens it needs 37 but the "
        r"context holds 32.*raise --max-length \(up to 256\)",
    ):
        small.generate(ids, SamplingParams(), 5)


def test_generation_reaching_the_end_of_context_stops_with_length(artifact):
    small = Generator(artifact, max_length=32)
    ids = list(range(10, 30))
    result = small.generate(ids, SamplingParams(), 50, stop_token_ids=())
    result.read()
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 32 - 20 + 1  # the last sampled token needs no cache slot
    assert "end of the context (32 tokens)" in result.notice


def test_max_length_bounds(artifact):
    with pytest.raises(QwenEdgeError, match="between 2 and the artifact's context length 256"):
        Generator(artifact, max_length=1000)


def test_cache_is_allocated_once_and_shared_by_past_and_present(artifact):
    g = Generator(artifact, max_length=64)
    buffers = [buf for buf, _ in g.runner.cache._buffers]
    pointers = [buf.ctypes.data for buf in buffers]
    info = artifact.model
    assert all(b.shape == (1, info.num_kv_heads, 64, info.head_dim) for b in buffers)
    ids = g.encode(PROMPT)[:20]
    g.generate(ids, SamplingParams(), 10, stop_token_ids=()).read()
    assert [buf.ctypes.data for buf, _ in g.runner.cache._buffers] == pointers
    # the graph wrote keys/values in place up to the cache position and nowhere after it
    assert all(np.abs(b[:, :, : g.position]).sum() > 0 for b in buffers)
    assert all(not b[:, :, g.position :].any() for b in buffers)


def test_truncate_and_prefix_reuse(gen):
    ids = gen.encode(PROMPT)
    gen.reset()
    first = gen.generate(ids, SamplingParams(), 8, stop_token_ids=())
    first.read()
    gen.truncate(10)
    assert gen.position == 10
    again = gen.generate(ids, SamplingParams(), 8, stop_token_ids=())
    again.read()
    assert again.token_ids == first.token_ids
    assert again.stats.reused_tokens == 10 and again.stats.prefill_tokens == len(ids) - 10
    with pytest.raises(QwenEdgeError, match="cannot truncate"):
        gen.truncate(gen.position + 1)


def test_stats_are_reported(gen):
    ids = gen.encode(PROMPT)
    gen.reset()
    r = gen.generate(ids, SamplingParams(), 16, stop_token_ids=())
    r.read()
    s = r.stats
    assert s.prompt_tokens == s.prefill_tokens == len(ids) and s.new_tokens == 16
    assert 0 < s.prefill_s <= s.ttft_s and s.decode_s > 0
    assert s.prefill_tps > 0 and s.decode_tps > 0


def test_bad_arguments(gen):
    with pytest.raises(QwenEdgeError, match="prompt is empty"):
        gen.generate([], SamplingParams(), 4)
    with pytest.raises(QwenEdgeError, match="max_new_tokens must be >= 1"):
        gen.generate([1, 2], SamplingParams(), 0)


def test_graph_without_num_logits_to_keep_reads_the_last_position(artifact, gen, tmp_path):
    """A graph without the optional input (e.g. onnxruntime-genai's) returns logits for every position."""
    import shutil

    import onnx

    copy = tmp_path / "no_keep"
    shutil.copytree(artifact.root, copy)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    graph = model.graph
    graph.input.remove(next(i for i in graph.input if i.name == "num_logits_to_keep"))
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "num_logits_to_keep"))
    graph.node.insert(
        0,
        onnx.helper.make_node(
            "Constant", [], ["num_logits_to_keep"], value=onnx.helper.make_tensor("v", onnx.TensorProto.INT64, [], [0])
        ),
    )
    onnx.save(model, str(copy / "model.onnx"))
    plain = Generator(Artifact.open(copy, verify="none"))
    assert not plain.runner.has_logits_to_keep
    ids = gen.encode(PROMPT)
    gen.reset()
    expected = gen.generate(ids, SamplingParams(), 10, stop_token_ids=())
    expected.read()
    result = plain.generate(ids, SamplingParams(), 10, stop_token_ids=())
    result.read()
    assert result.token_ids == expected.token_ids


def test_graph_that_does_not_match_the_manifest_is_refused(artifact, tmp_path):
    import json
    import shutil

    copy = tmp_path / "mismatch"
    shutil.copytree(artifact.root, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["num_layers"] = 3
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"lacks the graph inputs/outputs past_key_values\.2\.key.*3 layers"):
        Generator(Artifact.open(copy, verify="size"))
