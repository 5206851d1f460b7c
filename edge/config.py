"""The normalized shape of a supported Qwen decoder, whatever the source format."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qwen_edge.errors import QwenEdgeError

SUPPORTED_FAMILIES = ("qwen2", "qwen3")
SUPPORTED_TEXT = "Qwen2, Qwen2.5 (incl. Coder and Math) and Qwen3 dense decoders (model_type qwen2 or qwen3)"


class UnsupportedModelError(QwenEdgeError):
    """A model this toolkit does not build."""


@dataclass(frozen=True)
class QwenConfig:
    """Hyper-parameters of a Qwen2/Qwen3 dense decoder, read from a HF config or GGUF metadata."""

    family: str  # "qwen2" or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    @property
    def attention_bias(self) -> bool:
        """Qwen2 has q/k/v biases; Qwen3 has none."""
        return self.family == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """Qwen3 normalizes each query and key head (RMSNorm) before rotary."""
        return self.family == "qwen3"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_hf(cls, cfg: dict) -> "QwenConfig":
        """Build from a Hugging Face config.json dict; unsupported models raise UnsupportedModelError."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; qwen-edge builds {SUPPORTED_TEXT}"
            )
        rope_scaling = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported; remove rope_scaling from config.json "
                "to build with the model's native context length"
            )
        rope_theta = cfg.get("rope_theta", rope_scaling.get("rope_theta", 10000.0))
        if cfg.get("use_sliding_window") and model_type == "qwen2":
            raise UnsupportedModelError("sliding-window attention is not supported; set use_sliding_window to false")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            family=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            pad_token_id=cfg.get("pad_token_id"),
        )
