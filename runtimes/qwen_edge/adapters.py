"""Switchable LoRA adapters: the adapters an artifact ships and one adapter's tensors as graph inputs.

A switchable artifact's graph takes, for every layer's fused linear (contract.LORA_GROUPS), a LoRA
A [in, rank] and B [rank, out] whose defaults have rank zero (the base model). An adapter file
(contract.adapter_file) holds each adapted linear's A and scaled B; here they are fused the way the
graph fuses its linears: the parts' A side by side, their B block-diagonal, a part the adapter does
not train contributing rank zero.
"""

from __future__ import annotations

import re

import numpy as np

from . import contract as c
from .artifact import Artifact
from .errors import ArtifactError, QwenEdgeError

_KEY = re.compile(r"layers\.(\d+)\.(\w+)\.([ab])")


def adapter_names(artifact: Artifact) -> list[str]:
    """The switchable adapters an artifact ships, by name."""
    block = artifact.manifest.get(c.ADAPTERS_BLOCK) or {}
    return sorted(block) if isinstance(block, dict) else []


def check_adapter(artifact: Artifact, name: str | None) -> None:
    """Raise, saying what to do, unless `name` is None or one of the artifact's adapters."""
    if name is None:
        return
    names = adapter_names(artifact)
    if name not in names:
        have = f"its adapters: {', '.join(names)}" if names else "it has none (build it with adapter mode switchable)"
        raise QwenEdgeError(f"artifact {artifact.root} has no adapter {name!r}; {have}")


def _part_sizes(artifact: Artifact, group: str, out: int) -> list[int]:
    """Output sizes of the parts of a fused linear of `out` outputs."""
    m = artifact.model
    if group == "qkv_proj":
        kv = m.num_kv_heads * m.head_dim
        return [out - 2 * kv, kv, kv]
    parts = len(c.LORA_GROUPS[group])
    return [out // parts] * parts


def lora_feeds(artifact: Artifact, name: str | None, shapes: dict[str, list]) -> dict[str, np.ndarray]:
    """The arrays of the graph's LoRA inputs (`shapes`: input name -> shape) for adapter `name`
    (None: every input at rank zero, the base model)."""
    check_adapter(artifact, name)
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    if name is not None:
        path = artifact.path(c.adapter_file(name))
        try:
            with np.load(path, allow_pickle=False) as npz:
                stored = {k: npz[k].astype(np.float32, copy=False) for k in npz.files}
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is not a readable adapter file ({e}); rebuild the artifact") from None
        for key, array in stored.items():
            m = _KEY.fullmatch(key)
            if not m or array.ndim != 2:
                raise ArtifactError(f"{path}: unexpected entry {key!r}; rebuild the artifact")
            parts.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = array
    if any(set(p) != {"a", "b"} for p in parts.values()):
        raise ArtifactError(f"adapter {name!r} has an A without its B (or the reverse); rebuild the artifact")
    feeds = {}
    # the graph takes LoRA inputs only where the build's adapters needed them
    groups = {
        (i, g)
        for i in range(artifact.model.num_layers)
        for g in c.LORA_GROUPS
        if c.LORA_A % (i, g) in shapes and c.LORA_B % (i, g) in shapes
    }
    known = {(i, p) for i, g in groups for p in c.LORA_GROUPS[g]}
    if set(parts) - known:
        i, part = sorted(set(parts) - known)[0]
        raise ArtifactError(
            f"adapter {name!r} adapts layer {i} {part}, for which {artifact.model_path} takes no LoRA input; "
            "rebuild the artifact with this adapter"
        )
    for i, group in sorted(groups):
        a_name, b_name = c.LORA_A % (i, group), c.LORA_B % (i, group)
        k, out = int(shapes[a_name][0]), int(shapes[b_name][1])
        members = [parts.get((i, p), {}) for p in c.LORA_GROUPS[group]]
        sizes = _part_sizes(artifact, group, out)
        a_list = [p["a"] if p else np.zeros((k, 0), np.float32) for p in members]
        b_full = np.zeros((sum(a.shape[1] for a in a_list), out), np.float32)
        row = col = 0
        for a, p, size in zip(a_list, members, sizes):
            r = a.shape[1]
            if p and (a.shape[0] != k or p["b"].shape != (r, size)):
                raise ArtifactError(f"adapter {name!r}: layer {i} {group} has mismatched LoRA shapes; rebuild it")
            if r:
                b_full[row : row + r, col : col + size] = p["b"]
            row, col = row + r, col + size
        feeds[a_name] = np.ascontiguousarray(np.concatenate(a_list, axis=1))
        feeds[b_name] = b_full
    return feeds
