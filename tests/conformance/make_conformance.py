"""Build the conformance artifacts and compute every case's expected prompt ids, greedy tokens and text.

Usage: python tests/conformance/make_conformance.py OUT_DIR  -> prints one JSON object:

    {"artifacts": {name: {"path", "backend", "weights", "layout": {"kv_cache", "position_ids"}}},
     "cases": [{"id", "artifact", "prompt", "max_new_tokens", "prompt_text", "prompt_ids", "token_ids",
                "text", "finish_reason", "expected_from", "reference"}]}

Both test suites (tests/test_conformance.py and runtimes/js/test/conformance.test.js) run this script
once and assert that their runtime reproduces each case: prompt ids, generated token ids, text and
finish reason. The cases are tests/conformance/cases.json; the artifacts are tiny random Qwen models
(tests/tiny_models.py) built through the `qwen-edge build` CLI from recipes written here:

- qwen2-fp32: native graph (GroupQueryAttention, one shared past/present buffer), Qwen2, untied;
- qwen3-int4: native graph, Qwen3, tied, int4 weights (round-to-nearest, embedding and lm_head too);
- olive-qwen3-fp32: the olive backend's plain-operator graph (growing cache, position_ids), Qwen3,
  untied (a tied tiny model mostly repeats its input token: weak for checking positions).

Expectations, independent of both runtimes where the arithmetic allows it:

- prompt text and ids: transformers' tokenizer of the source model (apply_chat_template with
  add_generation_prompt for {"messages"}, the raw text for {"text"}; no special tokens added);
- fp32 artifacts: the transformers fp32 model's greedy tokens (`generate(do_sample=False)` on the
  prompt ids, stopping at the artifact's eos ids, which are not part of the tokens);
- int4 artifacts: quantization changes the model, so the expected tokens are the Python loop's
  (qwen_edge.Generator, greedy, a fresh cache per case); `reference` then holds the fp32 model's
  greedy tokens and, teacher-forced along the expected tokens, the fp32 rank of each expected token
  (and of the stop token), for tests/test_conformance.py to check the quantized model against;
- text: the tokens decoded with the artifact's tokenizer.json (special tokens skipped), as streamed:
  a trailing incomplete UTF-8 character is never emitted.

A runtime under test runs the cases of one artifact in order on one generator (not reset between
cases), so prompts that share a prefix with the previous case also exercise cache reuse and rollback.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("cases.json")
sys.path.insert(0, str(REPO / "tests"))

import tiny_models  # noqa: E402

FP32 = {"weights": "fp32", "embedding": "same", "lm_head": "same"}
INT4 = {
    "weights": "int4",
    "method": "rtn",
    "block_size": 32,
    "symmetric": False,
    "embedding": "same",
    "lm_head": "same",
}
ARTIFACTS = {  # name -> how it is built and the layout it must state
    "qwen2-fp32": {
        "family": "qwen2",
        "tied": False,
        "backend": "native",
        "precision": FP32,
        "layout": {"kv_cache": "shared", "position_ids": False},
    },
    "qwen3-int4": {
        "family": "qwen3",
        "tied": True,
        "backend": "native",
        "precision": INT4,
        "layout": {"kv_cache": "shared", "position_ids": False},
    },
    "olive-qwen3-fp32": {
        "family": "qwen3",
        "tied": False,
        "backend": "olive",
        "precision": FP32,
        "layout": {"kv_cache": "growing", "position_ids": True},
    },
}
CONTEXT_LENGTH = 256
BACKGROUND = ("olive",)  # backends built in a subprocess started first (see start_background_builds)
CLI = "import sys; from qwen_edge.cli import main; sys.exit(main())"  # the `qwen-edge` console script


def load_cases() -> list[dict]:
    """cases.json, checked: unique ids, a known artifact, one prompt kind, max_new_tokens >= 1."""
    cases = json.loads(CASES.read_text(encoding="utf-8"))
    seen = set()
    for case in cases:
        cid = case.get("id")
        if not isinstance(cid, str) or cid in seen:
            raise SystemExit(f"{CASES}: case id {cid!r} is missing or repeated")
        seen.add(cid)
        if case.get("artifact") not in ARTIFACTS:
            raise SystemExit(f"{CASES}: case {cid}: artifact must be one of {', '.join(ARTIFACTS)}")
        if sorted(case.get("prompt", {})) not in (["messages"], ["text"]):
            raise SystemExit(f"{CASES}: case {cid}: prompt must be {{messages: [...]}} or {{text: ...}}")
        if not (isinstance(case.get("max_new_tokens"), int) and case["max_new_tokens"] >= 1):
            raise SystemExit(f"{CASES}: case {cid}: max_new_tokens must be an integer >= 1")
    return cases


def recipe_yaml(name: str, spec: dict, source: Path) -> str:
    precision = "".join(f"\n  {k}: {json.dumps(v)}" for k, v in spec["precision"].items())
    return (
        f"name: conformance-{name}\nsource: {json.dumps(str(source))}\nbackend: {spec['backend']}\n"
        f"profile: cpu-x86_64\ncontext_length: {CONTEXT_LENGTH}\nprecision:{precision}\n"
        "fidelity:\n  enabled: false\n"
    )


def source_dir(out: Path, family: str, tied: bool) -> Path:
    """Where the tiny HF model an artifact is built from lives (written by `build_sources`)."""
    return out / f"hf-{family}-{'tied' if tied else 'untied'}"


def build_sources(out: Path, specs: dict) -> dict:
    """Write the tiny HF models the artifacts in `specs` are built from: {(family, tied): directory}."""
    kinds = sorted({(spec["family"], spec["tied"]) for spec in specs.values()})
    return {(f, t): tiny_models.build_hf_model(source_dir(out, f, t), f, t) for f, t in kinds}


def write_recipes(out: Path, specs: dict, sources: dict) -> dict:
    """OUT/recipes/NAME.yaml for every artifact of `specs`: {name: recipe path}."""
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    recipes = {}
    for name, spec in specs.items():
        recipes[name] = out / "recipes" / f"{name}.yaml"
        recipes[name].write_text(recipe_yaml(name, spec, sources[spec["family"], spec["tied"]]), encoding="utf-8")
    return recipes


def _build_args(out: Path, name: str, recipe: Path) -> list[str]:
    return ["build", str(recipe), "--out", str(out / name), "--no-eval", "--quiet"]


def start_background_builds(out: Path, specs: dict, recipes: dict) -> dict:
    """Start the builds of the BACKGROUND backends (olive: the slow one, which also reconfigures logging
    and tempfile) as `qwen-edge build` subprocesses: {name: (process, log file)}."""
    procs = {}
    for name, spec in specs.items():
        if spec["backend"] in BACKGROUND:
            log = open(out / "recipes" / f"{name}.log", "w", encoding="utf-8")  # noqa: SIM115 (closed by wait)
            cmd = [sys.executable, "-c", CLI, *_build_args(out, name, recipes[name])]
            procs[name] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log)
    return procs


def run_foreground_builds(out: Path, specs: dict, recipes: dict) -> None:
    """The other builds, one after the other, through the CLI's entry point in this process (no Python
    start-up and torch import per build). The CLI prints its one-line errors to stderr."""
    from qwen_edge.cli import main as cli

    for name, spec in specs.items():
        if spec["backend"] not in BACKGROUND:
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the result
                code = cli(_build_args(out, name, recipes[name]))
            if code != 0:
                raise SystemExit(f"building the {name} artifact failed (qwen-edge build exit {code})")


def wait_builds(out: Path, procs: dict) -> None:
    """Wait for the background builds; a failed one exits with its log's tail."""
    failed = []
    for name, (proc, log) in procs.items():
        code = proc.wait()
        log.close()
        if code != 0:
            tail = (out / "recipes" / f"{name}.log").read_text(encoding="utf-8").strip().splitlines()[-15:]
            failed.append(f"building the {name} artifact failed (qwen-edge build exit {code}):\n" + "\n".join(tail))
    if failed:
        raise SystemExit("\n".join(failed))


