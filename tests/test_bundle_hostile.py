"""Hostile bundles: zip slip, links, name clashes, zip bombs and malformed bundle.json are rejected by
`verify_bundle`, and `unpack_bundle` / `qwen-edge unpack` never write outside DIR or leave partial files.

The corpus is generated here, byte by byte (a small zip writer below), so each case controls exactly the
central directory, local headers, modes and sizes an attacker would, independent of the build package.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import time
import tracemalloc
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from qwen_edge import bundle as bundle_mod
from qwen_edge.bundle import (
    MAX_BUNDLE_JSON_BYTES,
    MAX_ENTRIES,
    BundleError,
    UnsafeBundleError,
    unpack_bundle,
    verify_bundle,
)
from qwen_edge.cli import main
from qwen_edge.errors import QwenEdgeError

REGULAR = (stat.S_IFREG | 0o644) << 16


# -- a minimal zip writer ------------------------------------------------------------------------


@dataclass
class M:
    """One zip entry, with every field an attacker controls."""

    name: str | bytes
    data: bytes = b""
    method: int = zipfile.ZIP_STORED
    attr: int = REGULAR
    system: int = 3
    flags: int = 0
    extra: bytes = b""
    local_name: str | bytes | None = None  # the local header's name, if it differs
    local_extra: bytes = b""
    usize: int | None = None  # uncompressed size in the headers (default: len(data))
    crc: int | None = None  # default: CRC-32 of data
    raw: bytes | None = None  # the stored/compressed bytes (default: data, deflated if method says so)
    csize: int | None = None  # compressed size in the headers (default: len(raw))
    listed: bool = True  # listed in bundle.json
    declared: tuple[int, str] | None = None  # (size, sha256) bundle.json declares (default: data's)


def _encode(name: str | bytes) -> tuple[bytes, int]:
    if isinstance(name, bytes):
        return name, 0
    try:
        return name.encode("ascii"), 0
    except UnicodeEncodeError:
        return name.encode("utf-8"), 0x800


def _raw(m: M) -> bytes:
    if m.raw is not None:
        return m.raw
    if m.method == zipfile.ZIP_DEFLATED:
        c = zlib.compressobj(6, zlib.DEFLATED, -15)
        return c.compress(m.data) + c.flush()
    return m.data


def _local(m: M) -> bytes:
    raw = _raw(m)
    name, utf8 = _encode(m.local_name if m.local_name is not None else m.name)
    crc = zlib.crc32(m.data) if m.crc is None else m.crc
    usize = len(m.data) if m.usize is None else m.usize
    csize = len(raw) if m.csize is None else m.csize
    head = struct.pack(
        "<4s2B4HL2L2H",
        b"PK\x03\x04",
        20,
        0,
        m.flags | utf8,
        m.method,
        0,
        0x21,
        crc,
        csize,
        usize,
        len(name),
        len(m.local_extra),
    )
    return head + name + m.local_extra + raw


def write_zip(path: Path, members: list[M]) -> Path:
    out, central = bytearray(), bytearray()
    for m in members:
        offset = len(out)
        out += _local(m)
        raw = _raw(m)
        name, utf8 = _encode(m.name)
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        usize = len(m.data) if m.usize is None else m.usize
        csize = len(raw) if m.csize is None else m.csize
        central += struct.pack(
            "<4s4B4HL2L5H2L",
            b"PK\x01\x02",
            20,
            m.system,
            20,
            0,
            m.flags | utf8,
            m.method,
            0,
            0x21,
            crc,
            csize,
            usize,
            len(name),
            len(m.extra),
            0,
            0,
            0,
            m.attr,
            offset,
        )
        central += name + m.extra
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + end))
    return path


# -- bundles -------------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MODEL_FILES = {
    "model.onnx": b"onnx graph " * 50,
    "model.onnx.data": bytes(range(256)) * 40,
    "tokenizer.json": b'{"model": "tiny"}',
    "LICENSE": b"Apache License, Version 2.0 (test text)\n",
}


def good_members(method: int = zipfile.ZIP_STORED) -> list[M]:
    manifest = {
        "format": "qwen-edge-artifact",
        "files": {n: {"size": len(d), "sha256": _sha(d)} for n, d in MODEL_FILES.items()},
    }
    files = dict(MODEL_FILES)
    files["manifest.json"] = json.dumps(manifest, indent=2).encode()
    files["INTEGRATION.md"] = b"# Desktop\n"
    files["docs/notes/README.txt"] = b"a file in nested folders\n"
    return [M(name, data, method=method) for name, data in sorted(files.items())]


def good_meta(members: list[M]) -> dict:
    files = {}
    for m in members:
        if m.listed and isinstance(m.name, str):
            files[m.name] = (
                {"size": m.declared[0], "sha256": m.declared[1]}
                if m.declared is not None
                else {"size": len(m.data), "sha256": _sha(m.data)}
            )
    return {
        "format": "qwen-edge-bundle",
        "format_version": 1,
        "target": "desktop",
        "recipe": "tiny",
        "qwen_edge_version": "0.0.0",
        "license": {"id": "Apache-2.0", "file": "LICENSE"},
        "checks": [],
        "notes": [],
        "files": files,
    }


def make_bundle(
    path: Path,
    members: list[M] | None = None,
    *,
    edit=None,
    meta_bytes: bytes | None = None,
    meta_member: M | None = None,
) -> Path:
    """A bundle of `members` (default: a good bundle) with a matching bundle.json, edited or replaced."""
    members = good_members() if members is None else members
    meta = good_meta(members)
    if edit is not None:
        edit(meta)
    data = meta_bytes if meta_bytes is not None else json.dumps(meta, indent=2).encode()
    meta_entry = replace(meta_member, data=data) if meta_member is not None else M("bundle.json", data)
    return write_zip(path, [meta_entry, *members])


def with_entry(*extra: M):
    """A case: the good bundle plus `extra` entries, listed in bundle.json (as a crafted bundle would)."""
    return lambda ctx: make_bundle(ctx.bundle, good_members() + list(extra))


def with_members(fn):
    """A case: the good bundle's members transformed by `fn(members) -> members`."""
    return lambda ctx: make_bundle(ctx.bundle, fn(good_members()))


