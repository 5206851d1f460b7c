"""Open an artifact directory and verify it against its manifest.json (size and sha256 of every file).

A full check hashes every file; "auto" (the default) hashes only the files that changed since a check
recorded them in a stamp in the app's cache (size, mtime, ctime, inode and device of each file next to the
sha256 it matched), so an app start on an unchanged artifact reads no weights. With trusted keys the
manifest's Ed25519 signature is checked at every open, before any file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .contract import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MANIFEST_SIGNATURE,
    MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    GraphLayout,
    graph_files,
)
from .errors import ArtifactError

VERIFY_MODES = ("full", "size", "none", "auto")
STAMP_VERSION = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelInfo:
    """The model facts the runtime needs, read from the manifest's `model` block."""

    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_manifest(cls, block: dict, where: str) -> "ModelInfo":
        """Read and type-check the `model` block; a missing key raises ArtifactError."""
        try:
            return cls(
                family=str(block["family"]),
                num_layers=int(block["num_layers"]),
                num_kv_heads=int(block["num_kv_heads"]),
                head_dim=int(block["head_dim"]),
                vocab_size=int(block["vocab_size"]),
                context_length=int(block["context_length"]),
                eos_token_ids=tuple(int(e) for e in block.get("eos_token_ids") or ()),
                bos_token_id=_opt_int(block.get("bos_token_id")),
                pad_token_id=_opt_int(block.get("pad_token_id")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"{where}: the `model` block is missing or has a bad {e}; rebuild the artifact"
            ) from None


def _opt_int(value) -> int | None:
    return None if value is None else int(value)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where verification stamps go: ``$QWEN_EDGE_CACHE/verified``, else ``~/.cache/qwen-edge/verified``."""
    return Path(os.environ.get("QWEN_EDGE_CACHE") or Path.home() / ".cache" / "qwen-edge") / "verified"


def _identity(st: os.stat_result) -> list[int]:
    # ctime too: a rewrite that restores mtime (os.utime) still moves it
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class _Stamp:
    """The files of one artifact directory that a full check found intact, and the file state it saw."""

    def __init__(self, root: Path, manifest_sha256: str, stamp_dir: Path | None):
        real = os.path.realpath(root)
        self.path = (stamp_dir or cache_dir()) / (hashlib.sha256(real.encode("utf-8")).hexdigest()[:32] + ".json")
        self.doc = {"version": STAMP_VERSION, "root": real, "manifest_sha256": manifest_sha256, "files": {}}
        try:
            old = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and old.get("version") == STAMP_VERSION and old.get("root") == real:
                self.old = old.get("files") if isinstance(old.get("files"), dict) else {}
            else:
                self.old = {}
        except (OSError, ValueError):
            self.old = {}

    def unchanged(self, name: str, sha256: str, st: os.stat_result) -> bool:
        entry = self.old.get(name)
        return isinstance(entry, dict) and entry.get("sha256") == sha256 and entry.get("stat") == _identity(st)

    def record(self, name: str, sha256: str, st: os.stat_result) -> None:
        self.doc["files"][name] = {"sha256": sha256, "stat": _identity(st)}

    def save(self) -> None:
        """Write the stamp atomically; an unwritable cache only costs the next open a full check."""
        if self.doc["files"] == self.old:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".stamp.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.doc, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


class Artifact:
    """A verified artifact directory: manifest facts, profile and file paths."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.model = ModelInfo.from_manifest(manifest.get("model") or {}, str(root / MANIFEST))
        self.profile: dict = dict(manifest.get("profile") or {})
        self.signed_by: str | None = None  # key id of the trusted key whose signature was checked
        self.hashed: list[str] = []  # the files this open hashed (the others matched the stamp)

    @classmethod
    def open(
        cls,
        path: str | Path,
        verify: str = "auto",
        trusted_keys=None,
        stamp_dir: str | Path | None = None,
    ) -> "Artifact":
        """Read manifest.json in `path` and check the listed files: "full" (size + sha256 of every file),
        "auto" (sha256 of the files changed since the last check, see the module doc), "size", or "none".

        `trusted_keys` (public key paths or loaded Ed25519 keys): when given, manifest.json must carry a
        valid signature (manifest.sig) by one of them. `stamp_dir` overrides where stamps go."""
        if verify not in VERIFY_MODES:
            raise ArtifactError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        root = Path(path)
        if not root.is_dir():
            raise ArtifactError(f"{root} is not an artifact directory; pass the folder `qwen-edge build` wrote")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{manifest_path} is missing; rebuild the artifact or re-copy the whole folder")
        try:
            manifest_bytes = manifest_path.read_bytes()
            manifest = json.loads(manifest_bytes.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise ArtifactError(f"{manifest_path} is unreadable ({e}); rebuild the artifact or re-copy it") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{manifest_path} is not a JSON object; rebuild the artifact or re-copy it")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                f"is not {FORMAT!r} version {FORMAT_VERSION}; rebuild the artifact with this qwen-edge version"
            )
        signed_by = None
        if trusted_keys:
            from . import signing

            keys = signing.load_trusted_keys(trusted_keys)
            doc = signing.read_signature(root / MANIFEST_SIGNATURE)
            signed_by = signing.verify(manifest_bytes, doc, MANIFEST, keys, str(manifest_path))
        artifact = cls(root, manifest)
        artifact.signed_by = signed_by
        stamp = _Stamp(root, hashlib.sha256(manifest_bytes).hexdigest(), stamp_dir and Path(stamp_dir))
        artifact._check_files(verify, stamp)
        return artifact

    @property
    def files(self) -> dict:
        """`{name: {"size": int, "sha256": str}}` as listed in the manifest."""
        return self.manifest.get("files") or {}

    def path(self, name: str) -> Path:
        """Absolute path of a file in the artifact."""
        return self.root / name

    @property
    def model_path(self) -> Path:
        return self.path(MODEL_FILE)

    @property
    def layout(self) -> GraphLayout:
        """How the artifact's graph holds its KV cache (shared, growing or static)."""
        return GraphLayout.of(self.root, self.manifest)

    @property
    def tokenizer_path(self) -> Path:
        return self.path(TOKENIZER_FILE)

    @property
    def tokenizer_config_path(self) -> Path:
        return self.path(TOKENIZER_CONFIG_FILE)

    def _check_files(self, verify: str, stamp: _Stamp) -> None:
        files = self.files
        if not isinstance(files, dict):
            raise ArtifactError(f"{self.root / MANIFEST}: `files` is not a mapping; rebuild the artifact")
        for name in (*graph_files(self.manifest), TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
            if name not in files:
                raise ArtifactError(f"{self.root / MANIFEST} does not list {name}; rebuild the artifact")
        for name, entry in files.items():
            if not (
                isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
            ):
                raise ArtifactError(
                    f"{self.root / MANIFEST}: the entry of {name} lacks size/sha256; rebuild the artifact"
                )
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise ArtifactError(
                    f"{self.root / MANIFEST} lists {name!r} outside the artifact; rebuild the artifact"
                )
        if verify == "none":
            return
        for name, entry in files.items():
            target = self.root / name
            if not target.is_file():
                raise ArtifactError(f"{target} is missing; rebuild the artifact or re-copy the whole folder")
            size = target.stat().st_size
            if size != entry["size"]:
                raise ArtifactError(
                    f"{target} has {size} bytes, the manifest says {entry['size']} (truncated or altered); "
                    "rebuild the artifact or re-copy it"
                )
        if verify == "size":
            return
        for name, entry in files.items():
            target = self.root / name
            before = target.stat()
            if verify == "auto" and stamp.unchanged(name, entry["sha256"], before):
                stamp.record(name, entry["sha256"], before)
                continue
            self.hashed.append(name)
            if sha256_file(target) != entry["sha256"]:
                raise ArtifactError(
                    f"{target} does not match its sha256 in the manifest (altered or corrupted); "
                    "rebuild the artifact or re-copy it"
                )
            if _identity(target.stat()) == _identity(before):  # not being rewritten while it was hashed
                stamp.record(name, entry["sha256"], before)
        stamp.save()
