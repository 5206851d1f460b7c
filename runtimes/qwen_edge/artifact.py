"""Open an artifact directory and verify it against its manifest.json (size and sha256 of every file)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .contract import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    GraphLayout,
    graph_files,
)
from .errors import ArtifactError

VERIFY_MODES = ("full", "size", "none")
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


class Artifact:
    """A verified artifact directory: manifest facts, profile and file paths."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.model = ModelInfo.from_manifest(manifest.get("model") or {}, str(root / MANIFEST))
        self.profile: dict = dict(manifest.get("profile") or {})

    @classmethod
    def open(cls, path: str | Path, verify: str = "full") -> "Artifact":
        """Read manifest.json in `path` and check the listed files: "full" (size + sha256), "size", or "none"."""
        if verify not in VERIFY_MODES:
            raise ArtifactError(f"verify must be one of {', '.join(VERIFY_MODES)}, not {verify!r}")
        root = Path(path)
        if not root.is_dir():
            raise ArtifactError(f"{root} is not an artifact directory; pass the folder `qwen-edge build` wrote")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{manifest_path} is missing; rebuild the artifact or re-copy the whole folder")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{manifest_path} is unreadable ({e}); rebuild the artifact or re-copy it") from None
        if not isinstance(manifest, dict):
            raise ArtifactError(f"{manifest_path} is not a JSON object; rebuild the artifact or re-copy it")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(
                f"{manifest_path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                f"is not {FORMAT!r} version {FORMAT_VERSION}; rebuild the artifact with this qwen-edge version"
            )
        artifact = cls(root, manifest)
        artifact._check_files(verify)
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

    def _check_files(self, verify: str) -> None:
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
        if verify == "full":
            for name, entry in files.items():
                if sha256_file(self.root / name) != entry["sha256"]:
                    raise ArtifactError(
                        f"{self.root / name} does not match its sha256 in the manifest (altered or corrupted); "
                        "rebuild the artifact or re-copy it"
                    )
