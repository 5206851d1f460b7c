"""manifest.json lists every file with its size and sha256; genai_config.json has onnxruntime-genai's keys."""

import hashlib
import json

import pytest

from edge.artifact.genai_config import genai_config, write_genai_config
from edge.artifact.manifest import write_manifest
from edge.config import QwenConfig
from edge.recipe import load_recipe, recipe_profile
from qwen_edge.errors import QwenEdgeError

CONFIG = QwenConfig(
    family="qwen2",
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
    tie_word_embeddings=False,
    bos_token_id=151643,
    eos_token_ids=(151645, 151643),
    pad_token_id=151643,
)


def test_manifest_lists_every_file_with_its_hash(tmp_path):
    recipe = load_recipe("demo")
    profile = recipe_profile(recipe)
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx.data").write_bytes(bytes(range(256)) * 1000)
    (tmp_path / "tokenizer.json").write_text("{}")
    write_genai_config(tmp_path, CONFIG, recipe.context_length, profile)
    (tmp_path / "manifest.json").write_text("stale")  # never hashed into itself
    manifest = write_manifest(
        tmp_path,
        recipe=recipe,
        profile=profile,
        source_fingerprint={"spec": "pypi-gguf", "kind": "pypi-gguf", "sha256": recipe.source.sha256},
        config=CONFIG,
        precision=recipe.precision,
        fidelity={"overall": {"top1_agreement": 0.9}},
        build_stats={"seconds": 1.5, "peak_rss_mb": 100},
    )
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == manifest
    expected = {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json"}
    assert set(on_disk["files"]) == expected
    for name, entry in on_disk["files"].items():
        data = (tmp_path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    keys = {
        "format",
        "format_version",
        "recipe",
        "profile",
        "source",
        "model",
        "precision",
        "tools",
        "files",
        "fidelity",
        "build",
        "license",
        "backend",
    }
    assert set(on_disk) == keys and on_disk["backend"] == {"name": "native"}
    assert on_disk["model"]["context_length"] == 4096 and on_disk["model"]["num_kv_heads"] == 2
    assert on_disk["profile"]["accuracy_level"] == 4
    assert on_disk["precision"]["weights"] == "int4"
    assert on_disk["tools"]["onnxruntime"] and "gguf" in on_disk["tools"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_genai_config_has_the_required_keys(tmp_path):
    profile = recipe_profile(load_recipe("demo"))
    cfg = json.loads(write_genai_config(tmp_path, CONFIG, 4096, profile).read_text())
    model, dec, search = cfg["model"], cfg["model"]["decoder"], cfg["search"]
    assert model["type"] == "qwen2" and model["vocab_size"] == 151936 and model["context_length"] == 4096
    assert model["eos_token_id"] == [151645, 151643] and model["pad_token_id"] == 151643
    assert model["bos_token_id"] == 151643
    assert dec["filename"] == "model.onnx"
    assert (dec["head_size"], dec["hidden_size"], dec["num_attention_heads"]) == (64, 896, 14)
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"]) == (24, 2)
    assert dec["inputs"] == {
        "input_ids": "input_ids",
        "attention_mask": "attention_mask",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    assert dec["outputs"] == {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    assert dec["session_options"]["provider_options"] == []
    assert dec["session_options"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert search["max_length"] == 4096 and search["past_present_share_buffer"] is True
    assert search["do_sample"] is False and search["top_k"] == 1


def test_genai_config_threads_and_single_eos():
    arm = recipe_profile(load_recipe("demo")).model_copy(update={"intra_op_num_threads": 4})
    one_eos = QwenConfig(**{**CONFIG.to_dict(), "family": "qwen3", "eos_token_ids": (151645,), "pad_token_id": None})
    cfg = genai_config(one_eos, 2048, arm)
    assert cfg["model"]["type"] == "qwen3"
    assert cfg["model"]["eos_token_id"] == 151645 and cfg["model"]["pad_token_id"] == 151645
    assert cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 4
    with pytest.raises(QwenEdgeError, match="eos_token_id"):
        genai_config(QwenConfig(**{**CONFIG.to_dict(), "eos_token_ids": ()}), 2048, arm)


def test_genai_config_of_a_static_npu_artifact_is_a_two_graph_pipeline():
    profile = recipe_profile(load_recipe("qwen2.5-coder-0.5b-instruct-qnn"))
    static = {
        "prefill": "prefill.onnx",
        "decode": "decode.onnx",
        "chunk": 64,
        "context_length": 1024,
        "mask_value": -100.0,
        "key_layout": "k",
        "value_layout": "v",
        "inputs": ["input_ids", "position_ids", "attention_bias"],
        "outputs": ["logits"],
    }
    config = genai_config(CONFIG, 1024, profile, {"kv_cache": "static", "static": static})
    decoder = config["model"]["decoder"]
    assert "filename" not in decoder and config["search"]["past_present_share_buffer"] is False
    (prefill,), (decode,) = (stage.values() for stage in decoder["pipeline"])
    assert (prefill["filename"], prefill["run_on_prompt"], prefill["run_on_token_gen"]) == (
        "prefill.onnx",
        True,
        False,
    )
    assert (decode["filename"], decode["run_on_prompt"], decode["run_on_token_gen"]) == ("decode.onnx", False, True)
    assert decoder["static"]["chunk"] == 64
    assert decoder["session_options"]["provider_options"] == [
        {"qnn": {"backend_type": "htp", "htp_performance_mode": "burst"}}
    ]
