"""Speculative decoding on tiny built artifacts: greedy tokens identical to plain decoding (prompt
lookup and draft model; Qwen2 and Qwen3; shared and growing caches), the accept/reject step keeps
the target distribution, n-gram lookup and draft-length adaptation, and the CLI options."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_runtime_plain_graph import _rewrite_genai_config

from qwen_edge.artifact import Artifact
from qwen_edge.errors import QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.sampling import Sampler, SamplingParams
from qwen_edge.speculative import AdaptiveK, DraftModel, PromptLookup, distribution, verify

# a prompt that repeats itself, so that n-gram lookup finds drafts
PROMPT = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n    return a + b\n" * 3


@pytest.fixture(scope="module", params=["qwen2-shared", "qwen3-shared", "qwen2-growing"])
def target(request, tiny_artifact, tmp_path_factory):
    family, layout = request.param.split("-")
    path = tiny_artifact(family, tied=family == "qwen3")
    if layout == "growing":
        path = _rewrite_genai_config(
            path,
            tmp_path_factory.mktemp("growing") / family,
            lambda c: c["search"].update(past_present_share_buffer=False),
        )
    return Generator(Artifact.open(path), max_length=160)


def _tokens(gen: Generator, prompt, params=SamplingParams(), n: int = 60):
    gen.reset()
    result = gen.generate(prompt, params, n, stop_token_ids=())
    result.read()
    return result


def test_prompt_lookup_greedy_equals_plain(target):
    prompt = target.encode(PROMPT)
    target.speculator = None
    plain = _tokens(target, prompt)
    target.speculator = PromptLookup(k=4)
    try:
        spec = _tokens(target, prompt)
    finally:
        target.speculator = None
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    s = spec.stats
    assert s.drafted > 0 and 0 <= s.accepted <= s.drafted and s.new_tokens == plain.stats.new_tokens
    # the cache holds exactly the plain sequence: rejected drafts were rolled back
    assert target.position == len(prompt) + len(plain.token_ids) - 1
    assert target.tokens.tolist() == [*prompt, *plain.token_ids[:-1]]


def test_draft_model_greedy_equals_plain(target, tiny_artifact):
    family = target.artifact.model.family
    draft = Generator(Artifact.open(tiny_artifact(family, tied=family == "qwen3", weights="int4")), max_length=160)
    prompt = target.encode(PROMPT)
    target.speculator = None
    plain = _tokens(target, prompt)
    target.speculator = DraftModel(draft, target, k=3)
    try:
        spec = _tokens(target, prompt)
        again = _tokens(target, prompt)  # the draft's cache is reused and rewound across generations
    finally:
        target.speculator = None
    assert spec.token_ids == plain.token_ids == again.token_ids
    assert spec.stats.accepted > 0  # an int4 twin agrees with its fp32 target most of the time


def test_speculation_stops_at_the_end_of_the_context(target):
    gen = Generator(target.artifact, max_length=40)
    prompt = gen.encode(PROMPT)[:30]
    plain = _tokens(gen, prompt, n=50)
    gen.speculator = PromptLookup(k=8)
    spec = _tokens(gen, prompt, n=50)
    assert spec.finish_reason == plain.finish_reason == "length" and spec.token_ids == plain.token_ids


def test_sampled_speculation_keeps_the_target_distribution(tiny_artifact):
    """The second token's distribution (the first drafted position) matches plain sampling."""
    target = Generator(Artifact.open(tiny_artifact("qwen2")), max_length=160)
    draft = Generator(Artifact.open(tiny_artifact("qwen2", weights="int4")), max_length=160)
    prompt = target.encode(PROMPT)
    params = [SamplingParams(temperature=1.0, top_k=3, seed=s) for s in range(800)]
    target.speculator = None
    plain = [_tokens(target, prompt, p, 2).token_ids[1] for p in params[:400]]
    target.speculator = DraftModel(draft, target, k=2)
    try:
        runs = [_tokens(target, prompt, p, 2) for p in params[400:]]
    finally:
        target.speculator = None
    assert all(r.stats.drafted for r in runs)  # every second token went through verify
    spec = [r.token_ids[1] for r in runs]
    vocab = max(plain + spec) + 1
    a, b = (np.bincount(x, minlength=vocab) / len(x) for x in (plain, spec))
    assert 0.5 * np.abs(a - b).sum() < 0.12


