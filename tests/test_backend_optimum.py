"""The optimum recipe backend: optimum-onnx export, quantization, and the runtime's plain-graph path.

The export tests need optimum-onnx, which pins transformers <4.58 and so lives in its own virtual
environment (see the `optimum` extra); they are skipped where it is not installed. The error and
recipe checks run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import metadata

import numpy as np
import pytest

from edge.backends import optimum as backend
from edge.recipe import Precision, Recipe, recipe_profile
from qwen_edge.errors import QwenEdgeError

try:
    backend.check_installed()
    MISSING = None
except QwenEdgeError as e:
    MISSING = str(e)
needs_optimum = pytest.mark.skipif(MISSING is not None, reason=f"optimum backend unavailable: {MISSING}")


def _recipe(model_dir, weights: str, **precision) -> Recipe:
    return Recipe(
        name="tiny-optimum",
        source=str(model_dir),
        backend="optimum",
        context_length=256,
        precision=Precision(weights=weights, **precision),
        fidelity={"enabled": False},
    )


def test_missing_backend_names_the_extra(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", not_installed)
    with pytest.raises(
        QwenEdgeError, match=r"needs optimum-onnx, which is not installed: pip install 'qwen-edge\[optimum\]'"
    ):
        backend.check_installed()


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="optimum-onnx is not installed")
def test_unsupported_transformers_names_the_separate_environment(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda d: "99.0.0" if d == "transformers" else real(d))
    with pytest.raises(QwenEdgeError, match="transformers 99.0.0.*separate virtual environment"):
        backend.check_installed()


@pytest.mark.parametrize(
    "precision,message",
    [({"weights": "fp16"}, "int4, int8 or fp32"), ({"weights": "int4", "method": "gptq"}, "backend: native")],
)
def test_describe_refuses_what_it_cannot_build(tmp_path, precision, message):
    recipe = _recipe(tmp_path, **precision)
    with pytest.raises(QwenEdgeError, match=message):
        backend.describe(recipe, recipe_profile(recipe))


def test_describe_lists_the_steps(tmp_path):
    recipe = _recipe(tmp_path, "int4", method="hqq", block_size=64)
    info = backend.describe(recipe, recipe_profile(recipe))
    assert info["graph"] == {"kv_cache": "growing", "position_ids": True, "num_logits_to_keep": True}
    assert "text-generation-with-past" in info["steps"][0] and "hqq, block_size 64" in info["steps"][1]


@pytest.fixture(scope="module")
def optimum_artifact(tiny_model, tmp_path_factory):
    """Factory `optimum_artifact(family, tied, weights) -> Path` built through the optimum backend (cached)."""
    from edge.pipeline import build

    root = tmp_path_factory.mktemp("optimum_artifacts")
    built = {}

    def make(family: str, tied: bool, weights: str, method: str = "rtn"):
        key = (family, tied, weights, method)
        if key not in built:
            built[key] = build(
                _recipe(tiny_model(family, tied), weights, method=method), out=root / "-".join(map(str, key))
            ).out_dir
        return built[key]

    return make


def _reference(model_dir, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


IDS = [5, 17, 33, 99, 120, 7, 8, 250, 3, 4, 5, 6, 7, 300, 42, 42]


def _generator_logits(artifact_dir, ids, prefill: int, chunk: int = 3):
    """Logits rows of every position from `prefill` on, through the Generator loop: a chunked prefill,
    then one token per step."""
    from qwen_edge.artifact import Artifact
    from qwen_edge.generator import Generator

    g = Generator(Artifact.open(artifact_dir), prefill_chunk=chunk)
    rows = [g.append(ids[:prefill]).copy()]
    rows += [g.append([t]).copy() for t in ids[prefill:]]
    return g, np.stack(rows)


@needs_optimum
@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_fp32_export_matches_transformers_through_the_generator(optimum_artifact, tiny_model, family, tied):
    art = optimum_artifact(family, tied, "fp32")
    cfg = json.loads((art / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is False
    assert cfg["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    manifest = json.loads((art / "manifest.json").read_text())
    assert "model.onnx.data" in manifest["files"]
    ref = _reference(tiny_model(family, tied), IDS)
    g, logits = _generator_logits(art, IDS, prefill=8)
    assert (
        type(g.runner.cache).__name__ == "GrowingKVCache" and g.runner.has_position_ids and g.runner.has_logits_to_keep
    )
    np.testing.assert_allclose(logits, ref[7:], rtol=0, atol=1e-4)
    g.truncate(5)  # prefix reuse: the growing past is cut back to 5 positions
    np.testing.assert_allclose(g.append(IDS[5:12]), ref[11], rtol=0, atol=1e-4)


@needs_optimum
def test_num_logits_to_keep_defaults_to_every_position(optimum_artifact):
    import onnxruntime as ort

    session = ort.InferenceSession(str(optimum_artifact("qwen2", False, "fp32") / "model.onnx"))
    feeds = {
        "input_ids": np.array([IDS]),
        "attention_mask": np.ones((1, len(IDS)), np.int64),
        "position_ids": np.arange(len(IDS))[None],
    }
    feeds.update(
        {
            i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs()
            if i.name.startswith("past_key_values.")
        }
    )
    every = session.run(["logits"], feeds)[0][0]  # num_logits_to_keep not fed: its default
    assert every.shape == (len(IDS), 600)
    feeds["num_logits_to_keep"] = np.array(2)
    last = session.run(["logits"], feeds)[0][0]
    assert last.shape == (2, 600)
    np.testing.assert_allclose(last, every[-2:], rtol=0, atol=1e-5)


@needs_optimum
def test_int4_export_matches_the_native_int4_artifact(optimum_artifact, tiny_artifact):
    """Same quantizer, same blocks: the optimum int4 graph computes what the native int4 graph does."""
    import onnx

    art = optimum_artifact("qwen2", False, "int4")
    ops = {n.op_type for n in onnx.load(art / "model.onnx", load_external_data=False).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" in ops  # attention stays float
    _, logits = _generator_logits(art, IDS, prefill=8)
    _, native = _generator_logits(tiny_artifact("qwen2", weights="int4"), IDS, prefill=8)
    np.testing.assert_allclose(logits, native, rtol=0, atol=1e-4)


@needs_optimum
def test_int8_export_stays_close_to_transformers(optimum_artifact, tiny_model):
    import onnx

    from edge.check import fidelity

    ref = _reference(tiny_model("qwen3", True), IDS)
    for method, op in (("dynamic", "MatMulInteger"), ("rtn", "MatMulNBits")):  # Optimum's preset; ours
        art = optimum_artifact("qwen3", True, "int8", method)
        ops = {n.op_type for n in onnx.load(art / "model.onnx", load_external_data=False).graph.node}
        assert op in ops, method
        _, logits = _generator_logits(art, IDS, prefill=8)
        scores = fidelity.compare(ref[7:], logits, IDS[7:])
        assert scores["top1_agreement"] >= 0.85 and scores["mean_kl"] < 0.05, (method, scores)


def test_save_model_reads_small_tensors_out_of_the_exporters_data_file(tmp_path):
    """An exporter's external file must not stay referenced (torch's exporter also moves Constant
    tensors there): the artifact holds model.onnx.data only."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    x = ir.val("x", ir.DataType.FLOAT, [2])
    small = ir.Value(
        name="small",
        shape=ir.Shape([2]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(np.array([1.0, 2.0], np.float32), name="small"),
    )
    big = ir.Value(
        name="big",
        shape=ir.Shape([512]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(np.arange(512, dtype=np.float32), name="big"),
    )
    const = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([10.0, 20.0], np.float32), name="c")})
    add = ir.node("Add", [x, small])
    total = ir.node("ReduceSum", [big], attributes={"keepdims": 0})
    shifted = ir.node("Add", [add.outputs[0], const.outputs[0]])
    out = ir.node("Add", [shifted.outputs[0], total.outputs[0]])
    out.outputs[0].name = "y"
    graph = ir.Graph(
        [x],
        [out.outputs[0]],
        nodes=[const, add, total, shifted, out],
        initializers=[small, big],
        opset_imports={"": 18},
    )
    (tmp_path / "export").mkdir()
    onnx.save_model(
        ir.to_proto(ir.Model(graph, ir_version=10)),
        tmp_path / "export" / "model.onnx",
        save_as_external_data=True,
        location="model.onnx_data",
        size_threshold=0,
        convert_attribute=True,
    )
    (tmp_path / "artifact").mkdir()
    backend.save_model(ir.load(tmp_path / "export" / "model.onnx"), tmp_path / "artifact")
    (tmp_path / "export" / "model.onnx_data").unlink()
    assert sorted(p.name for p in (tmp_path / "artifact").iterdir()) == ["model.onnx", "model.onnx.data"]
    session = ort.InferenceSession(str(tmp_path / "artifact" / "model.onnx"))
    y = session.run(["y"], {"x": np.zeros(2, np.float32)})[0]
    np.testing.assert_allclose(y, [11.0 + 130816.0, 22.0 + 130816.0])
