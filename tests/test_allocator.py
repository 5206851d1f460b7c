"""The size-budgeted allocator (edge.quantize.allocator) on tiny models: budgets hold, the predicted size is
the artifact's bytes, more budget never predicts more loss, unreachable budgets fail early, the manifest
holds the plan."""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edge.check import sensitivity
from edge.graph.plan import weight_plan
from edge.pipeline import build
from edge.quantize import allocator
from edge.recipe import Precision, Recipe, RecipeError, load_recipe
from edge.sources import open_source
from qwen_edge import contract


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory of this module's own (sensitivity measurements, hashes)."""
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("allocator-cache")
        mp.setenv("QWEN_EDGE_CACHE", str(root))
        yield root


def _sizer(path: Path, **precision) -> allocator.Sizer:
    return allocator.Sizer(open_source(str(path)), Precision(**precision), 256)


def _recipe(
    path: Path, mb: float, method: str = "rtn", fidelity: bool = False, read_mb: float | None = None
) -> Recipe:
    return Recipe(
        name="budget",
        source=str(path),
        context_length=256,
        precision=Precision(weights="int4", method=method, max_size_mb=mb, max_read_mb=read_mb),
        fidelity={"enabled": fidelity, "max_tokens": 64},
        overrides={"fidelity_threshold": {"max_kl": 100.0}},  # a random tiny model is far from int4-friendly
    )


def _tokenizer_files(path: Path) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        open_source(str(path)).write_tokenizer(Path(tmp))
        return [p.name for p in Path(tmp).iterdir()]