def _tv(samples: list[int], p: np.ndarray) -> float:
    return 0.5 * float(np.abs(np.bincount(samples, minlength=p.size) / len(samples) - p).sum())


@pytest.mark.parametrize("draft_kind", ["lookup", "model"])
def test_accept_reject_leaves_the_target_distribution(draft_kind):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=12).astype(np.float32) * 2
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=8, seed=3))
    p = distribution(sampler, logits, None)
    assert p.sum() == pytest.approx(1) and np.count_nonzero(p) == 8
    q = rng.dirichlet(np.ones(12))
    n, picks, naive = 6000, [], []
    for _ in range(n):
        d = int(rng.choice(12, p=q)) if draft_kind == "model" else 0
        picks.append(verify(sampler, logits, None, d, q if draft_kind == "model" else None))
        naive.append(d)  # always keeping the draft: the distribution of q, not p
    assert _tv(picks, p) < 0.04
    assert _tv(naive, p) > 0.1  # the check can tell a wrong scheme


def test_greedy_verify_is_the_argmax():
    logits = np.array([0.1, 3.0, 2.0], np.float32)
    sampler = Sampler(SamplingParams())
    assert verify(sampler, logits, None, 1, None) == 1 and verify(sampler, logits, None, 2, None) == 1


def test_prompt_lookup_takes_the_latest_longest_match():
    look = PromptLookup(k=3, max_ngram=2)
    look.start(SamplingParams())
    ctx = np.array([5, 6, 7, 8, 1, 6, 9, 9, 5, 6], np.int64)
    # the bigram (5, 6) occurs at 0; the unigram 6 also at 5, but the longer match wins
    assert look.propose(ctx, 10).tokens == [7, 8, 1]
    assert look.propose(ctx, 2).tokens == [7, 8]  # bounded by the room left in the context
    assert look.propose(np.array([1, 2, 3], np.int64), 10).tokens == []
    assert look.propose(np.array([4, 3, 4], np.int64), 10).tokens == [3, 4]


def test_adaptive_draft_length():
    k = AdaptiveK(4, 6)
    k.update(4, 4)
    k.update(5, 5)
    k.update(6, 6)
    assert k.k == 6
    k.update(6, 2)
    assert k.k == 5
    k.update(5, 3)
    assert k.k == 5
    k.reset()
    assert k.k == 4
    with pytest.raises(QwenEdgeError, match="draft length"):
        AdaptiveK(0, 4)
    with pytest.raises(QwenEdgeError, match="n-gram"):
        PromptLookup(min_ngram=3, max_ngram=2)


