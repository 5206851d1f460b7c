"""Recipe backends: the tool that turns the fp32 model into the ONNX graph.

``native`` is qwen-edge's own exporter (edge.graph.decoder / edge.quantize.gptq). ``olive`` and
``optimum`` hand the export (and, where the recipe asks for it, the quantization) to those tools; the
build then normalizes their output into the same artifact (tokenizer, genai_config, licence,
fidelity check, manifest). Each backend module exposes ``check_installed()``,
``describe(recipe, profile)`` and ``export(recipe, profile, model_dir, out_dir) -> dict`` (progress
and logs as the current ``edge.report`` Reporter says).
"""

from __future__ import annotations

from types import ModuleType

from edge.backends.base import BackendMissingError

BACKENDS = ("native", "olive", "optimum")

__all__ = ["BACKENDS", "BackendMissingError", "load_backend"]


def _olive() -> ModuleType:
    from edge.backends import olive

    return olive


def _optimum() -> ModuleType:
    from edge.backends import optimum

    return optimum


# External backend name -> its module, imported only when a recipe asks for it (each pulls its tool in).
_EXTERNAL = {"olive": _olive, "optimum": _optimum}


def load_backend(name: str) -> ModuleType:
    """The backend module for a recipe's ``backend`` value, checked to be installed."""
    if name not in _EXTERNAL:
        raise ValueError(f"no external backend named {name!r}")
    module = _EXTERNAL[name]()
    module.check_installed()
    return module
