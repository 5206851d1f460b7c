"""The static-shape prefill/decode graphs and their loop against transformers fp32, Qwen2 and Qwen3."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForCausalLM

from edge.artifact.manifest import model_block
from edge.graph.static import MASK_VALUE, export_static
from edge.sources import open_source
from qwen_edge.artifact import Artifact
from qwen_edge.errors import ContextOverflowError, QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.runner import StaticRunner
from qwen_edge.sampling import SamplingParams

CHUNK, CONTEXT = 8, 48
IDS = np.random.default_rng(11).integers(0, 590, 30).tolist()
FAMILIES = [("qwen2", False), ("qwen3", True)]

# RMSNorm is LpNormalization without eps (see edge.graph.static): on these tiny models, whose hidden
# states have a mean square near 0.01, leaving eps = 1e-6 out moves logits by about 1e-4.
ATOL = 5e-4


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f"{f[0]}-{'tied' if f[1] else 'untied'}")
def static(request, tiny_model, tmp_path_factory):
    """(export info, artifact, HF reference model) of one tiny model exported as static graphs."""
    model_dir = tiny_model(*request.param)
    source = open_source(str(model_dir))
    out = tmp_path_factory.mktemp("static")
    info = export_static(source, out, chunk=CHUNK, context_length=CONTEXT)
    source.write_tokenizer(out)
    artifact = Artifact(out, {"model": model_block(source.config, CONTEXT), "profile": {}, "static": info})
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return info, artifact, reference


def cpu_session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def run_prefill_graph(sess, ids, layers, kv_heads, head_dim):
    """Logits of every prompt position from the prefill graph, fed chunk by chunk as the contract says."""
    keys = [np.zeros((1, kv_heads, head_dim, CONTEXT), np.float32) for _ in range(layers)]
    values = [np.zeros((1, kv_heads, CONTEXT, head_dim), np.float32) for _ in range(layers)]
    out = []
    for pos in range(0, len(ids), CHUNK):
        part = ids[pos : pos + CHUNK]
        n = len(part)
        bias = np.full((1, 1, CHUNK, CONTEXT + CHUNK), MASK_VALUE, np.float32)
        bias[0, 0, :, :pos] = 0
        bias[0, 0, :, CONTEXT:] = np.where(np.tri(CHUNK, dtype=bool), 0, MASK_VALUE)
        feeds = {
            "input_ids": np.array([part + [0] * (CHUNK - n)], np.int32),
            "position_ids": np.arange(pos, pos + CHUNK, dtype=np.int32)[None],
            "attention_bias": bias,
        }
        for i in range(layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = keys[i], values[i]
        logits, *presents = sess.run(None, feeds)
        assert logits.shape == (1, CHUNK, 600)
        out.append(logits[0, :n])
        for i in range(layers):
            keys[i][..., pos : pos + n] = presents[2 * i][..., :n]
            values[i][:, :, pos : pos + n] = presents[2 * i + 1][:, :, :n]
    return np.concatenate(out)


@pytest.mark.parametrize("length", [5, 13], ids=["padded-chunk", "two-chunks"])
def test_prefill_graph_matches_transformers(static, length):
    _, artifact, reference = static
    m = artifact.model
    sess = cpu_session(artifact.path("prefill.onnx"))
    got = run_prefill_graph(sess, IDS[:length], m.num_layers, m.num_kv_heads, m.head_dim)
    np.testing.assert_allclose(got, hf_logits(reference, IDS[:length]), atol=ATOL, rtol=0)


def test_decode_steps_match_transformers_cache(static):
    _, artifact, reference = static
    gen = Generator(artifact)
    assert isinstance(gen.runner, StaticRunner)
    prompt, steps = IDS[:13], IDS[13:25]
    with torch.no_grad():
        out = reference(torch.tensor([prompt]), use_cache=True)
        expected, cache = [out.logits[0, -1].numpy()], out.past_key_values
        for token in steps:
            out = reference(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            expected.append(out.logits[0, -1].numpy())
            cache = out.past_key_values
    got = [gen.append(prompt).copy()] + [gen.append([t]).copy() for t in steps]
    assert gen.position == 25
    np.testing.assert_allclose(np.stack(got), np.stack(expected), atol=ATOL, rtol=0)


def test_greedy_generation_equals_transformers_and_reuses_the_prefix(static):
    _, artifact, reference = static
    seen = []
    gen = Generator(
        artifact,
        runner=StaticRunner(artifact, on_feeds=lambda name, feeds: seen.append((name, feeds["input_ids"].shape))),
    )
    prompt = IDS[:11]
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=14, min_new_tokens=14, pad_token_id=0
        )[0, len(prompt) :].tolist()
    result = gen.generate(prompt, SamplingParams(), 14, stop_token_ids=())
    result.read()
    assert result.token_ids == expected and result.finish_reason == "max_tokens"
    assert result.stats.prefill_tokens == 11 and result.stats.new_tokens == 14
    assert seen[:2] == [("prefill", (1, CHUNK)), ("prefill", (1, CHUNK))]
    assert {s for s in seen[2:]} == {("decode", (1, 1))}
    longer = prompt + expected[:6]
    again = gen.generate(longer, SamplingParams(), 8, stop_token_ids=())
    again.read()
    assert again.stats.reused_tokens == len(longer) - 1
    assert again.token_ids == expected[6:14]


def test_context_is_the_graphs_fixed_length(static):
    _, artifact, _ = static
    sessions = (cpu_session(artifact.path("prefill.onnx")), cpu_session(artifact.path("decode.onnx")))
    gen = Generator(artifact, runner=StaticRunner(artifact, sessions=sessions))
    with pytest.raises(ContextOverflowError):
        gen.generate(IDS[:1] * CONTEXT, SamplingParams(), 1)
    result = gen.generate(IDS[:30], SamplingParams(), 40, stop_token_ids=())
    result.read()
    assert result.finish_reason == "length" and gen.position == CONTEXT
    with pytest.raises(ContextOverflowError):
        gen.append([1])


def test_graphs_are_static_standard_onnx(static):
    info, artifact, _ = static
    for name, n in (("prefill", CHUNK), ("decode", 1)):
        model = onnx.load(str(artifact.path(info[name])), load_external_data=False)
        assert {n.domain for n in model.graph.node} == {""}
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 21)]
        assert [i.name for i in model.graph.input] == info["inputs"]
        assert [o.name for o in model.graph.output] == info["outputs"]
        for v in [*model.graph.input, *model.graph.output]:
            assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["qwen_edge.graph"] == name and meta["qwen_edge.chunk"] == str(n)
        assert meta["qwen_edge.context_length"] == str(CONTEXT)
        assert float(meta["qwen_edge.mask_value"]) == info["mask_value"] == MASK_VALUE
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
        assert shapes["attention_bias"] == [1, 1, n, CONTEXT + n]
        assert shapes["past_key_0"][3] == shapes["past_value_0"][2] == CONTEXT


@pytest.mark.parametrize(
    "chunk,context,mask,message",
    [
        (24, 64, MASK_VALUE, "must divide"),
        (64, 64, MASK_VALUE, "larger than the chunk"),
        (1, 64, MASK_VALUE, ">= 2"),
        (64, 1 << 20, MASK_VALUE, "positions"),
        (8, 64, float("-inf"), "mask_value"),
        (8, 64, -1.0, "mask_value"),
    ],
)
def test_bad_export_arguments_are_refused(tiny_model, tmp_path, chunk, context, mask, message):
    source = open_source(str(tiny_model("qwen2", False)))
    with pytest.raises(QwenEdgeError, match=message):
        export_static(source, tmp_path / "out", chunk=chunk, context_length=context, mask_value=mask)
    assert not (tmp_path / "out").exists()
