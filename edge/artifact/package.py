"""Package an artifact into one versioned, deterministic zip bundle for android, ios, desktop or web.

Entries are stored (the int4/int8 weights barely compress, and stored entries can be read or
memory-mapped in place), sorted, with fixed timestamps and modes: packaging the same artifact twice
gives identical bytes. `qwen_edge.bundle.verify_bundle` checks a bundle offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from edge.artifact.licenses import LicenseFacts, choose
from qwen_edge import __version__
from qwen_edge.artifact import Artifact
from qwen_edge.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BUNDLE_JSON, TARGETS
from qwen_edge.contract import (
    ALIGNMENT,
    BUNDLE_SIGNATURE,
    LICENSE_FILE,
    MANIFEST,
    MODEL_DATA_FILE,
    MODEL_FILE,
)
from qwen_edge.errors import QwenEdgeError

INTEGRATION_FILE = "INTEGRATION.md"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 20

# Per-file and total byte limits each target's loader imposes.
# web: Chrome's largest ArrayBuffer (0x7fe00000 bytes) bounds each fetched file, and 32-bit
#      WebAssembly memory (4 GiB) bounds the whole model; protobuf bounds the graph file to 2 GiB.
# ios: the App Store's 4 GB limit on an app's uncompressed size.
# android / desktop: files are copied to app storage and memory-mapped; no format limit.
_WEB_FILE_LIMIT = 0x7FE00000


@dataclass(frozen=True)
class TargetRules:
    """What a target's loader can take."""

    max_file_bytes: int | None = None
    max_total_bytes: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


RULES = {
    "android": TargetRules(
        notes=(
            "entries are stored uncompressed: keep them uncompressed in the APK/AAB (noCompress) or copy them "
            "to app storage on first run",
            "Google Play caps the base module at 200 MB: ship larger weights in a Play Asset Delivery pack or "
            "download them on first run",
        )
    ),
    "ios": TargetRules(
        max_total_bytes=4_000_000_000,
        notes=(f"keep the files together in one folder reference so {MODEL_FILE} finds its external data",),
    ),
    "desktop": TargetRules(),
    "web": TargetRules(
        max_file_bytes=_WEB_FILE_LIMIT,
        max_total_bytes=4 * 1024**3,
        notes=(
            "each external-data file is fetched into one ArrayBuffer (Chrome: at most 0x7fe00000 bytes)",
            "the whole model must fit 32-bit WebAssembly memory (4 GiB)",
        ),
    ),
}


@dataclass
class _Entry:
    """One file of the bundle: where its bytes come from and their size + sha256."""

    name: str
    size: int
    sha256: str
    path: Path | None = None  # copied from disk
    data: bytes | None = None  # generated
    ranges: list[tuple[int, int]] | None = None  # (offset, length) slices of `path`, after `pad` zero bytes
    pad: int = 0


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _generated(name: str, data: bytes) -> _Entry:
    return _Entry(name, len(data), _sha(data), data=data)


def _json_bytes(data: dict) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# -- licence -------------------------------------------------------------------------------------


def resolve_license(
    artifact: Artifact, license_file: str | Path | None = None, license_id: str | None = None
) -> tuple[str, bytes]:
    """The model's (licence id, licence text): from the flags or the licence the build recorded."""
    recorded = artifact.manifest.get("license") or {}
    path = artifact.path(recorded["file"]) if recorded.get("file") else None
    facts = LicenseFacts(recorded.get("id"), path if path is not None and path.is_file() else None)
    return choose(facts, license_file, license_id, str(artifact.root))


# -- layout --------------------------------------------------------------------------------------


