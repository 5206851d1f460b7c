"""Property-based fuzzing (hypothesis) of what reads untrusted input: the recipe loader, the manifest and
bundle readers, and the server's request parsing. Whatever comes in: no crash, no 500, one-line errors."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_edge.artifact import FORMAT, FORMAT_VERSION, Artifact
from qwen_edge.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, unpack_bundle, verify_bundle
from qwen_edge.errors import QwenEdgeError
from qwen_edge.generator import Generator
from qwen_edge.server import CHAT_FIELDS, COMPLETION_FIELDS, ChatServer, Engine, Limits, RequestError

# The same examples every run (CI stays reproducible, nothing is written to a .hypothesis folder); set
# QWEN_EDGE_FUZZ_EXAMPLES (and QWEN_EDGE_FUZZ_RANDOM=1) for a longer hunt.
EXAMPLES = int(os.environ.get("QWEN_EDGE_FUZZ_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("QWEN_EDGE_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def one_line(error: Exception) -> None:
    assert isinstance(error, QwenEdgeError), repr(error)
    assert "\n" not in str(error) and str(error).strip(), repr(error)


def _tmpdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="qwen-edge-fuzz-"))


# -- recipes ---------------------------------------------------------------------------------------

PRECISION_KEYS = ["weights", "block_size", "symmetric", "method", "embedding", "lm_head", "lm_head_int8_rows"]
RECIPE_KEYS = ["name", "source", "profile", "context_length", "backend", "precision", "fidelity", "overrides"]
plausible = {
    "weights": st.sampled_from(["int4", "int8", "fp16", "fp32", "int3"]),
    "block_size": st.sampled_from([16, 32, 33, 0, -1]),
    "method": st.sampled_from(["rtn", "gptq", "hqq", "mixed", "dynamic", "kquant"]),
    "profile": st.sampled_from(["cpu-x86_64", "cpu-arm64", "qnn-htp", "nope"]),
    "backend": st.sampled_from(["native", "olive", "optimum", "other"]),
    "context_length": st.sampled_from([256, 4096, 1000, 0, 1 << 40]),
    "source": st.sampled_from(["Qwen/Qwen2.5-0.5B", "./x.gguf", "/abs/dir", "../../etc", "a b c"]),
}


def _value(key: str):
    return (plausible[key] | json_values) if key in plausible else json_values


recipe_dicts = st.fixed_dictionaries(
    {},
    optional={
        **{k: _value(k) for k in RECIPE_KEYS if k != "precision"},
        "precision": st.fixed_dictionaries({}, optional={k: _value(k) for k in PRECISION_KEYS}) | json_values,
        "unknown_key": json_values,
    },
)


@SETTINGS
@given(doc=recipe_dicts | json_values, raw=st.none() | st.text(max_size=200))
def test_recipe_loader_never_crashes(doc, raw):
    from edge.recipe import load_recipe

    path = _tmpdir() / "recipe.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    try:
        load_recipe(path)
    except Exception as e:
        one_line(e)


# -- manifests -------------------------------------------------------------------------------------

FILES = {"model.onnx": b"graph" * 10, "tokenizer.json": b"{}", "tokenizer_config.json": b"{}"}
MODEL = {
    "family": "qwen2",
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 8,
    "vocab_size": 16,
    "context_length": 256,
    "eos_token_ids": [1],
}


def _manifest() -> dict:
    table = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in FILES.items()}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": dict(MODEL), "files": table}


def _mutate(doc, path: list, value):
    """`doc` with the value at `path` (keys/indexes, clipped to what exists) replaced by `value`."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return value
    keys = list(doc) if isinstance(doc, dict) else list(range(len(doc)))
    key = keys[path[0] % len(keys)]
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    out[key] = _mutate(doc[key], path[1:], value)
    return out


paths = st.lists(st.integers(0, 50), max_size=4)


@SETTINGS
@given(
    edits=st.lists(st.tuples(paths, json_values), max_size=3),
    raw=st.none() | st.binary(max_size=200),
    verify=st.sampled_from(["auto", "full", "size", "none"]),
)
def test_manifest_reader_never_crashes(edits, raw, verify):
    root = _tmpdir()
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    doc = _manifest()
    for path, value in edits:
        doc = _mutate(doc, path, value)
    (root / "manifest.json").write_bytes(raw if raw is not None else json.dumps(doc).encode())
    try:
        art = Artifact.open(root, verify=verify, stamp_dir=root / ".stamps")
        art.layout, art.model_path, art.files  # noqa: B018 - what a runner reads next
    except Exception as e:
        one_line(e)


# -- bundles ---------------------------------------------------------------------------------------


