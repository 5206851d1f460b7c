"""The exported decoder against transformers fp32 logits: prefill and cached decode, Qwen2 and Qwen3.

Quantized graphs are checked two ways: exactly (accuracy_level 0) against transformers running the
dequantized weights, which isolates the graph from the quantization error; and with the profile's
int8 activations (accuracy_level 4) against the fp32 model, with bounded error.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import hf_config
from transformers import AutoModelForCausalLM

from edge.config import QwenConfig
from edge.graph.plan import weight_plan
from edge.pipeline import build
from edge.quantize import head_rows
from edge.quantize.blockwise import QuantSpec, quantize
from edge.recipe import Precision, Recipe
from edge.sources import open_source
from qwen_edge.errors import QwenEdgeError

FAMILIES = [("qwen2", False), ("qwen2", True), ("qwen3", True), ("qwen3", False)]
IDS = np.random.default_rng(7).integers(0, 590, 24).tolist()
PREFILL = 9


GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _dequantize_like_the_graph(model, precision: Precision, source) -> None:
    """Replace every matrix of `source`'s `model` by its dequantized form, quantizing packed groups (qkv,
    gate/up) together."""
    config = QwenConfig.from_hf(model.config.to_dict())
    plan = head_rows.with_int8_ids(source, weight_plan(precision, config))
    params = dict(model.named_parameters())
    original_embedding = params["model.embed_tokens.weight"].detach().numpy().copy()
    groups = [["model.embed_tokens.weight"]] + ([] if config.tie_word_embeddings else [["lm_head.weight"]])
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        groups += [
            [f"{p}.self_attn.{n}.weight" for n in GROUPS[0]],
            [f"{p}.self_attn.o_proj.weight"],
            [f"{p}.mlp.{n}.weight" for n in GROUPS[1]],
            [f"{p}.mlp.down_proj.weight"],
        ]
    with torch.no_grad():
        for names in groups:
            spec = (
                plan.embedding
                if "embed" in names[0]
                else plan.lm_head
                if "lm_head" in names[0]
                else plan.for_linear(names)
            )
            if isinstance(spec, str):
                continue
            stacked = np.concatenate([params[n].detach().numpy() for n in names])
            if "lm_head" in names[0]:
                deq = _lm_head_like_the_graph(stacked, plan)
            else:
                q = quantize(stacked.copy(), spec)
                if "embed" in names[0] and not plan.lm_head_shares_embedding(config.tie_word_embeddings):
                    # a table of its own keeps fp16 scales, cast to fp32 at load: its rows are dequantized in fp32
                    q.scales = q.scales.astype(np.float16).astype(np.float32)
                deq = q.dequantize()
            start = 0
            for n in names:
                rows = params[n].shape[0]
                params[n].copy_(torch.from_numpy(deq[start : start + rows]))
                start += rows
        if (
            config.tie_word_embeddings
            and not isinstance(plan.lm_head, str)
            and not plan.lm_head_shares_embedding(True)
        ):
            model.lm_head.weight = torch.nn.Parameter(
                torch.from_numpy(_lm_head_like_the_graph(original_embedding, plan))
            )


def _lm_head_like_the_graph(weight: np.ndarray, plan, quantized=None) -> np.ndarray:
    """lm_head dequantized as the graph stores it: the rows `lm_head_int8_ids` names symmetric int8, the rest
    from `quantized` (blobs supplied to the build) or quantized with its own spec."""
    deq = (quantized or quantize(weight.copy(), plan.lm_head)).dequantize()
    ids = list(plan.lm_head_int8_ids)
    if ids:
        deq[ids] = quantize(weight[ids].copy(), QuantSpec(8, plan.lm_head.block_size)).dequantize()
    return deq


def reference(model_dir, dequantized: Precision | None = None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if dequantized is not None:
        _dequantize_like_the_graph(model, dequantized, open_source(str(model_dir)))
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def session(artifact_dir):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(artifact_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])


def prefill_all(sess, ids):
    """Logits for every position from one prefill with an empty past (the default num_logits_to_keep)."""
    kv = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values")
    }
    ids = np.array([ids], np.int64)
    return sess.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **kv})[0][0]


def cached_steps(sess, ids, prefill, max_len=64):
    """Last-position logits of a `prefill`-token chunk and then one token at a time, on a shared KV buffer."""
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    buffers = {
        i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, i.shape[1], max_len, i.shape[3]), np.float32))
        for i in pasts
    }
    keep_one = ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64))
    chunks = [ids[:prefill]] + [[t] for t in ids[prefill:]]
    out, pos = [], 0
    for chunk in chunks:
        binding = sess.io_binding()
        binding.bind_cpu_input("input_ids", np.array([chunk], np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, pos + len(chunk)), np.int64))
        binding.bind_ortvalue_input("num_logits_to_keep", keep_one)
        binding.bind_output("logits")
        for name, buf in buffers.items():
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        sess.run_with_iobinding(binding)
        logits = binding.copy_outputs_to_cpu()[0]
        assert logits.shape[:2] == (1, 1)
        out.append(logits[0, 0])
        pos += len(chunk)
    return np.stack(out)


def build_tiny(tiny_model, tmp_path, family, tied, accuracy_level=4, **precision):
    recipe = Recipe(
        name="t",
        source=str(tiny_model(family, tied)),
        context_length=256,
        precision=Precision(**precision),
        fidelity={"enabled": False},
        overrides={"accuracy_level": accuracy_level},
    )
    return build(recipe, out=tmp_path / "art").out_dir


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_fp32_prefill_and_cached_decode_match_transformers(tiny_model, tmp_path, family, tied):
    art = build_tiny(tiny_model, tmp_path, family, tied, weights="fp32")
    ref = reference(tiny_model(family, tied))
    sess = session(art)
    np.testing.assert_allclose(prefill_all(sess, IDS), ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(cached_steps(sess, IDS, PREFILL), ref[PREFILL - 1 :], atol=1e-4, rtol=0)


QUANTIZED = [
    dict(weights="int4", method="rtn", symmetric=True, block_size=32),
    dict(weights="int4", method="rtn", symmetric=False, block_size=64, lm_head="int8"),
    dict(weights="int4", method="kquant", block_size=32, embedding="int8"),
    dict(weights="int4", method="hqq", block_size=128),
    dict(weights="int4", method="mixed", block_size=32),
    dict(weights="int4", method="rtn", symmetric=False, block_size=32, lm_head_int8_rows=100),
    dict(weights="int8", method="rtn", symmetric=True, block_size=32),
    dict(weights="int8", method="rtn", symmetric=False, block_size=128, embedding="fp32"),
]


@pytest.mark.parametrize("precision", QUANTIZED, ids=lambda p: "-".join(str(v) for v in p.values()))
@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_quantized_graph_computes_the_dequantized_model(tiny_model, tmp_path, family, tied, precision):
    art = build_tiny(tiny_model, tmp_path, family, tied, accuracy_level=0, **precision)
    ref = reference(tiny_model(family, tied), dequantized=Precision(**precision))
    sess = session(art)
    np.testing.assert_allclose(prefill_all(sess, IDS), ref, atol=2e-4, rtol=0)
    np.testing.assert_allclose(cached_steps(sess, IDS, PREFILL), ref[PREFILL - 1 :], atol=2e-4, rtol=0)


def _kl(ref, art):
    lp = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(art).double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("weights,min_top1,max_kl", [("int8", 0.95, 0.01), ("int4", 0.6, 0.5)])
@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_quantized_error_is_bounded_with_int8_activations(
    tiny_model, tmp_path, family, tied, weights, min_top1, max_kl
):
    art = build_tiny(tiny_model, tmp_path, family, tied, weights=weights, symmetric=False)
    ref = reference(tiny_model(family, tied))
    logits = prefill_all(session(art), IDS)
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= min_top1
    assert _kl(ref, logits) <= max_kl


def test_logits_to_keep_defaults_to_every_position(tiny_artifact):
    sess = session(tiny_artifact("qwen2"))
    assert [i.name for i in sess.get_overridable_initializers()] == ["num_logits_to_keep"]
    all_positions = prefill_all(sess, IDS)
    assert all_positions.shape == (len(IDS), 600)
    last = cached_steps(sess, IDS, len(IDS))
    np.testing.assert_allclose(last[0], all_positions[-1], atol=1e-5)


def _initializer_bytes(art):
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    return {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}, model


def test_tied_int4_embedding_and_lm_head_share_one_copy(tiny_artifact):
    sizes, model = _initializer_bytes(tiny_artifact("qwen3", tied=True, weights="int4"))
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMulNBits")
    assert gather.input[0] == head.input[1] == "model.embed_tokens.qweight"
    assert not any(name.startswith("lm_head") for name in sizes)


def test_mixed_keeps_value_and_down_projections_in_int8(tiny_artifact):
    _, model = _initializer_bytes(tiny_artifact("qwen2", weights="int4", method="mixed"))
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in model.graph.node
        if n.op_type == "MatMulNBits"
    }
    assert bits["/model.layers.0.self_attn.qkv_proj/MatMulNBits"] == 8  # packed with v_proj
    assert bits["/model.layers.1.mlp.down_proj/MatMulNBits"] == 8
    assert bits["/model.layers.0.mlp.gate_up_proj/MatMulNBits"] == 4
    assert bits["/model.layers.0.self_attn.o_proj/MatMulNBits"] == 4


def test_fp16_storage_stays_close_to_fp32(tiny_model, tmp_path):
    art = build_tiny(tiny_model, tmp_path, "qwen3", True, weights="fp16", embedding="fp32")
    ref = reference(tiny_model("qwen3", True))
    np.testing.assert_allclose(prefill_all(session(art), IDS), ref, atol=5e-2, rtol=0)


def test_gguf_source_builds_the_same_bytes_and_builds_are_reproducible(tiny_model, tiny_gguf, tmp_path):
    def build_from(source, out):
        recipe = Recipe(
            name="t",
            source=str(source),
            context_length=256,
            precision=Precision(weights="int4"),
            fidelity={"enabled": False},
        )
        return build(recipe, out=out).out_dir

    a = build_from(tiny_model("qwen2", False), tmp_path / "a")
    b = build_from(tiny_model("qwen2", False), tmp_path / "b")
    g = build_from(tiny_gguf("qwen2", False), tmp_path / "g")
    for name in ("model.onnx", "model.onnx.data"):
        assert (a / name).read_bytes() == (b / name).read_bytes() == (g / name).read_bytes()


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_lm_head_in_int8_and_int4_row_slices_computes_the_dequantized_model(
    tiny_model, tmp_path, monkeypatch, family, tied
):
    monkeypatch.setattr("edge.graph.decoder.LM_HEAD_SLICE_ROWS", 200)
    precision = dict(weights="int4", method="rtn", symmetric=False, block_size=32, lm_head_int8_rows=100)
    art = build_tiny(tiny_model, tmp_path, family, tied, accuracy_level=0, **precision)
    _, model = _initializer_bytes(art)
    heads = {n.name: {a.name: a.i for a in n.attribute} for n in model.graph.node if n.name.startswith("/lm_head.")}
    # 600 rows: 100 int8, then 500 int4 rows in three slices of at most 200
    assert [(h["N"], h["bits"]) for h in heads.values()] == [(100, 8), (166, 4), (167, 4), (167, 4)]
    # the int8 slice holds the ranked rows, not the first 100: a Gather puts each logit back at its token id
    gather = next(n for n in model.graph.node if n.name == "/lm_head/Gather")
    assert list(gather.output) == ["logits"]
    source = open_source(str(tiny_model(family, tied)))
    ids = head_rows.with_int8_ids(source, weight_plan(Precision(**precision), source.config)).lm_head_int8_ids
    assert len(ids) == 100 and list(ids) != list(range(100))
    ref = reference(tiny_model(family, tied), dequantized=Precision(**precision))
    sess = session(art)
    np.testing.assert_allclose(prefill_all(sess, IDS), ref, atol=2e-4, rtol=0)
    np.testing.assert_allclose(cached_steps(sess, IDS, PREFILL), ref[PREFILL - 1 :], atol=2e-4, rtol=0)


def test_lm_head_int8_rows_must_leave_int4_rows():
    config = QwenConfig.from_hf(hf_config("qwen2", False, 600, 0, 1).to_dict())
    with pytest.raises(QwenEdgeError, match="covers the whole 600-token vocabulary; use lm_head: int8"):
        weight_plan(Precision(lm_head_int8_rows=600), config)


def test_hqq_zero_points_are_integers_so_onnxruntime_repacks_the_weights(tiny_artifact):
    model = onnx.load(
        str(tiny_artifact("qwen2", weights="int4", method="hqq") / "model.onnx"), load_external_data=False
    )
    types = {i.name: i.data_type for i in model.graph.initializer}
    zero_points = [
        n.input[3] for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) > 3 and n.input[3]
    ]
    assert zero_points and all(types[z] == onnx.TensorProto.UINT8 for z in zero_points)
