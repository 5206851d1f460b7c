"""transformers fp32 anchor (the plain baseline and the fidelity reference), PyTorch on CPU.

Runs in the project venv (/work/venv: torch 2.13 CPU, transformers 5). Subcommands:

  run        one measurement in this process: load, short warm-up, one timed greedy generate() of
             exactly --new-tokens; prints one JSON object.
  repeat     one discarded process, then --reps `run` processes; each JSON line and the median.
  reference  the fidelity reference: float32 logits at every position of each sequence in --ids, and
             the greedy continuation (--greedy-tokens) of each prompt in --prompts -> one npz.
  replies    greedy replies to the task requests in --requests (the task check's reference loop) -> new
             token ids (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ANCHOR = "transformers-fp32"


def _load(path: str, threads: int):
    if not os.path.isfile(os.path.join(path, "config.json")):
        common.fail(f"{path} is not a Hugging Face model directory (no config.json); pass --model DIR")
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run(args) -> dict:
    return common.hf_run(args, ANCHOR, _load, "torch-default")


def reference(args) -> dict:
    """Reference logits (float32, every position) of --ids and greedy continuations of --prompts."""
    import numpy as np
    import torch

    model = _load(args.model, args.threads)
    eos = model.generation_config.eos_token_id
    pad = (eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else None
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    continuations = {}
    with torch.inference_mode():
        for name, ids in prompts.items():
            inp = torch.tensor([ids], dtype=torch.long)
            out = model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                do_sample=False,
                max_new_tokens=args.greedy_tokens,
                pad_token_id=pad,
            )
            continuations[name] = out[0, len(ids) :].tolist()

    def logits_of(ids):
        inp = torch.tensor([ids], dtype=torch.long)
        with torch.inference_mode():
            return model(input_ids=inp, attention_mask=torch.ones_like(inp), use_cache=False).logits[0].float().numpy()

    result = common.write_logits(args.ids, args.out, logits_of)
    with np.load(args.out) as z:
        arrays = dict(z)
    arrays.update({f"greedy:{k}": np.asarray(v, dtype=np.int64) for k, v in continuations.items()})
    tmp = args.out + ".partial.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, args.out)
    return {**result, "greedy_prompts": len(continuations)}


def replies(args) -> dict:
    from tokenizers import Tokenizer

    from edge.check.tasks import reference_replier

    model = _load(args.model, args.threads)
    tokenizer = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))

    def reply_of(ids, max_new_tokens, stops, eos):
        return reference_replier(model, tokenizer, sorted(eos))(ids, max_new_tokens, stops)

    return common.write_replies(args.requests, args.out, reply_of)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "repeat"):
        common.add_run_args(
            sub.add_parser(name),
            "Hugging Face model directory (fp32)",
            0,
            "torch intra-op threads (0: torch's default)",
        )
    r = sub.add_parser("reference")
    r.add_argument("--model", required=True, help="Hugging Face model directory (fp32)")
    r.add_argument("--ids", required=True, help="JSON {name: [token ids]}: sequences to score")
    r.add_argument("--prompts", required=True, help="JSON {name: [token ids]}: chat prompts to continue")
    r.add_argument("--greedy-tokens", type=int, default=32)
    r.add_argument("--out", required=True, help="npz to write")
    r.add_argument("--threads", type=int, default=0)
    common.add_replies_args(sub.add_parser("replies"), "Hugging Face model directory (fp32)", threads=0)
    args = parser.parse_args(argv)
    if args.cmd == "repeat":
        common.repeat(os.path.abspath(__file__), common.run_argv(args), args.reps, ANCHOR)
        return
    commands = {"run": run, "reference": reference, "replies": replies}
    print(json.dumps(commands[args.cmd](args)), flush=True)


if __name__ == "__main__":
    main()
