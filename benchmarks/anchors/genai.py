"""onnxruntime-genai anchor: build a model with genai's own builder and time generation with genai's API.

Runs inside the anchor venv (`benchmarks/envs/setup.sh genai`), not the project venv, so it imports
nothing from qwen_edge. Subcommands:

  build   run `onnxruntime_genai.models.builder` on an HF directory; prints one JSON object
          (wall seconds, peak RSS of the whole process tree, artifact bytes).
  run     one measurement in this process: load, optional in-process warm-up, one greedy
          generation; prints one JSON object (ttft_ms, prefill_tps, decode_tps, peak_rss_mb, ...).
  repeat  one discarded warm-up process, then N `run` processes; prints each run's JSON line and
          a last line with the median of each number ("run": "median").
  logits  logits at every position of each sequence in --ids, from the artifact's model.onnx on plain
          onnxruntime (the graph returns every position's logits) -> float32 npz.
  replies greedy replies (genai's own search) to the task requests in --requests -> new token ids (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."


_fail = common.fail


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def build(args: argparse.Namespace) -> dict:
    """Run genai's model builder on an HF directory, polling the process tree's RSS."""
    import psutil

    if not os.path.isfile(os.path.join(args.input, "config.json")):
        _fail(f"{args.input} is not a Hugging Face model directory (no config.json); pass --input DIR")
    out = os.path.abspath(args.output)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}-")
    cache = tempfile.mkdtemp(prefix="genai-builder-cache-")
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-i",
        args.input,
        "-o",
        tmp,
        "-p",
        args.precision,
        "-e",
        "cpu",
        "-c",
        cache,
    ]
    if args.extra_options:
        cmd += ["--extra_options", *args.extra_options]
    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL if args.quiet else None)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        _fail(f"the genai builder exited with {proc.returncode}; see its output above")
    if os.path.exists(out):
        shutil.rmtree(out)
    os.rename(tmp, out)
    files = {f: os.path.getsize(os.path.join(out, f)) for f in sorted(os.listdir(out))}
    return {
        "anchor": "onnxruntime-genai",
        "command": " ".join(cmd[1:]).replace(tmp, out),
        "build_s": round(seconds, 1),
        "peak_rss_mb": round(peak / 2**20, 1),
        "artifact_bytes": _dir_bytes(out),
        "files": files,
    }


def _prompt_ids(tok, prompt: str, prompt_tokens: int | None) -> list[int]:
    """Token ids of the chat-templated prompt; with prompt_tokens, filler code trimmed to that length."""

    def templated(user: str) -> list[int]:
        messages = json.dumps([{"role": "user", "content": user}])
        return list(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True)))

    if prompt_tokens is None:
        return templated(prompt)
    return common.code_prompt(templated, lambda text: list(tok.encode(text)), tok.decode, prompt_tokens)


def _generate(og, model, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """Greedy generation of exactly new_tokens (EOS suppressed); returns (ttft_s, decode_s, count)."""
    params = og.GeneratorParams(model)
    total = len(ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    gen.get_next_tokens()
    t1 = time.perf_counter()
    count = 1
    while count < new_tokens and not gen.is_done():
        gen.generate_next_token()
        gen.get_next_tokens()
        count += 1
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, count


def _model(og, path: str, threads: int):
    """An artifact directory's genai model on the CPU provider (`threads` intra-op threads; 0: genai's default)."""
    if not os.path.isfile(os.path.join(path, "genai_config.json")):
        _fail(f"{path} has no genai_config.json; build it first with `genai.py build`")
    config = og.Config(path)
    config.clear_providers()  # CPU
    if threads:
        options = {"intra_op_num_threads": threads}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    return og.Model(config)


def run(args: argparse.Namespace) -> dict:
    """One measurement in this process: load, warm up, one timed greedy generation."""
    import onnxruntime_genai as og

    t0 = time.perf_counter()
    model = _model(og, args.model, args.threads)
    tok = og.Tokenizer(model)
    load_ms = (time.perf_counter() - t0) * 1000
    if args.ids_file:
        ids = common.load_ids(args.ids_file, args.prompt_tokens)
        warm = ids[:32]  # short warm-up: a full long prompt would double the run
    else:
        ids = warm = _prompt_ids(tok, args.prompt, args.prompt_tokens)
    if args.warmup_tokens:
        _generate(og, model, warm, args.warmup_tokens)
    before = resource.getrusage(resource.RUSAGE_SELF)
    ttft, decode, count = _generate(og, model, ids, args.new_tokens)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "anchor": "onnxruntime-genai",
        "ttft_ms": round(ttft * 1000, 1),
        "prefill_tps": round(len(ids) / ttft, 1),
        "decode_tps": round((count - 1) / decode, 2) if count > 1 else None,
        "peak_rss_mb": round(common.peak_rss_mb(), 1),
        "prompt_tokens": len(ids),
        "new_tokens": count,
        "load_ms": round(load_ms, 1),
        # CPU seconds this process got during the timed generation vs its wall time: on a
        # busy machine cpu_s / wall_s falls well below the thread count.
        "threads": args.threads or "ort-default",
        "cpu_s": round(cpu_s, 2),
        "wall_s": round(ttft + decode, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def repeat(args: argparse.Namespace) -> list[dict]:
    """A discarded warm-up process, then args.reps fresh `run` processes; prints each and the median."""
    argv = [
        "--model",
        args.model,
        "--new-tokens",
        str(args.new_tokens),
        "--warmup-tokens",
        str(args.warmup_tokens),
        "--prompt",
        args.prompt,
        "--threads",
        str(args.threads),
    ]
    if args.prompt_tokens is not None:
        argv += ["--prompt-tokens", str(args.prompt_tokens)]
    if args.ids_file:
        argv += ["--ids-file", args.ids_file]
    return common.repeat(os.path.abspath(__file__), argv, args.reps, "onnxruntime-genai")


def logits(args: argparse.Namespace) -> dict:
    """Every position's logits of each sequence: one prefill with an empty past on plain onnxruntime."""
    import numpy as np
    import onnxruntime as ort

    try:
        with open(os.path.join(args.model, "genai_config.json"), encoding="utf-8") as f:
            decoder = json.load(f)["model"]["decoder"]
    except (OSError, ValueError, KeyError) as e:
        _fail(f"{args.model} has no readable genai_config.json ({e}); build it first with `genai.py build`")
    session = ort.InferenceSession(os.path.join(args.model, decoder["filename"]), providers=["CPUExecutionProvider"])
    past = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), dtype=np.float32)

    def logits_of(ids):
        feeds = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
        }
        for inp in session.get_inputs():
            if inp.name.startswith("past_key_values."):
                feeds[inp.name] = past
        return session.run(["logits"], feeds)[0][0]

    return common.write_logits(args.ids, args.out, logits_of)