def _external_tensors(model) -> list:
    """Tensors of the top-level graph whose bytes live in an external file."""
    import onnx

    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def _shard(artifact: Artifact, limit: int) -> list[_Entry]:
    """Split the external data into files of at most `limit` bytes at tensor boundaries; rewrite the graph file.

    Only the graph (not the weights) is loaded. Each shard starts with zero padding so every tensor
    keeps its offset modulo 4096 (what memory-mapping loaders expect).
    """
    import onnx

    model = onnx.load(str(artifact.model_path), load_external_data=False)
    spans = []
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        spans.append((int(info.get("offset", 0)), int(info["length"]), info["location"], tensor))
    spans.sort(key=lambda s: (s[2], s[0]))
    shards: list[dict] = []
    for offset, length, location, tensor in spans:
        if length + ALIGNMENT > limit:
            raise QwenEdgeError(
                f"{tensor.name} alone has {length} bytes, over the {limit}-byte file limit of the target"
            )
        cur = shards[-1] if shards else None
        if cur is None or cur["location"] != location or offset + length - cur["start"] + cur["pad"] > limit:
            cur = {"location": location, "start": offset, "pad": offset % ALIGNMENT, "end": offset, "tensors": []}
            shards.append(cur)
        cur["end"] = max(cur["end"], offset + length)
        cur["tensors"].append((tensor, offset))
    entries = []
    for index, shard in enumerate(shards):
        name = f"{MODEL_DATA_FILE}.{index:03d}" if len(shards) > 1 else MODEL_DATA_FILE
        for tensor, offset in shard["tensors"]:
            for e in tensor.external_data:
                if e.key == "location":
                    e.value = name
                elif e.key == "offset":
                    e.value = str(offset - shard["start"] + shard["pad"])
        source = artifact.path(shard["location"])
        ranges = [(shard["start"], shard["end"] - shard["start"])]
        h = hashlib.sha256(b"\0" * shard["pad"])
        with open(source, "rb") as f:
            f.seek(shard["start"])
            remaining = ranges[0][1]
            while remaining:
                chunk = f.read(min(_CHUNK, remaining))
                if not chunk:
                    raise QwenEdgeError(f"{source} is shorter than {MODEL_FILE} says; rebuild the artifact")
                h.update(chunk)
                remaining -= len(chunk)
        entries.append(
            _Entry(name, shard["pad"] + ranges[0][1], h.hexdigest(), path=source, ranges=ranges, pad=shard["pad"])
        )
    entries.append(_generated(MODEL_FILE, model.SerializeToString()))
    return entries


def _model_entries(artifact: Artifact, rules: TargetRules, checks: list[str]) -> list[_Entry]:
    """The artifact's files as bundle entries, external data sharded when a file exceeds the target's limit."""
    files = {n: e for n, e in artifact.files.items() if n not in (MANIFEST, LICENSE_FILE)}  # LICENSE is re-added
    limit = rules.max_file_bytes
    too_big = sorted(n for n, e in files.items() if limit is not None and e["size"] > limit)
    plain = [_Entry(n, e["size"], e["sha256"], path=artifact.path(n)) for n, e in sorted(files.items())]
    if limit is None:
        checks.append("no per-file size limit on this target")
        return plain
    if not too_big:
        largest = max(files, key=lambda n: files[n]["size"])
        checks.append(
            f"largest file {largest} ({files[largest]['size']} bytes) is within the {limit}-byte "
            "per-file limit: no sharding needed"
        )
        return plain
    if MODEL_FILE in too_big:
        raise QwenEdgeError(f"{MODEL_FILE} itself exceeds {limit} bytes; rebuild the artifact with external data")
    sharded = _shard(artifact, limit)
    locations = {e.name for e in sharded}
    kept = [e for e in plain if e.name not in too_big and e.name not in locations]
    checks.append(
        f"{', '.join(too_big)} over the {limit}-byte per-file limit: split into "
        f"{len(sharded) - 1} files at tensor boundaries, {MODEL_FILE} rewritten"
    )
    return kept + sharded


# -- archive -------------------------------------------------------------------------------------


