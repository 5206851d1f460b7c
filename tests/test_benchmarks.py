"""The benchmark harness's pure parts: statistics, run order, fidelity aggregation, targets, table."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _load("bench_harness", ROOT / "benchmarks" / "harness.py")
synthetic = _load("bench_synthetic", ROOT / "benchmarks" / "synthetic.py")


def test_spread_median_min_max_and_missing_values():
    assert harness.spread([3.0, 1.0, None, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert harness.spread([4, 1])["median"] == 2.5
    assert harness.spread([None, None]) is None


def test_interleave_is_round_robin_over_systems():
    order = harness.interleave(["A", "B", "C"], ["s1", "s2"], 2)
    assert [o[2] for o in order] == ["A", "B", "C"] * 4
    assert [o[1] for o in order[:6]] == ["s1"] * 3 + ["s2"] * 3
    assert [o[0] for o in order] == [0] * 6 + [1] * 6
    # every system meets every scenario once per repetition
    assert sorted(order) == sorted({(r, s, x) for r in range(2) for s in ("s1", "s2") for x in "ABC"})


def test_combine_fidelity_weights_by_positions():
    a = {"top1_agreement": 1.0, "mean_kl": 0.0, "ppl_reference": 2.0, "ppl_artifact": 2.0}
    b = {"top1_agreement": 0.5, "mean_kl": 0.3, "ppl_reference": 8.0, "ppl_artifact": 16.0}
    out = harness.combine_fidelity({"a": (a, 11), "b": (b, 31)})
    assert out["tokens"] == 42
    assert out["top1_agreement"] == pytest.approx((11 * 1.0 + 31 * 0.5) / 42)
    assert out["mean_kl"] == pytest.approx(31 * 0.3 / 42)
    # perplexity: exp of the target-weighted mean log perplexity (10 and 30 targets)
    assert out["ppl_artifact"] == pytest.approx(math.exp((10 * math.log(2) + 30 * math.log(16)) / 40))
    with pytest.raises(ValueError):
        harness.combine_fidelity({})


def test_greedy_prefix_counts_until_first_difference():
    assert harness.greedy_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert harness.greedy_prefix([5], [6]) == 0
    assert harness.greedy_prefix([1, 2, 3], [1, 2, 3]) == 3


def _rows():
    return {
        "ours": {
            "decode_tps": 20.0,
            "ttft_512_ms": 2000.0,
            "artifact_mb": 400.0,
            "peak_rss_mb": 700.0,
            "peak_rss_512_mb": 800.0,
            "mean_kl": 0.05,
            "top1_agreement": 0.91,
            "build_peak_rss_mb": 1000.0,
        },
        "g": {
            "decode_tps": 25.0,
            "ttft_512_ms": 5000.0,
            "artifact_mb": 873.0,
            "peak_rss_mb": 600.0,
            "peak_rss_512_mb": 970.0,
            "mean_kl": 0.2,
            "top1_agreement": 0.8,
            "build_peak_rss_mb": 6400.0,
        },
        "l": {"decode_tps": 16.0},
    }


def test_targets_ratios_and_verdicts():
    t = {x["key"]: x for x in harness.evaluate_targets(_rows(), "ours", {"genai": "g", "llamacpp": "l"})}
    assert t["decode"]["ratio"] == pytest.approx(20 / 16) and t["decode"]["met"] is True
    assert t["ttft512"]["ratio"] == pytest.approx(0.4) and t["ttft512"]["met"] is True
    assert t["size"]["ratio"] == pytest.approx(400 / 873) and t["size"]["met"] is True
    assert t["rss"]["met"] is False  # 700 > 600
    assert t["rss512"]["met"] is True
    assert t["kl"]["ratio"] == pytest.approx(0.25) and t["kl"]["met"] is True
    assert t["top1"]["met"] is True and t["top1"]["anchor"] is None
    assert t["build_rss"]["ratio"] == pytest.approx(1000 / 6400) and t["build_rss"]["met"] is True


def test_targets_limits_are_inclusive_and_missing_anchor_is_not_measured():
    rows = _rows()
    rows["ours"]["ttft_512_ms"] = 2500.0  # exactly 0.5x
    t = {x["key"]: x for x in harness.evaluate_targets(rows, "ours", {"genai": "g", "llamacpp": None})}
    assert t["ttft512"]["met"] is True
    assert t["decode"]["met"] is None and t["decode"]["ratio"] is None
    rows["ours"]["ttft_512_ms"] = 2501.0
    assert {x["key"]: x for x in harness.evaluate_targets(rows, "ours", {"genai": "g"})}["ttft512"]["met"] is False


def test_render_table_and_targets():
    rows = {
        "qwen-edge-int4": {
            "artifact_mb": 412.3,
            "decode": harness.spread([20.0, 22.0, 21.0]),
            "ttft_512": harness.spread([2000.0]),
            "top1_agreement": 0.912,
            "mean_kl": 0.0512,
            "ppl_artifact": 5.5,
            "ppl_reference": 5.0,
        },
        "genai-int4": {"artifact_mb": 873.6},
    }
    md = harness.render_table(rows).splitlines()
    assert md[0].startswith("| system | artifact MB |")
    assert len(md) == 4 and all(line.count("|") == md[0].count("|") for line in md)
    assert "21.00 (20.00–22.00)" in md[2] and "2,000" in md[2] and "0.912" in md[2] and "5.50 (5.00)" in md[2]
    assert md[3].count("—") == len(harness.COLUMNS) - 1
    text = harness.render_targets(harness.evaluate_targets(_rows(), "ours", {"genai": "g", "llamacpp": None}))
    assert "TTFT 512-token prompt <= 0.5x genai: **met** (ours 2,000 vs g 5,000 = 0.40x)" in text
    assert "peak RSS generating (chat prompt) <= 1.0x genai: **missed**" in text
    assert "decode tok/s >= 1.0x llama.cpp: not measured (needs ours and a llamacpp system in the run)" in text


def test_anchor_replies_stop_at_the_limit_an_eos_id_or_a_stop_string():
    common = _load("bench_anchor_common", ROOT / "benchmarks" / "anchors" / "common.py")
    decode = "".join
    stream = list("abc```\nde")
    assert common.greedy_reply(iter(stream), decode, 3, [], set()) == list("abc")
    assert common.greedy_reply(iter(stream), decode, 20, [], {"c"}) == list("ab")
    assert common.greedy_reply(iter(stream), decode, 20, ["```\n"], set()) == list("abc```\n")
    assert common.greedy_reply(iter(stream), decode, 20, [], set()) == stream  # the stream ends first


def test_task_rates_table_counts_items_gained_and_lost_against_the_reference():
    def o(*passed):
        return dict(zip(("a", "b", "ref"), ({"passed": p} for p in passed)))

    items = {"x": {"1": o(True, False, True), "2": o(True, True, False)}, "y": {"3": o(False, False, True)}}
    result = {
        "suites": {
            "x": {"items": 2, "a": 1.0, "b": 0.5, "ref": 0.5},
            "y": {"items": 1, "a": 0.0, "b": 0.0, "ref": 1.0},
        },
        "overall": {"items": 3, "a": 2 / 3, "b": 1 / 3, "ref": 2 / 3},
        "items": items,
    }
    table = harness.render_task_rates(result, "ref").splitlines()
    assert table[0] == "| suite | items | a | b | ref |" and table[4] == "| overall | 3 | 66.7 | 33.3 | 66.7 |"
    assert table[5] == "| items vs ref | 3 | +1 / -1 | +1 / -2 |  |"
    assert table[6].startswith("| points vs ref (95 % interval) | | +0.0 (") and "| -33.3 (-100.0 to " in table[6]
    assert len(harness.render_task_rates(result).splitlines()) == 5


def test_divergence_counts_identical_replies_and_departures_per_token_decided():
    reference = {"a": [1, 2, 3, 4], "b": [5, 6], "c": [7, 8, 9], "d": [1]}
    replies = {"a": [1, 2, 3, 4], "b": [5, 0, 0], "c": [7, 8], "d": [1, 2, 3]}
    # a: 4 decisions on the path; b: leaves at its 2nd token; c: stops before the 3rd; d: goes on past the end
    assert harness.divergence(replies, reference) == {"items": 4, "identical": 1, "per_1k_tokens": 1000 * 3 / 11}
    assert harness.divergence(reference, reference)["per_1k_tokens"] == 0.0
    result = {
        "suites": {"x": {"items": 1, "s": 1.0, "ref": 1.0}},
        "overall": {"items": 1, "s": 1.0, "ref": 1.0},
        "items": {"x": {"1": {"s": {"passed": True}, "ref": {"passed": True}}}},
        "divergence": {"s": harness.divergence(replies, reference)},
    }
    table = harness.render_task_rates(result, "ref").splitlines()
    assert table[-2:] == [
        "| replies identical to ref's | 4 | 1 |  |",
        "| leaves ref's path, per 1k tokens | | 272.73 |  |",
    ]


def test_synthetic_shapes_match_qwen25_3b():
    shards = synthetic.tensor_shapes()
    tensors = dict(t for items in shards.values() for t in items)
    assert len(shards) == 1 + math.ceil(36 / synthetic.LAYERS_PER_SHARD)
    assert "lm_head.weight" not in tensors  # tied embeddings
    assert tensors["model.embed_tokens.weight"] == (151936, 2048)
    assert tensors["model.layers.35.self_attn.k_proj.weight"] == (256, 2048)
    assert tensors["model.layers.0.mlp.down_proj.weight"] == (2048, 11008)
    params = sum(math.prod(s) for s in tensors.values())
    assert 3.0e9 < params < 3.2e9  # Qwen2.5-3B: 3.09 B parameters


def test_method_variant_systems_are_valid_recipes(tmp_path, monkeypatch):
    from edge.recipe import load_recipe

    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    monkeypatch.setattr(run, "CACHE", tmp_path)
    variants = [s for s, spec in run.SYSTEMS.items() if "method" in spec]
    assert variants
    for system in variants:
        spec = run.SYSTEMS[system]
        for model in spec["recipe"]:
            recipe = load_recipe(str(run._recipe_path(system, spec, model)))
            assert recipe.precision.method == spec["method"]
            for key, value in spec.get("precision", {}).items():
                assert getattr(recipe.precision, key) == value


def test_allocator_systems_budget_a_fraction_of_the_source_size(tmp_path, monkeypatch):
    from edge.recipe import load_recipe

    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    monkeypatch.setattr(run, "CACHE", tmp_path)
    budgets = {}
    for system in ("qwen-edge-alloc-gguf", "qwen-edge-alloc-0.8gguf"):
        for model in ("0.5b", "1.5b"):
            recipe = load_recipe(str(run._recipe_path(system, run.SYSTEMS[system], model)))
            assert recipe.precision.int8_layers is None and recipe.precision.lm_head_int8_rows == 0
            budgets[system, model] = recipe.precision.max_size_mb
    assert budgets == {
        ("qwen-edge-alloc-gguf", "0.5b"): 491,  # the GGUF: 491,400,064 bytes
        ("qwen-edge-alloc-gguf", "1.5b"): 1117,  # 1,117,320,768 bytes
        ("qwen-edge-alloc-0.8gguf", "0.5b"): 393,
        ("qwen-edge-alloc-0.8gguf", "1.5b"): 893,
    }


def test_every_qwen_edge_system_names_shipped_recipes():
    from edge.recipe import list_recipes

    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    names = set(list_recipes())
    for spec in run.SYSTEMS.values():
        assert set(spec.get("recipe", {}).values()) <= names


def test_prebuilt_pairs_are_checked(tmp_path):
    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    (tmp_path / "manifest.json").write_text("{}")
    ours = ["qwen-edge-int4-b128", "llamacpp"]
    assert run._parse_prebuilt([f"qwen-edge-int4-b128={tmp_path}"], ours, ["1.5b"]) == (
        {"qwen-edge-int4-b128": tmp_path},
        None,
    )
    for pairs, models, needle in (
        ([str(tmp_path)], ["1.5b"], "give SYSTEM=DIR"),
        ([f"llamacpp={tmp_path}"], ["1.5b"], "give SYSTEM=DIR"),  # runs a GGUF, not an artifact
        ([f"qwen-edge-int4={tmp_path}"], ["1.5b"], "give SYSTEM=DIR"),  # not in --systems
        ([f"qwen-edge-int4-b128={tmp_path}"], ["0.5b", "1.5b"], "give one --models"),
        ([f"qwen-edge-int4-b128={tmp_path / 'none'}"], ["1.5b"], "has no manifest.json"),
    ):
        found, error = run._parse_prebuilt(pairs, ours, models)
        assert found == {} and needle in error and "\n" not in error
    assert run.ensure_artifact("qwen-edge-int4-b128", "1.5b", {}, tmp_path, tmp_path)["prebuilt"] is True


def test_a_labelled_run_leaves_latest_md_alone(tmp_path, monkeypatch):
    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    result = {
        "date": "2026-12-01T14:05:00+00:00",
        "machine": {"host": "vm", "cpu": "x", "cores": 2, "memory_gib": 23},
        "command": "python benchmarks/run.py --label layout",
        "load": harness.spread([3.0, 5.0]),
        "nice": 0,
        "reps": 1,
        "label": "layout",
        "models": [],
    }
    path = run.write_outputs(result)
    assert path.name == "layout-20261201T1405-vm.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout-20261201T1405-vm.json", "layout-latest.md"]


def test_draft_system_and_its_artifact_go_together(tmp_path, capsys):
    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    (tmp_path / "manifest.json").write_text("{}")
    for argv, needle in (
        (["--speculation", "--systems", "qwen-edge,qwen-edge-draft"], "go together"),
        (["--speculation", "--systems", "qwen-edge", "--draft-artifact", str(tmp_path)], "go together"),
        (["--speculation", "--systems", "qwen-edge-draft", "--draft-artifact", str(tmp_path / "x")], "manifest.json"),
    ):
        assert run.main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1
    art = run.speculation_cmd("qwen-edge-draft", Path("big"), Path("g"), Path("t"), Path("i"), 3, tmp_path)
    assert art[-3:] == ["--draft", tmp_path, "--no-lookup"]


def test_task_replies_through_the_anchors_grade_as_the_task_check(tiny_model, tiny_artifact, tmp_path, monkeypatch):
    """The benchmark's task-rate path: requests from the suites, our loop's and the fp32 reference's
    `replies` each in its own process, graded by edge.check.tasks; an fp32 artifact replies like its
    reference and like the task check's own in-process loop."""
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from edge.check import tasks
    from qwen_edge.artifact import Artifact

    task_rates = _load("bench_task_rates", ROOT / "benchmarks" / "task_rates.py")
    monkeypatch.setattr(tasks, "MAX_NEW_TOKENS", {"code": 12, "answer": 6})
    shipped = tasks.load_suites
    monkeypatch.setattr(tasks, "load_suites", lambda full=False: {k: v[:1] for k, v in shipped(full).items()})
    model, art = tiny_model("qwen2"), tiny_artifact("qwen2")
    eos = json.loads((model / "config.json").read_text())["eos_token_id"]
    suites = tasks.load_suites()
    reqs = task_rates.requests(AutoTokenizer.from_pretrained(model), eos if isinstance(eos, list) else [eos], suites)
    assert len(reqs["items"]) == 4 and {r["max_new_tokens"] for r in reqs["items"].values()} == {12, 6}
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(reqs))
    replies = {}
    for side, script, target in (("ours", "qwen_edge_anchor.py", art), ("fp32", "transformers_fp32.py", model)):
        out = tmp_path / f"{side}.json"
        cmd = [sys.executable, ROOT / "benchmarks" / "anchors" / script, "replies", "--model", target]
        done = subprocess.run(
            [*map(str, cmd), "--requests", str(path), "--out", str(out)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        replies[side] = json.loads(out.read_text())
    assert replies["ours"] == replies["fp32"] and all(replies["ours"].values())
    result = task_rates.grade(suites, replies, Tokenizer.from_file(str(model / "tokenizer.json")))
    chat = tasks.session(Artifact.open(art))
    direct = tasks.run(
        {"ours": tasks.artifact_generator(chat)}, lambda m: chat.prompt(m, enable_thinking=False), suites
    )
    for name, items in direct["items"].items():
        for item_id, outcome in items.items():
            graded = result["items"][name][item_id]
            assert graded["ours"] == graded["fp32"] == outcome["ours"]
    assert result["overall"]["items"] == 4 and result["overall"]["ours"] == direct["overall"]["ours"]
    table = harness.render_task_rates(result, "fp32")
    assert "| overall | 4 |" in table and "| items vs fp32 | 4 | +0 / -0 |  |" in table
    assert table.endswith("| points vs fp32 (95 % interval) | | +0.0 (+0.0 to +0.0) |  |")


def test_measurement_processes_show_their_progress_and_fail_with_their_last_line(capsys):
    import sys

    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    talk = "import sys, json\nfor i in range(3): print(f'replies {i}/3', file=sys.stderr)\nprint(json.dumps({'n': 3}))"
    assert run._run_json([sys.executable, "-c", talk], "talker", progress=True) == {"n": 3}
    assert capsys.readouterr().err.splitlines() == [f"  talker: replies {i}/3" for i in range(3)]
    assert run._run_json([sys.executable, "-c", talk], "quiet") == {"n": 3} and not capsys.readouterr().err
    with pytest.raises(run.BenchError, match="broken exited with 3: bad input, fix it"):
        fail = "import sys; print('x', file=sys.stderr); print('bad input, fix it', file=sys.stderr); sys.exit(3)"
        run._run_json([sys.executable, "-c", fail], "broken")
    with pytest.raises(run.BenchError, match="sleeper took longer than 0 s"):
        run._run_json([sys.executable, "-c", "import time; time.sleep(30)"], "sleeper", timeout=0.5)


def test_reference_replies_are_cached_per_request(tmp_path):
    """A run that adds items asks the reference only for those; a changed limit is a new request."""
    task_rates = _load("bench_task_rates", ROOT / "benchmarks" / "task_rates.py")
    asked = []

    def replies_of(reqs, keep):
        asked.append(sorted(reqs["items"]))
        return {name: [len(r["ids"])] for name, r in reqs["items"].items()}

    cache = tmp_path / "reference.json"
    one = {"a/1": {"ids": [1, 2], "max_new_tokens": 8, "stops": []}}
    two = {**one, "b/1": {"ids": [3], "max_new_tokens": 8, "stops": ["x"]}}
    assert task_rates.cached_replies({"eos": [0], "items": one}, cache, replies_of) == {"a/1": [2]}
    assert task_rates.cached_replies({"eos": [0], "items": two}, cache, replies_of) == {"a/1": [2], "b/1": [1]}
    assert task_rates.cached_replies({"eos": [0], "items": two}, cache, replies_of) == {"a/1": [2], "b/1": [1]}
    longer = {"a/1": {**one["a/1"], "max_new_tokens": 9}}
    task_rates.cached_replies({"eos": [0], "items": longer}, cache, replies_of)
    assert asked == [["a/1"], ["b/1"], ["a/1"]] and not list(tmp_path.glob("*.partial"))


def test_replies_a_failed_run_had_are_kept_and_a_rerun_asks_only_for_the_rest(tmp_path):
    """An anchor writes each reply to OUT.partial as it goes; what a stopped run had stays in the cache."""
    import json

    common = _load("bench_anchor_common", ROOT / "benchmarks" / "anchors" / "common.py")
    task_rates = _load("bench_task_rates", ROOT / "benchmarks" / "task_rates.py")
    items = {f"s/{i}": {"ids": [i], "max_new_tokens": 4, "stops": []} for i in range(3)}
    (tmp_path / "req.json").write_text(json.dumps({"eos": [0], "items": items}))
    out = str(tmp_path / "out.json")

    def reply_of(ids, limit, stops, eos):
        if ids == [2]:
            raise KeyboardInterrupt  # stopped during the third request
        return [ids[0] + 10]

    with pytest.raises(KeyboardInterrupt):
        common.write_replies(str(tmp_path / "req.json"), out, reply_of)
    partial = json.loads((tmp_path / "out.json.partial").read_text())
    assert partial == {"s/0": [10], "s/1": [11]} and not (tmp_path / "out.json").exists()

    asked, cache = [], tmp_path / "cache.json"

    def stopped(reqs, keep):
        asked.append(sorted(reqs["items"]))
        keep(partial)
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError):
        task_rates.cached_replies({"eos": [0], "items": items}, cache, stopped)

    def rest(reqs, keep):
        asked.append(sorted(reqs["items"]))
        return {name: [99] for name in reqs["items"]}

    got = task_rates.cached_replies({"eos": [0], "items": items}, cache, rest)
    assert got == {"s/0": [10], "s/1": [11], "s/2": [99]} and asked == [["s/0", "s/1", "s/2"], ["s/2"]]
    assert common.write_replies(str(tmp_path / "req.json"), out, lambda *a: [5])["replies"] == 3
    assert json.loads((tmp_path / "out.json").read_text()) == {f"s/{i}": [5] for i in range(3)}
    assert not (tmp_path / "out.json.partial").exists()


def test_a_systems_replies_are_keyed_by_its_artifact_and_the_code_that_runs_it(tmp_path):
    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    art = tmp_path / "art"
    art.mkdir()
    (art / "manifest.json").write_text('{"files": {"model.onnx.data": {"sha256": "a"}}}')
    key = run._replies_key("qwen-edge-int4", {"path": str(art)})
    assert key == run._replies_key("qwen-edge-int4", {"path": str(art)})
    assert key != run._replies_key("qwen-edge-int4-1t", {"path": str(art)})  # another thread count
    (art / "manifest.json").write_text('{"files": {"model.onnx.data": {"sha256": "b"}}}')
    assert key != run._replies_key("qwen-edge-int4", {"path": str(art)})
    assert run._replies_key("llamacpp", {"path": "q.gguf"}) != run._replies_key("llamacpp-1t", {"path": "q.gguf"})


def test_humaneval_problems_grade_their_canonical_solutions_as_passed_and_the_stub_as_failed():
    """All 164 problems through the task check's grader: the canonical solution in a reply passes, a reply
    that restates only the function gets the prompt's imports and helpers, and a reply with no function
    leaves the docstring-only stub, which fails."""
    from edge.check import tasks

    humaneval = _load("bench_humaneval", ROOT / "benchmarks" / "humaneval.py")
    items = humaneval.suite()
    assert len(items) == 164 and len({i["id"] for i in items}) == 164
    for item in items:
        assert tasks.is_code(item) and item["preamble"] in item["prompt"]
        assert tasks.grade(item, f"```python\n{item['solution']}```").passed, item["id"]
    typed = next(i for i in items if i["id"] == "HumanEval/0")  # `from typing import List` in the prompt only
    body = typed["solution"].split("def has_close_elements", 1)[1]
    assert tasks.grade(typed, f"Here:\n```python\ndef has_close_elements{body}```\n").passed
    assert not tasks.grade(typed, "I cannot help with that.").passed


def test_task_rates_refuse_systems_without_replies(capsys):
    run = _load("bench_run", ROOT / "benchmarks" / "run.py")
    assert run.main(["--systems", "optimum-fp32,llamacpp", "--models", "0.5b", "--task-rates"]) == 2
    err = capsys.readouterr().err
    assert "optimum-fp32 cannot answer the task suites" in err and err.count("\n") == 1
