"""Checks before heavy work (edge/check/preflight.py): provider, backend, memory budget, disk space."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from edge import pipeline
from edge.check import preflight
from edge.config import QwenConfig
from edge.graph.plan import weight_plan
from edge.recipe import Precision, Recipe, load_recipe, recipe_profile
from qwen_edge.cli import main

# Qwen2.5-3B-Instruct's shape (config.json)
QWEN25_3B = QwenConfig(
    family="qwen2",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_layers=36,
    num_heads=16,
    num_kv_heads=2,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)


@pytest.fixture
def no_source(monkeypatch):
    """Opening the source is the first heavy step: a build that reaches it fails the test."""

    def refuse(spec):
        raise AssertionError(f"the build opened {spec} before its checks failed")

    monkeypatch.setattr(pipeline, "open_source", refuse)


def _one_line(capsys, argv, *needles) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qwen-edge: error: "), err
    for needle in needles:
        assert needle in err, err


def test_qnn_recipe_without_onnxruntime_qnn_fails_before_any_work(no_source, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # as if onnxruntime-qnn were not installed
    out = tmp_path / "npu"
    argv = ["build", "qwen2.5-coder-0.5b-instruct-qnn", "--out", str(out)]
    _one_line(capsys, argv, "compiles for the QNN NPU", "pip install onnxruntime-qnn", "nothing was built")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_backend_package_fails_before_any_work(no_source, tmp_path, capsys):
    from edge.backends import BackendMissingError, optimum

    try:
        optimum.check_installed()
        pytest.skip("optimum-onnx is installed in this environment (.venv-optimum)")
    except BackendMissingError:
        pass
    _one_line(capsys, ["build", "demo-optimum-int4", "--out", str(tmp_path / "o")], "pip install 'qwen-edge[optimum]'")
    assert not list(tmp_path.iterdir())


def test_memory_budget_is_checked_against_the_model_size(tmp_path):
    recipe = Recipe(
        name="big", source="x.gguf", profile="cpu-arm64", context_length=4096, precision=Precision(weights="int8")
    )
    with pytest.raises(preflight.PreflightError, match=r"over the 3072 MB memory budget of profile cpu-arm64") as e:
        preflight.check_resources(recipe, recipe_profile(recipe), QWEN25_3B, tmp_path / "out")
    assert "\n" not in str(e.value)
    small = recipe.model_copy(update={"precision": Precision(weights="int4")})
    n = preflight.check_resources(small, recipe_profile(small), QWEN25_3B, tmp_path / "out")
    assert 1500 << 20 < n.weight_bytes < 2000 << 20  # 3.09 B parameters at ~4.6 bits


def test_disk_space_is_checked_before_export(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    layers = int(free / 50e6) + 10  # each Qwen2.5-3B-shaped layer is ~50 MB in int4: more than the disk holds
    huge = QwenConfig(**{**QWEN25_3B.__dict__, "num_layers": layers})
    recipe = Recipe(
        name="huge",
        source="x.gguf",
        context_length=256,
        precision=Precision(weights="int4"),
        overrides={"memory_budget_mb": 1 << 40},
    )
    with pytest.raises(preflight.PreflightError, match=r"MB of disk in .* free; free up space or pass --out"):
        preflight.check_resources(recipe, recipe_profile(recipe), huge, tmp_path / "deep" / "out")


def test_weight_estimate_matches_a_built_artifact(tiny_artifact, tiny_model):
    """The estimate covers the quantized matrices; a tiny model's norms and biases are a few percent."""
    from edge.sources import open_source

    art = Path(tiny_artifact("qwen2", weights="int4"))
    config = open_source(str(tiny_model("qwen2"))).config
    estimate = preflight.weight_bytes(weight_plan(Precision(weights="int4"), config), config)
    actual = (art / "model.onnx.data").stat().st_size
    assert 0.85 * actual < estimate <= actual


# the shapes of the models the shipped recipes build (their config.json): hidden, MLP, layers, heads, KV heads
SHAPES = {
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2),
    "qwen2.5-coder-0.5b": (896, 4864, 24, 14, 2),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2),
    "qwen2.5-coder-1.5b": (1536, 8960, 28, 12, 2),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2),
    "qwen3-0.6b": (1024, 3072, 28, 16, 8),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8),
}


def test_shipped_recipes_pass_their_memory_budget():
    """No shipped recipe is refused by its own profile."""
    recipes = sorted(Path(pipeline.__file__).parent.parent.joinpath("recipes").glob("*.yaml"))
    assert len(recipes) >= 20
    for path in recipes:
        recipe = load_recipe(str(path))
        model = "qwen2.5-coder-0.5b" if recipe.name.startswith("demo") else recipe.name.rsplit("-instruct", 1)[0]
        model = model.rsplit("-int", 1)[0].rsplit("-qnn", 1)[0]
        hidden, mlp, layers, heads, kv = SHAPES[model]
        config = QwenConfig(
            family=model.split("-")[0].split(".")[0],
            vocab_size=151936,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=128 if model.startswith("qwen3") else hidden // heads,
            rms_norm_eps=1e-6,
            rope_theta=1e6,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
        )
        profile = recipe_profile(recipe)
        assert preflight.needs(recipe, profile, config).device_bytes <= profile.memory_budget_mb << 20, recipe.name
