"""PEFT LoRA adapters: read and validate an adapter directory, and merge it into a Source.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT saves
them. LoRA on the decoder linears (q/k/v/o/gate/up/down) and on ``embed_tokens`` / ``lm_head`` is
supported, with rank, alpha, ``rank_pattern`` / ``alpha_pattern`` and rsLoRA honoured; every other
PEFT feature is refused by name when the config is read, before any tensor is.

`MergedSource` wraps a Source so that every reader of its tensors (the graph exporter, GPTQ
calibration, the fp32 directory writer of the backends) sees W + scale·B·A; its reference model is
transformers + peft in fp32, which the fidelity check compares against.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.config import QwenConfig
from edge.sources.base import Source, SourceError, file_sha256, hf_tensor_shapes
from qwen_edge import contract

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TABLE_TARGETS = ("embed_tokens", "lm_head")
_PREFIX = "base_model.model."
# adapter_config.json keys whose non-default value changes what the adapter computes, and why we refuse it
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "fan_in_fan_out": "fan_in_fan_out",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


class AdapterError(SourceError):
    """An adapter directory that cannot be used."""


@dataclass(frozen=True)
class LoraWeight:
    """One adapted weight: ``delta = scale * B @ A`` in the weight's [out, in] layout (an embedding
    table's delta is its transpose, [vocab, hidden], as PEFT computes it)."""

    a: np.ndarray  # [r, in] (embedding: [r, vocab])
    b: np.ndarray  # [out, r] (embedding: [hidden, r])
    scale: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta(self, rows: slice | None = None) -> np.ndarray:
        """The weight's delta, or only its `rows` (float32)."""
        if self.embedding:
            a_t = self.a.T if rows is None else self.a.T[rows]
            return (self.scale * (a_t @ self.b.T)).astype(np.float32)
        b = self.b if rows is None else self.b[rows]
        return (self.scale * (b @ self.a)).astype(np.float32)


