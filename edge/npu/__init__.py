"""Ahead-of-time NPU compilation of the static graphs (Qualcomm QNN HTP: `qnn`)."""
