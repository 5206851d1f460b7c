"""Bundles: `qwen-edge package` for each target, `qwen-edge verify`, licences, determinism, tampering."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import onnxruntime as ort
import pytest

from edge.artifact.licenses import choose, directory_facts, license_id_for_name
from edge.artifact.package import package
from edge.pipeline import build
from edge.recipe import Precision, Recipe
from qwen_edge.artifact import Artifact
from qwen_edge.bundle import TARGETS, BundleError, verify_bundle
from qwen_edge.cli import main
from qwen_edge.errors import QwenEdgeError


@pytest.fixture(scope="module")
def artifact(tiny_artifact) -> Path:
    return tiny_artifact("qwen2")


def _built_from(tiny_model, tmp_path: Path, name: str, license_text: str | None = None) -> Path:
    """A tiny artifact built from a copy of the tiny model in a directory called `name` (+ LICENSE)."""
    source = tmp_path / name
    shutil.copytree(tiny_model("qwen2"), source)
    if license_text is not None:
        (source / "LICENSE").write_text(license_text)
    recipe = Recipe(
        name="tiny",
        source=str(source),
        context_length=256,
        precision=Precision(weights="int4"),
        fidelity={"enabled": False},
    )
    return build(recipe, out=tmp_path / "artifact").out_dir


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_packages_and_verifies(artifact, tmp_path, target, capsys):
    assert (
        main(["package", str(artifact), "--target", target, "--out", str(tmp_path), "--license-id", "Apache-2.0"]) == 0
    )
    bundle = tmp_path / f"tiny-{target}-v1.zip"
    assert bundle.is_file()
    assert main(["verify", str(bundle)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {bundle}: {target} bundle of tiny, licence Apache-2.0")
    with zipfile.ZipFile(bundle) as zf:
        names = zf.namelist()
        assert names == sorted(names)
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        meta = json.loads(zf.read("bundle.json"))
        assert {
            "model.onnx",
            "model.onnx.data",
            "tokenizer.json",
            "tokenizer_config.json",
            "genai_config.json",
            "manifest.json",
            "LICENSE",
            "INTEGRATION.md",
        } <= set(names)
        assert meta["target"] == target and meta["license"] == {"id": "Apache-2.0", "file": "LICENSE"}
        assert meta["artifact_manifest_sha256"] and meta["checks"]
        assert b"Apache License" in zf.read("LICENSE")
        assert target.encode() in zf.read("INTEGRATION.md").lower()


def test_unpacked_bundle_is_an_artifact_and_inspect_shows_licence(artifact, tmp_path, capsys):
    bundle = package(artifact, "desktop", tmp_path, license_id="Apache-2.0").path
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(bundle) as zf:
        zf.extractall(unpacked)
    assert Artifact.open(unpacked).manifest["license"] == {"id": "Apache-2.0", "file": "LICENSE"}
    assert main(["inspect", str(unpacked)]) == 0
    assert "license    id=Apache-2.0, file=LICENSE" in capsys.readouterr().out


def test_packaging_twice_gives_identical_bytes(artifact, tmp_path):
    a = package(artifact, "web", tmp_path / "a.zip", license_id="Apache-2.0").path
    b = package(artifact, "web", tmp_path / "b.zip", license_id="Apache-2.0").path
    assert a.read_bytes() == b.read_bytes()


def _flip(data: bytearray, offset: int) -> bytearray:
    data[offset] ^= 0x01
    return data


def test_byte_flipped_bundle_is_rejected_naming_the_file(artifact, tmp_path):
    bundle = package(artifact, "android", tmp_path, license_id="Apache-2.0").path
    data = bytearray(bundle.read_bytes())
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo("model.onnx.data")
    # stored entry: local header (30 bytes + name + extra) then the raw bytes
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    bad = tmp_path / "flipped.zip"
    bad.write_bytes(_flip(data, start + info.file_size // 2))
    with pytest.raises(BundleError, match="model.onnx.data"):
        verify_bundle(bad)
    assert main(["verify", str(bad)]) == 2


def test_every_byte_region_is_covered(artifact, tmp_path):
    """A flip anywhere inside any entry's data is caught."""
    bundle = package(artifact, "desktop", tmp_path, license_id="Apache-2.0").path
    data = bundle.read_bytes()
    with zipfile.ZipFile(bundle) as zf:
        infos = zf.infolist()
    for info in infos:
        start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
        bad = tmp_path / "bad.zip"
        bad.write_bytes(_flip(bytearray(data), start + info.file_size - 1))
        with pytest.raises(BundleError, match=info.filename.replace(".", r"\.")):
            verify_bundle(bad)


