"""edge.sources: HF directories, GGUF files and Hub ids opened as a Source."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edge.config import UnsupportedModelError
from edge.sources import open_source
from edge.sources.base import SourceError, file_sha256, row_blocks, write_hf_directory

VARIANTS = [("qwen2", False), ("qwen2", True), ("qwen3", True), ("qwen3", False)]


@pytest.mark.parametrize("family,tied", VARIANTS)
def test_hf_dir_and_f32_gguf_agree(tiny_model, tiny_gguf, family, tied):
    hf = open_source(str(tiny_model(family, tied)))
    gg = open_source(str(tiny_gguf(family, tied)))
    assert (hf.kind, gg.kind) == ("hf", "gguf")
    assert hf.config == gg.config
    assert hf.config.family == family and hf.config.tie_word_embeddings == tied
    assert (hf.config.head_dim, hf.config.num_kv_heads, hf.config.vocab_size) == (32, 2, 600)
    assert sorted(hf.tensor_names()) == sorted(gg.tensor_names())
    for name in hf.tensor_names():
        a, b = hf.tensor(name), gg.tensor(name)
        assert a.dtype == np.float32 and b.dtype == np.float32
        np.testing.assert_array_equal(a, b, err_msg=name)
    name = "model.embed_tokens.weight"  # some rows only
    for src in (hf, gg):
        np.testing.assert_array_equal(src.tensor(name, rows=slice(0, 70)), hf.tensor(name)[:70])
        np.testing.assert_array_equal(src.tensor(name, rows=slice(550, 700)), hf.tensor(name)[550:])
        np.testing.assert_array_equal(
            np.concatenate([r for _, r in row_blocks(src.tensor, name, 600, 256)]), hf.tensor(name)
        )


def test_tensor_layout_is_hf_out_in(tiny_qwen3_untied):
    src = open_source(str(tiny_qwen3_untied))
    assert src.tensor("model.layers.0.self_attn.q_proj.weight").shape == (128, 128)
    assert src.tensor("model.layers.1.self_attn.k_proj.weight").shape == (64, 128)
    assert src.tensor("model.layers.0.mlp.down_proj.weight").shape == (128, 256)
    assert src.tensor("model.layers.0.self_attn.q_norm.weight").shape == (32,)
    assert not src.has_tensor("model.layers.0.self_attn.q_proj.bias")


def test_q8_gguf_dequantizes_close(tiny_qwen2, tiny_gguf):
    hf = open_source(str(tiny_qwen2))
    q8 = open_source(str(tiny_gguf("qwen2", False, "Q8_0")))
    assert q8.config == hf.config
    w = hf.tensor("model.layers.1.mlp.up_proj.weight")
    err = np.abs(q8.tensor("model.layers.1.mlp.up_proj.weight") - w).max()
    assert 0 < err < np.abs(w).max() / 100


@pytest.mark.parametrize("fixture", ["tiny_qwen2_tied", "tiny_qwen3", "tiny_qwen3_gguf"])
def test_tied_model_has_no_lm_head(request, fixture):
    src = open_source(str(request.getfixturevalue(fixture)))
    assert src.config.tie_word_embeddings
    assert not src.has_tensor("lm_head.weight")
    with pytest.raises(SourceError, match="ties lm_head"):
        src.tensor("lm_head.weight")


def test_untied_model_has_lm_head(tiny_qwen2_gguf):
    src = open_source(str(tiny_qwen2_gguf))
    assert src.tensor("lm_head.weight").shape == (600, 128)


def test_sharded_safetensors(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="600KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = open_source(str(tmp_path), cache_dir=tmp_path / "cache")
    assert len(sharded.weight_files()) > 1
    ref = open_source(str(tiny_qwen2))
    assert sharded.config == ref.config
    for name in ref.tensor_names():
        np.testing.assert_array_equal(sharded.tensor(name), ref.tensor(name))
    fp = sharded.fingerprint()
    assert len(fp["files"]) == len(sharded.weight_files()) and fp["bytes"] > 0


def test_missing_shard_is_clear(tiny_qwen2, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_qwen2).save_pretrained(tmp_path, max_shard_size="600KB")
    next(tmp_path.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(SourceError, match="missing"):
        open_source(str(tmp_path))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unsupported_model_type(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="qwen2 or qwen3"):
        open_source(str(d))


def test_unsupported_gguf_arch(tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'llama'.*qwen2 and qwen3"):
        open_source(str(path))


def test_pytorch_bin_weights_ask_for_safetensors(tiny_qwen2, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_qwen2 / "config.json", d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safetensors"):
        open_source(str(d))


def test_truncated_safetensors_is_clear(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    (d / "model.safetensors").write_bytes((tiny_qwen2 / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(SourceError, match="not a readable safetensors"):
        open_source(str(d))


def test_corrupt_config_is_clear(tiny_qwen2, tmp_path):
    d = _copy(tiny_qwen2, tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        open_source(str(d))


def test_truncated_gguf_is_clear(tiny_qwen2_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_qwen2_gguf.read_bytes()[:5000])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        open_source(str(bad))


@pytest.mark.parametrize("spec", ["/nonexistent/model", "missing.gguf", "./here", "not a model"])
def test_nonexistent_spec_is_clear(spec):
    with pytest.raises(SourceError, match="not found"):
        open_source(spec)


def test_other_file_is_clear(tiny_qwen2):
    with pytest.raises(SourceError, match="not a GGUF"):
        open_source(str(tiny_qwen2 / "config.json"))


def test_hub_id_offline_not_cached(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SourceError, match="not in the local Hugging Face cache.*local model directory or a .gguf"):
        open_source("Qwen/Qwen2.5-0.5B-Instruct")


def test_fingerprint_and_hash_sidecar(tiny_qwen2, tmp_path):
    src = open_source(str(tiny_qwen2), cache_dir=tmp_path / "cache")
    data = (tiny_qwen2 / "model.safetensors").read_bytes()
    fp = src.fingerprint()
    assert fp["kind"] == "hf" and fp["spec"] == str(tiny_qwen2)
    assert fp["sha256"] == hashlib.sha256(data).hexdigest() and fp["bytes"] == len(data)
    assert len(list((tmp_path / "cache" / "sha256").iterdir())) == 1
    # a changed file (new size and mtime) is re-hashed, not served from the sidecar
    copy = tmp_path / "w.bin"
    copy.write_bytes(b"abc")
    assert file_sha256(copy, tmp_path / "cache") == hashlib.sha256(b"abc").hexdigest()
    copy.write_bytes(b"abcd")
    assert file_sha256(copy, tmp_path / "cache") == hashlib.sha256(b"abcd").hexdigest()


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_write_tokenizer_hf_and_gguf_agree(tiny_model, tiny_gguf, tmp_path, family, tied):
    from transformers import AutoTokenizer

    open_source(str(tiny_model(family, tied))).write_tokenizer(tmp_path / "hf")
    open_source(str(tiny_gguf(family, tied))).write_tokenizer(tmp_path / "gguf")
    for d in ("hf", "gguf"):
        cfg = json.loads((tmp_path / d / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert "<|im_start|>" in cfg["chat_template"]
        assert (cfg["eos_token"], cfg["pad_token"], cfg["bos_token"]) == (
            "<|im_end|>",
            "<|endoftext|>",
            "<|endoftext|>",
        )
        assert not (tmp_path / d / "chat_template.jinja").exists()
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    hf, gg = AutoTokenizer.from_pretrained(tmp_path / "hf"), AutoTokenizer.from_pretrained(tmp_path / "gguf")
    messages = [{"role": "user", "content": "你好, où est le code? def f(x): return x 🙂"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gg.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert hf(text)["input_ids"] == gg(text)["input_ids"]
    assert hf.decode(hf(text)["input_ids"]) == text
    if family == "qwen3":
        off = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_reference_models_agree(tiny_model, tiny_gguf, family, tied):
    hf = open_source(str(tiny_model(family, tied))).reference_model()
    gg = open_source(str(tiny_gguf(family, tied))).reference_model()
    ids = torch.arange(0, 600, 7).unsqueeze(0)
    with torch.no_grad():
        a, b = hf(ids).logits, gg(ids).logits
    assert not hf.training and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.real_model
def test_real_qwen25_coder_gguf():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from fixtures import ensure_gguf
    from transformers import AutoModelForCausalLM

    src = open_source(str(ensure_gguf("0.5b")))
    c = src.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "qwen2",
        24,
        896,
        14,
        2,
        64,
    )
    assert (c.vocab_size, c.tie_word_embeddings, c.intermediate_size) == (151936, False, 4864)
    ref = AutoModelForCausalLM.from_pretrained(src.path.parent, gguf_file=src.path.name, dtype=torch.float32)
    for name in ("model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.k_proj.bias", "lm_head.weight"):
        expected = ref.state_dict()[name].numpy()
        np.testing.assert_array_equal(src.tensor(name), expected, err_msg=name)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_write_hf_directory_round_trips(tiny_gguf, tmp_path, family):
    gguf = open_source(str(tiny_gguf(family)))
    out = write_hf_directory(gguf, tmp_path / "hf")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    hf = open_source(str(out))
    assert hf.config == gguf.config
    for name in gguf.tensor_names():
        np.testing.assert_array_equal(hf.tensor(name), gguf.tensor(name))
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        np.testing.assert_allclose(
            hf.reference_model()(ids).logits.numpy(), gguf.reference_model()(ids).logits.numpy(), atol=1e-5
        )
