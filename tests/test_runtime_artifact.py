"""Artifact.open: manifest checks and file verification (size, sha256), one-line errors."""

import hashlib
import json
import shutil

import pytest

from qwen_edge.artifact import FORMAT, FORMAT_VERSION, Artifact
from qwen_edge.errors import ArtifactError, QwenEdgeError

MODEL = {
    "family": "qwen2",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 32,
    "vocab_size": 600,
    "context_length": 256,
    "eos_token_ids": [597],
    "bos_token_id": 595,
    "pad_token_id": 595,
}
FILES = {
    "model.onnx": b"graph" * 100,
    "model.onnx.data": bytes(range(256)) * 40,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"chat_template": "x"}',
}


@pytest.fixture
def artifact_dir(tmp_path):
    root = tmp_path / "art"
    root.mkdir()
    table = {}
    for name, data in FILES.items():
        (root / name).write_bytes(data)
        table[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": MODEL,
        "profile": {"execution_provider": "cpu", "intra_op_num_threads": 2},
        "files": table,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def edit_manifest(root, **changes):
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_good_artifact_exposes_facts_profile_and_paths(artifact_dir):
    art = Artifact.open(artifact_dir)
    assert art.model.family == "qwen2" and art.model.num_layers == 2 and art.model.eos_token_ids == (597,)
    assert art.model.context_length == 256 and art.model.bos_token_id == 595
    assert art.profile["intra_op_num_threads"] == 2
    assert art.model_path == artifact_dir / "model.onnx"
    assert art.tokenizer_path.is_file() and art.tokenizer_config_path.is_file()
    assert set(art.files) == set(FILES)


def test_missing_manifest(artifact_dir):
    (artifact_dir / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest.json is missing; rebuild the artifact or re-copy"):
        Artifact.open(artifact_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        Artifact.open(tmp_path / "nope")


@pytest.mark.parametrize("verify", ["full", "size"])
def test_missing_file_is_named(artifact_dir, verify):
    (artifact_dir / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data is missing; rebuild"):
        Artifact.open(artifact_dir, verify=verify)


@pytest.mark.parametrize("verify", ["full", "size"])
def test_truncated_file_is_named(artifact_dir, verify):
    data = artifact_dir / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data has 10230 bytes, the manifest says 10240"):
        Artifact.open(artifact_dir, verify=verify)


def test_altered_file_is_caught_by_full_verification_only(artifact_dir):
    data = artifact_dir / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 0xFF
    data.write_bytes(bytes(raw))
    Artifact.open(artifact_dir, verify="size")
    with pytest.raises(ArtifactError, match=r"model\.onnx\.data does not match its sha256.*re-copy"):
        Artifact.open(artifact_dir, verify="full")


def test_verify_none_skips_file_checks(artifact_dir):
    (artifact_dir / "model.onnx.data").unlink()
    assert Artifact.open(artifact_dir, verify="none").model.num_layers == 2


def test_unknown_format_version(artifact_dir):
    edit_manifest(artifact_dir, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match=r"version 2 is not 'qwen-edge' version 1; rebuild"):
        Artifact.open(artifact_dir)


def test_corrupt_manifest(artifact_dir):
    (artifact_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        Artifact.open(artifact_dir)


def test_incomplete_model_block(artifact_dir):
    edit_manifest(artifact_dir, model={k: v for k, v in MODEL.items() if k != "head_dim"})
    with pytest.raises(ArtifactError, match="head_dim"):
        Artifact.open(artifact_dir)


def test_required_file_must_be_listed(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    del manifest["files"]["tokenizer.json"]
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not list tokenizer.json"):
        Artifact.open(artifact_dir)


def test_listed_file_outside_the_artifact_is_refused(artifact_dir, tmp_path):
    shutil.copy(artifact_dir / "tokenizer.json", tmp_path / "outside.json")
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["files"]["../outside.json"] = manifest["files"]["tokenizer.json"]
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        Artifact.open(artifact_dir)


def test_bad_verify_mode(artifact_dir):
    with pytest.raises(QwenEdgeError, match="verify must be one of full, size, none"):
        Artifact.open(artifact_dir, verify="quick")


def test_errors_are_one_line(artifact_dir):
    (artifact_dir / "tokenizer.json").write_bytes(b"x")
    with pytest.raises(ArtifactError) as info:
        Artifact.open(artifact_dir)
    assert "\n" not in str(info.value)


def test_malformed_file_entry(artifact_dir):
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"size": "big"}
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="entry of model.onnx lacks size/sha256"):
        Artifact.open(artifact_dir, verify="none")
