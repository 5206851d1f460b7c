"""Ed25519 signatures: keygen, build/package --sign, verify --key, Artifact.open(trusted_keys=...), --trusted-key."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import sys
import zipfile
from pathlib import Path

import pytest

from qwen_edge.artifact import Artifact
from qwen_edge.bundle import verify_bundle
from qwen_edge.cli import main
from qwen_edge.contract import BUNDLE_SIGNATURE, MANIFEST_SIGNATURE
from qwen_edge.contract import SIGNATURE_FORMAT as SIG
from qwen_edge.errors import QwenEdgeError
from qwen_edge.signing import SignatureError, generate_key, load_private_key, sign_artifact


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: `good` signs, `other` is any other key."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("good", "other"):
        private, public, kid = generate_key(root / name)
        out[name] = (private, public, kid)
    return out


@pytest.fixture(scope="module")
def signed_artifact(tiny_artifact, keys, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signed") / "art"
    shutil.copytree(tiny_artifact("qwen2"), root)
    sign_artifact(root, load_private_key(keys["good"][0]))
    return root


@pytest.fixture(scope="module")
def signed_bundle(signed_artifact, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    args = ["package", str(signed_artifact), "--target", "desktop", "--out", str(out), "--license-id", "Apache-2.0"]
    assert main([*args, "--sign", str(keys["good"][0])]) == 0
    (bundle,) = out.glob("*.zip")
    return bundle


def _one_line_error(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qwen-edge: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_keygen_writes_a_private_and_a_public_key_and_never_overwrites(tmp_path, capsys):
    key = tmp_path / "release"
    assert main(["keygen", str(key)]) == 0
    assert "OK key " in capsys.readouterr().out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in (tmp_path / "release.pub").read_bytes()
    before = key.read_bytes()
    _one_line_error(capsys, ["keygen", str(key)], "already exists")
    assert key.read_bytes() == before


def test_signed_artifact_opens_with_its_key_and_fails_with_any_other(signed_artifact, keys):
    art = Artifact.open(signed_artifact, trusted_keys=[keys["good"][1]])
    assert art.signed_by == keys["good"][2]
    either = [keys["other"][1], keys["good"][1]]
    assert Artifact.open(signed_artifact, trusted_keys=either).signed_by == keys["good"][2]
    with pytest.raises(SignatureError, match=f"not by a trusted key \\({keys['other'][2]}\\)"):
        Artifact.open(signed_artifact, trusted_keys=[keys["other"][1]])
    assert Artifact.open(signed_artifact).signed_by is None  # no key required: the signature is not looked at


def test_unsigned_artifact_is_refused_when_a_key_is_required(tiny_artifact, keys):
    with pytest.raises(SignatureError, match="is not signed and a trusted key is required"):
        Artifact.open(tiny_artifact("qwen2"), trusted_keys=[keys["good"][1]])


def test_rewritten_manifest_breaks_the_signature(signed_artifact, keys, tmp_path):
    """Tampering with a file and rewriting manifest.json to match passes the checksums, not the signature."""
    root = tmp_path / "art"
    shutil.copytree(signed_artifact, root)
    (root / "LICENSE").write_text("anything goes\n")
    manifest = json.loads((root / "manifest.json").read_text())
    data = (root / "LICENSE").read_bytes()
    manifest["files"]["LICENSE"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (root / "manifest.json").write_text(json.dumps(manifest))
    Artifact.open(root, verify="full")  # the checksums agree
    with pytest.raises(SignatureError, match="or was altered after signing"):
        Artifact.open(root, trusted_keys=[keys["good"][1]])


@pytest.mark.parametrize(
    "doc",
    [
        b"not json",
        b"[]",
        json.dumps({"format": SIG, "version": 1, "algorithm": "ed25519", "signature": "!!"}).encode(),
        json.dumps({"format": SIG, "version": 1, "algorithm": "rsa", "signature": "AA=="}).encode(),
    ],
)
def test_malformed_signature_file_is_one_line(signed_artifact, keys, tmp_path, doc):
    root = tmp_path / "art"
    shutil.copytree(signed_artifact, root)
    (root / MANIFEST_SIGNATURE).write_bytes(doc)
    with pytest.raises(SignatureError, match="the signature file is malformed") as e:
        Artifact.open(root, trusted_keys=[keys["good"][1]])
    assert "\n" not in str(e.value)


def test_bundle_signature_cannot_be_replayed_on_the_manifest(signed_artifact, signed_bundle, keys, tmp_path):
    root = tmp_path / "art"
    shutil.copytree(signed_artifact, root)
    with zipfile.ZipFile(signed_bundle) as zf:
        (root / MANIFEST_SIGNATURE).write_bytes(zf.read(BUNDLE_SIGNATURE))
    with pytest.raises(SignatureError, match="the signature is of 'bundle.json', not manifest.json"):
        Artifact.open(root, trusted_keys=[keys["good"][1]])


def test_signed_bundle_verifies_with_its_key_and_fails_with_any_other(signed_bundle, keys, capsys):
    assert verify_bundle(signed_bundle).files >= 5  # no key: the checksums only, bundle.sig allowed
    assert main(["verify", str(signed_bundle), "--key", str(keys["good"][1])]) == 0
    assert "signature by a trusted key" in capsys.readouterr().out
    _one_line_error(capsys, ["verify", str(signed_bundle), "--key", str(keys["other"][1])], "not by a trusted key")


def test_unsigned_and_resigned_bundles_are_refused(signed_bundle, keys, tmp_path, capsys):
    unsigned = tmp_path / "unsigned.zip"
    resigned = tmp_path / "resigned.zip"
    other = load_private_key(keys["other"][0])
    from qwen_edge.signing import sign

    with zipfile.ZipFile(signed_bundle) as zf, zipfile.ZipFile(unsigned, "w") as a:
        b = zipfile.ZipFile(resigned, "w")
        for info in zf.infolist():
            data = zf.read(info)
            if info.filename != BUNDLE_SIGNATURE:
                a.writestr(info, data)
                b.writestr(info, data)
        b.writestr(BUNDLE_SIGNATURE, sign(other, "bundle.json", zf.read("bundle.json")))
        b.close()
    good = str(keys["good"][1])
    _one_line_error(capsys, ["verify", str(unsigned), "--key", good], "is not signed")
    _one_line_error(capsys, ["verify", str(resigned), "--key", good], f"signed by key '{keys['other'][2]}'")
    _one_line_error(capsys, ["unpack", str(resigned), str(tmp_path / "out"), "--key", good], "not by a trusted key")
    assert not (tmp_path / "out").exists()


def test_unpacked_signed_bundle_keeps_its_signature(signed_bundle, keys, tmp_path):
    assert main(["unpack", str(signed_bundle), str(tmp_path / "out"), "--key", str(keys["good"][1])]) == 0
    assert (tmp_path / "out" / BUNDLE_SIGNATURE).is_file()


def test_verify_artifact_directory_and_trusted_key_flag(signed_artifact, keys, capsys):
    assert main(["verify", str(signed_artifact), "--key", str(keys["good"][1])]) == 0
    assert f"signed by key {keys['good'][2]}" in capsys.readouterr().out
    _one_line_error(capsys, ["verify", str(signed_artifact), "--key", str(keys["other"][1])], "not by a trusted key")
    argv = ["inspect", str(signed_artifact), "--trusted-key", str(keys["other"][1])]
    _one_line_error(capsys, argv, "not by a trusted key")
    assert main(["inspect", str(signed_artifact), "--trusted-key", str(keys["good"][1])]) == 0


def test_bad_keys_are_one_line_errors(signed_artifact, keys, tmp_path, capsys):
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    _one_line_error(capsys, ["verify", str(signed_artifact), "--key", str(junk)], "is not a PEM public key")
    _one_line_error(capsys, ["verify", str(signed_artifact), "--key", str(keys["good"][0])], "is not a PEM public key")
    _one_line_error(capsys, ["verify", str(signed_artifact), "--key", str(tmp_path / "none")], "cannot be read")
    argv = ["package", str(signed_artifact), "--target", "web", "--out", str(tmp_path), "--sign", str(keys["good"][1])]
    _one_line_error(capsys, argv, "is not an unencrypted PEM private key")
    assert not list(tmp_path.glob("*.zip"))


def test_build_signs_the_manifest_and_checks_the_key_first(tiny_model, keys, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"name: tiny\nsource: {tiny_model('qwen2')}\ncontext_length: 256\nprecision: {{weights: int4}}\n"
        "fidelity: {enabled: false}\n"
    )
    out = tmp_path / "built"
    argv = ["build", str(recipe), "--out", str(out), "--sign", str(tmp_path / "nokey")]
    _one_line_error(capsys, argv, "cannot be read")
    assert not out.exists()
    assert main(["build", str(recipe), "--out", str(out), "--quiet", "--sign", str(keys["good"][0])]) == 0
    assert Artifact.open(out, trusted_keys=[keys["good"][1]]).signed_by == keys["good"][2]


def test_missing_cryptography_is_a_one_line_error_naming_the_extra(signed_artifact, keys, monkeypatch):
    for name in list(sys.modules):
        if name == "cryptography" or name.startswith("cryptography."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)
    with pytest.raises(QwenEdgeError, match=r"pip install 'qwen-edge\[sign\]'"):
        Artifact.open(signed_artifact, trusted_keys=[keys["good"][1]])
