"""Emit the Qwen2/Qwen3 decoder as an ONNX graph for ONNX Runtime's CPU contrib kernels, and write it.

The graph is described once with onnx-ir; every weight is a lazy tensor that reads, and if
asked quantizes, one source tensor only when the model is written, so peak memory stays near
the size of the largest single matrix rather than the whole model.

Inputs and outputs follow docs/ARCHITECTURE.md (onnxruntime-genai's decoder layout with a
shared past/present KV buffer), plus the optional ``num_logits_to_keep`` input.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edge import report
from edge.config import QwenConfig
from edge.graph.plan import WeightPlan
from edge.quantize.blockwise import BlockQuantized, QuantSpec, quantize
from edge.sources.base import READ_ROWS, row_blocks
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

MS = "com.microsoft"
OPSET = 21
INT64_MAX = np.iinfo(np.int64).max
# A quantized lm_head is emitted as row slices of at most this many rows, concatenated: onnxruntime
# repacks each MatMulNBits weight at load, and one 150k-row matrix would briefly exist twice.
LM_HEAD_SLICE_ROWS = 32768


@dataclass(frozen=True)
class GraphOptions:
    """Graph-level choices: context length (rotary cache size), MatMulNBits accuracy level, and the
    (layer, contract.LORA_GROUPS group) linears that take LoRA A/B inputs (a switchable-adapter artifact:
    only those its adapters adapt, since every input costs a few empty ops per step even at rank zero)."""

    context_length: int
    accuracy_level: int = 4
    lora: frozenset[tuple[int, str]] = frozenset()


TensorReader = Callable[..., np.ndarray]  # (HF name, rows: slice | None = None) -> float32 array (a source's tensor)


class _Memo:
    """Compute a multi-part weight once and hand each part out once, then forget it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[dict, set]] = {}

    def part(self, key: str, parts: tuple[str, ...], compute: Callable[[], dict], which: str) -> np.ndarray:
        with self._lock:
            if key not in self._entries:
                self._entries[key] = (compute(), set(parts))
            values, pending = self._entries[key]
            pending.discard(which)
            if not pending:
                del self._entries[key]
            return values[which]


