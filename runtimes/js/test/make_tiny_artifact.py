"""Build the tiny random Qwen artifacts the JS runtime tests run on (tests/tiny_models.py + edge.build).

Usage: python make_tiny_artifact.py OUT_DIR  -> prints a JSON object {name: artifact path}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))

import tiny_models  # noqa: E402
from edge.build import build  # noqa: E402
from edge.recipe import Precision, Recipe  # noqa: E402

VARIANTS = {  # name -> (family, tied, weights)
    "qwen2-fp32": ("qwen2", False, "fp32"),
    "qwen3-int4": ("qwen3", True, "int4"),
}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, (family, tied, weights) in VARIANTS.items():
        model = tiny_models.build_hf_model(out / f"hf-{family}-{'tied' if tied else 'untied'}", family, tied)
        recipe = Recipe(name="tiny", source=str(model), context_length=256,
                        precision=Precision(weights=weights), fidelity={"enabled": False})
        built[name] = str(build(recipe, out=out / name, progress=False).out_dir)
    print(json.dumps(built))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
