"""`qwen-edge` command line: run, chat, inspect, bench on an artifact; build-side commands via `edge`."""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
from typing import Iterable

import numpy as np

from . import __version__
from .artifact import VERIFY_MODES, Artifact
from .chat import ChatSession
from .constrain import Constraint, load_grammar
from .contract import SpeculationDefault
from .errors import QwenEdgeError
from .generator import Generation, Generator
from .memory import peak_rss_mb
from .sampling import SamplingParams
from .speculative import DraftModel, PromptLookup, Speculator

BUILD_HINT = "pip install 'qwen-edge[build]'"


# -- run / chat ----------------------------------------------------------------------------------


def _open(args) -> Generator:
    gen = Generator(_open_artifact(args), max_length=args.max_length)
    gen.speculator = _speculator(args, gen)
    return gen


def _speculator(args, gen: Generator) -> Speculator | None:
    """The speculator `--lookup` or `--draft ARTIFACT` asks for, else the one the artifact's manifest
    names unless `--no-lookup`/`--no-draft` turn it off (None: plain decoding)."""
    lookup, draft, k, ngram = args.lookup, args.draft, args.draft_tokens, args.lookup_ngram
    if lookup and draft:
        raise QwenEdgeError("--lookup and --draft are two ways to draft tokens; give one of them")
    if draft and args.no_draft:
        raise QwenEdgeError("--draft and --no-draft contradict each other; give one of them")
    if not (lookup or draft):
        default = SpeculationDefault.of(gen.artifact.manifest)
        if default is not None and default.lookup and lookup is not False:
            lookup, k = True, k or default.draft_tokens
        elif default is not None and default.draft and not args.no_draft:
            named, k = default.draft_path(gen.artifact.root), k or default.draft_tokens  # beside the artifact
            if not (named / "manifest.json").is_file():
                raise QwenEdgeError(
                    f"the artifact's manifest names the draft {default.draft!r}, but {named} holds no artifact; "
                    "pass --draft ARTIFACT (or --no-draft to decode without it)"
                )
            draft = str(named)
    if (k is not None or ngram is not None) and not (lookup or draft):
        raise QwenEdgeError("--draft-tokens/--lookup-ngram set --lookup or --draft; give one of them")
    if ngram is not None and not lookup:
        raise QwenEdgeError("--lookup-ngram sets the n-gram of --lookup; it does not apply to --draft")
    if lookup:
        return PromptLookup(k=k or 10, **({"min_ngram": ngram, "max_ngram": max(3, ngram)} if ngram else {}))
    if draft:
        art = Artifact.open(draft, verify=args.verify)
        return DraftModel(Generator(art, max_length=min(gen.max_length, art.model.context_length)), gen, k=k or 4)
    return None


def _speculation_label(spec: Speculator | None) -> str | None:
    """How `bench` names the speculation in use."""
    if isinstance(spec, DraftModel):
        return f"draft {spec.draft.artifact.root}"
    return "lookup" if isinstance(spec, PromptLookup) else None


def _open_artifact(args) -> Artifact:
    return Artifact.open(args.artifact, verify=args.verify, trusted_keys=args.trusted_key)


def _params(args) -> SamplingParams:
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def _chat_session(args, gen: Generator) -> ChatSession:
    return ChatSession(
        gen, system=args.system, enable_thinking=args.think, thinking_budget=args.thinking_budget, adapter=args.adapter
    )


