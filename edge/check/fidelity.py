"""How close an artifact stays to its fp32 transformers reference: top-1 agreement, mean KL, perplexity.

The artifact runs as the runtime runs it (qwen_edge's Generator over the artifact's own runner:
prefill from an empty cache with logits at every position); the reference is a transformers
CausalLM in fp32. The shipped evaluation texts (English prose, Python, Chinese, French) and chat prompts live in
``edge/data/eval``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from edge import DATA_DIR, report
from qwen_edge.errors import QwenEdgeError

EVAL_DIR = DATA_DIR / "eval"
_CHUNK = 32  # positions per float64 block, to bound memory with a 150k vocabulary
# token ids -> logits [n, vocab] float32 at every position: how an artifact is scored
LogitsFn = Callable[[Sequence[int]], np.ndarray]


class FidelityError(QwenEdgeError):
    """An artifact that misses its profile's fidelity threshold, or cannot be compared."""


def load_eval_texts() -> dict[str, str]:
    """The shipped evaluation texts by language name (``chinese``, ``english``, ``french``, ``python``)."""
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(EVAL_DIR.glob("*.txt"))}


def load_chat_prompts() -> list[dict]:
    """The shipped chat prompts: ``[{id, language, messages}]``."""
    return json.loads((EVAL_DIR / "chat_prompts.json").read_text(encoding="utf-8"))


def reference_logits(model, token_ids: Sequence[int]) -> np.ndarray:
    """Logits ``[T, vocab]`` (float32) of a transformers CausalLM over ``token_ids``, without gradients."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([list(token_ids)], dtype=torch.long)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        return out.logits[0].float().numpy()


def scorer(artifact) -> LogitsFn:
    """Logits at every position of token ids, from the artifact as the runtime runs it: its profile's
    session, its KV-cache layout (shared, growing or static graphs), prefill in chunks."""
    from qwen_edge.generator import Generator

    return Generator(artifact).logits


def check(logits: LogitsFn, reference_model, tokenizer, profile, max_tokens: int | None = None) -> dict[str, Any]:
    """The fidelity check a build runs and `qwen-edge eval` repeats: `evaluate` and `greedy_match` of
    the scored artifact against the reference, then the profile's threshold (FidelityError below it).
    ``result`` is attached to the error so a caller can still show the numbers."""
    result = evaluate(logits, reference_model, tokenizer, max_tokens=max_tokens)
    result["greedy"] = greedy_match(logits, reference_model, tokenizer)
    try:
        check_threshold(result, profile)
    except FidelityError as e:
        e.result = result
        raise
    return result


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _sums(ref: np.ndarray, art: np.ndarray, token_ids: Sequence[int]) -> dict[str, float]:
    """Sums over positions: top-1 hits, KL(ref||art), next-token NLL of each side, and the counts."""
    ref, art = np.asarray(ref), np.asarray(art)
    if ref.ndim == 3:
        ref, art = ref[0], art[0]
    if ref.shape != art.shape or ref.ndim != 2 or ref.shape[0] != len(token_ids):
        raise FidelityError(
            f"logits shapes differ: reference {ref.shape}, artifact {art.shape}, for {len(token_ids)} tokens"
        )
    targets = np.asarray(token_ids[1:], dtype=np.int64)
    s = {"positions": ref.shape[0], "targets": len(targets), "top1": 0.0, "kl": 0.0, "nll_ref": 0.0, "nll_art": 0.0}
    for start in range(0, ref.shape[0], _CHUNK):
        sl = slice(start, start + _CHUNK)
        lr, la = _log_softmax(ref[sl]), _log_softmax(art[sl])
        s["top1"] += float((lr.argmax(-1) == la.argmax(-1)).sum())
        s["kl"] += float((np.exp(lr) * (lr - la)).sum())
        rows = np.arange(lr.shape[0])
        tgt = targets[start : start + lr.shape[0]]
        k = len(tgt)
        s["nll_ref"] -= float(lr[rows[:k], tgt].sum())
        s["nll_art"] -= float(la[rows[:k], tgt].sum())
    return s


def _metrics(s: Mapping[str, float]) -> dict[str, float]:
    t = max(s["targets"], 1)
    return {
        "tokens": int(s["positions"]),
        "top1_agreement": s["top1"] / s["positions"],
        "mean_kl": s["kl"] / s["positions"],
        "ppl_reference": float(np.exp(s["nll_ref"] / t)),
        "ppl_artifact": float(np.exp(s["nll_art"] / t)),
    }


def compare(ref_logits: np.ndarray, art_logits: np.ndarray, token_ids: Sequence[int]) -> dict[str, float]:
    """Top-1 agreement, mean KL(ref||art) per position, and each side's perplexity on the next tokens."""
    m = _metrics(_sums(ref_logits, art_logits, token_ids))
    return {k: m[k] for k in ("top1_agreement", "mean_kl", "ppl_reference", "ppl_artifact")}


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return list(getattr(ids, "ids", ids))


