"""Write an artifact's manifest (contract.MANIFEST: what it is, how it was built, every file's size and
sha256).

Write genai_config (``edge.artifact.genai_config``) and every other file first: the manifest hashes
whatever is in the directory when it is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from edge.config import QwenConfig
from qwen_edge.artifact import sha256_file
from qwen_edge.contract import ADAPTERS_BLOCK, FORMAT, FORMAT_VERSION, MANIFEST, SPECULATION_BLOCK, STATIC_BLOCK

TOOLS = ("qwen-edge", "onnx", "onnx-ir", "onnxruntime", "transformers", "torch", "gguf")


def file_table(out_dir: Path | str) -> dict[str, dict[str, Any]]:
    """``{relative posix name: {size, sha256}}`` for every file in ``out_dir`` except the manifest."""
    root = Path(out_dir)
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name != MANIFEST:
            table[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    return table


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools that shape an artifact (None when absent)."""
    versions = {}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _plain(value: Any) -> Any:
    """A pydantic model or mapping as JSON-ready data."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    return value


def write_json(path: Path, data: Mapping) -> None:
    """Write JSON next to its destination and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_block(config: QwenConfig, context_length: int) -> dict[str, Any]:
    """The manifest's ``model`` entry."""
    return {
        "family": config.family,
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "context_length": context_length,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_ids": list(config.eos_token_ids),
        "pad_token_id": config.pad_token_id,
    }


def profile_block(profile) -> dict[str, Any]:
    """The manifest's ``profile``: the device profile as the runtime reads it (session options, provider)."""
    return _plain(profile)


def _speculation(recipe_data: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's `speculation` with its unset keys left out."""
    return {k: v for k, v in recipe_data["speculation"].items() if v not in (None, False)}


def write_manifest(
    out_dir: Path | str,
    *,
    recipe,
    profile,
    source_fingerprint: Mapping[str, Any],
    config: QwenConfig,
    precision,
    fidelity: Mapping[str, Any] | None,
    build_stats: Mapping[str, Any],
    license: Mapping[str, str] | None = None,
    backend: Mapping[str, Any] | None = None,
    static: Mapping[str, Any] | None = None,
    adapters: Mapping[str, Any] | None = None,
    source_grid: Mapping[str, Any] | None = None,
    allocation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in ``out_dir`` and write the manifest; return it.

    ``recipe``, ``profile`` and ``precision`` are the models from ``edge.recipe`` (or plain dicts);
    ``source_fingerprint`` is ``{spec, kind, sha256}``; ``build_stats`` holds seconds and peak RSS;
    ``backend`` is what exported the graph (``{"name", "versions", "steps"}``; default the native exporter);
    ``static`` describes an NPU artifact's prefill/decode graphs (``edge.graph.static``, ``edge.npu.qnn``);
    ``adapters`` a switchable artifact's LoRA adapters (``{name: {file, rank, ...}}``; the files are in ``files``);
    ``source_grid`` what precision method ``gguf`` kept of a GGUF's grids (``edge.graph.plan.source_grid_summary``);
    ``allocation`` a size-budgeted build's per-tensor plan, predicted size and KL, and measured KL
    (``edge.quantize.allocator``).
    """
    out = Path(out_dir)
    recipe_data = _plain(recipe)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe_data,
        "profile": profile_block(profile),
        "source": dict(source_fingerprint),
        "model": model_block(config, int(recipe_data["context_length"])),
        "precision": _plain(precision),
        **({"source_grid": dict(source_grid)} if source_grid is not None else {}),
        **({"allocation": dict(allocation)} if allocation is not None else {}),
        "tools": tool_versions(),
        "backend": dict(backend) if backend is not None else {"name": "native"},
        **({STATIC_BLOCK: dict(static)} if static is not None else {}),
        **({ADAPTERS_BLOCK: dict(adapters)} if adapters else {}),
        # the runtime's default speculative decoding (qwen_edge.contract.SpeculationDefault)
        **({SPECULATION_BLOCK: _speculation(recipe_data)} if recipe_data.get("speculation") else {}),
        "files": file_table(out),
        "license": dict(license) if license is not None else None,
        "fidelity": dict(fidelity) if fidelity is not None else None,
        "build": dict(build_stats),
    }
    write_json(out / MANIFEST, manifest)
    return manifest
