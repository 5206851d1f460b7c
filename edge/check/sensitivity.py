"""Per-tensor quantization sensitivity: how much the fp32 model's output moves when one weight group alone
is stored at each candidate precision.

A group is what the graph stores as one matrix (a layer's packed qkv, o, packed gate/up, down), the
embedding table, or lm_head. The plain-torch decoder of ``edge.quantize.gptq`` runs the model on the
calibration tokens; every layer is read once and all perturbed hidden states advance through it together.

- The reference candidate (int4 in blocks of 32) of every group is measured end to end: the group alone
  quantized round-to-nearest, the rest fp32, and the mean KL(fp32 || perturbed) of the next-token
  distributions is its cost.
- The other candidates of a linear group or the embedding are scaled from it by their local error: the
  squared error of the group's output on its actual calibration inputs (for the embedding, of the rows
  the text uses), relative to the reference candidate's. KL grows with the square of a small output
  perturbation, so the ratio carries over; measuring every candidate end to end would cost four times as
  many forward passes.
- lm_head's candidates, including ``lm_head_int8_rows`` (the R rows ``edge.quantize.head_rows`` ranks
  first in int8, the rest the int4 candidate, their logits spliced), are all measured end to end: they
  cost one product each.

Results are cached on disk (they cost minutes on a 0.5B model), keyed by the source's sha256, the
candidates, the token count and the text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import numpy as np
import torch

from edge import report
from edge.graph.plan import GROUPS, WeightPlan
from edge.quantize import head_rows
from edge.quantize.blockwise import QuantSpec, quantize
from edge.quantize.gptq import calibration_ids, calibration_text, embed, layer_forward, layer_weights, rotary
from edge.sources.base import cache_root

DEFAULT_TOKENS = 512
# windows this long spread evenly over the calibration text: 512 tokens are eight windows, one in each
# stretch of the text (chat, Chinese, English, French, Python, SQL), so no language's rows go unmeasured
WINDOW = 64
EMBEDDING = "model.embed_tokens"
LM_HEAD = "lm_head"
REFERENCE = "int4-b32"  # the candidate measured end to end for every group
LM_HEAD_ROWS = (4096, 16384, 32768, 65536)  # lm_head_int8_rows candidates (those below the vocabulary size)
VERSION = 4  # bump when the measurement changes, so stale caches are not read


def candidates(symmetric: bool) -> dict[str, QuantSpec]:
    """The storages a group may get, by label: int4 in blocks of 32/64/128 (the recipe's symmetry), int8 in
    blocks of 32 and 128."""
    int4 = {f"int4-b{b}": QuantSpec(4, b, symmetric) for b in (32, 64, 128)}
    # int8 block 32 holds a GGUF's Q8_0/Q5_0 grid exactly; block 128 is 8 % fewer bytes for a squared error
    # under 1 % of int4's (it re-rounds that grid), so more of the model fits int8 under a budget
    return {**int4, "int8-b32": QuantSpec(8, 32, True), "int8-b128": QuantSpec(8, 128, True)}


def int8_rows_spec(storage: QuantSpec) -> QuantSpec:
    """The storage of lm_head's int8 rows beside an int4 `storage` (as DecoderGraph._sliced_lm_head writes them)."""
    return QuantSpec(8, storage.block_size, symmetric=True)


def head_label(label: str, rows: int) -> str:
    """The label of an lm_head candidate: int4 `label` with its first `rows` rows in int8."""
    return f"{label}+int8-rows-{rows}" if rows else label


def linear_groups(num_layers: int) -> list[str]:
    """Graph keys of the decoder's linear groups, in forward order."""
    return [f"model.layers.{i}.{suffix}" for i in range(num_layers) for suffix, _ in GROUPS.values()]


def measure(source, symmetric: bool = False, tokens: int = DEFAULT_TOKENS, cache_dir=None) -> dict:
    """``{"tokens", "kl": {group: {candidate label: mean KL}}}`` for every group of `source` (cached on disk)."""
    specs = candidates(symmetric)
    rows = [r for r in LM_HEAD_ROWS if r < source.config.vocab_size]
    key = {
        "version": VERSION,
        "sha256": source.fingerprint()["sha256"],
        "candidates": {k: asdict(v) for k, v in specs.items()},
        "lm_head_rows": rows,
        "tokens": tokens,
        "window": WINDOW,
        "text": hashlib.sha256(calibration_text().encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root(cache_dir) / "sensitivity" / f"{digest}.json"
    if path.is_file():
        report.current().status(f"sensitivity from cache {path}")
        return json.loads(path.read_text(encoding="utf-8"))["result"]
    with torch.no_grad():
        result = {"tokens": tokens, "kl": _measure(source, specs, rows, tokens)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=1), encoding="utf-8")
    tmp.replace(path)
    return result


def _dequantized(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return torch.from_numpy(quantize(weight.numpy(), spec).dequantize())


def _local_errors(reference: torch.Tensor, inputs: torch.Tensor, specs: dict[str, QuantSpec]) -> dict[str, float]:
    """Squared error of `inputs` @ W^T for W quantized at each candidate (`inputs` None: of W itself)."""
    out = {}
    for label, spec in specs.items():
        delta = _dequantized(reference, spec) - reference
        out[label] = float(
            (delta if inputs is None else inputs.reshape(-1, inputs.shape[-1]) @ delta.T).square().sum()
        )
    return out


def _measure(source, specs: dict[str, QuantSpec], rows: list[int], tokens: int) -> dict:
    cfg = source.config
    ids = calibration_ids(source, tokens, seq_len=min(WINDOW, tokens))
    fp32 = WeightPlan("fp32", "fp32", "fp32")
    cos, sin = rotary(cfg, ids.shape[1])
    x = embed(source, fp32, ids)
    local: dict[str, dict[str, float]] = {EMBEDDING: _local_errors(x.reshape(-1, cfg.hidden_size), None, specs)}
    # group -> the hidden state with that group alone at the reference candidate, advanced layer by layer
    hidden = {EMBEDDING: embed(source, replace(fp32, embedding=specs[REFERENCE]), ids)}
    bar = report.current().bar(range(cfg.num_layers), desc=f"sensitivity ({ids.numel()} tokens)", unit="layer")
    for i in bar:
        w = layer_weights(source, cfg, i)
        for group, h in hidden.items():
            hidden[group] = layer_forward(h, w, cfg, cos, sin)
        keys = {g: f"model.layers.{i}.{suffix}" for g, (suffix, _) in GROUPS.items()}

        def observe(g, inputs):
            local[keys[g]] = _local_errors(w[g], inputs, specs)
            return w[g]

        for g, key in keys.items():
            q = _dequantized(w[g], specs[REFERENCE])
            hook = lambda name, _inp, g=g, q=q: q if name == g else w[name]  # noqa: E731
            hidden[key] = layer_forward(x, w, cfg, cos, sin, hook)
        x = layer_forward(x, w, cfg, cos, sin, observe)
    head = head_rows.head_matrix(source)

    def normed(h):
        return head_rows.final_norm(source, h)

    reference = torch.log_softmax(normed(x) @ head.T, dim=-1)
    p_ref = reference.exp()

    def kl(logits: torch.Tensor) -> float:
        return float((p_ref * (reference - torch.log_softmax(logits, dim=-1))).sum(-1).mean())

    out: dict[str, dict[str, float]] = {}
    for group, h in report.current().bar(list(hidden.items()), desc="sensitivity KL", unit="group"):
        measured = kl(normed(h) @ head.T)
        base = local[group][REFERENCE]
        out[group] = {label: measured * (err / base if base else 1.0) for label, err in local[group].items()}
    hn = normed(x)
    out[LM_HEAD] = {}
    int8 = {}
    int4 = [label for label, spec in specs.items() if spec.bits == 4]
    orders = dict(zip(int4, head_rows.ranking(source, [specs[label] for label in int4]))) if rows else {}
    for label, spec in specs.items():
        logits = hn @ _dequantized(head, spec).T
        out[LM_HEAD][label] = kl(logits)
        if label in orders:
            row_spec = int8_rows_spec(spec)
            if row_spec not in int8:
                int8[row_spec] = hn @ _dequantized(head, row_spec).T
            for r in rows:
                spliced = logits.clone()
                ids = torch.from_numpy(np.sort(orders[label][:r]).astype(np.int64))
                spliced[:, ids] = int8[row_spec][:, ids]
                out[LM_HEAD][head_label(label, r)] = kl(spliced)
    return out
