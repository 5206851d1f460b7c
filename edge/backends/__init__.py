"""Recipe backends: the tool that turns the fp32 model into the ONNX graph.

``native`` is qwen-edge's own exporter (edge.graph / edge.gptq). ``olive`` and ``optimum`` hand the
export (and, where the recipe asks for it, the quantization) to those tools; the build then
normalizes their output into the same artifact (tokenizer, genai_config.json, licence, fidelity
check, manifest). Each backend module exposes ``check_installed()``, ``describe(recipe, profile)``
and ``export(recipe, profile, model_dir, out_dir, progress) -> dict``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

BACKENDS = ("native", "olive", "optimum")


def load_backend(name: str) -> ModuleType:
    """The backend module for a recipe's ``backend`` value, checked to be installed."""
    if name not in BACKENDS or name == "native":
        raise ValueError(f"no external backend named {name!r}")
    module = importlib.import_module(f"edge.backends.{name}")
    module.check_installed()
    return module