@dataclass
class LoraAdapter:
    """A validated PEFT LoRA adapter: its weights by the Hugging Face name of the weight they adapt."""

    name: str
    path: Path
    config: dict
    weights: dict[str, LoraWeight]

    @property
    def targets(self) -> list[str]:
        """The module kinds it adapts (q_proj, ..., embed_tokens, lm_head)."""
        return sorted({n.split(".")[-2] for n in self.weights})

    @property
    def slots(self) -> frozenset[tuple[int, str]]:
        """The (layer, contract.LORA_GROUPS group) pairs it adapts: where a switchable graph needs LoRA inputs."""
        group_of = {part: group for group, parts in contract.LORA_GROUPS.items() for part in parts}
        found = (re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight", n) for n in self.weights)
        return frozenset((int(m.group(1)), group_of[m.group(2)]) for m in found if m)

    @property
    def tables(self) -> list[str]:
        """The adapted weights that are the embedding table or lm_head."""
        return [n for n in self.weights if n.split(".")[-2] in TABLE_TARGETS]

    def summary(self) -> dict:
        """The manifest's account of the adapter: ranks, alpha, rsLoRA, targets, sha256 of its files."""
        ranks = sorted({w.rank for w in self.weights.values()})
        return {
            "base_model": self.config.get("base_model_name_or_path"),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "targets": self.targets,
            "weights": len(self.weights),
            "sha256": {f: file_sha256(self.path / f) for f in (CONFIG_FILE, WEIGHTS_FILE)},
        }


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(path: Path | str) -> dict:
    """adapter_config.json of a LoRA adapter directory, refusing what qwen-edge cannot build (cheap: no tensors)."""
    path = Path(path).expanduser()
    cfg_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise AdapterError(f"adapter {path} is not a directory; give a PEFT adapter directory")
    for p in (cfg_path, weights_path):
        if not p.is_file():
            hint = " (save it with save_pretrained(..., safe_serialization=True))" if p == weights_path else ""
            raise AdapterError(f"adapter {path} has no {p.name}{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterError(f"{cfg_path} is unreadable ({e}); save the adapter again with PEFT") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path} is not a JSON object; save the adapter again with PEFT")
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {kind!r} is not supported; qwen-edge builds LoRA adapters only")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key) not in (None, False, [], {}, "none"):
            raise AdapterError(f"{cfg_path}: {what} is not supported; train a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias {cfg['bias']!r} (trained biases) is not supported; use bias='none'")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1 or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise AdapterError(f"{cfg_path}: r must be a positive integer and lora_alpha a number")
    return cfg


def load_adapter(path: Path | str, config: QwenConfig, name: str | None = None) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter for a model of `config`: every tensor is a LoRA A/B of a
    supported module of this model, with matching shapes."""
    from safetensors.numpy import load_file

    path = Path(path).expanduser().resolve()
    cfg = read_adapter_config(path)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:
        raise AdapterError(f"{path / WEIGHTS_FILE} is unreadable ({e}); save the adapter again with PEFT") from None
    shapes = hf_tensor_shapes(config)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, array in tensors.items():
        if "lora_magnitude_vector" in key:
            raise AdapterError(f"adapter {path} holds DoRA magnitudes ({key}); DoRA is not supported")
        if re.search(r"(embed_tokens|lm_head)(\.base_layer)?\.weight$", key):
            raise AdapterError(
                f"adapter {path} stores whole {key.rsplit('.', 1)[0]} weights (a resized vocabulary?), which is not "
                "supported; save it with save_pretrained(..., save_embedding_layers=False)"
            )
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", key)
        if not m or not key.startswith(_PREFIX):
            raise AdapterError(f"adapter {path}: {key!r} is not a LoRA A/B weight; qwen-edge builds plain LoRA only")
        module = (m.group(1) or m.group(3))[len(_PREFIX) :]
        part = m.group(2) or m.group(4)
        pairs.setdefault(module, {})[part.replace("embedding_", "")] = array.astype(np.float32)
    weights = {}
    rslora = bool(cfg.get("use_rslora"))
    for module, ab in sorted(pairs.items()):
        kind = module.rsplit(".", 1)[-1]
        weight = f"{module}.weight"
        if kind not in LINEAR_TARGETS + TABLE_TARGETS or weight not in shapes:
            raise AdapterError(
                f"adapter {path} adapts {module!r}, which this {config.family} model has no LoRA support for; "
                f"supported: {', '.join(LINEAR_TARGETS + TABLE_TARGETS)}"
            )
        if set(ab) != {"lora_A", "lora_B"}:
            raise AdapterError(f"adapter {path}: {module} lacks its {'lora_B' if 'lora_A' in ab else 'lora_A'} tensor")
        a, b = ab["lora_A"], ab["lora_B"]
        embedding = kind == "embed_tokens"
        out_dim, in_dim = shapes[weight] if not embedding else shapes[weight][::-1]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_dim or b.shape != (out_dim, r):
            raise AdapterError(
                f"adapter {path}: {module} has LoRA shapes A {list(a.shape)}, B {list(b.shape)}, not A [r, {in_dim}], "
                f"B [{out_dim}, r]; was it trained on another model?"
            )
        rank = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"])
        if rank != r:
            raise AdapterError(f"adapter {path}: {module} has rank {r} but {CONFIG_FILE} says {rank}")
        scale = alpha / (r**0.5 if rslora else r)
        weights[weight] = LoraWeight(a, b, float(scale), embedding)
    if not weights:
        raise AdapterError(f"adapter {path} holds no LoRA weights")
    return LoraAdapter(name or path.name, path, cfg, weights)


def check_tables(adapter: LoraAdapter, config: QwenConfig, *, switchable: bool) -> None:
    """Refuse embedding/lm_head LoRA where the artifact cannot hold it as PEFT computes it."""
    if not adapter.tables:
        return
    if switchable:
        raise AdapterError(
            f"adapter {adapter.name!r} adapts {', '.join(adapter.tables)}; switchable adapters cover the decoder "
            "linears (q/k/v/o/gate/up/down): build it with adapter mode merged"
        )
    if config.tie_word_embeddings:
        raise AdapterError(
            f"adapter {adapter.name!r} adapts {', '.join(adapter.tables)} of a model whose lm_head is tied to the "
            "embeddings, where merging changes both; train it without embed_tokens/lm_head in target_modules"
        )


class MergedSource(Source):
    """A Source whose tensors are the base's with a LoRA adapter folded in (W + scale·B·A)."""

    def __init__(self, base: Source, adapter: LoraAdapter):
        super().__init__(base.spec, base.cache_dir)
        check_tables(adapter, base.config, switchable=False)
        self.base, self.adapter = base, adapter
        self.kind, self.config = base.kind, base.config

    def tensor_names(self) -> list[str]:
        return self.base.tensor_names()

    def has_tensor(self, name: str) -> bool:
        return self.base.has_tensor(name)

    def tensor(self, name: str, rows: slice | None = None) -> np.ndarray:
        array = self.base.tensor(name, rows)
        lora = self.adapter.weights.get(name)
        return array if lora is None else array + lora.delta(rows)

    def weight_files(self) -> list[Path]:
        return self.base.weight_files()

    def write_tokenizer(self, out_dir: Path) -> None:
        self.base.write_tokenizer(out_dir)

    def license_facts(self):
        return self.base.license_facts()

    def reference_model(self):
        """transformers + peft in fp32: the base reference with the adapter applied (not merged)."""
        return peft_reference(self.base.reference_model(), [self.adapter])

    def fingerprint(self) -> dict:
        return {**self.base.fingerprint(), "adapter": {"name": self.adapter.name, **self.adapter.summary()}}


def peft_reference(model, adapters: list[LoraAdapter]):
    """`model` (transformers fp32) with PEFT adapters loaded under their names; the first one active."""
    try:
        from peft import PeftModel
    except ImportError:
        raise AdapterError("the adapted fp32 reference needs peft: pip install 'qwen-edge[build]'") from None
    first, *rest = adapters
    peft_model = PeftModel.from_pretrained(model, str(first.path), adapter_name=first.name)
    for adapter in rest:
        peft_model.load_adapter(str(adapter.path), adapter_name=adapter.name)
    peft_model.set_adapter(first.name)
    return peft_model.eval()


def write_switchable(adapter: LoraAdapter, path: Path) -> Path:
    """The adapter as an artifact's switchable adapter file (contract.ADAPTER_KEY_A/B: per layer and
    linear, A transposed [in, r] and scale·B transposed [r, out]), a plain .npz numpy reads."""
    check_tables(adapter, None, switchable=True)
    arrays = {}
    for weight, lora in adapter.weights.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight", weight)
        layer, target = int(m.group(1)), m.group(2)
        arrays[contract.ADAPTER_KEY_A % (layer, target)] = np.ascontiguousarray(lora.a.T)
        arrays[contract.ADAPTER_KEY_B % (layer, target)] = np.ascontiguousarray(lora.scale * lora.b.T)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path
