"""Write an artifact's ``manifest.json`` (what it is, how it was built, every file's size and sha256)
and its onnxruntime-genai compatible ``genai_config.json``.

Write ``genai_config.json`` and every other file first: the manifest hashes whatever is in the
directory when it is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from edge.config import QwenConfig
from qwen_edge.artifact import FORMAT, FORMAT_VERSION, GENAI_CONFIG, MANIFEST, sha256_file
from qwen_edge.errors import QwenEdgeError

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


def _write_json(path: Path, data: Mapping) -> None:
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
) -> dict[str, Any]:
    """Hash every file in ``out_dir`` and write ``manifest.json``; return the manifest.

    ``recipe``, ``profile`` and ``precision`` are the models from ``edge.recipe`` (or plain dicts);
    ``source_fingerprint`` is ``{spec, kind, sha256}``; ``build_stats`` holds seconds and peak RSS;
    ``backend`` is what exported the graph (``{"name", "versions", "steps"}``; default the native exporter);
    ``static`` describes an NPU artifact's prefill/decode graphs (``edge.static_graph``, ``edge.qnn``).
    """
    out = Path(out_dir)
    recipe_data = _plain(recipe)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "recipe": recipe_data,
        "profile": _plain(profile),
        "source": dict(source_fingerprint),
        "model": model_block(config, int(recipe_data["context_length"])),
        "precision": _plain(precision),
        "tools": tool_versions(),
        "backend": dict(backend) if backend is not None else {"name": "native"},
        **({"static": dict(static)} if static is not None else {}),
        "files": file_table(out),
        "license": dict(license) if license is not None else None,
        "fidelity": dict(fidelity) if fidelity is not None else None,
        "build": dict(build_stats),
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


def _session_options(profile) -> dict[str, Any]:
    options: dict[str, Any] = {"log_id": "qwen-edge"}
    if profile.intra_op_num_threads:
        options["intra_op_num_threads"] = profile.intra_op_num_threads
    options["graph_optimization_level"] = profile.ort_graph_optimization_level
    # The CPU provider is onnxruntime-genai's default and is not listed; others go in by name.
    options["provider_options"] = (
        [] if profile.execution_provider == "cpu" else [{profile.execution_provider: dict(profile.provider_options)}]
    )
    return options


NATIVE_GRAPH = {"kv_cache": "shared", "position_ids": False}


def genai_config(config: QwenConfig, context_length: int, profile, graph: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """The onnxruntime-genai ``genai_config.json`` content for this artifact.

    ``graph`` describes a graph exported by another backend (``edge.backends``); None is the native graph:
    ``kv_cache`` "shared" (one past/present buffer of max_length, GroupQueryAttention) or "growing"
    (present = past + new; ``past_present_share_buffer`` false), and ``position_ids`` (whether the
    graph takes that input; listed under the decoder's inputs as onnxruntime-genai expects); "static"
    for an NPU artifact, whose ``static`` entry (edge.static_graph) becomes a prefill/decode pipeline.
    """
    graph = {**NATIVE_GRAPH, **(graph or {})}
    if graph["kv_cache"] not in ("shared", "growing", "static"):
        raise QwenEdgeError(f"graph kv_cache must be 'shared', 'growing' or 'static', not {graph['kv_cache']!r}")
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if graph["position_ids"]:
        inputs["position_ids"] = "position_ids"
    eos = list(config.eos_token_ids)
    if not eos:
        raise QwenEdgeError("the model config has no eos_token_id; set eos_token_id in the source config")
    pad = config.pad_token_id if config.pad_token_id is not None else eos[0]
    bos = config.bos_token_id if config.bos_token_id is not None else eos[0]
    decoder = {
        "session_options": _session_options(profile),
        "filename": "model.onnx",
        "head_size": config.head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "inputs": {
            **inputs,
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    if graph["kv_cache"] == "static":  # two graphs instead of model.onnx
        for key in ("filename", "inputs", "outputs"):
            del decoder[key]
        decoder.update(_static_pipeline(graph["static"]))
    return {
        "model": {
            "type": config.family,
            "bos_token_id": bos,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": pad,
            "context_length": context_length,
            "vocab_size": config.vocab_size,
            "decoder": decoder,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": graph["kv_cache"] == "shared",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _static_pipeline(static: Mapping[str, Any]) -> dict[str, Any]:
    """An NPU artifact's decoder: the prefill and decode graphs (edge.static_graph) as a two-stage
    pipeline, the prefill graph over the prompt and the decode graph per generated token; the client
    keeps the KV cache (``past_key_{i}``/``past_value_{i}`` in, this run's ``present_*`` out)."""
    def stage(name: str, prompt: bool) -> dict[str, Any]:
        return {name: {"filename": static[name], "inputs": list(static["inputs"]), "outputs": list(static["outputs"]),
                       "run_on_prompt": prompt, "run_on_token_gen": not prompt}}

    return {"pipeline": [stage("prefill", True), stage("decode", False)],
            "static": {k: static[k] for k in ("chunk", "context_length", "mask_value", "key_layout", "value_layout")}}


def write_genai_config(out_dir: Path | str, config: QwenConfig, context_length: int, profile,
                       graph: Mapping[str, Any] | None = None) -> Path:
    """Write ``genai_config.json`` into ``out_dir`` (``graph``: see `genai_config`); return its path."""
    path = Path(out_dir) / GENAI_CONFIG
    _write_json(path, genai_config(config, context_length, profile, graph))
    return path