def with_meta(edit):
    return lambda ctx: make_bundle(ctx.bundle, edit=edit)


def with_meta_bytes(data: bytes):
    return lambda ctx: make_bundle(ctx.bundle, meta_bytes=data)


@dataclass
class Ctx:
    root: Path
    bundle: Path = field(init=False)
    parent: Path = field(init=False)
    dest: Path = field(init=False)
    sentinel: Path = field(init=False)

    def __post_init__(self):
        (self.root / "bundles").mkdir()
        self.bundle = self.root / "bundles" / "case.zip"
        self.parent = self.root / "out"
        self.parent.mkdir()
        self.dest = self.parent / "app"
        self.sentinel = self.parent / "sentinel"
        self.sentinel.mkdir()


@pytest.fixture
def ctx(tmp_path) -> Ctx:
    return Ctx(tmp_path)


def _set(path: str, value):
    def edit(meta):
        *keys, last = path.split(".")
        target = meta
        for k in keys:
            target = target[k]
        target[last] = value

    return edit


def _overlapping(ctx: Ctx) -> Path:
    """An entry whose data span covers the next entry's local header and data (an overlapping-entries bomb)."""
    members = good_members()
    b = members[-1]
    a = members[-2]
    span = a.data + _local(b)
    members[-2] = replace(
        a, raw=a.data, csize=len(span), usize=len(span), crc=zlib.crc32(span), declared=(len(span), _sha(span))
    )
    return make_bundle(ctx.bundle, members)


def _more_than_declared(ctx: Ctx) -> Path:
    """Header and bundle.json say 1000 bytes (with the CRC and sha256 of the first 1000); it inflates to 10 KB."""
    data = bytes(10_000)
    m = M(
        "big.bin",
        data,
        method=zipfile.ZIP_DEFLATED,
        usize=1000,
        crc=zlib.crc32(data[:1000]),
        declared=(1000, _sha(data[:1000])),
    )
    return make_bundle(ctx.bundle, good_members() + [m])


def _fewer_than_declared(ctx: Ctx) -> Path:
    data = bytes(500)
    m = M("short.bin", data, method=zipfile.ZIP_DEFLATED, usize=1000, declared=(1000, _sha(bytes(1000))))
    return make_bundle(ctx.bundle, good_members() + [m])


def _trailing_data(ctx: Ctx) -> Path:
    data = b"payload " * 10
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    m = M("tail.bin", data, method=zipfile.ZIP_DEFLATED, raw=c.compress(data) + c.flush() + b"hidden")
    return make_bundle(ctx.bundle, good_members() + [m])


