"""Bundles: one zip archive per target platform, checked offline against its `bundle.json`.

A bundle holds an artifact's files (possibly re-laid out for the target), the artifact's
`manifest.json` (its `files` table describing the bundled model files), the model's licence text,
`INTEGRATION.md` and `bundle.json`: format, target, versions, licence and the size + sha256 of every
other entry. `edge.package` writes bundles; this module only reads them (standard library only).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .artifact import MANIFEST
from .errors import QwenEdgeError

BUNDLE_FORMAT = "qwen-edge-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
TARGETS = ("android", "ios", "desktop", "web")
_CHUNK = 1 << 20


class BundleError(QwenEdgeError):
    """A bundle that is unreadable, incomplete, tampered with or of another format."""


@dataclass(frozen=True)
class BundleReport:
    """What `verify_bundle` checked."""

    path: Path
    target: str
    recipe: str | None
    license_id: str | None
    files: int
    bytes: int


def _fail(path: Path, what: str) -> BundleError:
    return BundleError(f"{path}: {what}; re-copy the bundle or package it again with `qwen-edge package`")


def _read_json(zf: zipfile.ZipFile, name: str, path: Path) -> dict:
    try:
        data = json.loads(zf.read(name).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError, ValueError, OSError, EOFError) as e:
        raise _fail(path, f"{name} is unreadable or corrupted ({e})") from None
    if not isinstance(data, dict):
        raise _fail(path, f"{name} is not a JSON object")
    return data


def _check_table(table, where: str, path: Path) -> dict:
    if not isinstance(table, dict) or not table:
        raise _fail(path, f"{where} has no `files` table")
    for name, entry in table.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)):
            raise _fail(path, f"{where}: the entry of {name} lacks size/sha256")
    return table


def _hash_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> str:
    h = hashlib.sha256()
    try:
        with zf.open(info) as f:  # zipfile also checks the entry's CRC-32 at the end
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise _fail(path, f"{info.filename} is corrupted or truncated ({e})") from None
    return h.hexdigest()


def verify_bundle(bundle: str | Path) -> BundleReport:
    """Check a bundle offline: readable archive, well-formed bundle.json, every listed file present
    with its size and sha256, nothing unlisted, and the embedded manifest.json consistent with it."""
    path = Path(bundle)
    if not path.is_file():
        raise BundleError(f"{path} does not exist; pass the .zip file `qwen-edge package` wrote")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _fail(path, f"not a readable bundle archive ({e}); it is truncated or not a qwen-edge bundle") from None
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise _fail(path, f"{duplicates[0]} appears more than once in the archive")
        if BUNDLE_JSON not in names:
            raise _fail(path, f"{BUNDLE_JSON} is missing; this is not a qwen-edge bundle")
        meta = _read_json(zf, BUNDLE_JSON, path)
        if meta.get("format") != BUNDLE_FORMAT or meta.get("format_version") != BUNDLE_FORMAT_VERSION:
            raise _fail(path, f"{BUNDLE_JSON}: format {meta.get('format')!r} version {meta.get('format_version')!r} "
                              f"is not {BUNDLE_FORMAT!r} version {BUNDLE_FORMAT_VERSION}")
        if meta.get("target") not in TARGETS:
            raise _fail(path, f"{BUNDLE_JSON}: unknown target {meta.get('target')!r}")
        table = _check_table(meta.get("files"), BUNDLE_JSON, path)
        by_name = {i.filename: i for i in infos}
        for name in names:
            if name != BUNDLE_JSON and name not in table:
                raise _fail(path, f"{name} is in the archive but not listed in {BUNDLE_JSON} (added after packaging)")
        for name, entry in table.items():
            info = by_name.get(name)
            if info is None:
                raise _fail(path, f"{name} is listed in {BUNDLE_JSON} but missing from the archive")
            if info.file_size != entry["size"]:
                raise _fail(path, f"{name} has {info.file_size} bytes, {BUNDLE_JSON} says {entry['size']} (altered)")
            if _hash_member(zf, info, path) != entry["sha256"]:
                raise _fail(path, f"{name} does not match its sha256 in {BUNDLE_JSON} (altered or corrupted)")
        license_block = meta.get("license") or {}
        license_file = license_block.get("file")
        if license_file not in table:
            raise _fail(path, f"{BUNDLE_JSON}: the licence file {license_file!r} is not in the bundle")
        if MANIFEST not in table:
            raise _fail(path, f"{MANIFEST} is missing from the bundle")
        manifest = _read_json(zf, MANIFEST, path)
        for name, entry in _check_table(manifest.get("files"), MANIFEST, path).items():
            listed = table.get(name)
            if listed is None:
                raise _fail(path, f"{name} is listed in the bundled {MANIFEST} but missing from the bundle")
            if (listed["size"], listed["sha256"]) != (entry["size"], entry["sha256"]):
                raise _fail(path, f"{name}: the bundled {MANIFEST} and {BUNDLE_JSON} disagree on its size/sha256")
    return BundleReport(
        path=path,
        target=meta["target"],
        recipe=meta.get("recipe"),
        license_id=license_block.get("id"),
        files=len(table) + 1,
        bytes=sum(int(e["size"]) for e in table.values()),
    )
