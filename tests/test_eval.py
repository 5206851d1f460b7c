"""`qwen-edge eval` repeats the build's fidelity check on the finished artifact: the same runner, the
same profile and token budget, so the same numbers and the same threshold failure; and the scorer the
two share gives transformers fp32's logits on every KV-cache layout."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from edge.artifact.manifest import file_table
from edge.check.fidelity import FidelityError, scorer
from edge.pipeline import build
from edge.recipe import load_recipe
from qwen_edge import cli
from qwen_edge.artifact import Artifact
from qwen_edge.generator import Generator

IDS = [3, 17, 92, 45, 8, 250, 33, 71, 19, 5, 140, 66, 28, 9, 201, 77, 12, 58]


def _recipe(tmp_path, model, name: str, extra: str = "") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\nsource: {model}\ncontext_length: 256\n"
        "precision: {weights: int8, method: rtn, embedding: same, lm_head: same}\nfidelity: {max_tokens: 96}\n" + extra
    )
    return str(path)


def _eval(capsys, artifact) -> dict:
    capsys.readouterr()  # what the build printed
    assert cli.main(["eval", str(artifact), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_scorer_equals_transformers_on_shared_growing_and_chunked_runs(family, tiny_model, tiny_artifact, tmp_path):
    tied = family == "qwen3"
    art = Artifact.open(tiny_artifact(family, tied=tied))
    with torch.no_grad():
        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model(family, tied), torch_dtype=torch.float32)
        expected = hf(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(scorer(art)(IDS), expected, atol=1e-4, rtol=0)
    chunked = Generator(art, prefill_chunk=5)
    np.testing.assert_allclose(chunked.logits(IDS), expected, atol=1e-4, rtol=0)
    growing = tmp_path / "growing"
    shutil.copytree(art.root, growing)
    cfg = json.loads((growing / "genai_config.json").read_text())
    cfg["search"]["past_present_share_buffer"] = False
    (growing / "genai_config.json").write_text(json.dumps(cfg))
    manifest = json.loads((growing / "manifest.json").read_text())
    manifest["files"] = file_table(growing)
    (growing / "manifest.json").write_text(json.dumps(manifest))
    grown = Generator(Artifact.open(growing), prefill_chunk=7)
    assert type(grown.runner.cache).__name__ == "GrowingKVCache"
    np.testing.assert_allclose(grown.logits(IDS), expected, atol=1e-4, rtol=0)


def test_eval_gives_the_numbers_the_build_recorded(tiny_qwen2, tmp_path, capsys):
    result = build(load_recipe(_recipe(tmp_path, tiny_qwen2, "native")), out=tmp_path / "art")
    again = _eval(capsys, result.out_dir)
    recorded = result.manifest["fidelity"]
    assert again["overall"] == pytest.approx(recorded["overall"], rel=1e-6)
    assert again["languages"].keys() == recorded["languages"].keys()
    assert again["greedy"] == recorded["greedy"]


def test_eval_of_a_plain_graph_artifact_gives_the_numbers_the_build_recorded(tiny_gguf, tmp_path, capsys):
    pytest.importorskip("olive")
    model = tiny_gguf("qwen3")  # a GGUF source: Olive gets the fp32 Hugging Face copy the build writes
    recipe = _recipe(tmp_path, model, "olive", "backend: olive\n")
    result = build(load_recipe(recipe), out=tmp_path / "art")
    assert Artifact.open(result.out_dir).layout.kv_cache == "growing"
    again = _eval(capsys, result.out_dir)
    assert again["overall"] == pytest.approx(result.manifest["fidelity"]["overall"], rel=1e-6)
    assert again["greedy"] == result.manifest["fidelity"]["greedy"]


def test_eval_fails_below_the_profile_threshold_as_the_build_does(tiny_qwen2, tmp_path, capsys):
    strict = "overrides: {fidelity_threshold: {max_kl: 1.0e-9}}\n"
    with pytest.raises(FidelityError) as built:
        build(load_recipe(_recipe(tmp_path, tiny_qwen2, "strict", strict)), out=tmp_path / "strict")
    assert not (tmp_path / "strict").exists()
    art = build(load_recipe(_recipe(tmp_path, tiny_qwen2, "lax")), out=tmp_path / "lax").out_dir
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["profile"]["fidelity_threshold"] = {"min_top1": None, "max_kl": 1.0e-9}
    (art / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert cli.main(["eval", str(art)]) == 2
    err = capsys.readouterr().err
    assert f"qwen-edge: error: {built.value}" in err