def _too_many_entries(ctx: Ctx) -> Path:
    return make_bundle(ctx.bundle, good_members() + [M(f"f{i}") for i in range(MAX_ENTRIES)])


def _entry_count_lies(ctx: Ctx) -> Path:
    """The end record announces 9 entries; the central directory holds over 10000 (zipfile parses them all)."""
    data = bytearray(_too_many_entries(ctx).read_bytes())
    struct.pack_into("<2H", data, len(data) - 22 + 8, 9, 9)
    ctx.bundle.write_bytes(bytes(data))
    return ctx.bundle


def _unicode_path_extra(local: bool):
    evil = b"../../evil.txt"
    field_ = struct.pack("<2HB", 0x7075, 5 + len(evil), 1) + struct.pack("<L", zlib.crc32(b"model.onnx")) + evil
    return with_members(
        lambda ms: [
            replace(m, **({"local_extra": field_} if local else {"extra": field_})) if m.name == "model.onnx" else m
            for m in ms
        ]
    )


NOT_LISTED = {"listed": False}

# (case id, bundle builder, regex the one-line message must match)
HOSTILE = [
    # zip slip: names that leave the folder
    ("dotdot", with_entry(M("../../evil.txt", b"x")), r"'\.\./\.\./evil\.txt'.*'\.\.' component.*zip slip"),
    ("dotdot-sentinel", with_entry(M("../sentinel/evil.txt", b"x")), r"'\.\./sentinel/evil\.txt'.*'\.\.'"),
    ("dotdot-inner", with_entry(M("docs/../../evil.txt", b"x")), r"'docs/\.\./\.\./evil\.txt'.*'\.\.'"),
    ("absolute-posix", with_entry(M("/tmp/evil.txt", b"x")), r"'/tmp/evil\.txt'.*absolute path"),
    ("absolute-drive", with_entry(M("C:\\evil.txt", b"x")), r"'C:\\evil\.txt'.*drive letter"),
    ("drive-relative", with_entry(M("C:evil.txt", b"x")), r"'C:evil\.txt'.*drive letter"),
    ("drive-slash", with_entry(M("c:/evil.txt", b"x")), r"'c:/evil\.txt'.*drive letter"),
    ("unc", with_entry(M("\\\\server\\share\\evil.txt", b"x")), r"server.*network path"),
    ("unc-slashes", with_entry(M("//server/share/evil.txt", b"x")), r"'//server/share/evil\.txt'.*network path"),
    ("backslash-dotdot", with_entry(M("..\\..\\evil.txt", b"x")), r"'\.\.\\\.\.\\evil\.txt'.*backslash"),
    ("backslash", with_entry(M("docs\\evil.txt", b"x")), r"'docs\\evil\.txt'.*backslash"),
    ("empty-component", with_entry(M("docs//evil.txt", b"x")), r"'docs//evil\.txt'.*empty path component"),
    ("trailing-slash-file", with_entry(M("evil/", b"x")), r"'evil/'.*ends in '/'"),
    ("dot-component", with_entry(M("./evil.txt", b"x")), r"'\./evil\.txt'.*'\.' component"),
    ("empty-name", with_entry(M("", b"x")), r"''.*name is empty"),
    ("nul-byte", with_entry(M("evil.txt\0.onnx", b"x")), r"evil\.txt\\x00\.onnx.*NUL byte"),
    ("newline", with_entry(M("evil\n.txt", b"x")), r"'evil\\n\.txt'.*character '\\n'"),
    ("colon-stream", with_entry(M("model.onnx:evil", b"x")), r"'model\.onnx:evil'.*character ':'"),
    ("windows-device", with_entry(M("docs/CON.txt", b"x")), r"'CON\.txt' is a reserved Windows device name"),
    ("trailing-dot", with_entry(M("evil.", b"x")), r"'evil\.'.*ends in a dot or space"),
    ("long-component", with_entry(M("a" * 300, b"x")), r"longer than 255 bytes"),
    # not regular files
    (
        "symlink",
        with_entry(M("link", b"../../etc/passwd", attr=(stat.S_IFLNK | 0o777) << 16)),
        r"'link'.*symbolic link",
    ),
    (
        "symlink-dos-system",
        with_entry(M("link", b"/etc", attr=(stat.S_IFLNK | 0o777) << 16, system=0)),
        r"'link'.*symbolic link",
    ),
    (
        "symlink-bundle-json",
        lambda ctx: make_bundle(ctx.bundle, meta_member=M("bundle.json", attr=(stat.S_IFLNK | 0o777) << 16)),
        r"'bundle\.json'.*symbolic link",
    ),
    (
        "directory-entry",
        with_entry(M("docs/", attr=(stat.S_IFDIR | 0o755) << 16 | 0x10, **NOT_LISTED)),
        r"'docs/'.*directory entry",
    ),
    ("directory-dos-attr", with_entry(M("folder", attr=0x10, system=0)), r"'folder'.*directory entry"),
    ("fifo", with_entry(M("pipe", attr=(stat.S_IFIFO | 0o644) << 16)), r"'pipe'.*not a regular file"),
    ("char-device", with_entry(M("tty", attr=(stat.S_IFCHR | 0o644) << 16)), r"'tty'.*not a regular file"),
    ("encrypted", with_entry(M("secret.bin", b"x", flags=0x1)), r"'secret\.bin'.*encrypted"),
    ("bzip2", with_entry(M("packed.bin", b"x", method=zipfile.ZIP_BZIP2)), r"'packed\.bin'.*compression method 12"),
    ("stored-size-mismatch", with_entry(M("odd.bin", b"xyz", csize=2)), r"'odd\.bin'.*stored, yet"),
    # one entry, two names
    ("unicode-path-extra", _unicode_path_extra(local=False), r"'model\.onnx'.*Unicode Path extra field"),
    ("unicode-path-extra-local", _unicode_path_extra(local=True), r"'model\.onnx'.*Unicode Path extra field"),
    (
        "local-name-differs",
        with_members(
            lambda ms: [replace(m, local_name="../../evil.txt") if m.name == "model.onnx" else m for m in ms]
        ),
        r"'model\.onnx'.*local header names it '\.\./\.\./evil\.txt'",
    ),
    ("overlapping-entries", _overlapping, r"overlaps the entry"),
    # names that clash on some file system
    ("duplicate", with_entry(M("model.onnx", MODEL_FILES["model.onnx"])), r"'model\.onnx'.*more than once"),
    ("duplicate-case", with_entry(M("license", b"other", **NOT_LISTED)), r"'license'.*'LICENSE' ignoring case"),
    (
        "duplicate-case-bundle-json",
        with_entry(M("BUNDLE.JSON", b"{}", **NOT_LISTED)),
        r"'BUNDLE\.JSON'.*'bundle\.json' ignoring case",
    ),
    (
        "duplicate-nfc",
        lambda ctx: make_bundle(ctx.bundle, good_members() + [M("caf\u00e9.txt", b"a"), M("cafe\u0301.txt", b"b")]),
        r"'cafe\\u0301\.txt'.*'caf\\xe9\.txt' after Unicode normalisation",
    ),
    (
        "file-and-folder",
        with_entry(M("docs", b"x")),
        r"'docs': it is a file and also the folder of 'docs/notes/README\.txt'",
    ),
    ("folder-two-spellings", with_entry(M("Docs/other.txt", b"x")), r"folder 'Docs' also appears as 'docs'"),
    ("too-many-entries", _too_many_entries, rf"announces 10008 entries.*over the {MAX_ENTRIES}-entry"),
    ("entry-count-lies", _entry_count_lies, rf"10008 entries, more than {MAX_ENTRIES}"),
    # the archive against bundle.json
    ("unlisted", with_entry(M("extra.bin", b"x", **NOT_LISTED)), r"'extra\.bin' is in the archive but not listed"),
    (
        "listed-missing",
        with_meta(lambda meta: meta["files"].update({"ghost.bin": {"size": 1, "sha256": _sha(b"x")}})),
        r"'ghost\.bin' is listed in bundle\.json but missing",
    ),
    (
        "header-size-differs",
        with_members(
            lambda ms: [
                replace(m, declared=(len(m.data) + 1, _sha(m.data))) if m.name == "model.onnx" else m for m in ms
            ]
        ),
        r"'model\.onnx' has 550 bytes in the zip header, bundle\.json says 551",
    ),
    (
        "sha256-differs",
        with_members(
            lambda ms: [
                replace(m, declared=(len(m.data), _sha(b"other"))) if m.name == "tokenizer.json" else m for m in ms
            ]
        ),
        r"'tokenizer\.json' does not match its sha256",
    ),
    ("more-than-declared", _more_than_declared, r"'big\.bin'.*decompresses to more than the 1000 bytes.*zip bomb"),
    ("fewer-than-declared", _fewer_than_declared, r"'short\.bin' decompresses to 500 bytes, not the 1000"),
    ("data-after-stream", _trailing_data, r"'tail\.bin'.*data after the end of its compressed stream"),
    (
        "bad-crc",
        with_members(lambda ms: [replace(m, crc=1) if m.name == "LICENSE" else m for m in ms]),
        r"'LICENSE' fails its CRC-32",
    ),
    (
        "listed-unsafe-name",
        with_meta(lambda meta: meta["files"].update({"../evil.txt": {"size": 1, "sha256": _sha(b"x")}})),
        r"'\.\./evil\.txt'.*bundle\.json lists it",
    ),
    # bundle.json itself
    ("meta-missing", lambda ctx: write_zip(ctx.bundle, good_members()), r"bundle\.json is missing"),
    ("meta-not-json", with_meta_bytes(b"{not json"), r"bundle\.json is not valid UTF-8 JSON"),
    ("meta-not-utf8", with_meta_bytes(b'{"format": "\xff"}'), r"bundle\.json is not valid UTF-8 JSON"),
    ("meta-nan", with_meta_bytes(b'{"format": NaN}'), r"bundle\.json is not valid UTF-8 JSON.*NaN"),
    ("meta-deep", with_meta_bytes(b"[" * 200_000 + b"]" * 200_000), r"bundle\.json is not valid UTF-8 JSON"),
    ("meta-not-object", with_meta_bytes(b"[1, 2]"), r"bundle\.json is not a JSON object"),
    ("meta-too-large", with_meta_bytes(b"{}" + b" " * MAX_BUNDLE_JSON_BYTES), r"bundle\.json is \d+ bytes, over"),
    ("meta-duplicate-key", with_meta_bytes(b'{"files": {}, "files": {}}'), r"duplicate key 'files'"),
    ("meta-format", with_meta(_set("format", "zip")), r"format 'zip' version 1 is not 'qwen-edge-bundle'"),
    ("meta-version-type", with_meta(_set("format_version", True)), r"version True is not"),
    ("meta-target", with_meta(_set("target", ["desktop"])), r"unknown target \['desktop'\]"),
    ("meta-recipe", with_meta(_set("recipe", 7)), r"the recipe 7 is not a string"),
    ("meta-license", with_meta(_set("license", "Apache-2.0")), r"the licence block 'Apache-2\.0'"),
    ("meta-license-missing", with_meta(_set("license.file", "NOTICE")), r"licence file 'NOTICE' is not in"),
    ("meta-files-list", with_meta(_set("files", ["model.onnx"])), r"bundle\.json has no `files` table"),
    ("meta-entry-type", with_meta(_set("files.LICENSE", "abc")), r"the entry of 'LICENSE' is 'abc'"),
    ("meta-size-string", with_meta(_set("files.LICENSE.size", "41")), r"size of 'LICENSE' is '41', not"),
    ("meta-size-bool", with_meta(_set("files.LICENSE.size", True)), r"size of 'LICENSE' is True, not"),
    ("meta-size-negative", with_meta(_set("files.LICENSE.size", -1)), r"size of 'LICENSE' is -1, not"),
    ("meta-sha-short", with_meta(_set("files.LICENSE.sha256", "abc")), r"sha256 of 'LICENSE' is 'abc', not 64"),
    (
        "meta-lists-itself",
        with_meta(lambda meta: meta["files"].update({"bundle.json": {"size": 1, "sha256": "0" * 64}})),
        r"bundle\.json lists itself",
    ),
]


