"""Ed25519 signatures of artifacts (manifest.json) and bundles (bundle.json).

manifest.json and bundle.json list the size and sha256 of every other file, so signing their exact bytes
covers everything that ships. The signature is a small JSON document in a detached file beside them
(`contract.MANIFEST_SIGNATURE`, `contract.BUNDLE_SIGNATURE`); keys are PEM files (PKCS#8 private key,
SubjectPublicKeyInfo public key), which node:crypto reads as they are. Needs the `sign` extra
(`cryptography`), imported only when a key is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .contract import SIGNATURE_ALGORITHM, SIGNATURE_CONTEXT, SIGNATURE_FORMAT, SIGNATURE_VERSION
from .errors import QwenEdgeError

SIGN_HINT = "pip install 'qwen-edge[sign]'"
MAX_KEY_BYTES = 64 << 10
MAX_SIGNATURE_BYTES = 64 << 10


class SignatureError(QwenEdgeError):
    """A missing, malformed or wrong signature, or an unusable key."""


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise QwenEdgeError(f"signatures need the `cryptography` package: {SIGN_HINT}") from None
    return serialization, ed25519


def _message(signed_name: str, data: bytes) -> bytes:
    return SIGNATURE_CONTEXT + signed_name.encode("utf-8") + b"\n" + data


def key_id(public_key) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key: names a key in messages."""
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        if path.stat().st_size > MAX_KEY_BYTES:
            raise SignatureError(
                f"{path} is not a {kind} key file (too large); pass the file `qwen-edge keygen` wrote"
            )
        return path.read_bytes()
    except OSError as e:
        raise SignatureError(f"{kind} key {path} cannot be read ({e.strerror or e}); check the path") from None


def load_private_key(path: str | Path):
    """The Ed25519 private key in a PEM file written by `qwen-edge keygen`."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(
            f"{path} is not an unencrypted PEM private key ({str(e).splitlines()[0] if str(e) else 'unreadable'}); "
            "pass the private key `qwen-edge keygen` wrote (not the .pub file)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 key; make one with `qwen-edge keygen`")
    return key


def load_public_key(path: str | Path):
    """The Ed25519 public key in a PEM file (`KEY.pub` of `qwen-edge keygen`)."""
    serialization, ed25519 = _crypto()
    path = Path(path)
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise SignatureError(
            f"{path} is not a PEM public key; pass the .pub file `qwen-edge keygen` wrote (never the private key)"
        ) from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key; make one with `qwen-edge keygen`")
    return key


def load_trusted_keys(keys: Iterable) -> list:
    """Public keys from paths (or already loaded keys); an empty list when none are given."""
    _, ed25519 = _crypto()
    return [k if isinstance(k, ed25519.Ed25519PublicKey) else load_public_key(k) for k in keys]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def generate_key(path: str | Path) -> tuple[Path, Path, str]:
    """Write a new Ed25519 key pair: `path` (private, mode 0600) and `path.pub`; returns (private, public, key id).
    Existing files are never overwritten."""
    serialization, ed25519 = _crypto()
    private_path = Path(path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise SignatureError(f"{p} already exists; choose another name or remove it first")
    if not private_path.parent.is_dir():
        raise SignatureError(f"{private_path.parent} does not exist; create it first")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path, key_id(key.public_key())


def sign(private_key, signed_name: str, data: bytes) -> bytes:
    """The signature document (JSON bytes) of `data`, the exact bytes of the file `signed_name`."""
    signature = private_key.sign(_message(signed_name, data))
    doc = {
        "format": SIGNATURE_FORMAT,
        "version": SIGNATURE_VERSION,
        "algorithm": SIGNATURE_ALGORITHM,
        "signed": signed_name,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def verify(data: bytes, signature_doc: bytes | None, signed_name: str, trusted_keys: list, where: str) -> str:
    """Check that `signature_doc` signs `data` (the bytes of `signed_name`) with one of `trusted_keys`;
    returns the key id. Raises `SignatureError` naming `where` when it is missing, malformed or from
    another key."""
    if signature_doc is None:
        raise SignatureError(f"{where} is not signed and a trusted key is required; sign it with --sign KEY")
    try:
        doc = json.loads(signature_doc.decode("utf-8"))
        ok = (
            isinstance(doc, dict)
            and doc.get("format") == SIGNATURE_FORMAT
            and doc.get("version") == SIGNATURE_VERSION
            and doc.get("algorithm") == SIGNATURE_ALGORITHM
            and isinstance(doc.get("signature"), str)
        )
        raw = base64.b64decode(doc["signature"], validate=True) if ok else b""
    except (UnicodeDecodeError, ValueError, binascii.Error, RecursionError):
        ok = False
    if not ok or len(raw) != 64:
        raise SignatureError(f"{where}: the signature file is malformed; sign it again with --sign KEY")
    if doc.get("signed") != signed_name:
        raise SignatureError(
            f"{where}: the signature is of {str(doc.get('signed'))[:60]!r}, not {signed_name}; sign it again"
        )
    from cryptography.exceptions import InvalidSignature

    message = _message(signed_name, data)
    for key in trusted_keys:
        try:
            key.verify(raw, message)
            return key_id(key)
        except InvalidSignature:
            continue
    ids = ", ".join(key_id(k) for k in trusted_keys)
    raise SignatureError(
        f"{where} is signed by key {str(doc.get('key_id'))[:16]!r}, not by a trusted key ({ids}), or was altered "
        "after signing; do not use it"
    )


def read_signature(path: Path) -> bytes | None:
    """The bytes of a signature file, None when there is none; a huge one is malformed."""
    try:
        if path.stat().st_size > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{path} is too large to be a signature; sign the artifact again")
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SignatureError(f"{path} cannot be read ({e.strerror or e})") from None


def write_signature(path: Path, doc: bytes) -> None:
    """Write a signature file atomically (a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(doc)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sign_artifact(root: str | Path, private_key) -> Path:
    """Sign an artifact's manifest.json; writes manifest.sig beside it and returns its path."""
    from .contract import MANIFEST, MANIFEST_SIGNATURE

    root = Path(root)
    data = (root / MANIFEST).read_bytes()
    path = root / MANIFEST_SIGNATURE
    write_signature(path, sign(private_key, MANIFEST, data))
    return path