def replies(args: argparse.Namespace) -> dict:
    """Greedy replies through genai's own generator loop, stopping at the requests' eos ids or a stop string."""
    import onnxruntime_genai as og

    model = _model(og, args.model, args.threads)
    tok = og.Tokenizer(model)

    def reply_of(ids, max_new_tokens, stops, eos):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + max_new_tokens)
        gen = og.Generator(model, params)
        gen.append_tokens(ids)

        def tokens():
            while not gen.is_done():
                gen.generate_next_token()
                yield int(gen.get_next_tokens()[0])

        return common.greedy_reply(tokens(), tok.decode, max_new_tokens, stops, eos)

    return common.write_replies(args.requests, args.out, reply_of)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build an artifact with genai's model builder")
    b.add_argument("--input", required=True, help="Hugging Face model directory (fp32)")
    b.add_argument("--output", required=True, help="artifact directory to create (replaced if present)")
    b.add_argument("--precision", default="int4", choices=["int4", "int8", "fp32"])
    b.add_argument("--extra-options", nargs="*", help="KEY=VALUE pairs passed to the builder")
    b.add_argument("--quiet", action="store_true", help="hide the builder's stdout")
    for name in ("run", "repeat"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True, help="directory with genai_config.json")
        p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (chat template applied)")
        p.add_argument("--prompt-tokens", type=int, help="instead: a code prompt of exactly N tokens")
        p.add_argument(
            "--ids-file",
            help="with --prompt-tokens N: take the N-token prompt from this "
            "prompts JSON (written by benchmarks/run.py)",
        )
        p.add_argument("--new-tokens", type=int, default=128)
        p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: genai's default)")
        p.add_argument(
            "--warmup-tokens", type=int, default=8, help="in-process warm-up generation before the timed one (0: none)"
        )
        if name == "repeat":
            p.add_argument("--reps", type=int, default=3)
    lg = sub.add_parser("logits", help="every position's logits of token sequences (plain onnxruntime)")
    lg.add_argument("--model", required=True, help="artifact directory with genai_config.json")
    lg.add_argument("--ids", required=True, help="JSON {name: [token ids]}")
    lg.add_argument("--out", required=True, help="npz to write")
    common.add_replies_args(sub.add_parser("replies", help="greedy replies to task requests"), "artifact directory", 2)
    args = parser.parse_args(argv)
    if getattr(args, "ids_file", None) and args.prompt_tokens is None:
        _fail("--ids-file needs --prompt-tokens N (which prompt of the file)")
    if getattr(args, "new_tokens", 1) < 1:
        _fail("--new-tokens must be at least 1")
    if args.cmd == "build":
        print(json.dumps(build(args)), flush=True)
    elif args.cmd == "run":
        print(json.dumps(run(args)), flush=True)
    elif args.cmd == "logits":
        print(json.dumps(logits(args)), flush=True)
    elif args.cmd == "replies":
        print(json.dumps(replies(args)), flush=True)
    else:
        repeat(args)


if __name__ == "__main__":
    main()