def _stream(pieces: Iterable[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def _rate(tps: float) -> str:
    """Tokens per second, or seconds per token when under one (an emulated NPU)."""
    return f"{tps:.1f} tok/s" if tps >= 1 or tps == 0 else f"{1 / tps:.1f} s/token"


def _report(gen: Generation) -> None:
    s = gen.stats
    print(
        f"[{gen.finish_reason}] prompt {s.prompt_tokens} tokens ({s.reused_tokens} cached), {s.new_tokens} new | "
        f"ttft {s.ttft_s * 1000:.0f} ms | prefill {_rate(s.prefill_tps)} | decode {_rate(s.decode_tps)}",
        file=sys.stderr,
    )
    if gen.notice:
        print(f"qwen-edge: note: {gen.notice}", file=sys.stderr)


def cmd_run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    grammar = load_grammar(args.json_schema, args.regex, args.grammar)
    gen = _open(args)
    params = _params(args)
    if args.no_chat_template:
        if args.system or args.think is not None or args.thinking_budget is not None:
            raise QwenEdgeError(
                "--system, --think and --thinking-budget need the chat template; drop --no-chat-template"
            )
        constraint = Constraint(grammar, gen) if grammar else None
        gen.set_adapter(args.adapter)
        result = gen.generate(
            gen.encode(prompt, add_special_tokens=True), params, args.max_new_tokens, constraint=constraint
        )
        _stream(result)
    else:
        chat = _chat_session(args, gen)
        _stream(chat.send(prompt, params, args.max_new_tokens, grammar=grammar))
        result = chat.last
    _report(result)
    return 0


def cmd_chat(args) -> int:
    gen = _open(args)
    chat = _chat_session(args, gen)
    params = _params(args)
    print(
        f"qwen-edge chat ({gen.artifact.model.family}, context {gen.max_length}); /reset starts over, /exit quits",
        file=sys.stderr,
    )
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not text:
            continue
        pieces = chat.send(text, params, args.max_new_tokens)
        try:
            _stream(pieces)
        except KeyboardInterrupt:
            pieces.close()
            print("\n(interrupted)", file=sys.stderr)
            continue
        except QwenEdgeError as e:  # e.g. the conversation outgrew the context: the session goes on
            print(f"qwen-edge: error: {e}", file=sys.stderr)
            continue
        if chat.last.notice:
            print(f"qwen-edge: note: {chat.last.notice}", file=sys.stderr)


# -- inspect -------------------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _flat(value, top: bool = True) -> str:
    """One-line `key=value, ...` form of a manifest block (nested blocks in braces, descriptions left out)."""
    if isinstance(value, dict):
        text = ", ".join(f"{k}={_flat(v, False)}" for k, v in value.items() if k != "description" and v is not None)
        return text if top else "{" + text + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flat(v, False) for v in value) + "]"
    return str(value)


def cmd_inspect(args) -> int:
    art = _open_artifact(args)
    m = art.manifest
    if args.json:
        print(json.dumps(m, indent=2, ensure_ascii=False))
        return 0
    info = art.model
    print(f"artifact   {art.root}  (format {m['format']} v{m['format_version']}, files verified: {args.verify})")
    print(
        f"model      {info.family}, {info.num_layers} layers, {info.num_kv_heads} KV heads x {info.head_dim}, "
        f"vocab {info.vocab_size}, context {info.context_length}, eos {list(info.eos_token_ids)}"
    )
    recipe = m.get("recipe") or {}
    print(f"recipe     {recipe.get('name', 'not recorded')}, context {recipe.get('context_length', '?')}")
    p = art.profile
    print(
        f"profile    {p.get('name', '?')}: {p.get('execution_provider', 'cpu')}, threads "
        f"{p.get('intra_op_num_threads') or 'all'}, session {_flat(p.get('session_config') or {}) or 'defaults'}"
    )
    source = m.get("source") or {}
    print(
        f"source     {source.get('kind', '?')} {source.get('spec', '?')}  sha256 {str(source.get('sha256', '?'))[:12]}"
    )
    for key in ("precision", "license", "build", "tools"):
        print(f"{key:<10} {_flat(m[key]) if m.get(key) else 'not recorded'}")
    print(f"fidelity   {_fidelity(m.get('fidelity'))}")
    total = sum(int(e["size"]) for e in art.files.values())
    print(f"files      {len(art.files)} files, {_size(total)} (+ manifest.json)")
    for name, entry in sorted(art.files.items()):
        print(f"  {name:<28} {_size(int(entry['size'])):>10}  sha256 {entry['sha256'][:12]}")
    return 0


def _fidelity(fidelity: dict | None) -> str:
    """One line per measure set: overall, then each language, then the greedy match and the task check."""
    if not fidelity:
        return "not checked"

    def line(m: dict) -> str:
        return (
            f"top-1 {m['top1_agreement']:.3f}, KL {m['mean_kl']:.4f}, "
            f"ppl {m['ppl_artifact']:.2f} (fp32 {m['ppl_reference']:.2f})"
        )

    rows = [f"vs fp32: {line(fidelity['overall'])}"]
    rows += [f"  {lang:<8} {line(m)}" for lang, m in (fidelity.get("languages") or {}).items()]
    if "greedy" in fidelity:
        rows.append(
            f"  greedy: {fidelity['greedy']['match_rate']:.2f} of the first 32 tokens match on "
            f"{len(fidelity['greedy']['prompts'])} chat prompts"
        )
    tasks = fidelity.get("tasks")
    if tasks:
        overall, change = tasks["overall"], tasks.get("change")
        row = f"  tasks: {overall['artifact']:.1%} vs fp32 {overall['reference']:.1%} on {overall['items']} items"
        if change:
            row += (
                f" ({100 * change['change']:+.1f} points, 95 % interval {100 * change['low']:+.1f} to "
                f"{100 * change['high']:+.1f}; +{change['gained']} / -{change['lost']} items)"
            )
        rows.append(row)
    return "\n           ".join(rows)


# -- bench ---------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cmd_bench(args) -> int:
    if min(args.p, args.n, args.r) < 1:
        raise QwenEdgeError("-p, -n and -r must each be at least 1")
    art = _open_artifact(args)
    max_length = args.max_length or min(art.model.context_length, 4096 if args.prompt_file else args.p + args.n)
    if not args.prompt_file and args.p + args.n > max_length:
        raise QwenEdgeError(
            f"-p {args.p} + -n {args.n} exceed the context of {max_length} tokens; lower -p/-n or raise --max-length"
        )
    gen = Generator(art, max_length=max_length)
    gen.speculator = _speculator(args, gen)
    if args.prompt_file:  # a real task (speculation needs one): the file's text as one user message
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = np.asarray(ChatSession(gen).prompt([{"role": "user", "content": f.read()}]).ids, dtype=np.int64)
        if prompt.size + args.n > max_length:
            raise QwenEdgeError(
                f"{args.prompt_file} is {prompt.size} tokens; with -n {args.n} it exceeds the context of "
                f"{max_length}; raise --max-length or lower -n"
            )
    else:
        vocab = gen.tokenizer.get_vocab_size(with_added_tokens=False)
        prompt = np.random.default_rng(0).integers(0, vocab, size=args.p, dtype=np.int64)
    greedy = SamplingParams()

    def once(ids, n):
        gen.reset()
        result = gen.generate(ids, greedy, n, stop_token_ids=())
        result.read()
        return result.stats

    once(prompt[: min(args.p, gen.prefill_chunk)], min(args.n, 2))  # warm-up, not counted
    runs = [once(prompt, args.n) for _ in range(args.r)]
    ttft = _spread([s.ttft_s * 1000 for s in runs])
    prefill = _spread([s.prefill_tps for s in runs])
    decode = _spread([s.decode_tps for s in runs])
    result = {
        "model": art.model.family,
        "precision": art.manifest.get("precision"),
        "prompt_tokens": int(prompt.size),
        "new_tokens": args.n,
        "repetitions": args.r,
        "ttft_ms": ttft["median"],
        "prefill_tps": prefill["median"],
        "decode_tps": decode["median"],
        "spread": {"ttft_ms": ttft, "prefill_tps": prefill, "decode_tps": decode},
        # decode_tps with speculation is the effective rate: generated tokens over decode time
        "speculation": _speculation_label(gen.speculator),
        "acceptance_rate": statistics.median(s.acceptance_rate for s in runs) if gen.speculator else None,
        "peak_rss_mb": peak_rss_mb(),  # the process's peak: the draft model's too
        "threads": art.profile.get("intra_op_num_threads", 0),
        "execution_provider": art.profile.get("execution_provider", "cpu"),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"| {'test':<8} | {'median':>10} | {'min':>10} | {'max':>10} |")
    print(f"| {'-' * 8} | {'-' * 10} | {'-' * 10} | {'-' * 10} |")
    rows = [(f"pp{prompt.size}", prefill, "t/s"), (f"tg{args.n}", decode, "t/s"), ("ttft", ttft, "ms")]
    if gen.speculator:
        rows.append(("accept", _spread([100 * s.acceptance_rate for s in runs]), "%"))
    for label, stats, unit in rows:
        cells = " | ".join(f"{stats[k]:>6.1f} {unit:<3}" for k in ("median", "min", "max"))
        print(f"| {label:<8} | {cells} |")
    rss = result["peak_rss_mb"]
    print(
        f"{args.r} runs after a warm-up; peak RSS {rss:.0f} MB"
        if rss is not None
        else f"{args.r} runs after a warm-up"
    )
    return 0


# -- verify --------------------------------------------------------------------------------------


def cmd_verify(args) -> int:
    from pathlib import Path

    from .bundle import verify_bundle

    signed = f", signature by a trusted key ({len(args.key)} given)" if args.key else ""
    if Path(args.bundle).is_dir():
        art = Artifact.open(args.bundle, verify="full", trusted_keys=args.key)
        total = sum(int(e["size"]) for e in art.files.values())
        signed = f", signed by key {art.signed_by}" if art.signed_by else ""
        print(f"OK {art.root}: artifact, {len(art.files)} files, {_size(total)} verified (size + sha256){signed}")
        return 0
    r = verify_bundle(args.bundle, trusted_keys=args.key)
    print(
        f"OK {r.path}: {r.target} bundle of {r.recipe}, licence {r.license_id}, "
        f"{r.files} files, {_size(r.bytes)} verified (size + sha256){signed}"
    )
    return 0


def cmd_keygen(args) -> int:
    from .signing import generate_key

    private, public, kid = generate_key(args.key)
    print(
        f"OK key {kid}: private key {private} (keep it secret; `build`/`package --sign {private}`), "
        f"public key {public} (ship it; `verify --key`, `--trusted-key`)"
    )
    return 0


def cmd_unpack(args) -> int:
    from .bundle import unpack_bundle

    u = unpack_bundle(args.bundle, args.dir, force=args.force, trusted_keys=args.key)
    r = u.bundle
    print(
        f"OK {r.path} -> {u.dest}{' (replaced)' if u.replaced else ''}: {r.target} bundle of {r.recipe}, "
        f"licence {r.license_id}, {r.files} files, {_size(r.bytes)} verified (size + sha256) and unpacked"
    )
    return 0


# -- serve ---------------------------------------------------------------------------------------


def _serve_until_interrupted(server) -> int:
    """Serve until Ctrl-C, then release the socket."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nqwen-edge serve: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _serve_web(args) -> int:
    from .webpage import WebServer

    artifact = _open_artifact(args)  # checked here; the page checks every file's sha256 again
    server = WebServer(artifact.root, args.host, args.port, quiet=args.quiet)
    print(f"qwen-edge serve --web: chat page for {artifact.root} at {server.url} (Ctrl-C stops)", file=sys.stderr)
    return _serve_until_interrupted(server)


def _hardening(args):
    """The server's Limits and Guard from the serve flags."""
    import os

    from .server import Guard, Limits

    for flag in ("max_tokens_cap", "max_body_mb", "max_messages", "request_timeout", "wait_timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise QwenEdgeError(f"--{flag.replace('_', '-')} must be positive, not {value}")
    if args.queue < 0:
        raise QwenEdgeError(f"--queue must be 0 or more, not {args.queue}")
    limits = Limits(
        max_tokens=args.max_tokens_cap,
        max_body=int(args.max_body_mb * (1 << 20)),
        max_messages=args.max_messages,
        max_waiting=args.queue,
        wait_timeout=args.wait_timeout,
        request_timeout=args.request_timeout,
    )
    return limits, Guard(args.api_key or os.environ.get("QWEN_EDGE_API_KEY"), tuple(args.allow_origin))


def cmd_serve(args) -> int:
    if args.web:
        return _serve_web(args)
    from .server import ChatServer, Engine

    limits, guard = _hardening(args)  # bad flags fail before the model loads
    engine = Engine(_open(args), model_id=args.model_id, thinking_budget=args.thinking_budget)
    server = ChatServer(engine, args.host, args.port, quiet=args.quiet, limits=limits, guard=guard)
    if guard.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"qwen-edge serve: warning: {args.host} is reachable from other machines and no --api-key is set",
            file=sys.stderr,
        )
    print(
        f"qwen-edge serve: model {engine.model_id!r} (context {engine.generator.max_length}) at {server.url} "
        "(OpenAI-compatible; Ctrl-C stops)",
        file=sys.stderr,
    )
    return _serve_until_interrupted(server)


# -- build side ----------------------------------------------------------------------------------


def _edge_command(name: str):
    def run(args) -> int:
        try:
            commands = importlib.import_module("edge.commands")
        except ImportError as e:
            raise QwenEdgeError(
                f"`qwen-edge {args.command}` needs the build tools ({e.name} is missing): {BUILD_HINT}"
            ) from None
        return getattr(commands, name)(args) or 0

    return run


# -- parser --------------------------------------------------------------------------------------


def _add_artifact_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="artifact directory written by `qwen-edge build`")
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="auto",
        help="check files against manifest.json: size + sha256 of every file (full), sha256 of the files changed "
        "since the last check (auto, the default), size only, or none",
    )
    p.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="PUB",
        help="Ed25519 public key (`qwen-edge keygen`'s .pub); the artifact must be signed by one (repeatable)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="KV cache length in tokens (default: the artifact's context length); smaller saves memory",
    )


