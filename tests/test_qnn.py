"""QNN HTP artifacts on a tiny Qwen2: QDQ quantization, shared KV ranges, EPContext compile, emulator check."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edge.artifact.manifest import model_block
from edge.graph.static import export_static
from edge.npu import qnn
from edge.quantize.qdq import QdqOptions, quantize, unwrapped_nodes
from edge.sources import open_source
from qwen_edge.artifact import Artifact
from qwen_edge.contract import STATIC_GRAPHS

CHUNK, CONTEXT = 8, 64
PROMPTS = [np.random.default_rng(s).integers(0, 590, 19).tolist() for s in (1, 2)]
HAS_QNN = importlib.util.find_spec("onnxruntime_qnn") is not None
needs_qnn = pytest.mark.skipif(not HAS_QNN, reason="onnxruntime-qnn is not installed (pip install onnxruntime-qnn)")


@pytest.fixture(scope="module")
def quantized(tiny_qwen2, tmp_path_factory):
    """(fp32 static dir, QDQ dir, captured feeds) of the tiny Qwen2."""
    source = open_source(str(tiny_qwen2))
    fp32 = tmp_path_factory.mktemp("static")
    info = export_static(source, fp32, chunk=CHUNK, context_length=CONTEXT)
    source.write_tokenizer(fp32)
    artifact = Artifact(fp32, {"model": model_block(source.config, CONTEXT), "profile": {}, "static": info})
    feeds = qnn.capture_feeds(artifact, PROMPTS, new_tokens=3)
    qdq = tmp_path_factory.mktemp("qdq")
    quantize(fp32, qdq, feeds)
    return fp32, qdq, feeds


def test_captured_feeds_cover_both_graphs(quantized):
    _, _, feeds = quantized
    assert len(feeds["prefill"]) == 2 * 3 and len(feeds["decode"]) == 2 * 2
    assert feeds["decode"][0]["past_key_0"].any()  # the cache the prefill left behind


def test_every_compute_node_is_qdq_wrapped_standard_onnx(quantized):
    _, qdq, _ = quantized
    for g in STATIC_GRAPHS:
        model = onnx.load(qdq / f"{g}.onnx", load_external_data=False)
        assert unwrapped_nodes(model) == {}
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
        assert {n.op_type for n in model.graph.node} >= {"MatMul", "Softmax", "QuantizeLinear", "DequantizeLinear"}


def _kv_qparams(model):
    inits = {
        t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith(("_scale", "_zero_point"))
    }
    out = {}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0].startswith("past_"):
            out[n.input[0]] = (float(inits[n.input[1]]), int(inits[n.input[2]]))
        if n.op_type == "DequantizeLinear" and n.output[0].startswith("present_"):
            out[n.output[0]] = (float(inits[n.input[1]]), int(inits[n.input[2]]))
    return out


def test_kv_quantization_matches_between_graphs(quantized):
    _, qdq, _ = quantized
    params = {g: _kv_qparams(onnx.load(qdq / f"{g}.onnx", load_external_data=False)) for g in STATIC_GRAPHS}
    names = [f"{io}_{kv}_{i}" for io in ("past", "present") for kv in ("key", "value") for i in range(2)]
    for name in names:
        past = name.replace("present_", "past_")
        assert params["prefill"][name] == params["decode"][name] == params["decode"][past], name
    weights = onnx.load(qdq / "prefill.onnx", load_external_data=False)
    scales = {t.name: t for t in weights.graph.initializer}
    assert list(scales["model.layers.0.mlp.down_proj.weight_t_scale"].dims) == [128]  # per output channel


def test_bad_options_are_one_line_errors():
    with pytest.raises(qnn.QnnError, match="weight_bits must be 4 or 8"):
        QdqOptions(weight_bits=6)


@needs_qnn
def test_compile_shares_weights_and_the_htp_agrees_with_the_cpu(quantized, tmp_path):
    fp32, qdq, feeds = quantized
    shared = qnn.compile_context(qdq, tmp_path / "shared")
    separate = qnn.compile_context(qdq, tmp_path / "separate", share=False)
    assert len(shared["binaries"]) == 1 and len(separate["binaries"]) == 2
    one = shared["files"][shared["binaries"][0]]
    two = sum(separate["files"][b] for b in separate["binaries"])
    assert one < 0.75 * two  # the weights are stored once
    for g in STATIC_GRAPHS:
        assert qnn.context_binaries(tmp_path / "shared" / f"{g}.onnx") in ([], shared["binaries"])
    result = qnn.verify(tmp_path / "separate", qdq, {"prefill": feeds["prefill"][:2], "decode": feeds["decode"][:2]})
    for g in STATIC_GRAPHS:
        assert result[g]["top1_agreement"] >= 0.8 and result[g]["mean_kl"] < 0.05, result


@needs_qnn
def test_a_graph_qnn_cannot_take_fails_the_build_naming_why(quantized):
    fp32, _, _ = quantized
    with pytest.raises(qnn.QnnError, match="QNN cannot compile prefill.onnx") as info:
        qnn.check_fallback(fp32 / "prefill.onnx")
    assert "\n" not in str(info.value)


def _recipe(tmp_path, model, share: bool):
    path = tmp_path / "tiny-qnn.yaml"
    path.write_text(
        f"name: tiny-qnn\nsource: {model}\nprofile: qnn-htp\ncontext_length: 256\n"
        f"overrides: {{chunk: 16, share_weights: {str(share).lower()}, fidelity_threshold: {{max_kl: 0.1}}}}\n"
        "fidelity: {max_tokens: 128}\n"
    )
    return path


@needs_qnn
def test_build_and_run_through_the_htp(tiny_qwen2, tmp_path, capsys):
    from edge.pipeline import build
    from edge.recipe import load_recipe
    from qwen_edge import cli

    result = build(load_recipe(_recipe(tmp_path, tiny_qwen2, share=False)), out=tmp_path / "art")
    files = sorted(p.name for p in (tmp_path / "art").iterdir())
    assert {"prefill.onnx", "decode.onnx", "prefill_qnn.bin", "decode_qnn.bin", "tokenizer.json"} <= set(files)
    assert not any(f.endswith(".data") or f.startswith(".") for f in files)  # no fp32/QDQ leftovers
    static, fidelity = result.manifest["static"], result.manifest["fidelity"]
    assert static["chunk"] == 16 and static["weight_bits"] == 8 and not static["share_weights"]
    assert fidelity["overall"]["mean_kl"] < 0.1 and static["npu_check"]["decode"]["top1_agreement"] >= 0.9
    assert cli.main(["run", str(tmp_path / "art"), "Hello", "--max-new-tokens", "4", "--no-think"]) == 0
    assert "4 new" in capsys.readouterr().err
    # `qwen-edge eval` runs the same compiled graphs through the runtime: the numbers the build recorded
    assert cli.main(["eval", str(tmp_path / "art"), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["overall"] == pytest.approx(fidelity["overall"], rel=1e-6)
    assert again["greedy"] == fidelity["greedy"]


@needs_qnn
def test_shared_weights_artifact_is_refused_on_the_emulator(tiny_qwen2, tmp_path):
    from edge.pipeline import build
    from edge.recipe import load_recipe
    from qwen_edge import Generator
    from qwen_edge.artifact import Artifact
    from qwen_edge.errors import RuntimeMissingError

    result = build(load_recipe(_recipe(tmp_path, tiny_qwen2, share=True)), out=tmp_path / "art", evaluate=False)
    assert len(result.manifest["static"]["binaries"]) == 1
    with pytest.raises(RuntimeMissingError, match="share_weights: false"):
        Generator(Artifact.open(tmp_path / "art"))