@pytest.mark.parametrize(
    "family,tied,method,fidelity", [("qwen2", False, "rtn", False), ("qwen3", True, "gptq", True)]
)
def test_budget_holds_and_the_prediction_is_the_artifacts_bytes(
    cache, tiny_model, tmp_path, family, tied, method, fidelity
):
    path = tiny_model(family, tied)
    budget = _sizer(path).smallest() * 1.35 / 1e6  # between the smallest and the largest mix
    out = build(_recipe(path, budget, method, fidelity), out=tmp_path / "a").out_dir
    manifest = json.loads((out / contract.MANIFEST).read_text())
    plan = manifest["allocation"]
    files = manifest["files"]
    written = files[contract.MODEL_DATA_FILE]["size"] + sum(files[f]["size"] for f in _tokenizer_files(path))
    assert plan["predicted_bytes"] == written <= plan["budget_bytes"] == int(budget * 1e6)
    storages = {t["storage"] for t in plan["tensors"].values()}
    assert len(storages) > 1, storages  # a mixed plan, not one storage everywhere
    groups = sensitivity.linear_groups(2) + [allocator.TABLES]
    assert sorted(plan["tensors"]) == sorted(groups)
    assert plan["predicted_mean_kl"] == pytest.approx(sum(t["predicted_kl"] for t in plan["tensors"].values()))
    if fidelity:
        assert plan["measured_mean_kl"] == manifest["fidelity"]["overall"]["mean_kl"] > 0
    else:
        assert plan["measured_mean_kl"] is None


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_a_bigger_budget_never_predicts_more_loss(cache, tiny_model, family, tied):
    path = tiny_model(family, tied)
    sizer = _sizer(path)
    kl = sensitivity.measure(open_source(str(path)))["kl"]
    smallest = sizer.smallest()
    largest = sizer.size(sizer.plan(dict.fromkeys(sizer.groups, "int8-b32"), "int8-b32/int8-b32"))
    losses = []
    for budget in range(smallest, largest + 1, max(1, (largest - smallest) // 40)):
        allocation = allocator.allocate(sizer, kl, budget)
        assert allocation.predicted_bytes <= budget
        assert allocation.predicted_bytes == sizer.size(allocation.plan)
        losses.append(allocation.predicted_kl)
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] / 10  # int8 everywhere is far better than the smallest int4 mix
    # the optimum of a small case equals brute force over every mix of two groups
    weights, losses = [[10, 30], [5, 25]], [[1.0, 0.2], [0.5, 0.1]]
    assert allocator._knapsack(weights, losses, 35) == [1, 0]  # b+c: 0.7 (a+d: 1.1, a+c: 1.5)
    assert allocator._knapsack(weights, losses, 34) == [0, 0]  # only a+c fits


def test_two_budgets_find_the_optimum_where_one_is_slack_and_always_hold():
    """Against brute force over every mix of small random cases: with the size budget slack the read-budgeted
    plan is the optimum; with both binding it holds both and is near it."""
    rng = np.random.default_rng(0)
    gaps = []
    for case in range(60):
        groups = []
        for g in range(5):
            size = rng.integers(10, 60, 3)
            groups.append(
                (
                    f"g{g}",
                    [
                        allocator.Option(
                            f"o{i}", int(size[i]), float(rng.random()), int(size[i] * rng.uniform(0.3, 1.0))
                        )
                        for i in range(3)
                    ],
                )
            )
        mixes = list(itertools.product(*(opts for _, opts in groups)))
        read_cap = int(np.median([sum(o.read for o in m) for m in mixes]))
        size_cap = 10**6 if case % 2 == 0 else int(np.median([sum(o.bytes for o in m) for m in mixes]))
        fits = [m for m in mixes if sum(o.bytes for o in m) <= size_cap and sum(o.read for o in m) <= read_cap]
        choices = allocator._choose(groups, size_cap, read_cap)
        if not fits:
            assert choices is None
            continue
        optimum = min(sum(o.loss for o in m) for m in fits)
        got = sum(o.loss for o in choices.values())
        assert sum(o.bytes for o in choices.values()) <= size_cap and sum(o.read for o in choices.values()) <= read_cap
        if size_cap == 10**6:
            assert got == pytest.approx(optimum), case
        gaps.append(got / optimum - 1)
    assert np.mean(gaps) < 0.05, gaps


def test_a_budget_too_small_fails_before_any_weight_is_read(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    path = tiny_model("qwen2", False)
    smallest = _sizer(path).smallest()
    with pytest.raises(allocator.BudgetError, match=rf"reaches \({smallest / 1e6:.3f} MB"):
        build(_recipe(path, (smallest - 1) / 1e6), out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "cache" / "sensitivity").exists()  # nothing was measured


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_read_budget_holds_and_is_what_a_decode_step_of_the_artifact_reads(cache, tiny_model, tmp_path):
    path = tiny_model("qwen2", False)  # untied: the embedding's rows are gathered, lm_head is read whole
    sizer = _sizer(path)
    kl = sensitivity.measure(open_source(str(path)))["kl"]
    budget = int(sizer.smallest() * 1.35)
    free = allocator.allocate(sizer, kl, budget)
    least = sizer.least_read()
    assert least < free.predicted_read_bytes  # room to ask for less
    losses = []
    for fraction in (1.0, 0.75, 0.5, 0.25, 0.0):
        read_budget = int(least + fraction * (free.predicted_read_bytes - least))
        capped = allocator.allocate(sizer, kl, budget, read_budget)
        assert capped.predicted_read_bytes == sizer.read(capped.plan) <= read_budget
        assert capped.predicted_bytes <= budget
        losses.append(capped.predicted_kl)
    assert losses[0] == pytest.approx(free.predicted_kl)
    assert all(b >= a - 1e-12 for a, b in zip(losses, losses[1:])), losses  # less read never predicts less loss
    assert losses[-1] > losses[0]
    # built: the manifest's read is what benchmarks/bytes_per_token.py counts on the artifact
    read_mb = (least + (free.predicted_read_bytes - least) // 2) / 1e6
    out = build(_recipe(path, budget / 1e6, read_mb=read_mb), out=tmp_path / "a").out_dir
    plan = json.loads((out / contract.MANIFEST).read_text())["allocation"]
    counted = _bench_module("bytes_per_token").bytes_per_token(out, 1)
    assert plan["predicted_read_bytes"] == counted["weights"] <= plan["read_budget_bytes"] == int(read_mb * 1e6)
    assert counted["gathered_tables"] > 0


@pytest.mark.parametrize("family,tied", [("qwen2", False), ("qwen3", True)])
def test_lm_head_int8_rows_are_sized_exactly_whichever_rows_are_ranked_first(
    cache, tiny_model, tmp_path, family, tied
):
    path = tiny_model(family, tied)
    precision = Precision(weights="int4", method="rtn", symmetric=False, lm_head_int8_rows=100)
    sizer = allocator.Sizer(open_source(str(path)), precision, 256)
    plan = weight_plan(precision, open_source(str(path)).config)  # the rows are named only at export
    recipe = Recipe(
        name="rows", source=str(path), context_length=256, precision=precision, fidelity={"enabled": False}
    )
    out = build(recipe, out=tmp_path / "a").out_dir
    files = json.loads((out / contract.MANIFEST).read_text())["files"]
    written = files[contract.MODEL_DATA_FILE]["size"] + sum(files[f]["size"] for f in _tokenizer_files(path))
    assert sizer.size(plan) == written
    assert sizer.read(plan) == _bench_module("bytes_per_token").bytes_per_token(out, 1)["weights"]


def test_a_read_budget_below_the_least_read_fails_before_any_weight_is_read(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_EDGE_CACHE", str(tmp_path / "cache"))
    path = tiny_model("qwen2", False)
    sizer = _sizer(path)
    least = sizer.least_read()
    with pytest.raises(allocator.BudgetError, match=rf"reads \({least / 1e6:.3f} MB.*raise max_read_mb"):
        build(_recipe(path, sizer.smallest() * 2 / 1e6, read_mb=(least - 1) / 1e6), out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    assert not (tmp_path / "cache" / "sensitivity").exists()


@pytest.mark.parametrize(
    "extra,message",
    [
        ("", "use weights int4 with method rtn or gptq"),  # the profile's method: mixed
        ("  method: rtn\n  lm_head_int8_rows: 16\n", "remove int8_layers, lm_head_int8_rows"),
        ("  method: rtn\n  embedding: int8\n", "remove int8_layers, lm_head_int8_rows, embedding and lm_head"),
        ("  method: rtn\nbackend: olive\n", "sizes qwen-edge's CPU graph"),
    ],
)
def test_recipe_checks_of_max_size_mb(tmp_path, extra, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsource: ./model\nprecision:\n  max_size_mb: 400\n{extra}")
    with pytest.raises(RecipeError, match=message):
        load_recipe(recipe)
    recipe.write_text("name: r\nsource: ./model\nprecision:\n  max_size_mb: 0\n  method: rtn\n")
    with pytest.raises(RecipeError, match="max_size_mb"):
        load_recipe(recipe)
    recipe.write_text("name: r\nsource: ./model\nprecision:\n  max_read_mb: 300\n  method: rtn\n")
    with pytest.raises(RecipeError, match="max_read_mb is a second budget of the allocator: set max_size_mb too"):
        load_recipe(recipe)
