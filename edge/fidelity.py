"""How close an artifact stays to its fp32 transformers reference: top-1 agreement, mean KL, perplexity.

The artifact runs once per text as a single prefill over the whole text (zero-length past,
``num_logits_to_keep`` 0 so every position has logits); the reference is a transformers CausalLM in
fp32. The shipped evaluation texts (English prose, Python, Chinese, French) and chat prompts live in
``edge/data/eval``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from qwen_edge.errors import QwenEdgeError

EVAL_DIR = Path(__file__).resolve().parent / "data" / "eval"
_CHUNK = 32  # positions per float64 block, to bound memory with a 150k vocabulary
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
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


def open_session(artifact_dir: Path | str):
    """A CPU InferenceSession over the artifact's ``model.onnx`` (the runtime's own session factory)."""
    from qwen_edge.session import create_session

    path = Path(artifact_dir) / "model.onnx"
    if not path.is_file():
        raise FidelityError(f"{path} does not exist; build the artifact first")
    return create_session(path, {"execution_provider": "cpu"})


def artifact_logits(artifact, token_ids: Sequence[int], logits_to_keep: int = 0) -> np.ndarray:
    """Logits ``[n, vocab]`` (float32) of the ONNX artifact in one prefill over ``token_ids``.

    ``artifact`` is an artifact directory or a session from ``open_session``. Every past input is
    fed with zero length and the attention mask is all ones; ``logits_to_keep`` 0 returns every
    position, 1 the last one only (ignored when the graph has no ``num_logits_to_keep`` input).
    """
    session = open_session(artifact) if isinstance(artifact, (str, Path)) else artifact
    n = len(token_ids)
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.asarray([token_ids], dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, n), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(n, dtype=np.int64)[None, :]
        elif inp.name == "num_logits_to_keep":
            feeds[inp.name] = np.asarray(logits_to_keep, dtype=np.int64)
        elif inp.name.startswith("past_key_values."):
            feeds[inp.name] = _empty_past(inp)
        else:
            raise FidelityError(f"the artifact's graph has an unexpected input {inp.name!r}; rebuild it")
    logits = session.run(["logits"], feeds)[0]
    return np.asarray(logits[0], dtype=np.float32)


def _session_logits(artifact_dir: Path | str) -> LogitsFn:
    session = open_session(artifact_dir)
    return lambda ids: artifact_logits(session, ids)


def _empty_past(inp) -> np.ndarray:
    dims = list(inp.shape)
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:2] + dims[3:]):
        raise FidelityError(f"input {inp.name} has shape {dims}; expected [batch, kv_heads, past, head_dim]")
    dtype = _ORT_DTYPES.get(inp.type)
    if dtype is None:
        raise FidelityError(f"input {inp.name} has type {inp.type}; expected float or float16")
    return np.zeros((1, dims[1], 0, dims[3]), dtype=dtype)


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
    artifact_dir: Path | str,
    reference_model,
    tokenizer,
    texts: Mapping[str, str] | None = None,
    progress: bool = True,
    max_tokens: int | None = None,
    logits: LogitsFn | None = None,
) -> dict[str, Any]:
    """Compare the artifact with the reference on each text; per-language and overall (token-weighted).

    ``max_tokens`` is the total budget, shared equally between the texts (each is cut to its share).
    ``logits`` scores the artifact (default: one prefill of ``model.onnx`` on the CPU).
    """
    texts = load_eval_texts() if texts is None else texts
    if not texts:
        raise FidelityError("no evaluation texts given")
    share = max(2, max_tokens // len(texts)) if max_tokens else None
    logits = logits or _session_logits(artifact_dir)
    languages, total = {}, None
    for name, text in tqdm(texts.items(), desc="fidelity", disable=not progress):
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
    artifact_dir: Path | str,
    reference_model,
    tokenizer,
    prompts: Iterable[Mapping] | None = None,
    n_tokens: int = 32,
    progress: bool = True,
    logits: LogitsFn | None = None,
) -> dict[str, Any]:
    """How many of the reference's first ``n_tokens`` greedy tokens the artifact reproduces, per chat prompt.

    The reference decodes with ``generate(do_sample=False)``. The artifact's greedy tokens agree with
    the reference's up to position k exactly when its argmax equals the reference token at every
    position before k given the same prefix, so one causal pass over prompt + reference continuation
    yields the matched prefix length without a decode loop.
    """
    import torch

    prompts = load_chat_prompts() if prompts is None else list(prompts)
    logits = logits or _session_logits(artifact_dir)
    eos = _eos_ids(reference_model)
    per_prompt, matched_total, ref_total = {}, 0, 0
    for i, prompt in enumerate(tqdm(prompts, desc="greedy match", disable=not progress)):
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