def _zip_info(name: str, size: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    info.file_size = size
    return info


def _write_entry(zf: zipfile.ZipFile, entry: _Entry) -> None:
    h = hashlib.sha256()
    with zf.open(_zip_info(entry.name, entry.size), "w", force_zip64=entry.size >= 0x7FFFFFFF) as out:
        if entry.data is not None:
            out.write(entry.data)
            h.update(entry.data)
        else:
            out.write(b"\0" * entry.pad)
            h.update(b"\0" * entry.pad)
            ranges = entry.ranges or [(0, entry.path.stat().st_size)]
            with open(entry.path, "rb") as f:
                for offset, length in ranges:
                    f.seek(offset)
                    while length and (chunk := f.read(min(_CHUNK, length))):
                        out.write(chunk)
                        h.update(chunk)
                        length -= len(chunk)
    if h.hexdigest() != entry.sha256:
        raise QwenEdgeError(f"{entry.path or entry.name} changed while packaging; package it again")


def _integration_note(target: str) -> bytes:
    return resources.files("edge").joinpath(f"data/integration/{target}.md").read_bytes()


def _page_entries(checks: list[str]) -> list[_Entry]:
    """The chat page (qwen_edge.webpage) under web/, beside the model files it loads from "../"."""
    from qwen_edge.webpage import PAGE_DIR, page_files

    files = page_files()
    checks.append(
        f"chat page in {PAGE_DIR}/ ({len(files)} files): serve the unzipped bundle with cross-origin isolation "
        f"headers (qwen-edge serve --web DIR does) and open /{PAGE_DIR}/"
    )
    return [_Entry(f"{PAGE_DIR}/{name}", p.stat().st_size, _sha(p.read_bytes()), path=p) for name, p in files.items()]


def bundle_name(recipe: str, target: str) -> str:
    """File name of a bundle: `<recipe>-<target>-v<bundle format>.zip`."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe).strip("-") or "model"
    return f"{safe}-{target}-v{BUNDLE_FORMAT_VERSION}.zip"


@dataclass(frozen=True)
class PackageResult:
    """A written bundle."""

    path: Path
    target: str
    files: int
    bytes: int
    license_id: str
    key_id: str | None = None  # the key that signed bundle.json


def package(
    artifact_dir: str | Path,
    target: str,
    out: str | Path | None = None,
    *,
    license_file: str | Path | None = None,
    license_id: str | None = None,
    max_file_bytes: int | None = None,
    sign_key=None,
) -> PackageResult:
    """Write the bundle of an artifact for `target`; `out` is a file, a directory, or None (next to the artifact).

    `max_file_bytes` overrides the target's per-file limit (external data is sharded below it); `sign_key`
    (an Ed25519 private key, `qwen_edge.signing`) adds bundle.sig, its signature of bundle.json.
    """
    if target not in TARGETS:
        raise QwenEdgeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    artifact = Artifact.open(artifact_dir, verify="full")
    rules = RULES[target]
    if max_file_bytes is not None:
        rules = TargetRules(max_file_bytes, rules.max_total_bytes, rules.notes)
    lic_id, lic_text = resolve_license(artifact, license_file, license_id)
    recipe = str((artifact.manifest.get("recipe") or {}).get("name") or artifact.root.name)

    checks: list[str] = []
    entries = _model_entries(artifact, rules, checks)
    entries.append(_generated(LICENSE_FILE, lic_text))
    model_table = {e.name: {"size": e.size, "sha256": e.sha256} for e in sorted(entries, key=lambda e: e.name)}
    manifest = dict(artifact.manifest, files=model_table, license={"id": lic_id, "file": LICENSE_FILE})
    entries.append(_generated(MANIFEST, _json_bytes(manifest)))
    entries.append(_generated(INTEGRATION_FILE, _integration_note(target)))
    if target == "web":
        entries += _page_entries(checks)
    total = sum(e.size for e in entries)
    if rules.max_total_bytes is not None:
        if total > rules.max_total_bytes:
            raise QwenEdgeError(
                f"the bundle holds {total} bytes, over the {rules.max_total_bytes}-byte limit of "
                f"{target}; use a smaller model or lower precision"
            )
        checks.append(f"total {total} bytes is within the {rules.max_total_bytes}-byte limit")
    entries.sort(key=lambda e: e.name)
    meta = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "target": target,
        "recipe": recipe,
        "qwen_edge_version": __version__,
        "artifact_manifest_sha256": _sha(artifact.path(MANIFEST).read_bytes()),
        "license": {"id": lic_id, "file": LICENSE_FILE},
        "checks": checks,
        "notes": list(rules.notes),
        "files": {e.name: {"size": e.size, "sha256": e.sha256} for e in entries},
    }
    meta_bytes = _json_bytes(meta)
    entries.append(_generated(BUNDLE_JSON, meta_bytes))
    kid = None
    if sign_key is not None:
        from qwen_edge import signing

        entries.append(_generated(BUNDLE_SIGNATURE, signing.sign(sign_key, BUNDLE_JSON, meta_bytes)))
        kid = signing.key_id(sign_key.public_key())
    entries.sort(key=lambda e: e.name)

    dest = Path(out) if out is not None else artifact.root.parent
    if out is None or dest.is_dir():
        dest = dest / bundle_name(recipe, target)
    if not dest.parent.is_dir():
        raise QwenEdgeError(f"{dest.parent} does not exist; create it or pass another --out")
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as zf:
            for entry in entries:
                _write_entry(zf, entry)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return PackageResult(dest, target, len(entries), dest.stat().st_size, lic_id, kid)
