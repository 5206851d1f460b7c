"""Session-wide fixtures: tiny random Qwen models (HF directories and GGUF files), built once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def quiet_builds():
    """Builds, exports and downloads in the tests report nothing (edge.report); a test may make its own
    Reporter current (as `qwen-edge build` does) to see or check what a build prints."""
    from edge import report

    with report.use(report.Reporter(quiet=True)):
        yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory `tiny_model(family="qwen2", tied=False) -> Path` of a tiny HF model directory (cached)."""
    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[tuple[str, bool], Path] = {}

    def make(family: str = "qwen2", tied: bool = False) -> Path:
        key = (family, bool(tied))
        if key not in built:
            built[key] = tiny_models.build_hf_model(root / f"{family}-{'tied' if tied else 'untied'}", family, tied)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model, tmp_path_factory):
    """Factory `tiny_gguf(family="qwen2", tied=False, qtype="F32"|"Q8_0") -> Path` of a tiny GGUF file (cached)."""
    root = tmp_path_factory.mktemp("tiny_gguf")
    built: dict[tuple[str, bool, str], Path] = {}

    def make(family: str = "qwen2", tied: bool = False, qtype: str = "F32") -> Path:
        key = (family, bool(tied), qtype)
        if key not in built:
            name = f"{family}-{'tied' if tied else 'untied'}-{qtype.lower()}.gguf"
            built[key] = tiny_models.write_gguf(tiny_model(family, tied), root / name, qtype)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model) -> Path:
    """Tiny Qwen2 (attention bias), untied lm_head, like Qwen2.5-Coder-0.5B."""
    return tiny_model("qwen2", tied=False)


@pytest.fixture(scope="session")
def tiny_qwen2_tied(tiny_model) -> Path:
    """Tiny Qwen2 with lm_head tied to the embeddings."""
    return tiny_model("qwen2", tied=True)


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model) -> Path:
    """Tiny Qwen3 (q_norm/k_norm, no bias), tied, like Qwen3-0.6B."""
    return tiny_model("qwen3", tied=True)


@pytest.fixture(scope="session")
def tiny_qwen3_untied(tiny_model) -> Path:
    """Tiny Qwen3 with a separate lm_head."""
    return tiny_model("qwen3", tied=False)


@pytest.fixture(scope="session")
def tiny_qwen2_gguf(tiny_gguf) -> Path:
    """`tiny_qwen2` as an F32 GGUF file (tensors equal to the safetensors ones)."""
    return tiny_gguf("qwen2", tied=False)


@pytest.fixture(scope="session")
def tiny_qwen3_gguf(tiny_gguf) -> Path:
    """`tiny_qwen3` as an F32 GGUF file (tensors equal to the safetensors ones)."""
    return tiny_gguf("qwen3", tied=True)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory):
    """Factory `tiny_artifact(family="qwen2", tied=False, weights="fp32", *, context_length=256,
    speculation=None, **precision) -> Path`: a built artifact (cached), all of them in one folder."""
    from edge.pipeline import build
    from edge.recipe import Precision, Recipe

    root = tmp_path_factory.mktemp("tiny_artifacts")
    built: dict[tuple, Path] = {}

    def make(
        family: str = "qwen2",
        tied: bool = False,
        weights: str = "fp32",
        *,
        context_length: int = 256,
        speculation: dict | None = None,
        **precision,
    ) -> Path:
        extra = (context_length, tuple(sorted((speculation or {}).items())))
        key = (family, bool(tied), weights, tuple(sorted(precision.items())), extra)
        if key not in built:
            recipe = Recipe(
                name="tiny",
                source=str(tiny_model(family, tied)),
                context_length=context_length,
                precision=Precision(weights=weights, **precision),
                fidelity={"enabled": False},
                speculation=speculation,
            )
            out = root / f"{family}-{'tied' if tied else 'untied'}-{weights}-{len(built)}"
            built[key] = build(recipe, out=out).out_dir
        return built[key]

    return make
