"""Which rows of an int4 lm_head are stored in int8: the rows whose rounding moves the fp32 model's
next-token distribution most, measured on the calibration text.

For a small logit perturbation d, KL(p || p') is about half the variance of d under p, so row r's share is
about the sum over calibration positions of p_r * d_r^2: a row matters when its token is likely there and
its rounding error is large along the hidden states the model actually produces. Token ids order the
vocabulary by BPE merge, which ranks English and code first and puts most Chinese and French tokens far
beyond the first rows, so measured rows beat a prefix of ids (benchmarks/README.md has the numbers).

The plain-torch decoder of ``edge.quantize.gptq`` produces the fp32 final hidden states of the calibration
sequences (the GPTQ default: 4096 tokens); each int4 storage's rows are ranked against its own
round-to-nearest error. Rankings are cached on disk, keyed by the source's sha256, the storages, the token
count and the text.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F

from edge import report
from edge.graph.plan import WeightPlan
from edge.quantize.blockwise import QuantSpec, quantize
from edge.quantize.gptq import (
    DEFAULT_TOKENS,
    SEQ_LEN,
    calibration_ids,
    calibration_text,
    embed,
    layer_forward,
    layer_weights,
    rotary,
)
from edge.sources.base import cache_root, row_blocks

VERSION = 1  # bump when the ranking changes, so stale caches are not read
POSITIONS = 256  # calibration positions scored at once (their logits over the vocabulary: 256 * vocab * 4 bytes)
ROWS = 16384  # lm_head rows quantized and scored at once (a position's logits over them cost ROWS * 4 bytes)


def head_matrix(source) -> torch.Tensor:
    """lm_head as fp32 [vocab, hidden] (a tied model's embedding table)."""
    cfg = source.config
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    blocks = [block for _, block in row_blocks(source.tensor, name, cfg.vocab_size)]
    return torch.from_numpy(np.concatenate(blocks, dtype=np.float32))


def final_norm(source, x: torch.Tensor) -> torch.Tensor:
    """The decoder's output `x` [..., hidden] through the final RMSNorm, as [positions, hidden]."""
    cfg = source.config
    norm = torch.from_numpy(np.ascontiguousarray(source.tensor("model.norm.weight"), dtype=np.float32))
    return F.rms_norm(x, (cfg.hidden_size,), norm, cfg.rms_norm_eps).reshape(-1, cfg.hidden_size)


def importance(hidden: torch.Tensor, head: torch.Tensor, storage: QuantSpec) -> torch.Tensor:
    """Per row of `head` [vocab, hidden]: sum over the `hidden` [positions, hidden] states of p_r * d_r^2,
    p the fp32 next-token probabilities and d the logit error of `storage`. Rows are quantized and scored a
    block at a time (rows quantize independently), so only one block's error is in memory."""
    # each position's softmax normalizer first, so a block of rows needs only its own logits
    lse = torch.cat(
        [torch.logsumexp(hidden[i : i + POSITIONS] @ head.T, dim=-1) for i in range(0, len(hidden), POSITIONS)]
    )
    total = torch.zeros(head.shape[0], dtype=torch.float64)
    for a in range(0, head.shape[0], ROWS):
        rows = head[a : a + ROWS]
        error = torch.from_numpy(quantize(rows.numpy(), storage).dequantize()) - rows
        for i in range(0, len(hidden), POSITIONS):
            h = hidden[i : i + POSITIONS]
            p = torch.exp(h @ rows.T - lse[i : i + POSITIONS, None])
            total[a : a + ROWS] += (p * (h @ error.T).square()).sum(0, dtype=torch.float64)
    return total


def ranking(source, storages: list[QuantSpec], tokens: int = DEFAULT_TOKENS, cache_dir=None) -> list[np.ndarray]:
    """For each storage, lm_head's row ids from the most to the least important (cached on disk per storage;
    the storages not cached share one forward pass)."""
    common = {
        "version": VERSION,
        "sha256": source.fingerprint()["sha256"],
        "tokens": tokens,
        "seq_len": SEQ_LEN,
        "text": hashlib.sha256(calibration_text().encode()).hexdigest(),
    }
    paths = []
    for storage in storages:
        key = json.dumps({**common, "storage": asdict(storage)}, sort_keys=True)
        paths.append(cache_root(cache_dir) / "head_rows" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy")
    orders = [_cached(path, source.config.vocab_size) for path in paths]
    missing = [i for i, order in enumerate(orders) if order is None]
    if missing:
        with torch.no_grad():
            hidden = final_hidden(source, calibration_ids(source, tokens))
            head = head_matrix(source)
            for i in report.current().bar(missing, desc="ranking lm_head rows", unit="storage"):
                order = np.argsort(-importance(hidden, head, storages[i]).numpy(), kind="stable").astype(np.int32)
                paths[i].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[i].with_name(paths[i].stem + ".tmp.npy")
                np.save(tmp, order)
                tmp.replace(paths[i])
                orders[i] = order
    else:
        report.current().status(f"lm_head row ranking from cache {paths[0].parent}")
    return orders


def _cached(path, vocab_size: int) -> np.ndarray | None:
    """A cached ranking, or None when it is missing or not a ranking of `vocab_size` rows (then measured again)."""
    try:
        order = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    ok = order.shape == (vocab_size,) and order.dtype == np.int32 and (np.sort(order) == np.arange(vocab_size)).all()
    return order if ok else None


def with_int8_ids(source, plan: WeightPlan, cache_dir=None) -> WeightPlan:
    """`plan` with the ids of its ``lm_head_int8_rows`` int8 rows named: the most important rows against its
    lm_head storage, in ascending id order."""
    if not plan.lm_head_int8_rows or plan.lm_head_int8_ids:
        return plan
    (order,) = ranking(source, [plan.lm_head], cache_dir=cache_dir)
    return replace(plan, lm_head_int8_ids=tuple(int(i) for i in np.sort(order[: plan.lm_head_int8_rows])))


def final_hidden(source, ids: torch.Tensor) -> torch.Tensor:
    """The fp32 model's normed final hidden states [positions, hidden] on `ids` [sequences, length]."""
    cfg = source.config
    cos, sin = rotary(cfg, ids.shape[1])
    x = embed(source, WeightPlan("fp32", "fp32", "fp32"), ids)
    bar = report.current().bar(range(cfg.num_layers), desc=f"fp32 hidden states ({ids.numel()} tokens)", unit="layer")
    for i in bar:
        x = layer_forward(x, layer_weights(source, cfg, i), cfg, cos, sin)
    return final_norm(source, x)
