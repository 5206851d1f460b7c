"""The runtime's growing-KV path (plain-op graphs, e.g. the optimum backend's), without optimum.

The native graph's GroupQueryAttention also runs with separate past and present tensors (present =
past + new) when the client does not share one buffer, so a native artifact whose genai_config.json
says ``past_present_share_buffer: false`` exercises the growing strategy here, and must give the
same logits and tokens as the shared-buffer strategy. The position_ids plumbing against a real
plain-op graph is covered by tests/test_backend_optimum.py (optimum venv).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge.artifact.genai_config import genai_config
from edge.artifact.manifest import file_table
from edge.recipe import Profile
from qwen_edge.artifact import Artifact
from qwen_edge.errors import ArtifactError, QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.sampling import SamplingParams


def _rewrite_genai_config(src, dst, change):
    """Copy artifact `src` to `dst`, edit its genai_config.json with `change(cfg)`, re-hash the manifest."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "genai_config.json").read_text())
    change(cfg)
    (dst / "genai_config.json").write_text(json.dumps(cfg))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"] = file_table(dst)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.fixture(scope="module")
def pair(tiny_artifact, tmp_path_factory):
    """(shared-buffer artifact, the same artifact declared as growing)."""
    shared = tiny_artifact("qwen2", weights="fp32")
    growing = _rewrite_genai_config(
        shared,
        tmp_path_factory.mktemp("plain") / "growing",
        lambda c: c["search"].update(past_present_share_buffer=False),
    )
    return shared, growing


def test_growing_cache_matches_shared_buffer(pair):
    shared, growing = (Generator(Artifact.open(p), prefill_chunk=7) for p in pair)
    assert (
        type(growing.runner.cache).__name__ == "GrowingKVCache"
        and type(shared.runner.cache).__name__ == "SharedKVCache"
    )
    ids = np.arange(3, 40)
    np.testing.assert_allclose(growing.append(ids), shared.append(ids), rtol=0, atol=1e-5)  # 6 chunks
    for token in (5, 9, 11):
        np.testing.assert_allclose(growing.append([token]), shared.append([token]), rtol=0, atol=1e-5)
        assert growing.runner.cache._values[0].shape()[2] == growing.position == shared.position
    for g in (shared, growing):
        g.truncate(20)  # roll back: the growing past is cut at the next step
    np.testing.assert_allclose(growing.append([1, 2, 3]), shared.append([1, 2, 3]), rtol=0, atol=1e-5)
    assert growing.runner.cache._values[0].shape()[2] == 23
    for g in (shared, growing):
        g.reset()
    np.testing.assert_allclose(growing.append([7, 8]), shared.append([7, 8]), rtol=0, atol=1e-5)


def test_growing_generation_reuses_the_prefix(pair):
    shared, growing = (Generator(Artifact.open(p), max_length=64) for p in pair)
    prompt = list(range(10, 30))
    first = [g.generate(prompt, SamplingParams(), max_new_tokens=8, stop_token_ids=()) for g in (shared, growing)]
    for gen in first:
        gen.read()
    assert first[0].token_ids == first[1].token_ids
    # The next turn repeats the conversation so far plus new tokens: only the new part is fed.
    follow = prompt + first[1].token_ids + [40, 41, 42]
    second = [g.generate(follow, SamplingParams(), max_new_tokens=60, stop_token_ids=()) for g in (shared, growing)]
    for gen in second:
        gen.read()
    assert second[1].stats.reused_tokens >= len(prompt) + 7
    assert second[0].token_ids == second[1].token_ids
    assert second[1].finish_reason == "length"  # the context (64) ends before 60 new tokens


def test_position_ids_declared_but_missing_is_an_artifact_error(pair, tmp_path):
    bad = _rewrite_genai_config(
        pair[0], tmp_path / "bad", lambda c: c["model"]["decoder"]["inputs"].update(position_ids="position_ids")
    )
    with pytest.raises(ArtifactError, match="position_ids"):
        Generator(Artifact.open(bad))


def test_malformed_genai_config_is_an_artifact_error(pair, tmp_path):
    bad = _rewrite_genai_config(
        pair[0], tmp_path / "bad", lambda c: c["search"].update(past_present_share_buffer="no")
    )
    with pytest.raises(ArtifactError, match="rebuild"):
        Generator(Artifact.open(bad))


def test_genai_config_describes_the_graph_layout():
    from edge.config import QwenConfig

    config = QwenConfig.from_hf(
        {
            "model_type": "qwen2",
            "vocab_size": 600,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_theta": 1e6,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "eos_token_id": 1,
        }
    )
    profile = Profile(name="p", description="", memory_budget_mb=100)
    native = genai_config(config, 256, profile)
    assert native["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in native["model"]["decoder"]["inputs"]
    plain = genai_config(config, 256, profile, {"kv_cache": "growing", "position_ids": True})
    assert plain["search"]["past_present_share_buffer"] is False
    assert plain["model"]["decoder"]["inputs"]["position_ids"] == "position_ids"
    with pytest.raises(QwenEdgeError, match="kv_cache"):
        genai_config(config, 256, profile, {"kv_cache": "paged"})
