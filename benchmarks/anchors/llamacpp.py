"""llama.cpp anchor: llama-cpp-python on the original GGUF (its own Q4_K_M mix), 2 threads, greedy
(optionally with its prompt-lookup speculative decoding, `--lookup N`).

Runs inside the anchor venv (`benchmarks/envs/setup.sh llamacpp`). Subcommands:

  run     one measurement in this process: load, short warm-up, one timed greedy generation of
          exactly --new-tokens (EOS does not stop it); prints one JSON object.
  repeat  one discarded process, then --reps `run` processes; each JSON line and the median.
  logits  logits at every position of each sequence in --ids (logits_all=True) -> float32 npz.
  replies greedy replies to the task requests in --requests -> their new token ids (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ANCHOR = "llama.cpp"


def _load(path: str, n_ctx: int, threads: int, logits_all: bool = False, lookup: int = 0):
    if not os.path.isfile(path):
        common.fail(f"{path} is not a GGUF file; pass the model's .gguf with --model")
    from llama_cpp import Llama

    draft = None
    if lookup:  # llama-cpp-python's own prompt-lookup speculative decoding
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        draft = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
    return Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        draft_model=draft,
        verbose=False,
    )


def _generate(llm, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """Greedy generation of exactly new_tokens; returns (ttft_s, decode_s, count)."""
    llm.reset()  # no prefix reuse from an earlier generation: every prompt is evaluated in full
    t0 = time.perf_counter()
    count, t1 = 0, None
    for _ in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        count += 1
        if t1 is None:
            t1 = time.perf_counter()
        if count == new_tokens:
            break
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, count


def run(args) -> dict:
    common.run_argv(args)  # checks the arguments
    ids = common.load_ids(args.ids_file, args.prompt_tokens)
    t0 = time.perf_counter()
    # With a lookup draft llama-cpp-python keeps every position's logits, trims drafts to llama.cpp's
    # context (padded to a multiple of 256) but sizes its token and logit arrays from the arguments:
    # ask for a padded context and for all logits, or a long accepted draft overruns those arrays.
    n_ctx = -(-(len(ids) + args.new_tokens + 8 + args.lookup) // 256) * 256
    llm = _load(args.model, n_ctx, args.threads, logits_all=bool(args.lookup), lookup=args.lookup)
    load_ms = (time.perf_counter() - t0) * 1000
    if args.warmup_tokens:
        _generate(llm, ids[:32], args.warmup_tokens)
    clock = common.CpuClock()
    clock.start()
    ttft, decode, count = _generate(llm, ids, args.new_tokens)
    record = common.record(ANCHOR, len(ids), ttft, decode, count, load_ms, clock.stop(), args.threads)
    return {**record, "lookup": args.lookup}


def logits(args) -> dict:
    import numpy as np

    with open(args.ids, encoding="utf-8") as f:
        longest = max(len(v) for v in json.load(f).values())
    llm = _load(args.model, longest + 8, args.threads, logits_all=True)

    def logits_of(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return common.write_logits(args.ids, args.out, logits_of)


def replies(args) -> dict:
    with open(args.requests, encoding="utf-8") as f:
        items = json.load(f).get("items", {})
    longest = max((len(r["ids"]) + r["max_new_tokens"] for r in items.values()), default=1)
    llm = _load(args.model, longest + 8, args.threads)

    def reply_of(ids, max_new_tokens, stops, eos):
        llm.reset()  # every request from an empty context, as the other systems decode it
        tokens = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        return common.greedy_reply(tokens, decode, max_new_tokens, stops, eos)

    def decode(ids):
        return llm.detokenize(ids).decode("utf-8", errors="ignore")

    return common.write_replies(args.requests, args.out, reply_of)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "repeat"):
        p = sub.add_parser(name)
        common.add_run_args(p, "GGUF file", 2, "n_threads and n_threads_batch (default 2: the machine's cores)")
        p.add_argument("--lookup", type=int, default=0, help="prompt-lookup draft of this many tokens (0: off)")
    common.add_logits_args(sub.add_parser("logits"), "GGUF file", threads=2)
    common.add_replies_args(sub.add_parser("replies"), "GGUF file", threads=2)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        print(json.dumps(run(args)), flush=True)
    elif args.cmd == "repeat":
        lookup = ["--lookup", str(args.lookup)] if args.lookup else []
        common.repeat(os.path.abspath(__file__), common.run_argv(args) + lookup, args.reps, ANCHOR)
    elif args.cmd == "replies":
        print(json.dumps(replies(args)), flush=True)
    else:
        print(json.dumps(logits(args)), flush=True)


if __name__ == "__main__":
    main()
