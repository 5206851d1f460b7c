"""How each weight of the decoder is stored: a recipe's precision block turned into a `WeightPlan`."""

from __future__ import annotations

from dataclasses import dataclass

from edge.config import QwenConfig
from edge.quantize.blockwise import QuantSpec
from edge.recipe import INT8_LAYER_METHODS, Precision, RecipeError

# The linears of a decoder layer, by Hugging Face module name (the weight is `<part>.weight`).
LINEAR_PARTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class WeightPlan:
    """How each kind of weight is stored: a QuantSpec, or "fp32" / "fp16" for float storage."""

    linear: QuantSpec | str
    embedding: QuantSpec | str
    lm_head: QuantSpec | str
    overrides: tuple[tuple[str, QuantSpec | str], ...] = ()  # (HF weight name, storage) for mixed precision
    lm_head_int8_rows: int = 0  # the first rows of a quantized lm_head kept in int8 (see DecoderGraph._lm_head)

    def lm_head_shares_embedding(self, tied: bool) -> bool:
        """Whether a tied model's lm_head reuses the embedding table's quantized blobs (one copy)."""
        return (
            tied
            and not isinstance(self.lm_head, str)
            and self.lm_head == self.embedding
            and not self.lm_head_int8_rows
        )

    def for_linear(self, names: list[str]) -> QuantSpec | str:
        """Storage of a (possibly packed) linear: the most precise storage any of its parts asks for."""
        chosen = dict(self.overrides)
        return max((chosen.get(n, self.linear) for n in names), key=_precision_rank)


def _precision_rank(storage: QuantSpec | str) -> int:
    return {"fp32": 32, "fp16": 16}[storage] if isinstance(storage, str) else storage.bits


def weight_plan(precision: Precision, config: QwenConfig) -> WeightPlan:
    """Translate a recipe's precision block into per-weight storage for the graph."""

    def storage(bits: str, table: bool = False, symmetric: bool = precision.symmetric) -> QuantSpec | str:
        if bits in ("fp32", "fp16"):
            return bits
        n = 4 if bits == "int4" else 8
        # gptq stores the rtn layout; edge.quantize.gptq supplies the calibrated values.
        method = "rtn" if precision.method in INT8_LAYER_METHODS else precision.method
        # onnxruntime's HQQ quantizer is 4-bit and for matrices; tables and 8-bit use rtn.
        if method == "hqq" and (table or n == 8):
            method = "rtn"
        return QuantSpec(n, precision.block_size, symmetric and method == "rtn", method)

    if precision.lm_head_int8_rows >= config.vocab_size:
        raise RecipeError(
            f"precision lm_head_int8_rows {precision.lm_head_int8_rows} covers the whole "
            f"{config.vocab_size}-token vocabulary; use lm_head: int8 instead"
        )
    overrides = ()
    if precision.method in INT8_LAYER_METHODS:
        names = [f"model.layers.{i}.{part}.weight" for i in range(config.num_layers) for part in LINEAR_PARTS]
        # int8 is near-lossless symmetric; zero points would only add bytes.
        overrides = tuple((n, storage("int8", symmetric=True)) for n in names if precision.bits_for(n) == "int8")
    return WeightPlan(
        linear=storage(precision.weights),
        embedding=storage(precision.embedding_bits, table=True),
        lm_head=storage(precision.lm_head_bits),
        overrides=overrides,
        lm_head_int8_rows=precision.lm_head_int8_rows,
    )