def _files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# -- tests ---------------------------------------------------------------------------------------


def test_good_bundle_verifies_and_unpacks(ctx, capsys):
    make_bundle(ctx.bundle)
    report = verify_bundle(ctx.bundle)
    assert (report.target, report.recipe, report.license_id, report.files) == ("desktop", "tiny", "Apache-2.0", 8)
    assert main(["verify", str(ctx.bundle)]) == 0
    assert main(["unpack", str(ctx.bundle), str(ctx.dest)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith(f"OK {ctx.bundle} -> {ctx.dest}: desktop bundle of tiny, licence Apache-2.0, 8 files")
    assert out[-1].endswith("verified (size + sha256) and unpacked")
    with zipfile.ZipFile(ctx.bundle) as zf:
        for name in zf.namelist():
            assert (ctx.dest / name).read_bytes() == zf.read(name)
    assert len([p for p in ctx.dest.rglob("*") if p.is_file()]) == 8
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((ctx.dest / "LICENSE").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((ctx.dest / "docs" / "notes").stat().st_mode) == 0o777 & ~umask
    assert sorted(os.listdir(ctx.parent)) == ["app", "sentinel"]  # no staging or temporary files left


def test_deflated_bundle_verifies_and_unpacks(ctx):
    make_bundle(ctx.bundle, good_members(zipfile.ZIP_DEFLATED))
    assert unpack_bundle(ctx.bundle, ctx.dest).bundle.files == 8
    assert (ctx.dest / "model.onnx.data").read_bytes() == MODEL_FILES["model.onnx.data"]


def test_python_zipfile_would_trust_what_we_reject(ctx):
    """The corpus is really hostile: zipfile reads these names and sizes as given."""
    with_entry(M("../../evil.txt", b"x"))(ctx)
    with zipfile.ZipFile(ctx.bundle) as zf:
        assert "../../evil.txt" in zf.namelist()
    _more_than_declared(ctx)
    with zipfile.ZipFile(ctx.bundle) as zf:
        assert zf.read("big.bin") == bytes(1000)  # zipfile stops at the header's size and the CRC matches


@pytest.mark.parametrize("case,build,message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_bundle_is_rejected(ctx, case, build, message, capsys):
    build(ctx)
    with pytest.raises(BundleError, match=message) as err:
        verify_bundle(ctx.bundle)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{ctx.bundle}: ")
    assert "rebuild it with `qwen-edge package`" in text or "package it again with `qwen-edge package`" in text
    assert main(["verify", str(ctx.bundle)]) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and "OK" not in stderr


@pytest.mark.parametrize("case,build,message", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_bundle_unpacks_nothing(ctx, case, build, message, capsys):
    build(ctx)
    assert main(["unpack", str(ctx.bundle), str(ctx.dest)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(os.listdir(ctx.parent)) == ["sentinel"]  # DIR not created, nothing staged left behind
    assert not any(ctx.sentinel.iterdir())
    assert _files_under(ctx.root) == ["bundles", "bundles/case.zip", "out", "out/sentinel"]


def test_unsafe_names_raise_the_unsafe_subclass(ctx):
    with_entry(M("../../evil.txt", b"x"))(ctx)
    with pytest.raises(UnsafeBundleError, match="do not use this bundle"):
        verify_bundle(ctx.bundle)


def _bomb_stream(total: int) -> bytes:
    """Raw deflate of `total` zero bytes, built from one full-flushed 1 MiB block repeated (~1 KB per MiB)."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (total >> 20) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def test_zip_bomb_is_rejected_fast_without_big_memory(ctx):
    raw = _bomb_stream(200 << 20)
    d = zlib.decompressobj(-15)  # it really is 200 MB of zeros (checked in bounded steps)
    produced, tail = len(d.decompress(raw, 1 << 24)), d.unconsumed_tail
    while tail:
        produced += len(d.decompress(tail, 1 << 24))
        tail = d.unconsumed_tail
    assert d.eof and produced == 200 << 20
    declared = bytes(4096)
    bomb = M("model.onnx.data", declared, method=zipfile.ZIP_DEFLATED, raw=raw)
    members = [bomb if m.name == "model.onnx.data" else m for m in good_members()]
    make_bundle(
        ctx.bundle,
        members,
        edit=lambda meta: meta["files"]["model.onnx.data"].update(size=4096, sha256=_sha(declared)),
    )
    assert ctx.bundle.stat().st_size < 300_000
    start = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeBundleError, match=r"'model\.onnx\.data'.*more than the 4096 bytes.*zip bomb"):
            verify_bundle(ctx.bundle)
        with pytest.raises(UnsafeBundleError, match="zip bomb"):
            unpack_bundle(ctx.bundle, ctx.dest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2
    assert peak < 16 << 20
    assert sorted(os.listdir(ctx.parent)) == ["sentinel"]


def test_nonempty_dir_needs_force_and_force_replaces_only_an_unpacked_bundle(ctx):
    make_bundle(ctx.bundle)
    ctx.dest.mkdir()
    assert unpack_bundle(ctx.bundle, ctx.dest).replaced is False  # an empty DIR is fine
    (ctx.dest / "stale.txt").write_text("from an older bundle")
    with pytest.raises(QwenEdgeError, match="is not empty; pass --force"):
        unpack_bundle(ctx.bundle, ctx.dest)
    assert unpack_bundle(ctx.bundle, ctx.dest, force=True).replaced is True
    assert not (ctx.dest / "stale.txt").exists() and (ctx.dest / "bundle.json").is_file()
    assert sorted(os.listdir(ctx.parent)) == ["app", "sentinel"]
    other = ctx.parent / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(QwenEdgeError, match="holds no bundle.json, so it is not an unpacked bundle"):
        unpack_bundle(ctx.bundle, other, force=True)
    assert (other / "holiday.jpg").read_bytes() == b"jpeg"
    (ctx.parent / "afile").write_text("x")
    with pytest.raises(QwenEdgeError, match="is not a directory"):
        unpack_bundle(ctx.bundle, ctx.parent / "afile")
    with pytest.raises(QwenEdgeError, match="does not exist; create it first"):
        unpack_bundle(ctx.bundle, ctx.parent / "missing" / "app")


def test_symlinks_already_in_dir_are_never_followed(ctx, capsys):
    make_bundle(ctx.bundle)
    outside = ctx.root / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    unpack_bundle(ctx.bundle, ctx.dest)
    (ctx.dest / "model.onnx").unlink()
    os.symlink(victim, ctx.dest / "model.onnx")  # a planted link where a bundle file goes
    (ctx.dest / "docs" / "notes" / "README.txt").unlink()
    os.rmdir(ctx.dest / "docs" / "notes")
    os.symlink(outside, ctx.dest / "docs" / "notes")  # and a planted link where a bundle folder goes
    assert main(["unpack", str(ctx.bundle), str(ctx.dest)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["unpack", str(ctx.bundle), str(ctx.dest), "--force"]) == 0
    assert "(replaced)" in capsys.readouterr().out
    assert victim.read_text() == "keep me" and sorted(os.listdir(outside)) == ["victim.txt"]
    assert not (ctx.dest / "model.onnx").is_symlink()
    assert (ctx.dest / "model.onnx").read_bytes() == MODEL_FILES["model.onnx"]
    assert not (ctx.dest / "docs" / "notes").is_symlink()
    assert (ctx.dest / "docs" / "notes" / "README.txt").is_file()


def test_dir_that_is_a_symlink_is_refused(ctx):
    make_bundle(ctx.bundle)
    os.symlink(ctx.sentinel, ctx.dest)
    with pytest.raises(QwenEdgeError, match="is a symbolic link"):
        unpack_bundle(ctx.bundle, ctx.dest)
    assert not any(ctx.sentinel.iterdir())


def test_a_symlinked_folder_inside_the_staging_dir_is_refused(ctx, monkeypatch):
    """Belt and braces: even a link appearing mid-unpack is refused, not followed."""
    make_bundle(ctx.bundle)
    real_mkdir = os.mkdir

    def mkdir_then_swap(path, *args, **kw):
        real_mkdir(path, *args, **kw)
        if os.path.basename(path) == "notes":
            os.rmdir(path)
            os.symlink(ctx.sentinel, path)

    monkeypatch.setattr(bundle_mod.os, "mkdir", mkdir_then_swap)
    with pytest.raises(UnsafeBundleError, match="not a real directory"):
        unpack_bundle(ctx.bundle, ctx.dest)
    monkeypatch.undo()
    assert not any(ctx.sentinel.iterdir()) and sorted(os.listdir(ctx.parent)) == ["sentinel"]


def test_failure_midway_leaves_no_partial_files(ctx, monkeypatch, capsys):
    make_bundle(ctx.bundle)
    unpack_bundle(ctx.bundle, ctx.dest)
    before = {p: p.read_bytes() for p in ctx.dest.rglob("*") if p.is_file()}
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(bundle_mod.os, "fsync", failing_fsync)
    with pytest.raises(QwenEdgeError, match="No space left on device.*nothing was unpacked"):
        unpack_bundle(ctx.bundle, ctx.dest, force=True)
    calls.clear()
    assert main(["unpack", str(ctx.bundle), str(ctx.parent / "fresh")]) == 2
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    assert sorted(os.listdir(ctx.parent)) == ["app", "sentinel"]  # no "fresh", no staging left
    assert {p: p.read_bytes() for p in ctx.dest.rglob("*") if p.is_file()} == before
