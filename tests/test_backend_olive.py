"""Recipe backend 'olive': the workflow a recipe becomes, the missing-extra error, and Olive-built graphs
(plain ops, position_ids, growing past) against transformers fp32 and against the native backend."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from edge.backends import BackendMissingError
from edge.backends import olive as backend
from edge.check import fidelity
from edge.recipe import Precision, Recipe, recipe_profile
from qwen_edge.artifact import Artifact

needs_olive = pytest.mark.skipif(
    importlib.util.find_spec("olive") is None, reason="olive-ai is not installed (pip install 'qwen-edge[olive]')"
)
EVAL_TOKENS = 256


def _recipe(model_dir, **precision) -> Recipe:
    return Recipe(
        name="tiny-olive",
        source=str(model_dir),
        context_length=256,
        precision=Precision(**precision),
        fidelity={"enabled": False},
    )


def _passes(config: dict) -> list[tuple[str, dict]]:
    return [(p["type"], p) for p in config["passes"].values()]


# ----- the workflow dict (no Olive run) -------------------------------------------------------------
def test_workflow_int4_rtn(tiny_model, tmp_path):
    recipe = _recipe(tiny_model("qwen2"), weights="int4", method="rtn", block_size=64, symmetric=True)
    profile = recipe_profile(recipe)
    config = backend.workflow(recipe, profile, tiny_model("qwen2"), tmp_path)
    (conv, c), (rtn, r) = _passes(config)
    assert (conv, rtn) == ("OnnxConversion", "OnnxBlockWiseRtnQuantization")
    assert c["use_dynamo_exporter"] is True
    assert (r["bits"], r["block_size"], r["is_symmetric"], r["accuracy_level"]) == (
        4,
        64,
        True,
        profile.accuracy_level,
    )
    assert config["input_model"] == {
        "type": "HfModel",
        "model_path": str(tiny_model("qwen2")),
        "task": "text-generation-with-past",
    }
    assert config["engine"]["output_dir"] == str(tmp_path)


def test_workflow_tied_rtn_quantizes_lm_head_in_torch(tiny_model, tmp_path):
    model = tiny_model("qwen3", tied=True)
    recipe = _recipe(model, weights="int4", method="rtn")
    config = backend.workflow(recipe, recipe_profile(recipe), model, tmp_path)
    assert [t for t, _ in _passes(config)] == ["Rtn", "OnnxConversion", "OnnxBlockWiseRtnQuantization"]
    rtn = config["passes"]["rtn_torch"]
    assert (rtn["bits"], rtn["group_size"], rtn["lm_head"], rtn["overrides"]) == (4, 32, True, {})


def test_workflow_int8(tiny_model, tmp_path):
    recipe = _recipe(tiny_model("qwen2"), weights="int8", method="rtn")
    (_, _), (rtn, r) = _passes(backend.workflow(recipe, recipe_profile(recipe), tiny_model("qwen2"), tmp_path))
    assert (rtn, r["bits"], r["block_size"]) == ("OnnxBlockWiseRtnQuantization", 8, 32)


def test_workflow_gptq_calibrates_on_the_shipped_text(tiny_model, tmp_path):
    model = tiny_model("qwen3", tied=True)
    recipe = _recipe(
        model,
        weights="int4",
        method="gptq",
        calibration_tokens=256,
        int8_layers=("model.layers.*.self_attn.v_proj.weight",),
    )
    config = backend.workflow(recipe, recipe_profile(recipe), model, tmp_path)
    types = [t for t, _ in _passes(config)]
    assert types == ["Gptq", "OnnxConversion", "OnnxBlockWiseRtnQuantization"]  # RTN: the embedding
    gptq = config["passes"]["gptq"]
    assert (gptq["bits"], gptq["group_size"], gptq["sym"], gptq["lm_head"]) == (4, 32, False, True)
    assert gptq["overrides"] == {f"model.layers.{i}.self_attn.v_proj": {"bits": 8, "symmetric": True} for i in (0, 1)}
    (data,) = config["data_configs"]
    assert gptq["data_config"] == data["name"]
    assert Path(data["user_script"]) == Path(backend.__file__).resolve()
    assert data["load_dataset_config"]["params"] == {"model_dir": str(model), "tokens": 256, "seq_len": 256}
    rows = backend.calibration_dataset(**data["load_dataset_config"]["params"])
    assert len(rows) == 1 and rows[0][0]["input_ids"].shape == (256,) and rows[0][0]["input_ids"].dtype == torch.int64


def test_workflow_hqq_and_describe(tiny_model):
    recipe = _recipe(tiny_model("qwen2"), weights="int4", method="hqq")
    config = backend.describe(recipe, recipe_profile(recipe))
    assert [t for t, _ in _passes(config)] == ["OnnxConversion", "OnnxHqqQuantization", "OnnxBlockWiseRtnQuantization"]
    assert config["input_model"]["model_path"] == backend.PLACEHOLDER_MODEL
    assert config["engine"]["output_dir"] == backend.PLACEHOLDER_OUT
    mixed = _recipe(tiny_model("qwen2"), weights="int4", method="mixed")
    overrides = backend.describe(mixed, recipe_profile(mixed))["passes"]["rtn_torch"]["overrides"]
    assert "model.layers.*.self_attn.v_proj.weight" in overrides  # a placeholder, not a silent {}


@pytest.mark.parametrize(
    "precision,needle",
    [
        ({"weights": "fp16"}, "precision.weights"),
        ({"weights": "int4", "embedding": "fp32"}, "precision.embedding"),
        ({"weights": "int4", "lm_head": "int8"}, "precision.lm_head"),
    ],
)
def test_unsupported_recipe_names_the_key(tiny_model, tmp_path, precision, needle):
    recipe = _recipe(tiny_model("qwen2"), **precision)
    with pytest.raises(backend.OliveBackendError, match=needle) as e:
        backend.workflow(recipe, recipe_profile(recipe), tiny_model("qwen2"), tmp_path)
    assert "\n" not in str(e.value)


def test_missing_olive_names_the_extra(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olive" else find_spec(name, *a))
    with pytest.raises(BackendMissingError) as e:
        backend.check_installed()
    assert str(e.value) == (
        "recipe backend 'olive' needs olive-ai, which is not installed: pip install 'qwen-edge[olive]'"
    )


# ----- Olive runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def olive_artifact(tiny_model, tmp_path_factory):
    """Factory `olive_artifact(family, tied, **precision) -> (dir, export result)` (cached)."""
    built = {}

    def make(family, tied, **precision):
        key = (family, tied, tuple(sorted(precision.items())))
        if key not in built:
            model = tiny_model(family, tied)
            out = tmp_path_factory.mktemp(f"olive-{family}")
            recipe = _recipe(model, **precision)
            built[key] = out, backend.export(recipe, recipe_profile(recipe), model, out)
        return built[key]

    return make


def _reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _session(out):
    """A plain CPU session over the backend's graph (its output directory is not an artifact yet)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(out / "model.onnx"))


