"""qwen-edge's build toolkit: recipe -> int4/int8 ONNX artifact (see docs/ARCHITECTURE.md for the module map)."""

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"  # calibration and evaluation texts, licences, integration notes
