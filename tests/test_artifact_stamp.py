"""Fast trusted loading: Artifact.open(verify="auto") hashes only what changed since a check stamped it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from qwen_edge.artifact import FORMAT, FORMAT_VERSION, Artifact, cache_dir
from qwen_edge.cli import build_parser
from qwen_edge.errors import ArtifactError

FILES = {
    "model.onnx": b"graph" * 100,
    "model.onnx.data": bytes(range(256)) * 400,
    "tokenizer.json": b'{"version": "1.0"}',
    "tokenizer_config.json": b'{"chat_template": "x"}',
}
MODEL = {
    "family": "qwen2",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 32,
    "vocab_size": 600,
    "context_length": 256,
    "eos_token_ids": [597],
}


@pytest.fixture
def art(tmp_path):
    root = tmp_path / "art"
    root.mkdir()
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    table = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in FILES.items()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": MODEL, "files": table}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def stamps(tmp_path):
    return tmp_path / "stamps"


def test_second_open_hashes_nothing(art, stamps):
    assert sorted(Artifact.open(art, stamp_dir=stamps).hashed) == sorted(FILES)
    assert len(list(stamps.iterdir())) == 1
    assert Artifact.open(art, stamp_dir=stamps).hashed == []
    assert sorted(Artifact.open(art, verify="full", stamp_dir=stamps).hashed) == sorted(FILES)  # --verify full


def test_only_a_changed_file_is_hashed_again(art, stamps):
    Artifact.open(art, stamp_dir=stamps)
    data = art / "model.onnx.data"
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 1000))  # touched, same bytes
    assert Artifact.open(art, stamp_dir=stamps).hashed == ["model.onnx.data"]
    assert Artifact.open(art, stamp_dir=stamps).hashed == []


def test_an_altered_file_with_its_mtime_restored_is_caught(art, stamps):
    Artifact.open(art, stamp_dir=stamps)
    data = art / "model.onnx.data"
    before = data.stat()
    with open(data, "r+b") as f:  # same size, one byte changed, mtime put back: the ctime still moves
        f.seek(1000)
        f.write(b"\xff")
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ArtifactError, match="model.onnx.data does not match its sha256"):
        Artifact.open(art, stamp_dir=stamps)


def test_a_replaced_file_and_a_copied_artifact_are_hashed_again(art, stamps, tmp_path):
    Artifact.open(art, stamp_dir=stamps)
    tok = art / "tokenizer.json"
    replacement = tmp_path / "tok"
    replacement.write_bytes(tok.read_bytes())
    os.replace(replacement, tok)  # another inode
    assert Artifact.open(art, stamp_dir=stamps).hashed == ["tokenizer.json"]
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    assert sorted(Artifact.open(copy, stamp_dir=stamps).hashed) == sorted(FILES)


def test_a_changed_manifest_entry_is_hashed_again(art, stamps):
    Artifact.open(art, stamp_dir=stamps)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"]["sha256"] = "0" * 64
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="tokenizer.json does not match its sha256"):
        Artifact.open(art, stamp_dir=stamps)


def test_a_broken_or_unwritable_stamp_costs_only_a_full_check(art, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for _ in range(2):
        assert sorted(Artifact.open(art, stamp_dir=blocker / "stamps").hashed) == sorted(FILES)
    stamps = tmp_path / "stamps"
    Artifact.open(art, stamp_dir=stamps)
    (stamp,) = stamps.iterdir()
    for garbage in ("{", "[]", '{"version": 1, "root": "%s", "files": []}' % os.path.realpath(art)):
        stamp.write_text(garbage)
        assert sorted(Artifact.open(art, stamp_dir=stamps).hashed) == sorted(FILES)


def test_default_stamp_dir_and_cli_default(monkeypatch, tmp_path, art):
    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache" / "verified"
    Artifact.open(art)
    assert len(list(cache_dir().iterdir())) == 1
    assert build_parser().parse_args(["run", "a", "p"]).verify == "auto"