def kill_builds(procs: dict) -> None:
    for proc, log in procs.values():
        proc.kill()
        proc.wait()
        log.close()


def build_artifacts(out: Path, specs: dict, also=None) -> dict:
    """Build the artifacts of `specs` (name -> family, tied, backend, precision) into OUT/NAME through the
    `qwen-edge build` CLI; `also()` runs while the background builds do. Returns {name: artifact directory}."""
    out = Path(out).resolve()
    recipes = write_recipes(out, specs, build_sources(out, specs))
    procs = start_background_builds(out, specs, recipes)
    try:
        run_foreground_builds(out, specs, recipes)
        if also is not None:
            also()
    except BaseException:
        kill_builds(procs)
        raise
    wait_builds(out, procs)
    return {name: out / name for name in specs}


def streamed_text(tokenizer, ids: list[int]) -> str:
    """The text a streaming detokenizer emits for `ids`: the longest prefix whose decoding does not end
    in an incomplete UTF-8 character (U+FFFD), special tokens skipped."""
    for k in range(len(ids), -1, -1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            return text
    return ""


def reference_greedy(model, prompt_ids: list[int], max_new: int, eos: list[int]) -> tuple[list[int], str]:
    """transformers greedy tokens after `prompt_ids` (stop tokens cut off) and the finish reason."""
    import torch

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=eos[0],
        )
    tokens = out[0, len(prompt_ids) :].tolist()
    if tokens and tokens[-1] in eos:
        return tokens[:-1], "stop"
    return tokens, "max_tokens"