def _add_speculation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lookup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="speculative decoding with prompt lookup: draft from n-grams of the prompt and the reply (same output); "
        "--no-lookup: not even when the artifact's manifest asks for it",
    )
    p.add_argument(
        "--draft",
        metavar="ARTIFACT",
        default=None,
        help="speculative decoding with a smaller draft artifact of the same tokenizer (same output)",
    )
    p.add_argument(
        "--no-draft", action="store_true", help="no draft model, not even the one the artifact's manifest names"
    )
    p.add_argument(
        "--draft-tokens", type=int, default=None, help="initial draft length, adapted as it goes (default 10 / 4)"
    )
    p.add_argument(
        "--lookup-ngram",
        type=int,
        default=None,
        metavar="N",
        help="--lookup: the shortest n-gram a draft is looked up by (default 1)",
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_speculation_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for tokens already seen (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument(
        "--think",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Qwen3: turn thinking on/off (default: the template's default)",
    )
    p.add_argument(
        "--thinking-budget", type=int, default=None, help="Qwen3: close thinking after this many tokens and answer"
    )
    p.add_argument("--adapter", default=None, metavar="NAME", help="switchable LoRA adapter of the artifact to use")


def build_parser() -> argparse.ArgumentParser:
    """The `qwen-edge` argument parser."""
    parser = argparse.ArgumentParser(prog="qwen-edge", description="Build and run small Qwen models on device.")
    parser.add_argument("--version", action="version", version=f"qwen-edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="generate a reply to one prompt (streams to stdout)")
    _add_artifact_args(p)
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    _add_generation_args(p)
    p.add_argument("--no-chat-template", action="store_true", help="raw completion of the prompt, no chat template")
    p.add_argument("--json-schema", metavar="FILE", help="hold the reply to this JSON schema (qwen-edge[constrained])")
    p.add_argument("--regex", metavar="PATTERN", help="hold the reply to this regular expression")
    p.add_argument("--grammar", metavar="FILE", help="hold the reply to this Lark grammar (llguidance's dialect)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive multi-turn chat on stdin/stdout")
    _add_artifact_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("inspect", help="summarize an artifact's manifest")
    _add_artifact_args(p)
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="measure time to first token, prefill and decode speed")
    _add_artifact_args(p)
    _add_speculation_args(p)
    p.add_argument("--prompt-file", default=None, help="a task's text as one chat message instead of -p random tokens")
    p.add_argument("-p", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("-n", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("-r", type=int, default=3, help="repetitions after one warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="local OpenAI-compatible server: /v1/chat/completions and /v1/models")
    _add_artifact_args(p)
    _add_speculation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--model-id", default=None, help="model id clients send (default: the artifact's recipe name)")
    p.add_argument("--quiet", action="store_true", help="do not log each request to stderr")
    p.add_argument(
        "--web",
        action="store_true",
        help="serve the browser chat page at /web/ and the artifact (or unpacked web bundle) statically instead: "
        "the model runs in the browser (onnxruntime-web)",
    )
    p.add_argument(
        "--thinking-budget",
        type=int,
        default=None,
        help="Qwen3: close thinking after this many tokens (requests may set thinking_budget)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on every request (default: $QWEN_EDGE_API_KEY, else none)",
    )
    p.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="web page origin allowed to call the server (CORS), e.g. http://localhost:3000, or * (repeatable; "
        "default none: browser requests are refused)",
    )
    p.add_argument("--max-tokens-cap", type=int, default=None, help="most tokens one request may generate")
    p.add_argument("--max-body-mb", type=float, default=16, help="largest request body in MiB (default 16)")
    p.add_argument("--max-messages", type=int, default=512, help="most messages in one request (default 512)")
    p.add_argument(
        "--queue", type=int, default=32, help="requests that may wait for the model; more get 503 (default 32)"
    )
    p.add_argument(
        "--wait-timeout", type=float, default=120, help="seconds a request may wait for its turn (default 120)"
    )
    p.add_argument(
        "--request-timeout", type=float, default=600, help="seconds a request may take in all (default 600)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("build", help="build an artifact from a recipe (needs qwen-edge[build])")
    p.add_argument("recipe", help="recipe name (see `qwen-edge recipes`) or path to a recipe YAML")
    p.add_argument("--model", default=None, help="source: HF directory, Hub id or GGUF file (default: the recipe's)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("--no-eval", action="store_true", help="skip the fidelity check")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved recipe, profile and backend plan (an Olive recipe's workflow config) "
        "as JSON and build nothing",
    )
    p.add_argument("--sign", default=None, metavar="KEY", help="sign manifest.json with this Ed25519 private key")
    p.set_defaults(func=_edge_command("build"))

    p = sub.add_parser("eval", help="measure an artifact's fidelity against the fp32 model (needs qwen-edge[build])")
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--reference", default=None, help="reference source (default: the manifest's source)")
    p.add_argument(
        "--tasks", action="store_true", help="task pass rates (coding, multilingual) instead of logit fidelity"
    )
    p.add_argument("--full", action="store_true", help="with --tasks: the full suites")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_edge_command("evaluate"))

    p = sub.add_parser("recipes", help="list the built-in recipes (needs qwen-edge[build])")
    p.set_defaults(func=_edge_command("recipes"))

    p = sub.add_parser("profiles", help="list the device profiles (needs qwen-edge[build])")
    p.set_defaults(func=_edge_command("profiles"))

    p = sub.add_parser(
        "package", help="write one versioned zip bundle of an artifact for a platform (needs qwen-edge[build])"
    )
    p.add_argument("artifact", help="artifact directory")
    p.add_argument("--target", required=True, choices=("android", "ios", "desktop", "web"), help="platform")
    p.add_argument("--out", default=None, help="bundle file or directory (default: next to the artifact)")
    p.add_argument(
        "--license", default=None, help="the model's LICENSE file (needed for non-Apache models without one)"
    )
    p.add_argument("--license-id", default=None, help="the model's licence id, e.g. Apache-2.0 or qwen-research")
    p.add_argument("--sign", default=None, metavar="KEY", help="sign bundle.json with this Ed25519 private key")
    p.set_defaults(func=_edge_command("package"))

    p = sub.add_parser("verify", help="check a bundle or an artifact offline: every file's size and sha256")
    p.add_argument("bundle", help="bundle .zip written by `qwen-edge package`, or an artifact directory")
    p.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PUB",
        help="Ed25519 public key; the bundle/artifact must be signed by one of these (repeatable)",
    )
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("keygen", help="write a new Ed25519 signing key pair: KEY (private) and KEY.pub")
    p.add_argument("key", help="private key file to create (KEY.pub is written beside it); never overwritten")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("unpack", help="verify a bundle, then extract it safely into a new directory")
    p.add_argument("bundle", help="bundle .zip written by `qwen-edge package`")
    p.add_argument("dir", help="directory to create (or an empty one); its parent must exist")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace the directory if it holds an earlier unpacked bundle (anything else is refused)",
    )
    p.add_argument(
        "--key", action="append", default=[], metavar="PUB", help="Ed25519 public key the bundle must be signed by"
    )
    p.set_defaults(func=cmd_unpack)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `qwen-edge`; returns the exit code (2 for user errors, 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QwenEdgeError as e:
        print(f"qwen-edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        sys.stdout.flush()
        print("\nqwen-edge: interrupted", file=sys.stderr)
        return 130