def evaluate(
    logits: LogitsFn,
    reference_model,
    tokenizer,
    texts: Mapping[str, str] | None = None,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Compare the artifact (``logits``, e.g. from `scorer`) with the reference on each text;
    per-language and overall (token-weighted).

    ``max_tokens`` is the total budget, shared equally between the texts (each is cut to its share).
    """
    texts = load_eval_texts() if texts is None else texts
    if not texts:
        raise FidelityError("no evaluation texts given")
    share = max(2, max_tokens // len(texts)) if max_tokens else None
    languages, total = {}, None
    for name, text in report.current().bar(texts.items(), desc="fidelity"):
        ids = _encode(tokenizer, text)[:share]
        if len(ids) < 2:
            raise FidelityError(f"evaluation text {name!r} is shorter than two tokens")
        s = _sums(reference_logits(reference_model, ids), logits(ids), ids)
        languages[name] = _metrics(s)
        total = dict(s) if total is None else {k: total[k] + s[k] for k in s}
    return {"languages": languages, "overall": _metrics(total)}


def _eos_ids(model) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])


def greedy_match(
    logits: LogitsFn,
    reference_model,
    tokenizer,
    prompts: Iterable[Mapping] | None = None,
    n_tokens: int = 32,
) -> dict[str, Any]:
    """How many of the reference's first ``n_tokens`` greedy tokens the artifact reproduces, per chat prompt.

    The reference decodes with ``generate(do_sample=False)``. The artifact's greedy tokens agree with
    the reference's up to position k exactly when its argmax equals the reference token at every
    position before k given the same prefix, so one causal pass over prompt + reference continuation
    yields the matched prefix length without a decode loop.
    """
    import torch

    prompts = load_chat_prompts() if prompts is None else list(prompts)
    eos = _eos_ids(reference_model)
    per_prompt, matched_total, ref_total = {}, 0, 0
    for i, prompt in enumerate(report.current().bar(prompts, desc="greedy match")):
        text = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
        ids = _encode(tokenizer, text)
        with torch.inference_mode():
            inp = torch.tensor([ids], dtype=torch.long)
            out = reference_model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                do_sample=False,
                max_new_tokens=n_tokens,
                pad_token_id=eos[0] if eos else None,
            )
        ref_new = out[0, len(ids) :].tolist()
        art_next = logits(ids + ref_new[:-1])[len(ids) - 1 :].argmax(-1).tolist() if ref_new else []
        matched = next((k for k, (a, r) in enumerate(zip(art_next, ref_new)) if a != r), len(ref_new))
        per_prompt[prompt.get("id", str(i))] = {"reference_tokens": len(ref_new), "matched": matched}
        matched_total += matched
        ref_total += len(ref_new)
    return {"prompts": per_prompt, "match_rate": matched_total / max(ref_total, 1)}


def check_threshold(result: Mapping[str, Any], profile) -> None:
    """Raise FidelityError when ``result`` (from ``evaluate``) misses the profile's fidelity threshold."""
    threshold = profile.fidelity_threshold
    if threshold is None:
        return
    overall = result.get("overall", result)
    misses = []
    if threshold.min_top1 is not None and overall["top1_agreement"] < threshold.min_top1:
        misses.append(f"top-1 agreement {overall['top1_agreement']:.3f} < {threshold.min_top1}")
    if threshold.max_kl is not None and overall["mean_kl"] > threshold.max_kl:
        misses.append(f"mean KL {overall['mean_kl']:.3f} > {threshold.max_kl}")
    if misses:
        raise FidelityError(
            f"fidelity below the {profile.name} profile's threshold ({'; '.join(misses)}); "
            "use int8 weights, method 'mixed' or 'hqq', or a smaller block_size in the recipe"
        )