def reference_ranks(model, prompt_ids: list[int], tokens: list[int]) -> list[int]:
    """Teacher-forced along `tokens`: the rank of each token among the fp32 model's logits (0 = its argmax)."""
    import torch

    seq = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        logits = model(seq).logits[0, len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)]
    return (logits > chosen[:, None]).sum(dim=1).tolist()


def python_loop(artifact_dir: Path, cases: list[dict]) -> list[tuple[list[int], str]]:
    """Greedy tokens and finish reason of the Python runtime for each case (fresh cache per case)."""
    from qwen_edge import Artifact, Generator, SamplingParams

    gen = Generator(Artifact.open(artifact_dir, verify="size"))
    results = []
    for case in cases:
        gen.reset()
        g = gen.generate(case["prompt_ids"], SamplingParams(), case["max_new_tokens"])
        g.read()
        results.append((list(g.token_ids), g.finish_reason))
    return results


def main(out: Path) -> None:
    t0 = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = load_cases()
    specs = {n: spec for n, spec in ARTIFACTS.items() if any(c["artifact"] == n for c in cases)}
    refs, eos_of, seconds = {}, {}, {}

    def reference() -> None:
        """The transformers side (it needs only the source models), while the olive artifact builds."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        seconds["native builds"] = time.perf_counter() - t0
        torch.set_num_threads(1)
        for spec in specs.values():
            key = spec["family"], spec["tied"]
            if key not in refs:
                source = source_dir(out, *key)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
                eos_of[key] = [int(model.config.eos_token_id)]
                # plain greedy: none of the source's sampling or repetition-penalty defaults
                model.generation_config = GenerationConfig(eos_token_id=eos_of[key], pad_token_id=eos_of[key][0])
                refs[key] = model, AutoTokenizer.from_pretrained(source)
        for case in cases:
            spec = specs[case["artifact"]]
            key = spec["family"], spec["tied"]
            model, tok = refs[key]
            prompt = case["prompt"]
            if "messages" in prompt:
                text = tok.apply_chat_template(prompt["messages"], tokenize=False, add_generation_prompt=True)
            else:
                text = prompt["text"]
            case["prompt_text"] = text
            case["prompt_ids"] = tok(text, add_special_tokens=False)["input_ids"]
            case["_ref"] = reference_greedy(model, case["prompt_ids"], case["max_new_tokens"], eos_of[key])
        seconds["reference"] = time.perf_counter() - t0

    paths = build_artifacts(out, specs, also=reference)
    seconds["built"] = time.perf_counter() - t0

    from tokenizers import Tokenizer

    artifacts = {}
    for name, spec in specs.items():
        path = paths[name]
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        eos = manifest["model"]["eos_token_ids"]
        family_eos = eos_of[spec["family"], spec["tied"]]
        if eos != family_eos:
            raise SystemExit(f"{name}: the manifest's eos ids {eos} are not the source model's {family_eos}")
        artifacts[name] = {
            "path": str(path),
            "backend": spec["backend"],
            "weights": spec["precision"]["weights"],
            "layout": spec["layout"],
        }
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        mine = [c for c in cases if c["artifact"] == name]
        quantized = spec["precision"]["weights"] != "fp32"
        loop = python_loop(path, mine) if quantized else None
        model = refs[spec["family"], spec["tied"]][0]
        for i, case in enumerate(mine):
            ref_tokens, ref_finish = case.pop("_ref")
            if quantized:
                tokens, finish = loop[i]
                case["expected_from"] = "python-loop"
                chosen = tokens + (eos[:1] if finish == "stop" else [])  # the stop token was chosen too
                case["reference"] = {
                    "token_ids": ref_tokens,
                    "finish_reason": ref_finish,
                    "ranks": reference_ranks(model, case["prompt_ids"], chosen),
                }
            else:
                tokens, finish = ref_tokens, ref_finish
                case["expected_from"] = "transformers"
                case["reference"] = None
            case.update(token_ids=tokens, text=streamed_text(tokenizer, tokens), finish_reason=finish)
    seconds["total"] = time.perf_counter() - t0
    result = {"artifacts": artifacts, "cases": cases, "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_conformance.py OUT_DIR")
    main(Path(sys.argv[1]))