class DecoderGraph:
    """Builds the ONNX decoder for one QwenConfig from a tensor reader (HF names → fp32 arrays)."""

    def __init__(
        self,
        config: QwenConfig,
        read: TensorReader,
        plan: WeightPlan,
        options: GraphOptions,
        quantized: Callable[[str], BlockQuantized | None] | None = None,
        grid: Callable[..., BlockQuantized] | None = None,
    ):
        """`quantized(key)` may supply the blobs of a packed linear (e.g. from calibrated GPTQ) by graph key;
        `grid(HF name, spec, rows=None)` gives the blobs of the weights in ``plan.source_grid`` (a GGUF
        source's own integers and scales)."""
        self.cfg = config
        self.read = read
        self.plan = plan
        self.opts = options
        self.memo = _Memo()
        self.supplied = quantized or (lambda key: None)
        self.grid = grid
        self.initializers: list[ir.Value] = []
        self.lora_inputs: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self._count = 0

    # ----- small helpers -------------------------------------------------------------------
    def _op(self, op_type: str, inputs, attrs=None, *, domain: str = "", outputs: int = 1, name: str | None = None):
        self._count += 1
        node_name = name or f"/{op_type}_{self._count}"
        node = ir.node(op_type, inputs, attributes=attrs or {}, domain=domain, num_outputs=outputs, name=node_name)
        for i, out in enumerate(node.outputs):
            out.name = f"{node_name}/output_{i}"
        self.nodes.append(node)
        return node.outputs[0] if outputs == 1 else node.outputs

    def _const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(
            name=name,
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array, name=name),
        )
        self.initializers.append(value)
        return value

    def _lazy(self, name: str, dtype: np.dtype, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> ir.Value:
        def load():
            array = produce()
            assert array.shape == shape and array.dtype == dtype, (name, array.shape, shape, array.dtype, dtype)
            return ir.tensor(array, name=name)

        tensor = ir.LazyTensor(load, dtype=ir.DataType.from_numpy(np.dtype(dtype)), shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
        self.initializers.append(value)
        return value

    def _overridable(self, name: str, shape: list, default: np.ndarray) -> ir.Value:
        """A graph input whose initializer of the same name is its default."""
        value = ir.val(name, ir.DataType.FLOAT, shape)
        value.const_value = ir.tensor(default, name=name)
        self.initializers.append(value)
        self.lora_inputs.append(value)
        return value

    def _lora(self, x: ir.Value, y: ir.Value, i: int, group: str, n: int, k: int) -> ir.Value:
        """y + (x @ A) @ B with layer i's LoRA inputs of `group` (contract.LORA_GROUPS); zero rank by default."""
        if (i, group) not in self.opts.lora:
            return y
        rank = f"lora_rank_{i}_{group}"  # one dim per input: layers may differ in rank (or have none)
        a = self._overridable(contract.LORA_A % (i, group), [k, rank], np.zeros((k, 0), np.float32))
        b = self._overridable(contract.LORA_B % (i, group), [rank, n], np.zeros((0, n), np.float32))
        delta = self._op("MatMul", [self._op("MatMul", [x, a]), b], name=f"/model/layers.{i}/{group}/lora")
        return self._op("Add", [y, delta])

    def _read_rows(self, names: list[str]) -> np.ndarray:
        arrays = [self.read(n) for n in names]
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)

    # ----- weights -------------------------------------------------------------------------
    def _float_weight(self, key: str, names: list[str], n: int, k: int, storage: str) -> ir.Value:
        """A [K, N] MatMul weight stored as fp32, or fp16 cast back to fp32 at load."""
        dtype = np.float32 if storage == "fp32" else np.float16
        w = self._lazy(
            f"{key}.weight_t",
            np.dtype(dtype),
            (k, n),
            lambda: np.ascontiguousarray(self._read_rows(names).T).astype(dtype),
        )
        return w if storage == "fp32" else self._op("Cast", [w], {"to": ir.DataType.FLOAT})

    def _quantized(
        self,
        key: str,
        names: list[str],
        n: int,
        k: int,
        spec: QuantSpec,
        gather: bool = False,
        matmul: bool = True,
        scales_dtype=np.float32,
        rows: np.ndarray | None = None,
        calibrated: str | None = None,
    ) -> dict[str, ir.Value | None]:
        """Lazy blobs for the rows of `names`: packed weights and scales, plus zero points in the
        MatMulNBits layout (`zp`, [N, ceil(kb*bits/8)]) and/or the GatherBlockQuantized one
        (`gather_zp`, [N, kb, 1], one value per byte), computed once whichever is written first.
        MatMulNBits takes float32 scales with float32 activations; GatherBlockQuantized alone may
        take float16 ones (its output then has that type).

        Supplied blobs are looked up by `key`; with `rows` (ascending row ids of the single matrix
        ``names[0]``) they are those rows of the supplied blobs `calibrated`, or quantized from the
        source when `calibrated` is None."""
        kb = -(-k // spec.block_size)
        blob = spec.block_size * spec.bits // 8
        asym = not spec.symmetric or spec.method != "rtn"
        zp_parts = (("zp",) if matmul else ()) + (("gather_zp",) if gather else ()) if asym else ()
        parts = ("packed", "scales") + zp_parts

        def compute() -> dict:
            if rows is None:
                q = self.supplied(key)
            else:
                q = self.supplied(calibrated) if calibrated else None
                q = q.take(rows) if q is not None else None
            q = q or self._read_quantized(names, n, spec, rows)
            values = {"packed": q.packed, "scales": q.scales.astype(scales_dtype), "zp": q.zero_points}
            if "gather_zp" in parts:
                values["gather_zp"] = q.zero_point_values()[:, :, None]
            return values

        def getter(which):
            return lambda: self.memo.part(key, parts, compute, which)

        out = {
            "packed": self._lazy(f"{key}.qweight", np.dtype(np.uint8), (n, kb, blob), getter("packed")),
            "scales": self._lazy(f"{key}.scales", np.dtype(scales_dtype), (n, kb), getter("scales")),
            "zp": None,
            "gather_zp": None,
        }
        if "zp" in parts:
            out["zp"] = self._lazy(
                f"{key}.zero_points", np.dtype(np.uint8), (n, -(-kb * spec.bits // 8)), getter("zp")
            )
        if "gather_zp" in parts:
            out["gather_zp"] = self._lazy(
                f"{key}.gather_zero_points", np.dtype(np.uint8), (n, kb, 1), getter("gather_zp")
            )
        return out

    def _read_quantized(
        self, names: list[str], n: int, spec: QuantSpec, rows: np.ndarray | None = None
    ) -> BlockQuantized:
        """quantize() of the `n` rows of `names` (the ascending ids `rows` of a single matrix); a single
        matrix is read and quantized in row blocks; weights of ``plan.source_grid`` come from `grid`."""
        if rows is not None:
            (name,) = names
            if name in self.plan.source_grid:
                return BlockQuantized.concat(
                    [self.grid(name, spec, window).take(ids) for window, ids in _row_windows(rows)]
                )
            return BlockQuantized.concat(
                [quantize(self.read(name, rows=window)[ids], spec) for window, ids in _row_windows(rows)]
            )
        if any(name in self.plan.source_grid for name in names):
            return BlockQuantized.concat(
                [
                    self.grid(name, spec) if name in self.plan.source_grid else quantize(self.read(name), spec)
                    for name in names
                ]
            )
        if len(names) > 1:
            return quantize(self._read_rows(names), spec)
        return BlockQuantized.concat([quantize(block, spec) for _, block in row_blocks(self.read, names[0], n)])

    def _linear(
        self,
        x: ir.Value,
        key: str,
        names: list[str],
        n: int,
        k: int,
        storage,
        bias: ir.Value | None = None,
        rows: np.ndarray | None = None,
        calibrated: str | None = None,
    ):
        if isinstance(storage, str):
            y = self._op("MatMul", [x, self._float_weight(key, names, n, k, storage)])
            return self._op("Add", [y, bias]) if bias is not None else y
        q = self._quantized(key, names, n, k, storage, rows=rows, calibrated=calibrated)
        y = self._matmul_nbits(x, q, n, k, storage, f"/{key}/MatMulNBits")
        return self._op("Add", [y, bias]) if bias is not None else y

    def _matmul_nbits(self, x: ir.Value, q: dict, n: int, k: int, storage: QuantSpec, name: str) -> ir.Value:
        """MatMulNBits with only the inputs that exist: onnxruntime-web's WebGPU kernel takes 3 or 4 inputs
        (no trailing empty ones), so a bias is a separate Add."""
        attrs = {
            "K": k,
            "N": n,
            "bits": storage.bits,
            "block_size": storage.block_size,
            "accuracy_level": self.opts.accuracy_level,
        }
        inputs = [x, q["packed"], q["scales"]] + ([q["zp"]] if q["zp"] is not None else [])
        return self._op("MatMulNBits", inputs, attrs, domain=MS, name=name)

    def _vector(self, name: str) -> ir.Value:
        size = int(np.prod(self._shape_of_vector(name)))
        return self._lazy(name, np.dtype(np.float32), (size,), lambda: self.read(name).astype(np.float32).reshape(-1))

    def _shape_of_vector(self, name: str) -> tuple[int]:
        c = self.cfg
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            return (c.head_dim,)
        if name.endswith("q_proj.bias"):
            return (c.num_heads * c.head_dim,)
        if name.endswith(("k_proj.bias", "v_proj.bias")):
            return (c.num_kv_heads * c.head_dim,)
        return (c.hidden_size,)

    # ----- blocks --------------------------------------------------------------------------
    def _embedding(self, input_ids: ir.Value) -> ir.Value:
        c = self.cfg
        storage = self.plan.embedding
        name = "model.embed_tokens.weight"
        if isinstance(storage, str):
            dtype = np.float32 if storage == "fp32" else np.float16
            table = self._lazy(
                name, np.dtype(dtype), (c.vocab_size, c.hidden_size), lambda: self.read(name).astype(dtype)
            )
            x = self._op("Gather", [table, input_ids], {"axis": 0})
            return x if storage == "fp32" else self._op("Cast", [x], {"to": ir.DataType.FLOAT})
        if c.hidden_size % storage.block_size:
            raise QwenEdgeError(
                f"hidden size {c.hidden_size} is not a multiple of block_size {storage.block_size}; "
                "choose a smaller block_size in the recipe"
            )
        shared = self.plan.lm_head_shares_embedding(self.cfg.tie_word_embeddings)
        # A table of its own keeps float16 scales (half their bytes); lm_head's MatMulNBits needs float32.
        q = self._quantized(
            "model.embed_tokens",
            [name],
            c.vocab_size,
            c.hidden_size,
            storage,
            gather=True,
            matmul=shared,
            scales_dtype=np.float32 if shared else np.float16,
        )
        self._embed_blobs = q
        # The float16 scales on disk are cast to float32 by an initializer-only Cast, which onnxruntime folds
        # at load (before placing nodes): no float16 arithmetic is left for a device without it (WebGPU
        # adapters lacking shader-f16 compute float16 casts as zeros).
        scales = q["scales"] if shared else self._op("Cast", [q["scales"]], {"to": ir.DataType.FLOAT})
        # The packed rows [vocab, blocks, bytes] serve as they are: each block is quantized along the last axis.
        scales = self._op("Unsqueeze", [scales, self._const("last_axis", np.array([-1], np.int64))])
        attrs = {"gather_axis": 0, "quantize_axis": 2, "block_size": storage.block_size, "bits": storage.bits}
        blocks = self._op("GatherBlockQuantized", [q["packed"], input_ids, scales, q["gather_zp"]], attrs, domain=MS)
        return self._op("Reshape", [blocks, self._const("hidden_shape", np.array([0, 0, c.hidden_size], np.int64))])

    def _norm(self, x, weight_name: str):
        return self._op(
            "SimplifiedLayerNormalization",
            [x, self._vector(weight_name)],
            {"axis": -1, "epsilon": self.cfg.rms_norm_eps, "stash_type": 1},
        )

    def _skip_norm(self, x, residual, weight_name: str):
        out = self._op(
            "SkipSimplifiedLayerNormalization",
            [x, residual, self._vector(weight_name)],
            {"epsilon": self.cfg.rms_norm_eps},
            domain=MS,
            outputs=4,
        )
        return out[0], out[3]

    def _head_norm(self, x, heads: int, weight_name: str):
        c = self.cfg
        split = self._op(
            "Reshape", [x, self._const(f"{weight_name}.heads_shape", np.array([0, 0, heads, c.head_dim], np.int64))]
        )
        normed = self._norm(split, weight_name)
        return self._op(
            "Reshape",
            [normed, self._const(f"{weight_name}.merge_shape", np.array([0, 0, heads * c.head_dim], np.int64))],
        )

    def _attention(self, i: int, x, past_k, past_v, seqlens_k, total_len, cos, sin):
        c = self.cfg
        p = f"model.layers.{i}.self_attn"
        q_n, kv_n = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        names = [f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.v_proj.weight"]
        storage = self.plan.for_linear(names)
        bias = None
        if c.attention_bias:
            bias = self._lazy(
                f"{p}.qkv_proj.bias",
                np.dtype(np.float32),
                (q_n + 2 * kv_n,),
                lambda: np.concatenate([self.read(f"{p}.{w}_proj.bias") for w in "qkv"]).astype(np.float32),
            )
        qkv = self._linear(x, f"{p}.qkv_proj", names, q_n + 2 * kv_n, c.hidden_size, storage, bias)
        qkv = self._lora(x, qkv, i, "qkv_proj", q_n + 2 * kv_n, c.hidden_size)
        if c.qk_norm:
            q, k, v = self._op(
                "Split",
                [qkv, self._const(f"{p}.qkv_split", np.array([q_n, kv_n, kv_n], np.int64))],
                {"axis": -1},
                outputs=3,
            )
            q = self._head_norm(q, c.num_heads, f"{p}.q_norm.weight")
            k = self._head_norm(k, c.num_kv_heads, f"{p}.k_norm.weight")
            gqa_in = [q, k, v]
        else:
            gqa_in = [qkv, None, None]
        attrs = {
            "num_heads": c.num_heads,
            "kv_num_heads": c.num_kv_heads,
            "do_rotary": 1,
            "rotary_interleaved": 0,
            "local_window_size": -1,
            "scale": float(c.head_dim) ** -0.5,
        }
        out, present_k, present_v = self._op(
            "GroupQueryAttention",
            [*gqa_in, past_k, past_v, seqlens_k, total_len, cos, sin],
            attrs,
            domain=MS,
            outputs=3,
            name=f"/model/layers.{i}/attn/GroupQueryAttention",
        )
        o_name = f"{p}.o_proj.weight"
        y = self._linear(out, f"{p}.o_proj", [o_name], c.hidden_size, q_n, self.plan.for_linear([o_name]))
        return self._lora(out, y, i, "o_proj", c.hidden_size, q_n), present_k, present_v

    def _mlp(self, i: int, x):
        c = self.cfg
        p = f"model.layers.{i}.mlp"
        gate_up_names = [f"{p}.gate_proj.weight", f"{p}.up_proj.weight"]
        gate_up = self._linear(
            x,
            f"{p}.gate_up_proj",
            gate_up_names,
            2 * c.intermediate_size,
            c.hidden_size,
            self.plan.for_linear(gate_up_names),
        )
        gate_up = self._lora(x, gate_up, i, "gate_up_proj", 2 * c.intermediate_size, c.hidden_size)
        gate, up = self._op(
            "Split",
            [gate_up, self._const(f"{p}.gate_up_split", np.array([c.intermediate_size] * 2, np.int64))],
            {"axis": -1},
            outputs=2,
        )
        act = self._op("Mul", [self._op("Mul", [gate, self._op("Sigmoid", [gate])]), up])
        down = f"{p}.down_proj.weight"
        storage = self.plan.for_linear([down])
        y = self._linear(act, f"{p}.down_proj", [down], c.hidden_size, c.intermediate_size, storage)
        return self._lora(act, y, i, "down_proj", c.hidden_size, c.intermediate_size)

    def _rotary_caches(self) -> tuple[ir.Value, ir.Value]:
        c = self.cfg
        inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        angles = np.outer(np.arange(self.opts.context_length, dtype=np.float64), inv_freq)
        return (
            self._const("cos_cache", np.cos(angles).astype(np.float32)),
            self._const("sin_cache", np.sin(angles).astype(np.float32)),
        )

    def _lm_head(self, x):
        c = self.cfg
        storage = self.plan.lm_head
        if self.plan.lm_head_shares_embedding(self.cfg.tie_word_embeddings):
            q = self._embed_blobs  # one copy of the packed weights, shared with the embedding
            return self._matmul_nbits(x, q, c.vocab_size, c.hidden_size, storage, "/lm_head/MatMulNBits")
        name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        if isinstance(storage, str):
            return self._linear(x, "lm_head", [name], c.vocab_size, c.hidden_size, storage)
        return self._sliced_lm_head(x, name, storage)

    def _sliced_lm_head(self, x, name: str, storage: QuantSpec):
        """lm_head as MatMulNBits row slices whose logits are concatenated, then put back in token order.

        The ``plan.lm_head_int8_rows`` rows named by ``plan.lm_head_int8_ids`` (those whose rounding moves
        the next-token distribution most, edge.quantize.head_rows) are one int8 slice; the other rows have
        `storage`, in id order, in slices of at most LM_HEAD_SLICE_ROWS rows.
        """
        c = self.cfg
        ids = np.asarray(self.plan.lm_head_int8_ids, np.int64)
        if len(ids) != self.plan.lm_head_int8_rows:
            raise ValueError(
                f"the plan keeps {self.plan.lm_head_int8_rows} lm_head rows in int8 but names {len(ids)}: "
                "fill them in with edge.quantize.head_rows.with_int8_ids"
            )
        rest = np.setdiff1d(np.arange(c.vocab_size), ids)
        count = -(-len(rest) // LM_HEAD_SLICE_ROWS)
        bounds = [len(rest) * i // count for i in range(count + 1)]
        int8 = QuantSpec(8, storage.block_size, symmetric=True)  # near-lossless; no zero points
        slices = ([(ids, int8)] if len(ids) else []) + [(rest[a:b], storage) for a, b in zip(bounds, bounds[1:])]
        # calibrated lm_head blobs (GPTQ) hold every row at `storage`: the int8 rows come from the source
        logits = [
            self._linear(
                x,
                "lm_head" if len(slices) == 1 else f"lm_head.{i}",
                [name],
                len(rows),
                c.hidden_size,
                spec,
                rows=rows,
                calibrated="lm_head" if spec is storage else None,
            )
            for i, (rows, spec) in enumerate(slices)
        ]
        if len(logits) == 1:
            return logits[0]
        joined = self._op("Concat", logits, {"axis": -1}, name="/lm_head/Concat")
        if not len(ids):
            return joined
        # logit j of the concatenation is token order[j]: gather each token's logit back to its id
        order = np.concatenate([rows for rows, _ in slices])
        position = self._const("lm_head.token_positions", np.argsort(order).astype(np.int32))
        return self._op("Gather", [joined, position], {"axis": -1}, name="/lm_head/Gather")

    # ----- the whole model -----------------------------------------------------------------
    def build(self) -> ir.Model:
        """Describe the full decoder; tensors are read only when the model is saved."""
        c = self.cfg
        f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
        input_ids = ir.val(contract.INPUT_IDS, i64, ["batch_size", "sequence_length"])
        mask = ir.val(contract.ATTENTION_MASK, i64, ["batch_size", "total_sequence_length"])
        kv_shape = ["batch_size", c.num_kv_heads, "past_sequence_length", c.head_dim]
        pasts = [
            (ir.val(contract.PAST_KEY % i, f32, kv_shape), ir.val(contract.PAST_VALUE % i, f32, kv_shape))
            for i in range(c.num_layers)
        ]
        keep = self._const(contract.LOGITS_TO_KEEP, np.array(0, np.int64))

        seqlens = self._op(
            "Sub",
            [
                self._op("ReduceSum", [mask, self._const("reduce_axis", np.array([1], np.int64))], {"keepdims": 0}),
                self._const("one", np.array(1, np.int64)),
            ],
        )
        seqlens_k = self._op("Cast", [seqlens], {"to": ir.DataType.INT32})
        total = self._op(
            "Gather", [self._op("Shape", [mask]), self._const("one_index", np.array(1, np.int64))], {"axis": 0}
        )
        total_len = self._op("Cast", [total], {"to": ir.DataType.INT32})
        cos, sin = self._rotary_caches()

        hidden = self._embedding(input_ids)
        presents = []
        residual = hidden
        x = self._norm(hidden, "model.layers.0.input_layernorm.weight")
        for i in range(c.num_layers):
            attn, pk, pv = self._attention(i, x, *pasts[i], seqlens_k, total_len, cos, sin)
            pk.name, pv.name = contract.PRESENT_KEY % i, contract.PRESENT_VALUE % i
            presents += [pk, pv]
            x, residual = self._skip_norm(attn, residual, f"model.layers.{i}.post_attention_layernorm.weight")
            mlp = self._mlp(i, x)
            next_norm = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < c.num_layers else "model.norm.weight"
            x, residual = self._skip_norm(mlp, residual, next_norm)

        starts = self._op("Unsqueeze", [self._op("Neg", [keep]), self._const("zero_axis", np.array([0], np.int64))])
        kept = self._op(
            "Slice",
            [
                x,
                starts,
                self._const("slice_end", np.array([INT64_MAX], np.int64)),
                self._const("seq_axis", np.array([1], np.int64)),
            ],
        )
        logits = self._lm_head(kept)
        logits.name = contract.LOGITS

        keep_input = ir.val(contract.LOGITS_TO_KEEP, i64, [])
        # The input and the initializer share one Value: the initializer is its default.
        self.initializers.remove(keep)
        keep_input.const_value = keep.const_value
        for use_node, idx in list(keep.uses()):
            use_node.replace_input_with(idx, keep_input)
        self.initializers.append(keep_input)

        inputs = [input_ids, mask, *[v for pair in pasts for v in pair], keep_input, *self.lora_inputs]
        graph = ir.Graph(
            inputs,
            [logits, *presents],
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": OPSET, MS: 1},
            name="qwen_edge_decoder",
        )
        return ir.Model(graph, ir_version=10, producer_name="qwen-edge")


GATHER_OPS = frozenset({"Gather", "GatherBlockQuantized"})
_PASS_THROUGH = frozenset({"Cast", "Unsqueeze"})  # what the graph puts between a table's scales and its gather


def gathered_initializers(graph: ir.Graph) -> set[str]:
    """Initializers a decode step reads only a few rows of: every use is a gather's table, scales or zero
    points, directly or through a Cast/Unsqueeze of that initializer alone (the embedding table unless
    lm_head shares its blobs, the rotary caches). The others are read whole for every generated token."""

    def rows_only(value: ir.Value) -> bool:
        uses = value.uses()
        return bool(uses) and all(
            (node.op_type in GATHER_OPS and index != 1)
            or (node.op_type in _PASS_THROUGH and index == 0 and all(rows_only(out) for out in node.outputs))
            for node, index in uses
        )

    return {name for name, value in graph.initializers.items() if rows_only(value)}


def _row_windows(ids: np.ndarray):
    """``(window, positions)`` over ascending row ids: slices of at most READ_ROWS rows, each starting at an
    id and ending after the last id it holds, and where those ids sit in the window's rows."""
    start = 0
    while start < len(ids):
        first = int(ids[start])
        stop = start + int(np.searchsorted(ids[start:], first + READ_ROWS))
        yield slice(first, int(ids[stop - 1]) + 1), ids[start:stop] - first
        start = stop


def export(source, out_dir: Path, plan: WeightPlan, options: GraphOptions, quantized=None) -> None:
    """Write the decoder of `source` into `out_dir` as the artifact's graph file and its external data
    file (contract.MODEL_FILE, contract.MODEL_DATA_FILE, aligned for memory mapping), then its tokenizer files.

    `quantized(key)` may supply precomputed blobs for packed linears (see DecoderGraph).
    """
    reporter = report.current()
    grid = source.grid_blocks if plan.source_grid else None
    graph = DecoderGraph(source.config, source.tensor, plan, options, quantized=quantized, grid=grid).build()
    bar = reporter.bar(total=len(graph.graph.initializers), desc="export+quantize", unit="tensor")
    try:
        ir.save(
            graph,
            Path(out_dir) / contract.MODEL_FILE,
            external_data=contract.MODEL_DATA_FILE,
            callback=lambda tensor, info: bar.update(1),
            alignment=contract.ALIGNMENT,
        )
    finally:
        bar.close()
    reporter.status("writing the tokenizer")
    source.write_tokenizer(out_dir)
