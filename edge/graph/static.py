"""Emit the Qwen2/Qwen3 decoder as two static-shape fp32 ONNX graphs for NPUs (QNN HTP first).

NPU compilers want every shape fixed and only standard ONNX operators, so instead of the
GroupQueryAttention graph of edge.graph.decoder this module writes:

- ``prefill.onnx``: a chunk of C tokens per run;
- ``decode.onnx``: one token per run;

both over a fixed context of L cache slots, batch 1, opset 21, default domain only.

Inputs (every graph):

- ``input_ids`` int32 ``[1, C]`` and ``position_ids`` int32 ``[1, C]`` (each < L; rotary cos/sin
  rows are gathered from an ``[L, head_dim/2]`` table);
- ``attention_bias`` float32 ``[1, 1, C, L + C]``: added to the attention scores. Columns ``0..L-1``
  are the cache slots, columns ``L..L+C-1`` the tokens of this run. 0 where a query may look,
  ``mask_value`` elsewhere (default ``MASK_VALUE`` = -100);
- ``past_key_{i}`` float32 ``[1, kv_heads, head_dim, L]`` (keys stored transposed, so Q·K needs no
  Transpose) and ``past_value_{i}`` float32 ``[1, kv_heads, L, head_dim]``.

Masking does not depend on the size of the scores. Qwen2.5's k-bias can put a whole row of real
scores several hundred below the zero keys of empty cache slots, so adding any moderate mask value
to the raw scores would leak. The graph first takes each row's maximum over the visible columns
(``ReduceMax`` of the scores plus ``GAIN`` times the bias, a shift only), subtracts it and clamps at
0, so visible scores end at 0 and below, then adds the bias: masked columns sit at least
``|mask_value|`` below the row's maximum whatever the scores are. Every tensor the softmax sees
stays within a few hundred units, which 16-bit activation quantization resolves finely.

Outputs: ``logits`` float32 ``[1, C, vocab]``; ``present_key_{i}`` ``[1, kv_heads, head_dim, C]`` and
``present_value_{i}`` ``[1, kv_heads, C, head_dim]``: the keys/values of this run's tokens only, in the
cache layout. The host commits the first n (unpadded) of them at cache slots ``pos..pos+n-1``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edge import report
from edge.graph.decoder import OPSET, DecoderGraph, GraphOptions
from edge.graph.plan import WeightPlan
from qwen_edge import contract
from qwen_edge.errors import QwenEdgeError

MASK_VALUE = -100.0
GAIN = 100.0  # bias × GAIN only finds each row's visible maximum
# Model metadata of each graph besides contract.MASK_VALUE_METADATA (informative; the runtime reads the shapes).
META_GRAPH, META_CHUNK, META_CONTEXT = "qwen_edge.graph", "qwen_edge.chunk", "qwen_edge.context_length"
META_KEY_LAYOUT, META_VALUE_LAYOUT = "qwen_edge.key_layout", "qwen_edge.value_layout"


def io_names(num_layers: int) -> dict[str, list[str]]:
    """Input and output names of both graphs, in graph order."""
    return {
        "inputs": [contract.INPUT_IDS, contract.POSITION_IDS, contract.ATTENTION_BIAS]
        + contract.past_names(num_layers, static=True),
        "outputs": [contract.LOGITS] + contract.present_names(num_layers, static=True),
    }


class StaticDecoderGraph(DecoderGraph):
    """The decoder over `chunk` tokens and a fixed `context_length` cache, standard ONNX ops only, fp32."""

    def __init__(self, config, read, *, chunk: int, context_length: int, mask_value: float = MASK_VALUE):
        fp32 = "fp32"
        super().__init__(config, read, WeightPlan(fp32, fp32, fp32), GraphOptions(context_length=context_length))
        self.chunk = chunk
        self.mask_value = mask_value

    def _c(self, name: str, values, dtype=np.int64) -> ir.Value:
        return self._const(name, np.array(values, dtype))

    def _norm(self, x, weight_name: str):
        """RMSNorm as x / ||x||₂ · (sqrt(dim) · weight): LpNormalization never forms x², whose range (the
        square of Qwen's outlier activations) no 16-bit quantization can hold. eps (1e-6 against a mean
        square of order one) is left out."""
        size = int(np.prod(self._shape_of_vector(weight_name)))
        weight = self._lazy(
            f"{weight_name}.scaled",
            np.dtype(np.float32),
            (size,),
            lambda: (self.read(weight_name).astype(np.float64) * np.sqrt(size)).astype(np.float32).reshape(-1),
        )
        return self._op("Mul", [self._op("LpNormalization", [x], {"axis": -1, "p": 2}), weight])

    def _rotary(self, x, cos, sin):
        """Rotate-half rotary on [1, C, heads, head_dim] with cos/sin [1, C, 1, head_dim/2]."""
        x1, x2 = self._op("Split", [x, self._halves], {"axis": -1}, outputs=2)
        first = self._op("Sub", [self._op("Mul", [x1, cos]), self._op("Mul", [x2, sin])])
        second = self._op("Add", [self._op("Mul", [x2, cos]), self._op("Mul", [x1, sin])])
        return self._op("Concat", [first, second], {"axis": -1})

    def _attention_static(self, i: int, x, past_k, past_v, bias, cos, sin):
        c, n = self.cfg, self.chunk
        p = f"model.layers.{i}.self_attn"
        heads, kvh, hd = c.num_heads, c.num_kv_heads, c.head_dim

        def proj(w: str, rows: int):
            b = self._vector(f"{p}.{w}_proj.bias") if c.attention_bias else None
            y = self._linear(x, f"{p}.{w}_proj", [f"{p}.{w}_proj.weight"], rows, c.hidden_size, "fp32", b)
            return self._op("Reshape", [y, self._c(f"{p}.{w}_heads", [1, n, rows // hd, hd])])

        q, k, v = proj("q", heads * hd), proj("k", kvh * hd), proj("v", kvh * hd)
        if c.qk_norm:
            q = self._norm(q, f"{p}.q_norm.weight")
            k = self._norm(k, f"{p}.k_norm.weight")
        q = self._op("Mul", [self._rotary(q, cos, sin), self._scale])
        k = self._rotary(k, cos, sin)
        new_k = self._op("Transpose", [k], {"perm": [0, 2, 3, 1]})  # [1, kvh, hd, C]
        new_v = self._op("Transpose", [v], {"perm": [0, 2, 1, 3]})  # [1, kvh, C, hd]
        keys = self._op("Concat", [past_k, new_k], {"axis": 3})
        values = self._op("Concat", [past_v, new_v], {"axis": 2})
        # GQA without repeating the cache: the `group` query heads of one KV head become rows.
        q = self._op("Transpose", [q], {"perm": [0, 2, 1, 3]})  # [1, heads, C, hd]
        q = self._op("Reshape", [q, self._grouped_q])  # [1, kvh, group*C, hd]
        scores = self._op("Reshape", [self._op("MatMul", [q, keys]), self._per_head_scores])  # [1, heads, C, L+C]
        probs = self._op("Softmax", [self._masked(scores, bias)], {"axis": -1})
        probs = self._op("Reshape", [probs, self._grouped_scores])  # [1, kvh, group*C, L+C]
        out = self._op("Reshape", [self._op("MatMul", [probs, values]), self._per_head_out])  # [1, heads, C, hd]
        out = self._op("Transpose", [out], {"perm": [0, 2, 1, 3]})
        out = self._op("Reshape", [out, self._c(f"{p}.merge_heads", [1, n, heads * hd])])
        o_name = f"{p}.o_proj.weight"
        y = self._linear(out, f"{p}.o_proj", [o_name], c.hidden_size, heads * hd, "fp32")
        return y, new_k, new_v

    def _masked(self, scores, bias):
        """Scores shifted so the row's visible maximum is 0 (clamped there), plus the bias."""
        row_max = self._op(
            "ReduceMax", [self._op("Add", [scores, self._op("Mul", [bias, self._gain])]), self._last], {"keepdims": 1}
        )
        shifted = self._op("Min", [self._op("Sub", [scores, row_max]), self._zero])
        return self._op("Add", [shifted, bias])

    def _shared_consts(self) -> None:
        c, n, total = self.cfg, self.chunk, self.opts.context_length + self.chunk
        group = c.num_heads // c.num_kv_heads
        self._halves = self._c("rotary_halves", [c.head_dim // 2] * 2)
        self._scale = self._c("attention_scale", c.head_dim**-0.5, np.float32)
        self._gain = self._c("mask_gain", GAIN, np.float32)
        self._zero = self._c("mask_ceiling", 0.0, np.float32)
        self._last = self._c("last_axis", [-1])
        self._grouped_q = self._c("grouped_q_shape", [1, c.num_kv_heads, group * n, c.head_dim])
        self._per_head_scores = self._c("per_head_scores_shape", [1, c.num_heads, n, total])
        self._grouped_scores = self._c("grouped_scores_shape", [1, c.num_kv_heads, group * n, total])
        self._per_head_out = self._c("per_head_out_shape", [1, c.num_heads, n, c.head_dim])

    def build(self) -> ir.Model:
        """Describe the static decoder; tensors are read only when the model is saved."""
        c, n, L = self.cfg, self.chunk, self.opts.context_length
        f32, i32 = ir.DataType.FLOAT, ir.DataType.INT32
        input_ids = ir.val(contract.INPUT_IDS, i32, [1, n])
        position_ids = ir.val(contract.POSITION_IDS, i32, [1, n])
        bias = ir.val(contract.ATTENTION_BIAS, f32, [1, 1, n, L + n])
        pasts = [
            (
                ir.val(contract.STATIC_PAST_KEY % i, f32, [1, c.num_kv_heads, c.head_dim, L]),
                ir.val(contract.STATIC_PAST_VALUE % i, f32, [1, c.num_kv_heads, L, c.head_dim]),
            )
            for i in range(c.num_layers)
        ]
        self._shared_consts()
        cos_cache, sin_cache = self._rotary_caches()
        rot_shape = self._c("rotary_shape", [1, n, 1, c.head_dim // 2])
        cos = self._op("Reshape", [self._op("Gather", [cos_cache, position_ids], {"axis": 0}), rot_shape])
        sin = self._op("Reshape", [self._op("Gather", [sin_cache, position_ids], {"axis": 0}), rot_shape])

        hidden = self._embedding(input_ids)
        presents = []
        for i in range(c.num_layers):
            layer = f"model.layers.{i}"
            attn, pk, pv = self._attention_static(
                i, self._norm(hidden, f"{layer}.input_layernorm.weight"), *pasts[i], bias, cos, sin
            )
            pk.name, pv.name = contract.STATIC_PRESENT_KEY % i, contract.STATIC_PRESENT_VALUE % i
            presents += [pk, pv]
            hidden = self._op("Add", [hidden, attn])
            hidden = self._op(
                "Add", [hidden, self._mlp(i, self._norm(hidden, f"{layer}.post_attention_layernorm.weight"))]
            )
        logits = self._lm_head(self._norm(hidden, "model.norm.weight"))
        logits.name = contract.LOGITS

        inputs = [input_ids, position_ids, bias, *[v for pair in pasts for v in pair]]
        graph = ir.Graph(
            inputs,
            [logits, *presents],
            nodes=self.nodes,
            initializers=self.initializers,
            opset_imports={"": OPSET},
            name=f"qwen_edge_static_{n}x{L}",
        )
        model = ir.Model(graph, ir_version=10, producer_name="qwen-edge")
        model.metadata_props.update(
            {
                META_CHUNK: str(n),
                META_CONTEXT: str(L),
                contract.MASK_VALUE_METADATA: repr(float(self.mask_value)),
                META_KEY_LAYOUT: contract.STATIC_KEY_LAYOUT,
                META_VALUE_LAYOUT: contract.STATIC_VALUE_LAYOUT,
            }
        )
        return model


def check_args(chunk: int, context_length: int, max_position_embeddings: int) -> None:
    """One-line QwenEdgeError for a chunk/context pair the static graphs cannot use."""
    if not isinstance(chunk, int) or chunk < 2:
        raise QwenEdgeError(f"chunk must be an integer >= 2 (the decode graph handles 1 token), not {chunk!r}")
    if not isinstance(context_length, int) or context_length <= chunk:
        raise QwenEdgeError(f"context_length {context_length!r} must be an integer larger than the chunk {chunk}")
    if context_length % chunk:
        raise QwenEdgeError(f"chunk {chunk} must divide context_length {context_length}; e.g. use a power of two")
    if context_length > max_position_embeddings:
        raise QwenEdgeError(
            f"context_length {context_length} exceeds the model's {max_position_embeddings} "
            "positions; choose a smaller context_length"
        )


def export_static(
    source, out_dir: Path | str, *, chunk: int, context_length: int, mask_value: float = MASK_VALUE
) -> dict:
    """Write the prefill and decode graphs (contract.STATIC_GRAPH_FILES, each with its ``.data`` file) for
    `source` into `out_dir`; return their description (the manifest's ``static`` block).

    The files appear only once both graphs are written completely.
    """
    cfg = source.config
    check_args(chunk, context_length, cfg.max_position_embeddings)
    if not -1e4 <= mask_value <= -100:
        raise QwenEdgeError(f"mask_value {mask_value} must be between -10000 and -100 (it is added to masked scores)")
    if cfg.num_heads % cfg.num_kv_heads or cfg.head_dim % 2:
        raise QwenEdgeError(
            f"{cfg.num_heads} heads over {cfg.num_kv_heads} KV heads of dim {cfg.head_dim} "
            "cannot be grouped; this model is not a supported Qwen decoder"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = contract.STATIC_GRAPH_FILES
    prefill, decode = contract.STATIC_GRAPHS
    reporter = report.current()
    with tempfile.TemporaryDirectory(prefix=".static-", dir=out_dir) as tmp:
        for name, n in ((prefill, chunk), (decode, 1)):
            model = StaticDecoderGraph(
                cfg, source.tensor, chunk=n, context_length=context_length, mask_value=mask_value
            ).build()
            model.metadata_props[META_GRAPH] = name
            bar = reporter.bar(total=len(model.graph.initializers), desc=f"export {name}", unit="tensor")
            try:
                ir.save(
                    model,
                    Path(tmp) / files[name],
                    external_data=files[name] + ".data",
                    callback=lambda tensor, info: bar.update(1),
                    alignment=contract.ALIGNMENT,
                )
            finally:
                bar.close()
        for name in contract.STATIC_GRAPHS:
            for f in (files[name], files[name] + ".data"):
                shutil.move(str(Path(tmp) / f), out_dir / f)
    return {
        **{name: files[name] for name in contract.STATIC_GRAPHS},
        "chunk": chunk,
        "context_length": context_length,
        "mask_value": float(mask_value),
        "key_layout": contract.STATIC_KEY_LAYOUT,
        "value_layout": contract.STATIC_VALUE_LAYOUT,
        **io_names(cfg.num_layers),
    }
