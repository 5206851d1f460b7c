"""The runtime as aarch64 (qemu-user, scripts/arm64) gives the x86-64 run's greedy tokens on tiny artifacts.

The first run sets up the cached sysroot (scripts/arm64/setup.sh: a few minutes on a fresh machine);
later runs reuse it.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / "scripts" / "arm64" / "python"

pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(
        sys.platform != "linux" or platform.machine() != "x86_64" or not shutil.which("apt-get"),
        reason="the arm64 harness emulates aarch64 on an x86-64 Debian/Ubuntu host",
    ),
]

# Run by both interpreters over every artifact given: the machine, greedy tokens after a prompt, and every
# position's logits. One aarch64 process for all artifacts: starting Python and onnxruntime emulated is slow.
GREEDY = """
import json, platform, sys
from qwen_edge.artifact import Artifact
from qwen_edge.generator import Generator
out = []
for path in sys.argv[1:]:
    gen = Generator(Artifact.open(path))
    prompt = [3, 17, 42, 5, 99, 8, 64, 21]
    tokens = []
    gen.generate(prompt, max_new_tokens=12, stop_token_ids=(), on_token=lambda t: tokens.append(int(t))).read()
    out.append({"machine": platform.machine(), "tokens": tokens, "logits": gen.logits(prompt + tokens).tolist()})
print(json.dumps(out))
"""
CASES = {"qwen2-int4": ("qwen2", False, "int4"), "qwen3-int8": ("qwen3", True, "int8")}


def run(python: list[str], artifacts: list[Path]) -> list[dict]:
    out = subprocess.run([*python, "-c", GREEDY, *map(str, artifacts)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_aarch64_greedy_matches_x86(tiny_artifact):
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "arm64" / "setup.sh")], capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr[-2000:]
    artifacts = [tiny_artifact(family, tied=tied, weights=weights) for family, tied, weights in CASES.values()]
    x86, arm = run([sys.executable], artifacts), run([str(PYTHON)], artifacts)
    for case, a, b in zip(CASES, arm, x86):
        assert (b["machine"], a["machine"]) == ("x86_64", "aarch64")
        assert a["tokens"] == b["tokens"], case
        got, want = np.asarray(a["logits"]), np.asarray(b["logits"])
        # the kernels differ (NEON vs AVX2), the distributions must not
        assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max()), case


def test_accuracy_level_copy(tiny_artifact, tmp_path):
    """fidelity.py --accuracy-level scores a verified copy whose MatMulNBits nodes all carry the level."""
    import importlib.util

    import onnx

    from qwen_edge.artifact import Artifact
    from qwen_edge.generator import Generator

    spec = importlib.util.spec_from_file_location("arm64_fidelity", ROOT / "scripts" / "arm64" / "fidelity.py")
    fidelity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fidelity)
    original = tiny_artifact("qwen2", weights="int4")
    copy = fidelity.with_accuracy_level(original, 1, tmp_path / "level1")
    artifact = Artifact.open(copy, verify="full")
    assert artifact.manifest["profile"]["accuracy_level"] == 1
    graph = onnx.load(copy / "model.onnx", load_external_data=False).graph
    nodes = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all({a.name: a.i for a in n.attribute}["accuracy_level"] == 1 for n in nodes)
    ids = [3, 17, 42, 5, 99, 8, 64, 21]
    level1, level4 = Generator(artifact).logits(ids), Generator(Artifact.open(original)).logits(ids)
    # fp32 activations instead of int8 ones: close, not the same numbers
    assert 0 < np.abs(level1 - level4).max() < 0.05 * np.abs(level4).max()
