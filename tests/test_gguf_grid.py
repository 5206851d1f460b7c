"""Precision method gguf: a GGUF's own integers and scales carried into the artifact's blobs exactly.

Tiny Qwen2 (untied) and Qwen3 (tied) GGUFs mix Q4_0, Q5_0, Q8_0, Q6_K and Q5_1 matrices; the stored
MatMulNBits / GatherBlockQuantized blocks, dequantized by numpy from the ONNX initializers, must equal
gguf's own dequantization, and the graph must compute the dequantized GGUF (transformers fp32).
"""

import json

import numpy as np
import onnx
import pytest
import torch
from gguf.quants import dequantize
from onnx import numpy_helper
from test_graph_parity import IDS, PREFILL, cached_steps, prefill_all, session
from tiny_models import write_gguf

from edge.pipeline import build
from edge.quantize import source_grid
from edge.quantize.blockwise import BlockQuantized, QuantSpec
from edge.recipe import Precision, Recipe, RecipeError
from edge.sources.gguf import GGUFSource

L = "model.layers.*."
MIXES = {
    # qkv mixes Q5_0 and Q8_0 rows (both int8 block 32); gate_up Q4_0 with Q8_0 (Q4_0 kept inside int8)
    ("qwen2", False): {
        f"{L}self_attn.[qk]_proj.weight": "Q5_0",
        f"{L}self_attn.v_proj.weight": "Q8_0",
        f"{L}self_attn.o_proj.weight": "Q4_0",
        f"{L}mlp.gate_proj.weight": "Q4_0",
        f"{L}mlp.up_proj.weight": "Q8_0",
        f"{L}mlp.down_proj.weight": "Q6_K",
        "model.embed_tokens.weight": "Q5_0",
        "lm_head.weight": "Q8_0",
    },
    # a tied int4 table (GatherBlockQuantized int4 + the shared lm_head); Q5_1 has a min: re-rounded
    ("qwen3", True): {
        f"{L}self_attn.[qkv]_proj.weight": "Q4_0",
        f"{L}self_attn.o_proj.weight": "Q5_1",
        "model.layers.0.mlp.*_proj.weight": "Q8_0",
        "model.layers.1.mlp.[gu]*_proj.weight": "Q5_0",
        "model.layers.1.mlp.down_proj.weight": "Q6_K",
        "model.embed_tokens.weight": "Q4_0",
    },
}
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    """Factory `mixed(family, tied) -> (gguf path, artifact dir)`, built with method gguf at accuracy_level 0."""
    root = tmp_path_factory.mktemp("gguf_grid")
    built = {}

    def make(family, tied):
        if (family, tied) not in built:
            path = write_gguf(tiny_model(family, tied), root / f"{family}.gguf", matrix_types=MIXES[family, tied])
            recipe = Recipe(
                name="t",
                source=str(path),
                context_length=256,
                precision=Precision(method="gguf", weights="int4", symmetric=False),
                fidelity={"enabled": False},
                overrides={"accuracy_level": 0},
            )
            built[family, tied] = path, build(recipe, out=root / f"{family}-art").out_dir
        return built[family, tied]

    return make


def _gguf_matrix(src: GGUFSource, name: str) -> np.ndarray:
    t = src._tensors[src._gguf_name[name]]
    return dequantize(t.data, t.tensor_type).reshape(src._shapes[name])