def test_draft_with_another_tokenizer_is_refused(target, tmp_path):
    import json
    import shutil

    from edge.artifact.manifest import file_table

    other = tmp_path / "other"
    shutil.copytree(target.artifact.root, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens with swapped ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["files"] = file_table(other)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(QwenEdgeError, match="different tokenizer"):
        DraftModel(Generator(Artifact.open(other), max_length=32), target)


def test_cli_lookup_and_draft_match_plain_and_bench_reports_acceptance(tiny_artifact, tmp_path, capsys):
    import json

    from qwen_edge import cli

    target, draft = str(tiny_artifact("qwen2")), str(tiny_artifact("qwen2", weights="int4"))
    outputs = []
    for extra in ([], ["--lookup"], ["--draft", draft, "--draft-tokens", "3"]):
        assert cli.main(["run", target, PROMPT, "--max-new-tokens", "24", "--no-chat-template", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] == outputs[2]
    task = tmp_path / "task.txt"
    task.write_text(PROMPT)
    assert (
        cli.main(["bench", target, "--prompt-file", str(task), "-n", "16", "-r", "1", "--draft", draft, "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["speculation"] == f"draft {draft}" and 0 < result["acceptance_rate"] <= 1
    assert result["prompt_tokens"] > len(PROMPT) // 8
    assert cli.main(["bench", target, "-p", "16", "-n", "8", "-r", "1", "--lookup"]) == 0
    assert "accept" in capsys.readouterr().out
    assert cli.main(["run", target, "hi", "--lookup", "--draft", draft]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_speculation_summary_and_targets():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("harness", Path(__file__).parents[1] / "benchmarks" / "harness.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    runs = [
        {"task": "code-edit", "system": s, "result": {"decode_tps": tps, "ttft_ms": 100.0, "acceptance_rate": acc}}
        for s, tps, acc in (
            ("qwen-edge", 40.0, None),
            ("qwen-edge-lookup", 90.0, 0.9),
            ("qwen-edge-lookup", 70.0, 0.8),
            ("llamacpp", 30.0, None),
            ("llamacpp-lookup", 60.0, None),
        )
    ]
    rows = harness.speculation_rows(runs)
    assert rows["code-edit"]["qwen-edge-lookup"]["decode"]["median"] == 80.0
    targets = {t["theirs"]: t for t in harness.speculation_targets(rows)}
    assert targets["qwen-edge"]["met"] and targets["qwen-edge"]["ratio"] == 2.0
    assert targets["llamacpp-lookup"]["met"] is False and targets["llamacpp"]["met"]
    assert harness.speculation_targets({})[0]["met"] is None
    table = harness.render_speculation(rows, harness.speculation_targets(rows))
    assert "| code-edit | qwen-edge-lookup | 80.0 (70.0–90.0) | 0.85 (0.80–0.90) |" in table and "**missed**" in table


@pytest.mark.real_model
def test_real_demo_greedy_is_identical_with_prompt_lookup():
    """The demo artifact (QWEN_EDGE_DEMO_ARTIFACT, default artifacts/demo) repeats a file with one rename:
    prompt lookup keeps most drafts and the reply is token for token the plain one."""
    import os
    import sys
    from pathlib import Path

    from qwen_edge.chat import ChatSession

    root = Path(__file__).parents[1]
    demo = Path(os.environ.get("QWEN_EDGE_DEMO_ARTIFACT") or root / "artifacts" / "demo")
    if not (demo / "manifest.json").exists():
        pytest.skip(f"no demo artifact at {demo}; build it (`qwen-edge build demo`) or set QWEN_EDGE_DEMO_ARTIFACT")
    sys.path.insert(0, str(root / "benchmarks"))
    from speculation_tasks import TASKS

    gen = Generator(Artifact.open(demo, verify="size"), max_length=1024)
    ids = ChatSession(gen).prompt([{"role": "user", "content": TASKS["code-edit"]}]).ids
    plain = _tokens(gen, ids, n=300)
    gen.speculator = PromptLookup()
    spec = _tokens(gen, ids, n=300)
    assert spec.token_ids == plain.token_ids and "def validate_config(data):" in spec.text  # the file, quoted
    assert spec.stats.acceptance_rate > 0.6


# -- the default speculation a recipe names (manifest block) and per-request speculation in the server --


def test_recipe_speculation_is_validated():
    from edge.recipe import Speculation

    assert Speculation(lookup=True, draft_tokens=6).draft is None
    for bad in ({}, {"lookup": True, "draft": "x"}, {"lookup": True, "draft_tokens": 17}, {"draft": ""}, {"k": 1}):
        with pytest.raises(ValueError):
            Speculation(**bad)


def test_manifest_speculation_is_the_cli_default_unless_told_otherwise(tiny_artifact, capsys):
    from qwen_edge import cli
    from qwen_edge.contract import SpeculationDefault

    draft = tiny_artifact("qwen2", weights="int4")  # a sibling of the artifacts built below
    lookup_art = tiny_artifact("qwen2", speculation={"lookup": True, "draft_tokens": 6})
    draft_art = tiny_artifact("qwen2", speculation={"draft": draft.name, "draft_tokens": 3})
    assert lookup_art.parent == draft_art.parent == draft.parent
    assert json.loads((lookup_art / "manifest.json").read_text())["speculation"] == {"lookup": True, "draft_tokens": 6}
    assert SpeculationDefault.of(Artifact.open(draft_art).manifest) == SpeculationDefault(False, draft.name, 3)

    def speculator(art, *flags):
        args = cli.build_parser().parse_args(["run", str(art), "hi", *flags])
        return cli._speculator(args, Generator(Artifact.open(art), max_length=64))

    spec = speculator(lookup_art)
    assert isinstance(spec, PromptLookup) and spec.length.start_k == 6
    assert speculator(lookup_art, "--no-lookup") is None
    assert speculator(lookup_art, "--draft-tokens", "2").length.start_k == 2
    assert isinstance(speculator(lookup_art, "--draft", str(draft)), DraftModel)
    spec = speculator(draft_art)
    assert isinstance(spec, DraftModel) and spec.length.start_k == 3
    assert spec.draft.artifact.root.resolve() == draft.resolve()
    assert speculator(draft_art, "--no-draft") is None
    assert isinstance(speculator(draft_art, "--lookup"), PromptLookup)
    # the same greedy text with the manifest's default as without it
    outputs = []
    for flags in ([], ["--no-draft"]):
        assert cli.main(["run", str(draft_art), PROMPT, "--max-new-tokens", "16", "--no-chat-template", *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    # a named draft that is not there: one line saying what to pass
    import shutil

    moved = shutil.copytree(draft_art, draft.parent.parent / "elsewhere-with-draft", dirs_exist_ok=True)
    assert cli.main(["run", str(moved), "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "names the draft" in err and "--draft ARTIFACT" in err and "--no-draft" in err
    assert cli.main(["run", str(moved), "hi", "--max-new-tokens", "2", "--no-draft"]) == 0


def test_malformed_manifest_speculation_is_an_artifact_error():
    from qwen_edge.contract import SpeculationDefault
    from qwen_edge.errors import ArtifactError

    assert SpeculationDefault.of({}) is None
    for bad in ({"lookup": True, "draft": "x"}, {"draft_tokens": 4}, {"lookup": "yes"}, {"lookup": True, "k": 2}, []):
        with pytest.raises(ArtifactError, match="rebuild the artifact"):
            SpeculationDefault.of({"speculation": bad})


def test_server_speculation_per_request(tiny_artifact):
    from qwen_edge.server import RequestError, parse_speculation

    lookup = PromptLookup(k=5)
    assert parse_speculation(None, lookup) is lookup
    assert parse_speculation({"lookup": False}, lookup) is None
    assert parse_speculation({"lookup": True, "draft_tokens": 3}, None).length.start_k == 3
    assert parse_speculation({"draft_tokens": 2}, lookup).length.start_k == 2 and lookup.length.start_k == 5
    target = Generator(Artifact.open(tiny_artifact("qwen2")), max_length=64)
    draft = DraftModel(Generator(Artifact.open(tiny_artifact("qwen2", weights="int4")), max_length=64), target)
    assert parse_speculation({"draft": False}, draft) is None
    assert parse_speculation({"lookup": False}, draft) is draft
    assert parse_speculation({"draft": True, "draft_tokens": 2}, draft).draft is draft.draft
    assert isinstance(parse_speculation({"lookup": True}, draft), PromptLookup)
    bad = [
        ("yes", "must be an object"),
        ({"lookup": 1}, "speculation.lookup"),
        ({"draft_tokens": 17}, "from 1 to 16"),
        ({"draft_tokens": 3}, "needs lookup or a draft model"),
        ({"draft": True}, "serve --draft ARTIFACT"),
        ({"lookup": True, "draft": True}, "exclude each other"),
        ({"ngram": 2}, "speculation.ngram"),
    ]
    for value, message in bad:
        with pytest.raises(RequestError, match=message) as e:
            parse_speculation(value, None)
        assert e.value.status == 400 and e.value.param == "speculation"


def test_server_request_turns_lookup_on_and_off_with_the_same_reply(tiny_artifact):
    import http.client
    import threading

    from qwen_edge.server import ChatServer, Engine

    gen = Generator(Artifact.open(tiny_artifact("qwen2")), max_length=160)
    srv = ChatServer(Engine(gen), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        replies = []
        for speculation in (None, {"lookup": True, "draft_tokens": 4}, {"lookup": False}):
            body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
            if speculation is not None:
                body["speculation"] = speculation
            conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 200
            replies.append(json.loads(response.read())["choices"][0]["text"])
            conn.close()
            used = gen.speculator
            assert isinstance(used, PromptLookup) if speculation and speculation["lookup"] else used is None
    finally:
        srv.shutdown()
        srv.server_close()
    assert replies[0] == replies[1] == replies[2]
