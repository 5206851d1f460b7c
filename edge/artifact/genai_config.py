"""Write an artifact's onnxruntime-genai compatible genai_config (contract.GENAI_CONFIG): the decoder's files,
I/O names and cache layout, which the runtimes read to drive the graph."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge.artifact.manifest import write_json
from edge.config import QwenConfig
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError


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


NATIVE_GRAPH = {"kv_cache": contract.SHARED, "position_ids": False}


def genai_config(
    config: QwenConfig, context_length: int, profile, graph: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The onnxruntime-genai ``genai_config.json`` content for this artifact.

    ``graph`` describes a graph exported by another backend (``edge.backends``); None is the native graph:
    ``kv_cache`` "shared" (one past/present buffer of max_length, GroupQueryAttention) or "growing"
    (present = past + new; ``past_present_share_buffer`` false), and ``position_ids`` (whether the
    graph takes that input; listed under the decoder's inputs as onnxruntime-genai expects); "static"
    for an NPU artifact, whose ``static`` entry (edge.graph.static) becomes a prefill/decode pipeline.
    """
    graph = {**NATIVE_GRAPH, **(graph or {})}
    if graph["kv_cache"] not in contract.LAYOUTS:
        *others, last = map(repr, contract.LAYOUTS)
        raise QwenEdgeError(f"graph kv_cache must be {', '.join(others)} or {last}, not {graph['kv_cache']!r}")
    inputs = {"input_ids": contract.INPUT_IDS, "attention_mask": contract.ATTENTION_MASK}
    if graph["position_ids"]:
        inputs["position_ids"] = contract.POSITION_IDS
    eos = list(config.eos_token_ids)
    if not eos:
        raise QwenEdgeError("the model config has no eos_token_id; set eos_token_id in the source config")
    pad = config.pad_token_id if config.pad_token_id is not None else eos[0]
    bos = config.bos_token_id if config.bos_token_id is not None else eos[0]
    decoder = {
        "session_options": _session_options(profile),
        "filename": contract.MODEL_FILE,
        "head_size": config.head_dim,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "num_key_value_heads": config.num_kv_heads,
        "inputs": {
            **inputs,
            "past_key_names": contract.PAST_KEY,
            "past_value_names": contract.PAST_VALUE,
        },
        "outputs": {
            "logits": contract.LOGITS,
            "present_key_names": contract.PRESENT_KEY,
            "present_value_names": contract.PRESENT_VALUE,
        },
    }
    if graph["kv_cache"] == contract.STATIC:  # two graphs instead of contract.MODEL_FILE
        for key in ("filename", "inputs", "outputs"):
            del decoder[key]
        decoder.update(_static_pipeline(graph[contract.STATIC_BLOCK]))
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
            "past_present_share_buffer": graph["kv_cache"] == contract.SHARED,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _static_pipeline(static: Mapping[str, Any]) -> dict[str, Any]:
    """An NPU artifact's decoder: the prefill and decode graphs (edge.graph.static) as a two-stage
    pipeline, the prefill graph over the prompt and the decode graph per generated token; the client
    keeps the KV cache (``past_key_{i}``/``past_value_{i}`` in, this run's ``present_*`` out)."""

    def stage(name: str, prompt: bool) -> dict[str, Any]:
        return {
            name: {
                "filename": static[name],
                "inputs": list(static["inputs"]),
                "outputs": list(static["outputs"]),
                "run_on_prompt": prompt,
                "run_on_token_gen": not prompt,
            }
        }

    prefill, decode = contract.STATIC_GRAPHS
    return {
        "pipeline": [stage(prefill, True), stage(decode, False)],
        contract.STATIC_BLOCK: {
            k: static[k] for k in ("chunk", "context_length", "mask_value", "key_layout", "value_layout")
        },
    }


def write_genai_config(
    out_dir: Path | str, config: QwenConfig, context_length: int, profile, graph: Mapping[str, Any] | None = None
) -> Path:
    """Write genai_config (contract.GENAI_CONFIG) into ``out_dir`` (``graph``: see `genai_config`); return its path."""
    path = Path(out_dir) / contract.GENAI_CONFIG
    write_json(path, genai_config(config, context_length, profile, graph))
    return path
