"""What every anchor script shares (standard library + numpy; torch only inside hf_generate).

- the prompt ids file written by `benchmarks/run.py` (`{"40": [...], "512": [...], ...}`),
- the timing record one `run` prints (ttft_ms, prefill_tps, decode_tps, peak_rss_mb, ...),
- the `repeat` driver (one discarded process, then N fresh `run` processes, median),
- the `logits` contract: a JSON file of named token-id sequences in, an npz of float32
  `[n, vocab]` logits per name out (written to a temp file, renamed at the end),
- the `replies` contract (task pass rates): a JSON file of named greedy requests in (prompt ids, a
  new-token limit, stop strings, the eos ids), each reply's new token ids out; the caller decodes,
  cuts at the first stop string and grades, so every system is graded by the same code. The replies so
  far stand in `OUT.partial` after each one, so a run that is stopped keeps them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

METRICS = ("ttft_ms", "prefill_tps", "decode_tps", "peak_rss_mb", "load_ms")


def _runtime_memory():
    """runtimes/qwen_edge/memory.py on its own: the anchors' virtual environments do not install qwen_edge
    (whose package imports onnxruntime and tokenizers), and that module needs the standard library only."""
    path = Path(__file__).resolve().parents[2] / "runtimes" / "qwen_edge" / "memory.py"
    spec = importlib.util.spec_from_file_location("qwen_edge_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peak_rss_mb = _runtime_memory().peak_rss_mb  # the one peak-RSS helper of the build, `bench` and the benchmarks


def fail(message: str) -> None:
    """Exit with a one-line error."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def load_ids(path: str, prompt_tokens: int) -> list[int]:
    """The prompt of exactly `prompt_tokens` ids from a prompts file written by benchmarks/run.py."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the prompts file {path}: {e}; let benchmarks/run.py write it")
    ids = prompts.get(str(prompt_tokens))
    if ids is None:
        fail(f"{path} has no {prompt_tokens}-token prompt (it has {', '.join(prompts)}); pass one of those")
    return [int(i) for i in ids]


class CpuClock:
    """CPU seconds this process gets between start() and stop()."""

    def start(self) -> None:
        self._before = resource.getrusage(resource.RUSAGE_SELF)

    def stop(self) -> float:
        after = resource.getrusage(resource.RUSAGE_SELF)
        return after.ru_utime + after.ru_stime - self._before.ru_utime - self._before.ru_stime


def record(
    anchor: str, prompt_tokens: int, ttft_s: float, decode_s: float, count: int, load_ms: float, cpu_s: float, threads
) -> dict:
    """The JSON record of one timed generation (peak RSS = this process's so far)."""
    return {
        "anchor": anchor,
        "ttft_ms": round(ttft_s * 1000, 1),
        "prefill_tps": round(prompt_tokens / ttft_s, 1),
        "decode_tps": round((count - 1) / decode_s, 2) if count > 1 and decode_s > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "prompt_tokens": prompt_tokens,
        "new_tokens": count,
        "load_ms": round(load_ms, 1),
        # on a busy machine cpu_s / wall_s falls well below the thread count
        "threads": threads,
        "cpu_s": round(cpu_s, 2),
        "wall_s": round(ttft_s + decode_s, 2),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def repeat(script: str, run_argv: list[str], reps: int, anchor: str) -> list[dict]:
    """A discarded warm-up process, then `reps` fresh `run` processes; prints each and the median."""
    cmd = [sys.executable, script, "run", *run_argv]
    runs = []
    for i in range(reps + 1):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            fail(f"measurement process exited with {done.returncode}: {last}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if i == 0:
            continue
        result["run"] = i
        print(json.dumps(result), flush=True)
        runs.append(result)
    median = {k: statistics.median(r[k] for r in runs) for k in METRICS if runs[0].get(k) is not None}
    median.update(
        run="median",
        anchor=anchor,
        prompt_tokens=runs[0]["prompt_tokens"],
        new_tokens=runs[0]["new_tokens"],
        reps=len(runs),
    )
    print(json.dumps(median), flush=True)
    return runs


def write_logits(ids_path: str, out_path: str, logits_of: Callable[[list[int]], "object"]) -> dict:
    """Run `logits_of(ids) -> [n, vocab]` on every sequence of the ids file; save float32 npz atomically."""
    import numpy as np

    try:
        with open(ids_path, encoding="utf-8") as f:
            sequences = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the sequences file {ids_path}: {e}")
    out = {}
    for name, ids in sequences.items():
        logits = np.asarray(logits_of([int(i) for i in ids]), dtype=np.float32)
        if logits.shape[0] != len(ids):
            fail(f"sequence {name}: got logits for {logits.shape[0]} of {len(ids)} positions")
        out[name] = logits
    tmp = out_path + ".partial.npz"
    np.savez(tmp, **out)
    os.replace(tmp, out_path)
    return {"sequences": len(out), "positions": sum(v.shape[0] for v in out.values()), "out": out_path}


def write_replies(
    requests_path: str, out_path: str, reply_of: Callable[[list[int], int, list[str], set], list]
) -> dict:
    """Run `reply_of(ids, max_new_tokens, stops, eos) -> new token ids` (greedy; stopping at an eos id,
    not included, or once the decoded reply holds a stop string) on every request; save JSON atomically,
    the replies so far in `out_path`.partial after each one (removed once `out_path` is written)."""
    try:
        with open(requests_path, encoding="utf-8") as f:
            requests = json.load(f)
        eos = {int(i) for i in requests["eos"]}
        items = requests["items"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        fail(f"cannot read the requests file {requests_path}: {e}; let benchmarks/run.py write it")
    out, start = {}, time.perf_counter()
    partial = out_path + ".partial"
    for n, (name, req) in enumerate(items.items(), 1):
        out[name] = [
            int(t) for t in reply_of([int(i) for i in req["ids"]], int(req["max_new_tokens"]), req["stops"], eos)
        ]
        _write_json(partial, out)
        print(f"replies {n}/{len(items)}: {name} ({len(out[name])} tokens)", file=sys.stderr, flush=True)
    _write_json(out_path, out)
    Path(partial).unlink(missing_ok=True)
    return {
        "replies": len(out),
        "tokens": sum(map(len, out.values())),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _write_json(path: str, data) -> None:
    """`data` as JSON at `path`, replaced whole (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def greedy_reply(
    tokens: Iterable[int], decode: Callable[[list[int]], str], max_new_tokens: int, stops: list[str], eos: set
) -> list[int]:
    """The new token ids a `replies` request gets from a runtime's greedy token stream: at most
    `max_new_tokens`, ending before an eos id or once the decoded reply holds a stop string."""
    new: list[int] = []
    stream = iter(tokens)
    while len(new) < max_new_tokens:
        token = next(stream, None)
        if token is None or token in eos:
            break
        new.append(token)
        if stops and any(s in decode(new) for s in stops):
            break
    return new


def add_replies_args(p, model_help: str, threads: int | None = None) -> None:
    """The `replies` subcommand's arguments: the model, the requests to answer and the JSON to write."""
    requests = ("--requests", "JSON {eos: [ids], items: {name: {ids, max_new_tokens, stops}}}")
    _add_io_args(p, model_help, requests, "JSON {name: [new token ids]} to write", threads)


def _add_io_args(p, model_help: str, given: tuple[str, str], out_help: str, threads: int | None) -> None:
    """--model, the input file option `given` (flag, help), --out and, with a default, --threads."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument(given[0], required=True, help=given[1])
    p.add_argument("--out", required=True, help=out_help)
    if threads is not None:
        p.add_argument("--threads", type=int, default=threads)


def hf_generate(model, ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """Greedy transformers-style generate() of exactly new_tokens; a streamer stamps the first token.

    Returns (ttft_s, decode_s, count). Needs torch and transformers (Optimum and transformers anchors).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    inp = torch.tensor([ids], dtype=torch.long)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=inp,
        attention_mask=torch.ones_like(inp),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        streamer=stamps,
    )
    t2 = time.perf_counter()
    count = out.shape[1] - len(ids)
    t1 = stamps.times[1]  # put() #0 is the prompt, #1 the first new token
    return t1 - t0, t2 - t1, count


def hf_run(args, anchor: str, load: Callable[[str, int], object], default_threads: str) -> dict:
    """One timed `run` of a transformers-style model (`load(model, threads)`), warm-up excluded."""
    run_argv(args)  # checks the arguments
    ids = load_ids(args.ids_file, args.prompt_tokens)
    t0 = time.perf_counter()
    model = load(args.model, args.threads)
    load_ms = (time.perf_counter() - t0) * 1000
    if args.warmup_tokens:
        hf_generate(model, ids[:32], args.warmup_tokens)
    clock = CpuClock()
    clock.start()
    ttft, decode, count = hf_generate(model, ids, args.new_tokens)
    return record(anchor, len(ids), ttft, decode, count, load_ms, clock.stop(), args.threads or default_threads)


def code_prompt(
    templated: Callable[[str], list[int]],
    encode: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
    n: int,
    tail: int = 5,
) -> list[int]:
    """A chat-templated prompt of exactly `n` tokens asking about a fixed code text (the standard
    library's textwrap source): the longest code prefix that fits, topped up with code ids before the
    template's last `tail` tokens when decode/encode round trips merge tokens."""
    import textwrap

    with open(textwrap.__file__, encoding="utf-8") as f:
        code_ids = list(encode(f.read()))
    head = "Explain what this code does:\n```python\n"
    lo, hi = 0, len(code_ids)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(templated(head + decode(code_ids[:mid]))) <= n:
            lo = mid
        else:
            hi = mid - 1
    ids = templated(head + decode(code_ids[:lo]))
    if len(ids) < n:
        ids = ids[:-tail] + code_ids[lo : lo + n - len(ids)] + ids[-tail:]
    if len(ids) != n:
        fail(f"could not build a prompt of exactly {n} tokens (got {len(ids)})")
    return ids


def add_logits_args(p, model_help: str, threads: int | None = None) -> None:
    """The `logits` subcommand's arguments: the model, the token ids to score and the npz to write."""
    _add_io_args(p, model_help, ("--ids", "JSON {name: [token ids]}"), "npz to write", threads)


def add_run_args(p, model_help: str, threads: int, threads_help: str) -> None:
    """The run/repeat options every anchor shares."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--threads", type=int, default=threads, help=threads_help)
    p.add_argument("--ids-file", required=True, help="prompts JSON written by benchmarks/run.py")
    p.add_argument("--prompt-tokens", type=int, default=40, help="which prompt of the file (its length)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--warmup-tokens",
        type=int,
        default=2,
        help="in-process warm-up generation on the first 32 prompt ids (0: none)",
    )
    p.add_argument("--reps", type=int, default=3, help="repeat only: measured processes")


def run_argv(args) -> list[str]:
    """The `run` arguments that reproduce `args` (for `repeat`); checks them."""
    if args.new_tokens < 1:
        fail("--new-tokens must be at least 1")
    return [
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--ids-file",
        args.ids_file,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--warmup-tokens",
        str(args.warmup_tokens),
    ]
