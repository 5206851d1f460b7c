"""How each weight of the decoder is stored: a recipe's precision block turned into a `WeightPlan`."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge.config import QwenConfig
from edge.quantize import source_grid
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
# The matrices the graph stores per layer (one storage each): key -> (graph name, the LINEAR_PARTS packed in it).
GROUPS = {
    "qkv": ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "o": ("self_attn.o_proj", ("self_attn.o_proj",)),
    "gate_up": ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    "down": ("mlp.down_proj", ("mlp.down_proj",)),
}
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class WeightPlan:
    """How each kind of weight is stored: a QuantSpec, or "fp32" / "fp16" for float storage."""

    linear: QuantSpec | str
    embedding: QuantSpec | str
    lm_head: QuantSpec | str
    overrides: tuple[tuple[str, QuantSpec | str], ...] = ()  # (HF weight name, storage) for mixed precision
    lm_head_int8_rows: int = 0  # rows of a quantized lm_head kept in int8 (see DecoderGraph._sliced_lm_head)
    lm_head_int8_ids: tuple[int, ...] = ()  # which rows, ascending (edge.quantize.head_rows.with_int8_ids)
    source_grid: tuple[str, ...] = ()  # HF weight names stored as the source's own integers and scales (GGUF)

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


def _precision_rank(storage: QuantSpec | str) -> tuple[int, int, bool]:
    """More bits, then smaller blocks, then zero points: a storage that holds every grid ranked below it."""
    if isinstance(storage, str):
        return {"fp32": 32, "fp16": 16}[storage], 0, False
    return storage.bits, -storage.block_size, not storage.symmetric


def storages(plan: WeightPlan, config: QwenConfig) -> dict[str, QuantSpec | str]:
    """The storage of every weight matrix by HF name (a packed linear's parts share one); a tied
    model's lm_head is the embedding table."""
    out = {}
    for i in range(config.num_layers):
        for _, parts in GROUPS.values():
            names = [f"model.layers.{i}.{part}.weight" for part in parts]
            out.update(dict.fromkeys(names, plan.for_linear(names)))
    out[EMBEDDING] = plan.embedding
    if not config.tie_word_embeddings:
        out[LM_HEAD] = plan.lm_head
    return out


def weight_plan(precision: Precision, config: QwenConfig, source_types: dict[str, str] | None = None) -> WeightPlan:
    """Translate a recipe's precision block into per-weight storage for the graph; method ``gguf``
    takes each weight's storage from its GGUF type (`source_types`: HF name -> GGUF type name)."""

    def storage(bits: str, table: bool = False, symmetric: bool = precision.symmetric) -> QuantSpec | str:
        if bits in ("fp32", "fp16"):
            return bits
        n = 4 if bits == "int4" else 8
        # gptq stores the rtn layout; edge.quantize.gptq supplies the calibrated values.
        method = "rtn" if precision.method in (*INT8_LAYER_METHODS, "gguf") else precision.method
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
    plan = WeightPlan(
        linear=storage(precision.weights),
        embedding=storage(precision.embedding_bits, table=True),
        lm_head=storage(precision.lm_head_bits),
        overrides=overrides,
        lm_head_int8_rows=precision.lm_head_int8_rows,
    )
    return plan if precision.method != "gguf" else _source_grid_plan(plan, config, source_types)


def _source_grid_plan(plan: WeightPlan, config: QwenConfig, types: dict[str, str] | None) -> WeightPlan:
    """`plan` (the recipe's storage, for float tensors) with every quantized GGUF weight at the storage its
    type asks for (edge.quantize.source_grid), and the names whose storage holds their grid exactly."""
    if types is None:
        raise RecipeError(
            "precision method 'gguf' keeps a GGUF source's own quantization; this source is not a GGUF file: "
            "use another method (e.g. rtn) or a .gguf source"
        )
    native = {name: source_grid.native_storage(t) for name, t in types.items()}
    linears = [f"model.layers.{i}.{part}.weight" for i in range(config.num_layers) for part in LINEAR_PARTS]
    overrides = tuple((n, native[n]) for n in linears if native.get(n) is not None)
    table = native.get(EMBEDDING) or plan.embedding
    # One storage for both: a tied lm_head is the table, an untied one is stored at its own type.
    head = table if config.tie_word_embeddings else native.get(LM_HEAD) or plan.lm_head
    plan = replace(plan, overrides=overrides, embedding=table, lm_head=head)
    stored = storages(plan, config)
    # An embedding table of its own has float16 scales: Q6_K's d * sc are not all float16 numbers.
    fp16_scales = not plan.lm_head_shares_embedding(config.tie_word_embeddings)
    kept = tuple(
        name
        for name, spec in stored.items()
        if source_grid.holds(types.get(name, "F32"), spec)
        and not (name == EMBEDDING and fp16_scales and types[name] == "Q6_K")
    )
    return replace(plan, source_grid=kept)


def source_grid_summary(plan: WeightPlan, config: QwenConfig, types: dict[str, str]) -> dict:
    """The manifest's account of a ``gguf`` plan: per storage, how many quantized GGUF weights kept their
    grid and which were re-rounded (with their type); weights stored from float tensors are counted apart."""
    summary: dict[str, dict] = {}
    for name, spec in storages(plan, config).items():
        label = spec if isinstance(spec, str) else f"int{spec.bits} block {spec.block_size}"
        label += "" if isinstance(spec, str) or spec.symmetric else " asymmetric"
        entry = summary.setdefault(label, {"kept": 0, "rerounded": [], "from_float": 0})
        qtype = types.get(name, "F32")
        if name in plan.source_grid:
            entry["kept"] += 1
        elif qtype in source_grid.FLOAT_TYPES:
            entry["from_float"] += 1
        else:
            entry["rerounded"].append(f"{name} ({qtype})")
    return summary
