"""OpenVINO artifacts on a tiny Qwen2: the static QDQ graphs built, scored against fp32 and run with every
node on the OpenVINO provider (its CPU device). The build-and-run tests need onnxruntime-openvino, which
replaces onnxruntime: they run in its own venv (``bash scripts/setup.sh openvino``, then
``.venv-openvino/bin/python -m pytest tests/test_openvino.py``) and skip elsewhere."""

import json
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

from edge.recipe import load_profile
from qwen_edge.artifact import Artifact
from qwen_edge.contract import STATIC_GRAPHS
from qwen_edge.errors import QwenEdgeError

ROOT = Path(__file__).resolve().parents[1]
OPENVINO = "OpenVINOExecutionProvider"
needs_openvino = pytest.mark.skipif(
    OPENVINO not in ort.get_available_providers(),
    reason="onnxruntime-openvino is not installed here: bash scripts/setup.sh openvino, then run this file "
    "with .venv-openvino/bin/python -m pytest",
)


def test_openvino_profiles_are_static_and_name_their_device():
    cpu, npu = load_profile("openvino-cpu"), load_profile("openvino-npu")
    assert (cpu.provider_options["device_type"], npu.provider_options["device_type"]) == ("CPU", "NPU")
    assert cpu.graph == npu.graph == "static" and cpu.ort_provider == OPENVINO


def test_openvino_with_dynamic_graphs_is_refused(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: p\ndescription: d\nmemory_budget_mb: 10\nexecution_provider: openvino\n")
    with pytest.raises(QwenEdgeError, match="openvino execution provider runs static graphs only"):
        load_profile(str(bad))


@pytest.mark.skipif(OPENVINO in ort.get_available_providers(), reason="this onnxruntime has OpenVINO")
def test_a_build_scored_on_openvino_without_it_stops_before_exporting(tiny_qwen2, tmp_path):
    from edge.pipeline import build
    from edge.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nsource: {tiny_qwen2}\nprofile: openvino-cpu\ncontext_length: 256\n")
    with pytest.raises(QwenEdgeError, match="build with --no-eval here") as info:
        build(load_recipe(recipe), out=tmp_path / "art")
    assert "\n" not in str(info.value) and not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def openvino_artifact(tiny_qwen2, tmp_path_factory) -> Path:
    """A tiny OpenVINO artifact, built without the fidelity check (that needs the OpenVINO provider). In the
    openvino venv, whose onnxruntime-openvino 1.24 ships older quantization tools, the dev venv builds it."""
    tmp = tmp_path_factory.mktemp("openvino")
    recipe, out = tmp / "tiny-openvino.yaml", tmp / "art"
    recipe.write_text(
        f"name: tiny-openvino\nsource: {tiny_qwen2}\nprofile: openvino-cpu\ncontext_length: 256\n"
        "overrides: {chunk: 16}\nfidelity: {max_tokens: 128}\n"
    )
    if OPENVINO not in ort.get_available_providers():
        from edge.pipeline import build
        from edge.recipe import load_recipe

        return build(load_recipe(recipe), out=out, evaluate=False).out_dir
    dev = ROOT / ".venv" / "bin" / "python"
    if not dev.is_file():
        pytest.skip("the dev venv builds OpenVINO artifacts: bash scripts/setup.sh")
    done = subprocess.run(
        [str(dev), "-m", "qwen_edge", "build", str(recipe), "--out", str(out), "--no-eval", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_build_writes_the_qdq_graphs_for_openvino(openvino_artifact):
    manifest = json.loads((openvino_artifact / "manifest.json").read_text())
    files = sorted(p.name for p in openvino_artifact.iterdir())
    assert {"prefill.onnx", "prefill.onnx.data", "decode.onnx", "decode.onnx.data", "tokenizer.json"} <= set(files)
    assert not any(f.startswith(".") or f.endswith(".bin") for f in files)  # no fp32 leftovers, no QNN binaries
    assert manifest["profile"]["execution_provider"] == "openvino"
    assert manifest["static"]["chunk"] == 16 and manifest["static"]["weight_bits"] == 8


@needs_openvino
def test_every_node_runs_on_openvino(openvino_artifact):
    from qwen_edge.generator import Generator
    from qwen_edge.session import create_session

    artifact = Artifact.open(openvino_artifact)
    for g in STATIC_GRAPHS:
        # CPU fallback is disabled for OpenVINO: the session loads only if OpenVINO takes every node
        session = create_session(artifact.path(f"{g}.onnx"), artifact.profile)
        assert session.get_providers()[0] == OPENVINO
    # the same QDQ graphs on onnxruntime's CPU provider pick the same tokens
    ids = list(range(3, 40))
    on_openvino = Generator(artifact).logits(ids)
    on_cpu = Generator(Artifact(artifact.root, {**artifact.manifest, "profile": {}})).logits(ids)
    assert (on_openvino.argmax(-1) == on_cpu.argmax(-1)).mean() >= 0.9


@needs_openvino
def test_cli_runs_and_eval_scores_against_fp32(openvino_artifact, capsys):
    from qwen_edge import cli

    out = str(openvino_artifact)
    assert cli.main(["run", out, "Hello", "--max-new-tokens", "4", "--no-think"]) == 0
    assert "4 new" in capsys.readouterr().err
    assert cli.main(["eval", out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["overall"]["tokens"] > 100 and result["overall"]["mean_kl"] < 0.1
    assert result["overall"]["top1_agreement"] > 0.8