def test_truncated_bundle_is_rejected(artifact, tmp_path, capsys):
    bundle = package(artifact, "ios", tmp_path, license_id="Apache-2.0").path
    cut = tmp_path / "cut.zip"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    assert main(["verify", str(cut)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cut.zip" in err and "truncated" in err


def test_unlisted_file_is_rejected(artifact, tmp_path):
    bundle = package(artifact, "desktop", tmp_path, license_id="Apache-2.0").path
    with zipfile.ZipFile(bundle, "a") as zf:
        zf.writestr("extra.bin", b"x")
    with pytest.raises(BundleError, match="extra.bin"):
        verify_bundle(bundle)


def test_web_shards_external_data_over_the_file_limit(artifact, tmp_path):
    data_size = (artifact / "model.onnx.data").stat().st_size
    result = package(artifact, "web", tmp_path, license_id="Apache-2.0", max_file_bytes=data_size // 3)
    verify_bundle(result.path)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(result.path) as zf:
        zf.extractall(unpacked)
        meta = json.loads(zf.read("bundle.json"))
    shards = sorted(p.name for p in unpacked.glob("model.onnx.data.*"))
    assert len(shards) >= 3 and not (unpacked / "model.onnx.data").exists()
    assert all((unpacked / s).stat().st_size <= data_size // 3 for s in shards)
    assert "split into" in " ".join(meta["checks"])
    # the rewritten model runs and gives the same logits as the original
    import numpy as np

    def logits(model_dir: Path) -> np.ndarray:
        art = Artifact.open(model_dir)
        sess = ort.InferenceSession(str(model_dir / "model.onnx"))
        m = art.model
        feeds = {"input_ids": np.array([[1, 2, 3]], dtype=np.int64), "attention_mask": np.ones((1, 3), dtype=np.int64)}
        for i in range(m.num_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, m.num_kv_heads, 0, m.head_dim), np.float32)
        return sess.run(["logits"], feeds)[0]

    np.testing.assert_array_equal(logits(unpacked), logits(artifact))


def test_licence_table():
    assert license_id_for_name("Qwen/Qwen2.5-3B-Instruct") == "qwen-research"
    assert license_id_for_name("Qwen2.5-Coder-3B-Instruct") == "qwen-research"
    assert license_id_for_name("Qwen2.5 Coder 0.5B Instruct AWQ") == "Apache-2.0"
    assert license_id_for_name("Qwen/Qwen2.5-32B-Instruct") == "Apache-2.0"
    assert license_id_for_name("Qwen/Qwen2.5-72B-Instruct") == "qwen"
    assert license_id_for_name("Qwen/Qwen3-1.7B") == "Apache-2.0"
    assert license_id_for_name("some-other-model") is None


def test_licence_file_from_the_source_directory(tiny_model, tmp_path):
    art = _built_from(tiny_model, tmp_path, "Qwen2.5-3B-Instruct", "Qwen RESEARCH LICENSE AGREEMENT (test text)\n")
    assert Artifact.open(art).manifest["license"] == {"id": "qwen-research", "file": "LICENSE"}
    bundle = package(art, "desktop", tmp_path).path
    report = verify_bundle(bundle)
    assert report.license_id == "qwen-research"
    with zipfile.ZipFile(bundle) as zf:
        assert zf.read("LICENSE").startswith(b"Qwen RESEARCH LICENSE")


def test_missing_licence_for_non_apache_model_errors(tiny_model, tmp_path, capsys):
    art = _built_from(tiny_model, tmp_path, "Qwen2.5-3B-Instruct")
    assert Artifact.open(art).manifest["license"] == {"id": "qwen-research", "file": None}
    with pytest.raises(QwenEdgeError, match="qwen-research.*--license FILE"):
        package(art, "android", tmp_path)
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".*.tmp"))
    assert main(["package", str(art), "--target", "android", "--out", str(tmp_path)]) == 2
    assert "--license FILE" in capsys.readouterr().err
    licence = tmp_path / "QWEN-LICENSE"
    licence.write_text("Qwen RESEARCH LICENSE AGREEMENT (test text)\n")
    result = package(art, "android", tmp_path, license_file=licence)
    assert result.license_id == "qwen-research"
    verify_bundle(result.path)


def test_unknown_licence_asks_for_it(artifact, tmp_path):
    with pytest.raises(QwenEdgeError, match="--license-id"):
        package(artifact, "desktop", tmp_path)


def test_gguf_source_names_its_model_for_the_licence(tiny_qwen2_gguf):
    from edge.sources import open_source

    facts = open_source(str(tiny_qwen2_gguf)).license_facts()
    assert facts.names and facts.license_file is None


def test_licence_for_a_build_source(tmp_path):
    source = tmp_path / "Qwen2.5-Coder-0.5B-Instruct"
    source.mkdir()
    license_id, text = choose(directory_facts(source), None, None, str(source))
    assert license_id == "Apache-2.0" and text.startswith(b"\n                                 Apache License")
    (source / "LICENSE").write_text("the model's own licence file\n")
    assert choose(directory_facts(source), None, None, str(source)) == (
        "Apache-2.0",
        b"the model's own licence file\n",
    )