def _run_cached(session, ids: np.ndarray, steps: list[int]) -> np.ndarray:
    """Logits of `ids` fed as a prefill then decode steps, carrying present -> past (which grows)."""
    kv = {i.name: i for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    past = {n: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for n, i in kv.items()}
    names = [o.name for o in session.get_outputs()]
    logits, pos = [], 0
    for n in steps:
        feed = {
            "input_ids": ids[None, pos : pos + n],
            "attention_mask": np.ones((1, pos + n), np.int64),
            "position_ids": np.arange(pos, pos + n, dtype=np.int64)[None],
            **past,
        }
        out = dict(zip(names, session.run(None, feed)))
        logits.append(out["logits"][0])
        past = {name: out[name.replace("past_key_values.", "present.")] for name in past}
        assert next(iter(past.values())).shape[2] == pos + n
        pos += n
    return np.concatenate(logits)


@needs_olive
@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_fp32_matches_transformers(olive_artifact, tiny_model, family, tied):
    out, result = olive_artifact(family, tied, weights="fp32")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert result["backend"] == "olive" and result["passes"] == ["OnnxConversion"]
    assert result["versions"]["olive-ai"]
    graph = result["graph"]
    assert (graph["kv_cache"], graph["position_ids"], graph["num_logits_to_keep"], graph["layers"]) == (
        "growing",
        True,
        True,
        2,
    )
    assert graph["outputs"][0] == "logits" and graph["matmulnbits"] == 0

    ids = np.random.default_rng(0).integers(0, 600, 11).astype(np.int64)
    with torch.no_grad():
        want = _reference(tiny_model(family, tied))(torch.from_numpy(ids[None])).logits[0].numpy()
    got = _run_cached(_session(out), ids, [8, 1, 1, 1])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@needs_olive
@pytest.mark.parametrize("family,tied,weights", [("qwen3", True, "int4"), ("qwen2", False, "int8")])
def test_quantized_stays_close_to_native(olive_artifact, tiny_model, tiny_artifact, family, tied, weights):
    out, result = olive_artifact(family, tied, weights=weights, method="rtn")
    graph = result["graph"]
    assert graph["matmulnbits"] == 2 * 7 + 1 and graph["gather_block_quantized"] == 1  # linears, lm_head, embedding
    assert graph["lm_head_quantized"]
    session = _session(out)
    ids = np.random.default_rng(1).integers(0, 600, 10).astype(np.int64)
    np.testing.assert_allclose(
        _run_cached(session, ids, [7, 1, 1, 1]), _run_cached(session, ids, [10]), atol=1e-3, rtol=1e-3
    )

    model_dir = tiny_model(family, tied)
    reference, tokenizer = _reference(model_dir), AutoTokenizer.from_pretrained(model_dir)
    native_dir = tiny_artifact(family, tied, weights=weights)
    olive = lambda ids: _run_cached(session, np.asarray(ids, np.int64), [len(ids)])  # noqa: E731
    olive_fid = fidelity.evaluate(olive, reference, tokenizer, max_tokens=EVAL_TOKENS)["overall"]
    native = fidelity.scorer(Artifact.open(native_dir))
    native_fid = fidelity.evaluate(native, reference, tokenizer, max_tokens=EVAL_TOKENS)["overall"]
    assert abs(olive_fid["top1_agreement"] - native_fid["top1_agreement"]) <= 0.05
    assert olive_fid["mean_kl"] <= 1.25 * native_fid["mean_kl"] + 1e-3


@needs_olive
def test_a_run_leaves_the_process_tempfile_root_alone(olive_artifact):
    import tempfile

    before = tempfile.gettempdir()
    olive_artifact("qwen2", False, weights="fp32")
    assert tempfile.gettempdir() == before and Path(before).is_dir()