def _stored(art) -> dict[str, np.ndarray]:
    """Every quantized weight of the artifact dequantized from its initializers, by graph key."""
    model = onnx.load(str(art / "model.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        key = node.input[0 if node.op_type == "GatherBlockQuantized" else 1].removesuffix(".qweight")
        packed = init[f"{key}.qweight"]
        zp = init.get(f"{key}.zero_points")
        n, kb = packed.shape[:2]
        scales = init[f"{key}.scales"].astype(np.float32)
        bits, block = attrs["bits"], attrs["block_size"]
        out[key] = BlockQuantized(packed, scales, zp, bits, block, n, kb * block).dequantize()
    return out


@pytest.mark.parametrize("family,tied", list(MIXES))
def test_stored_blocks_are_the_gguf_values(mixed, family, tied):
    path, art = mixed(family, tied)
    src = GGUFSource(path, str(path))
    types = src.tensor_types()
    stored = _stored(art)
    manifest = json.loads((art / "manifest.json").read_text())
    kept = rerounded = 0
    for key, values in stored.items():
        if key == "model.embed_tokens" or key == "lm_head":
            names = ["model.embed_tokens.weight" if key == "model.embed_tokens" or tied else "lm_head.weight"]
        else:
            prefix, _, part = key.rpartition(".")
            names = [f"{prefix}.{p}.weight" for p in PACKED.get(part, (part,))]
        start = 0
        for name in names:
            want = _gguf_matrix(src, name)
            got = values[start : start + want.shape[0]]
            start += want.shape[0]
            if types[name] == "Q5_1":
                assert 0 < np.abs(got - want).max() < 0.01 * np.abs(want).max()  # int8 re-rounding of its step
                rerounded += 1
            else:
                assert np.array_equal(got, want), (name, types[name], np.abs(got - want).max())
                kept += 1
    assert kept + rerounded == len(types) - sum(t == "F32" for t in types.values())
    grid = manifest["source_grid"]
    assert sum(e["kept"] for e in grid.values()) == kept
    assert sum(len(e["rerounded"]) for e in grid.values()) == rerounded == (2 if family == "qwen3" else 0)
    if family == "qwen3":
        assert grid["int8 block 32 asymmetric"]["rerounded"] == [
            f"model.layers.{i}.self_attn.o_proj.weight (Q5_1)" for i in range(2)
        ]
        assert grid["int8 block 16"]["kept"] == 1  # layer 1's down_proj (Q6_K)
    else:
        assert grid["int8 block 16"]["kept"] == 2 and grid["int4 block 32"]["kept"] == 2  # down_proj, o_proj


@pytest.mark.parametrize("family,tied", list(MIXES))
def test_graph_computes_the_dequantized_gguf(mixed, family, tied):
    path, art = mixed(family, tied)
    src = GGUFSource(path, str(path))
    model = src.reference_model()  # transformers' own load: gguf's dequantized values in fp32
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("o_proj.weight") and src.tensor_types()[name] == "Q5_1":  # the re-rounded ones
                param.copy_(torch.from_numpy(_stored(art)[name.removesuffix(".weight")]))
        ref = model(torch.tensor([IDS])).logits[0].numpy()
    sess = session(art)
    np.testing.assert_allclose(prefill_all(sess, IDS), ref, atol=2e-4, rtol=0)
    np.testing.assert_allclose(cached_steps(sess, IDS, PREFILL), ref[PREFILL - 1 :], atol=2e-4, rtol=0)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q6_K"])
def test_decode_reads_every_bit_of_the_layout(qtype):
    """Random bytes (finite float16 scales) decoded into integers and scales give gguf's own values."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, (8, 2 * size), dtype=np.uint8)
    scale_at = [size - 2] if qtype == "Q6_K" else [0]
    for row in raw.reshape(-1, size):
        for at in scale_at:
            row[at : at + 2] = np.array([rng.normal() * 0.01], np.float16).view(np.uint8)
    q, scales = source_grid.decode(qtype, raw, 2 * block)
    per = source_grid.EXACT[qtype][1]
    values = (q.reshape(8, -1, per).astype(np.float32) * scales[:, :, None]).reshape(8, -1)
    assert np.array_equal(values, dequantize(raw, kind).reshape(8, -1))


def test_which_storages_hold_which_grid():
    assert source_grid.holds("Q4_0", QuantSpec(4, 32)) and source_grid.holds("Q4_0", QuantSpec(8, 16))
    assert not source_grid.holds("Q5_0", QuantSpec(4, 32))  # 5 bits
    assert not source_grid.holds("Q6_K", QuantSpec(8, 32))  # one scale per 16
    assert not source_grid.holds("Q8_0", QuantSpec(8, 64))
    assert not source_grid.holds("Q8_0", QuantSpec(8, 32, method="kquant"))
    assert not source_grid.holds("Q5_1", QuantSpec(8, 32, symmetric=False))  # a min: -m/d is no integer
    assert source_grid.native_storage("Q4_K") == source_grid.REROUNDED and source_grid.native_storage("F16") is None


def test_method_gguf_needs_a_gguf_source(tiny_qwen2, tiny_qwen2_gguf):
    with pytest.raises(ValueError, match="not a GGUF"):
        Recipe(name="t", source=str(tiny_qwen2), precision=Precision(method="gguf"))
    with pytest.raises(ValueError, match="remove backend"):
        Recipe(name="t", source=str(tiny_qwen2_gguf), backend="olive", precision=Precision(method="gguf"))
    recipe = Recipe(
        name="t", source=str(tiny_qwen2_gguf), precision=Precision(method="gguf"), fidelity={"enabled": False}
    )
    with pytest.raises(RecipeError, match="this source is not a GGUF file"):
        build(recipe, model=str(tiny_qwen2))