def _bundle(entries: dict[str, bytes] | None = None, meta_edits=()) -> bytes:
    """A small valid bundle (or one with other entry names / an edited bundle.json)."""
    files = {"model.onnx": b"graph" * 10, "LICENSE": b"Apache-2.0\n"}
    table = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    manifest = json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "files": table}).encode()
    files["manifest.json"] = manifest
    files.update(entries or {})
    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "target": "desktop",
        "recipe": "tiny",
        "license": {"id": "Apache-2.0", "file": "LICENSE"},
        "files": {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()},
    }
    for path, value in meta_edits:
        meta = _mutate(meta, path, value)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for name, data in sorted({**files, "bundle.json": json.dumps(meta).encode()}.items()):
            zf.writestr(name, data)
    return out.getvalue()


def test_the_fuzzed_bundle_is_valid_to_begin_with():
    path = _tmpdir() / "b.zip"
    path.write_bytes(_bundle())
    assert verify_bundle(path).files == 4


def _check_bundle(data: bytes) -> None:
    root = _tmpdir()
    path = root / "b.zip"
    path.write_bytes(data)
    try:
        verify_bundle(path)
    except Exception as e:
        one_line(e)
    dest = root / "out"
    try:
        unpack_bundle(path, dest)
    except Exception as e:
        one_line(e)
    for dirpath, dirnames, filenames in os.walk(root):  # nothing anywhere but the bundle and the unpacked folder
        for name in filenames + dirnames:
            full = os.path.realpath(os.path.join(dirpath, name))
            assert full == str(path) or full.startswith(str(dest.resolve())), full


@SETTINGS
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 10**6),
)
def test_bundle_reader_never_crashes_on_corrupted_bytes(flips, cut):
    data = bytearray(_bundle())
    for at, byte in flips:
        data[at % len(data)] = byte
    _check_bundle(bytes(data[: cut % len(data)] if cut is not None else data))


# separators, NUL, a drive colon, case (K and the Kelvin sign) and NFC (e-acute, e + combining accent) twins
NAME_PARTS = [*"ab./\\:C\0 ~Kk\u00e9\u0301\u212a\u2215", "..", "e"]
hostile_names = st.lists(st.sampled_from(NAME_PARTS), max_size=12).map("".join)


@pytest.mark.filterwarnings("ignore:Duplicate name")  # duplicate entries are among the hostile bundles
@SETTINGS
@given(
    names=st.dictionaries(hostile_names, st.binary(max_size=20), max_size=3),
    meta_edits=st.lists(st.tuples(paths, json_values), max_size=2),
)
def test_bundle_reader_never_crashes_on_hostile_structure(names, meta_edits):
    try:
        data = _bundle(names, meta_edits)
    except (ValueError, TypeError, IndexError):  # zipfile cannot write some names (empty, NUL): no such bundle
        return
    _check_bundle(data)


# -- server request parsing -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    return Engine(Generator(Artifact.open(tiny_artifact("qwen2")), max_length=128))


def _request(fields: frozenset):
    plausible_values = {
        "model": st.sampled_from(["tiny", "other"]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]) | json_values,
                    "content": st.text(max_size=30) | json_values,
                    "tool_calls": json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "prompt": st.text(max_size=30) | json_values,
    }
    optional = {f: plausible_values.get(f, json_values) for f in sorted(fields)}
    return st.fixed_dictionaries({}, optional={**optional, "bogus": json_values}) | json_values


@SETTINGS
@given(chat=_request(CHAT_FIELDS), completion=_request(COMPLETION_FIELDS))
def test_request_parsing_only_answers_4xx(engine, chat, completion):
    for body, prepare in ((chat, engine.prepare), (completion, engine.prepare_completion)):
        if not isinstance(body, dict):
            continue
        try:
            Limits(max_tokens=4).check(body)
            request = prepare(body)
        except RequestError as e:
            assert 400 <= e.status < 500 and "\n" not in e.message, (e.status, e.message)
        else:
            assert isinstance(request, dict) and 1 <= request["max_tokens"] <= 4


@pytest.fixture(scope="module")
def server(engine):
    srv = ChatServer(engine, "127.0.0.1", 0, quiet=True, limits=Limits(max_tokens=2))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


@settings(SETTINGS, max_examples=max(EXAMPLES // 2, 1))
@given(
    body=st.binary(max_size=100) | _request(CHAT_FIELDS).map(lambda b: json.dumps(b).encode()),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/x", "/v1/models/tiny"]),
    method=st.sampled_from(["GET", "POST", "PUT", "OPTIONS", "HEAD"]),
)
def test_http_never_answers_500(server, body, path, method):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status < 500, (resp.status, method, path, body[:200])
