"""The speculative-decoding tasks of `benchmarks/run.py --speculation`: one user message each.

- code-edit: repeat a 40-line file with one rename (the answer quotes its context: drafts pay off),
- summarise: summarise a given text (part of the answer quotes it),
- chat: an open-ended question (nothing to quote: speculation should cost little and gain little).
"""

from __future__ import annotations

CODE_FILE = '''import json
from pathlib import Path


def load_config(path):
    """Read a JSON config file and fill in defaults."""
    data = json.loads(Path(path).read_text())
    data.setdefault("name", "app")
    data.setdefault("port", 8080)
    data.setdefault("debug", False)
    return data


def save_config(path, data):
    """Write the config back, sorted and indented."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True))


def merge_config(base, override):
    """Override keys of base with those of override, recursively for dicts."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def validate_config(data):
    """Raise ValueError when a required key is missing or has the wrong type."""
    if not isinstance(data.get("name"), str):
        raise ValueError("name must be a string")
    if not isinstance(data.get("port"), int) or not 0 < data["port"] < 65536:
        raise ValueError("port must be an integer between 1 and 65535")
    if not isinstance(data.get("debug"), bool):
        raise ValueError("debug must be true or false")
    return data
'''

TEXT = """The town of Hallstatt sits on the western shore of a narrow alpine lake, squeezed between the water and a
steep mountainside. For more than seven thousand years people have mined salt in the mountain above it, and the
prehistoric graves found near the mine gave their name to a whole period of the European Iron Age. Until the
late nineteenth century the village could be reached only by boat or by a narrow path; a road along the lake was
cut into the rock in 1890. Today fewer than eight hundred people live there, but close to a million visitors
arrive every year, most of them for a few hours. The crowds bring money to the shops and hotels, and they also
bring traffic, noise and rising rents that push young families out. The town council has limited the number of
tour buses, introduced time slots for coaches and asked visitors to keep their voices down in the residential
lanes. Some residents want stricter limits, others fear for the businesses that depend on day trippers. The
debate in Hallstatt is one that many small places with famous views now face: how to share a beautiful place
without losing the life that made it worth visiting."""

TASKS = {
    "code-edit": "Rename the function merge_config to merge_configs everywhere in this file and output the whole "
    "file, nothing else:\n\n```python\n" + CODE_FILE + "```",
    "summarise": "Summarise the following text in five sentences, keeping its key facts and figures:\n\n" + TEXT,
    "chat": "Explain to a beginner why the sky is blue, with an everyday comparison.",
}
