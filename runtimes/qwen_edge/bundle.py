"""Bundles: one zip archive per target platform, checked offline against its `bundle.json`, and unpacked safely.

A bundle holds an artifact's files (possibly re-laid out for the target), the artifact's
`manifest.json` (its `files` table describing the bundled model files), the model's licence text,
`INTEGRATION.md` and `bundle.json`: format, target, versions, licence and the size + sha256 of every
other entry. `edge.artifact.package` writes bundles; this module only reads them (standard library only).

A bundle is untrusted input. `verify_bundle` rejects, before hashing anything:

- entry names an unpacker could turn into a path outside its folder or into another file: absolute
  (`/x`, `C:\\x`, `C:x`, `\\\\server\\share`), `..` or `.` components, backslashes, empty components,
  names ending in `/`, NUL and control characters, characters or device names Windows does not allow
  (`:` also being NTFS's alternate data streams), components ending in a dot or space (Windows drops
  them), components over 255 bytes;
- entries that are not regular files: symbolic links, directories (the packager writes none and
  unpacking creates the folders it needs, so directory entries are refused, not skipped), devices,
  FIFOs, sockets; encrypted entries; compression other than stored or deflated;
- names that collide on some file system: exact duplicates, and duplicates ignoring case or after Unicode
  NFC normalisation (Windows, macOS, iOS), a name that is both a file and a folder, a folder spelled two
  ways; a second name hidden in a Unicode Path extra field or a local header that disagrees with the
  central directory (extractors differ on which one they use); entries whose data overlap;
- a `bundle.json` over 1 MiB, not UTF-8 JSON, not an object, with duplicate keys or fields of the wrong
  type; entries not listed in it, listed entries missing, and header sizes other than the declared ones.

Then every entry is hashed while it is decompressed, in bounded chunks and never trusting the zip header:
an entry that decompresses to more than its declared size (a zip bomb) is rejected as soon as the output
passes that size. `unpack_bundle` runs all of this first and then extracts into a new directory only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .artifact import MANIFEST
from .contract import BUNDLE_SIGNATURE
from .errors import QwenEdgeError

BUNDLE_FORMAT = "qwen-edge-bundle"
BUNDLE_FORMAT_VERSION = 1
BUNDLE_JSON = "bundle.json"
TARGETS = ("android", "ios", "desktop", "web")
MAX_BUNDLE_JSON_BYTES = 1 << 20  # bundle.json is a few KB; anything near this is not a real bundle
MAX_MANIFEST_BYTES = 8 << 20
MAX_ENTRIES = 10_000
_MAX_CENTRAL_BYTES = 8 << 20  # the central directory zipfile parses into memory: ~800 bytes per allowed entry
_CHUNK = 1 << 20
_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zipfile.structFileHeader
_LOCAL_MAGIC = b"PK\x03\x04"
_UNICODE_PATH_EXTRA = 0x7075
_WINDOWS_FORBIDDEN = set('<>:"|?*')
_WINDOWS_DEVICES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    "CONIN$",
    "CONOUT$",
    *(f"COM{i}" for i in range(10)),
    *(f"LPT{i}" for i in range(10)),
}
_HEX = set("0123456789abcdef")
_DO_NOT_USE = "do not use this bundle; rebuild it with `qwen-edge package`"


class BundleError(QwenEdgeError):
    """A bundle that is unreadable, incomplete, tampered with or of another format."""


class UnsafeBundleError(BundleError):
    """A bundle crafted to escape its folder, clash on disk or exhaust memory or disk (zip slip, zip bomb)."""


@dataclass(frozen=True)
class BundleReport:
    """What `verify_bundle` checked."""

    path: Path
    target: str
    recipe: str | None
    license_id: str | None
    files: int
    bytes: int


@dataclass(frozen=True)
class UnpackReport:
    """What `unpack_bundle` wrote: the verified bundle, the directory, and whether an earlier unpack was replaced."""

    bundle: BundleReport
    dest: Path
    replaced: bool


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


def _q(name: str) -> str:
    """An entry name for a message: quoted, control and invisible characters escaped, at most ~100 characters."""
    if len(name) > 100:
        name = name[:97] + "..."
    return f"'{name}'" if name.isprintable() else repr(name)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(path: Path, what: str) -> BundleError:
    return BundleError(_one_line(f"{path}: {what}; re-copy the bundle or package it again with `qwen-edge package`"))


def _unsafe(path: Path, name: str, what: str) -> UnsafeBundleError:
    return UnsafeBundleError(_one_line(f"{path}: unsafe entry {_q(name)}: {what}; {_DO_NOT_USE}"))


# -- names and entry types -----------------------------------------------------------------------


def _name_problem(name: str) -> str | None:
    """Why `name` cannot be a file path relative to the unpack folder on every platform, or None."""
    if "\0" in name:
        return "its name holds a NUL byte (extractors cut the name there)"
    if not name:
        return "its name is empty"
    if name.startswith(("\\\\", "//")):
        return "it is an absolute Windows network path (\\\\server\\share) outside the unpack folder"
    if len(name) >= 2 and name[1] == ":" and name[0].isascii() and name[0].isalpha():
        return "it starts with a Windows drive letter (an absolute or drive-relative path)"
    if name.startswith(("/", "\\")):
        return "it is an absolute path, outside the unpack folder (zip slip)"
    if "\\" in name:
        return "its name holds a backslash, a path separator on Windows"
    if name.endswith("/"):
        return "its name ends in '/' (a directory entry, or a file without a name); bundles hold only regular files"
    for part in name.split("/"):
        if part == "":
            return "its name has an empty path component ('//')"
        if part == "..":
            return "its name has a '..' component that climbs out of the unpack folder (zip slip)"
        if part == ".":
            return "its name has a '.' component"
        bad = next((c for c in part if ord(c) < 0x20 or ord(c) == 0x7F or c in _WINDOWS_FORBIDDEN), None)
        if bad is not None:
            return f"its name holds the character {bad!r}, not allowed in file names on Windows"
        if part[-1] in ". ":
            return f"its component {_q(part)} ends in a dot or space, which Windows drops (another file's name)"
        if part.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
            return f"its component {_q(part)} is a reserved Windows device name"
        if len(part.encode("utf-8")) > 255:
            return "its name has a component longer than 255 bytes"
    return None


def _has_extra(extra: bytes, wanted: int) -> bool:
    i = 0
    while i + 4 <= len(extra):
        kind, size = struct.unpack_from("<2H", extra, i)
        if kind == wanted:
            return True
        i += 4 + size
    return False


def _entry_problem(info: zipfile.ZipInfo) -> str | None:
    """Why the central directory record of `info` is not a plain regular file qwen-edge can read, or None."""
    kind = stat.S_IFMT(info.external_attr >> 16)  # checked whatever system made the entry
    if kind == stat.S_IFLNK:
        return "it is a symbolic link (unpacked, it could point anywhere)"
    if kind == stat.S_IFDIR or info.external_attr & 0x10:
        return "it is a directory entry; bundles hold only regular files"
    if kind not in (0, stat.S_IFREG):
        return f"it is not a regular file (file type {kind:#o}: a device, FIFO or socket)"
    if info.flag_bits & 0x41:
        return "it is encrypted"
    if info.compress_type not in _METHODS:
        return f"it uses compression method {info.compress_type}; bundles are stored or deflated"
    if info.flag_bits & 0x20:
        return "it uses compressed patched data"
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        return f"it is stored, yet its header says {info.compress_size} bytes stored for {info.file_size}"
    if _has_extra(info.extra, _UNICODE_PATH_EXTRA):
        return "it carries a second name in a Unicode Path extra field (extractors differ on which they use)"
    return None


def _fold(name: str) -> str:
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def _check_collisions(names: list[str], path: Path) -> None:
    """Names must stay distinct on case-insensitive and normalising file systems (Windows, macOS, iOS)."""
    exact: set[str] = set()
    nfc: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name in names:
        n = unicodedata.normalize("NFC", name)
        if name in exact:
            raise _unsafe(path, name, "it appears more than once in the archive")
        if n in nfc:
            raise _unsafe(path, name, f"it is {name!a}, the same name as {nfc[n]!a} after Unicode normalisation (NFC)")
        if _fold(name) in folded:
            raise _unsafe(path, name, f"it is the same name as {_q(folded[_fold(name)])} ignoring case")
        exact.add(name)
        nfc[n] = name
        folded[_fold(name)] = name
    folders: dict[str, str] = {}
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            key = _fold(folder)
            if key in folded:
                raise _unsafe(path, folded[key], f"it is a file and also the folder of {_q(name)}")
            spelled = folders.setdefault(key, folder)
            if spelled != folder:
                raise _unsafe(path, name, f"its folder {_q(folder)} also appears as {_q(spelled)}")


# -- reading entries -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    info: zipfile.ZipInfo
    data_offset: int


def _local_header(fp: BinaryIO, info: zipfile.ZipInfo, size: int, path: Path) -> int:
    """Check the entry's local header against its central directory record; return where its data starts."""
    name = info.orig_filename
    fp.seek(info.header_offset)
    head = fp.read(_LOCAL_HEADER.size)
    if len(head) != _LOCAL_HEADER.size or head[:4] != _LOCAL_MAGIC:
        raise _fail(path, f"the local header of {_q(name)} is missing or corrupted (truncated bundle?)")
    fields = _LOCAL_HEADER.unpack(head)
    flags, method, name_len, extra_len = fields[3], fields[4], fields[10], fields[11]
    raw_name, extra = fp.read(name_len), fp.read(extra_len)
    if len(raw_name) != name_len or len(extra) != extra_len:
        raise _fail(path, f"the local header of {_q(name)} is truncated")
    local = raw_name.decode("utf-8" if flags & 0x800 else "cp437", errors="replace")
    if local != name:
        raise _unsafe(path, name, f"its local header names it {_q(local)} (extractors differ on which they use)")
    if method != info.compress_type:
        raise _unsafe(path, name, "its local header and central directory disagree on its compression")
    if _has_extra(extra, _UNICODE_PATH_EXTRA):
        raise _unsafe(path, name, "its local header carries a second name in a Unicode Path extra field")
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.compress_size > size:
        raise _fail(path, f"{_q(name)} is truncated (its data runs past the end of the file)")
    return start


def _check_layout(members: list[_Member], end: int, path: Path) -> None:
    """Entries' data must not overlap (overlapping entries multiply a small file into a huge unpack)."""
    ordered = sorted(members, key=lambda m: m.info.header_offset)
    for m, after in zip(ordered, ordered[1:] + [None]):
        limit = after.info.header_offset if after is not None else end
        if m.data_offset + m.info.compress_size > limit:
            other = f"the entry {_q(after.info.orig_filename)}" if after is not None else "the central directory"
            raise _unsafe(path, m.info.orig_filename, f"its data overlaps {other} (a crafted archive)")


def _chunks(fp: BinaryIO, m: _Member, size: int, path: Path) -> Iterator[bytes]:
    """The entry's decompressed bytes, which must be exactly `size` bytes; never more than `size` + 1 are produced.

    The zip header is not trusted: data are decompressed here (stored or raw deflate), in chunks of at most
    1 MiB, and the stream must end exactly at `size` bytes, with nothing after it and a matching CRC-32.
    """
    info, name = m.info, m.info.orig_filename
    fp.seek(m.data_offset)
    left = info.compress_size
    total = crc = 0
    inflate = zlib.decompressobj(-15) if info.compress_type == zipfile.ZIP_DEFLATED else None
    pending = b""
    try:
        while True:
            if inflate is not None and inflate.eof:
                break
            if not pending:
                if not left:
                    if inflate is None:
                        break
                    raise _fail(path, f"{_q(name)} is truncated (its compressed data end early)")
                pending = fp.read(min(_CHUNK, left))
                if not pending:
                    raise _fail(path, f"{_q(name)} is truncated")
                left -= len(pending)
            if inflate is None:
                out, pending = pending, b""
            else:
                out = inflate.decompress(pending, min(_CHUNK, size - total + 1))
                pending = inflate.unconsumed_tail
            total += len(out)
            if total > size:
                raise _unsafe(
                    path,
                    name,
                    f"it decompresses to more than the {size} bytes declared for it (a zip bomb or an altered entry)",
                )
            crc = zlib.crc32(out, crc)
            if out:
                yield out
    except zlib.error as e:
        raise _fail(path, f"{_q(name)} is corrupted ({e})") from None
    if left or pending or (inflate is not None and inflate.unused_data):
        raise _unsafe(path, name, "it has data after the end of its compressed stream")
    if total != size:
        raise _fail(path, f"{_q(name)} decompresses to {total} bytes, not the {size} declared (truncated)")
    if crc != info.CRC:
        raise _fail(path, f"{_q(name)} fails its CRC-32 check (corrupted)")


def _read_small(fp: BinaryIO, m: _Member, cap: int, path: Path) -> bytes:
    if m.info.file_size > cap:
        raise _fail(path, f"{m.info.orig_filename} is {m.info.file_size} bytes, over the {cap}-byte limit")
    return b"".join(_chunks(fp, m, m.info.file_size, path))


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(chunk)
    return h.hexdigest()


# -- bundle.json and manifest.json ---------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {_short(key)}")
        out[key] = value
    return out


def _reject_constant(text: str):
    raise ValueError(f"{text} is not a JSON number")


def _parse_json(data: bytes, name: str, path: Path) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"{name} is not valid UTF-8 JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _fail(path, f"{name} is not a JSON object")
    return obj


def _check_table(table, where: str, path: Path) -> dict[str, tuple[int, str]]:
    """`files`: {name: {"size": int >= 0, "sha256": 64 lowercase hex digits}}, as {name: (size, sha256)}."""
    if not isinstance(table, dict) or not table:
        raise _fail(path, f"{where} has no `files` table (an object of name -> size + sha256)")
    out = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise _fail(path, f"{where}: the entry of {_q(name)} is {_short(entry)}, not an object with size/sha256")
        size, sha = entry.get("size"), entry.get("sha256")
        if type(size) is not int or size < 0:
            raise _fail(path, f"{where}: the size of {_q(name)} is {_short(size)}, not a non-negative integer")
        if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX):
            raise _fail(path, f"{where}: the sha256 of {_q(name)} is {_short(sha)}, not 64 lowercase hex digits")
        out[name] = (size, sha)
    return out


def _check_meta(meta: dict, path: Path) -> tuple[dict[str, tuple[int, str]], dict]:
    fmt, version = meta.get("format"), meta.get("format_version")
    if fmt != BUNDLE_FORMAT or type(version) is not int or version != BUNDLE_FORMAT_VERSION:
        raise _fail(
            path,
            f"{BUNDLE_JSON}: format {_short(fmt)} version {_short(version)} "
            f"is not {BUNDLE_FORMAT!r} version {BUNDLE_FORMAT_VERSION}",
        )
    target = meta.get("target")
    if not isinstance(target, str) or target not in TARGETS:
        raise _fail(path, f"{BUNDLE_JSON}: unknown target {_short(target)}")
    if not isinstance(meta.get("recipe"), (str, type(None))):
        raise _fail(path, f"{BUNDLE_JSON}: the recipe {_short(meta['recipe'])} is not a string")
    license_block = meta.get("license")
    if not (
        isinstance(license_block, dict)
        and isinstance(license_block.get("file"), str)
        and isinstance(license_block.get("id"), (str, type(None)))
    ):
        raise _fail(
            path,
            f"{BUNDLE_JSON}: the licence block {_short(license_block)} is not "
            '{"id": ..., "file": ...} with string values',
        )
    table = _check_table(meta.get("files"), BUNDLE_JSON, path)
    if BUNDLE_JSON in table:
        raise _fail(path, f"{BUNDLE_JSON} lists itself in its `files` table")
    return table, license_block


# -- verify --------------------------------------------------------------------------------------


@dataclass
class _Checked:
    report: BundleReport
    table: dict[str, tuple[int, str]]
    members: dict[str, _Member]
    meta_bytes: bytes
    signature: bytes | None  # bundle.sig, the one entry bundle.json cannot list (it signs bundle.json)


def _central_directory_size(fp: BinaryIO) -> tuple[int, int] | None:
    """(entries, bytes) the end-of-central-directory record announces, read before zipfile parses it all."""
    find = getattr(zipfile, "_EndRecData", None)  # private, but stable since Python 2; skipped if it goes
    try:
        end = find(fp) if find is not None else None
        return (int(end[4]), int(end[5])) if end else None
    except (OSError, ValueError, TypeError, IndexError, struct.error, zipfile.BadZipFile):
        return None


def _verify(fp: BinaryIO, path: Path) -> _Checked:
    """All of `verify_bundle` on an open bundle file: structure and names first, then every byte hashed."""
    announced = _central_directory_size(fp)
    if announced is not None and (announced[0] > MAX_ENTRIES or announced[1] > _MAX_CENTRAL_BYTES):
        raise UnsafeBundleError(
            f"{path}: its central directory announces {announced[0]} entries in "
            f"{announced[1]} bytes, over the {MAX_ENTRIES}-entry / {_MAX_CENTRAL_BYTES}-byte "
            f"limit; {_DO_NOT_USE}"
        )
    fp.seek(0)
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise _fail(path, f"not a readable bundle archive ({e}); it is truncated or not a qwen-edge bundle") from None
    with zf:
        infos = zf.infolist()
        end = getattr(zf, "start_dir", None)
    size = os.fstat(fp.fileno()).st_size
    if len(infos) > MAX_ENTRIES:
        raise UnsafeBundleError(f"{path}: {len(infos)} entries, more than {MAX_ENTRIES}; {_DO_NOT_USE}")
    # 1. cheap structural checks on every entry, nothing decompressed yet
    for info in infos:
        problem = _entry_problem(info) or _name_problem(info.orig_filename)
        if problem:
            raise _unsafe(path, info.orig_filename, problem)
    names = [i.orig_filename for i in infos]
    _check_collisions(names, path)
    members = {i.orig_filename: _Member(i, _local_header(fp, i, size, path)) for i in infos}
    _check_layout(list(members.values()), end if isinstance(end, int) else size, path)
    # 2. bundle.json, bounded
    if BUNDLE_JSON not in members:
        raise _fail(path, f"{BUNDLE_JSON} is missing; this is not a qwen-edge bundle")
    meta_bytes = _read_small(fp, members[BUNDLE_JSON], MAX_BUNDLE_JSON_BYTES, path)
    meta = _parse_json(meta_bytes, BUNDLE_JSON, path)
    table, license_block = _check_meta(meta, path)
    # 3. the table against the archive: names, listing, header sizes
    for name in table:
        problem = _name_problem(name)
        if problem:
            raise _unsafe(path, name, f"{BUNDLE_JSON} lists it and {problem}")
    for name in names:
        if name not in (BUNDLE_JSON, BUNDLE_SIGNATURE) and name not in table:
            raise _fail(path, f"{_q(name)} is in the archive but not listed in {BUNDLE_JSON} (added after packaging)")
    for name, (declared, _) in table.items():
        if name not in members:
            raise _fail(path, f"{_q(name)} is listed in {BUNDLE_JSON} but missing from the archive")
        if members[name].info.file_size != declared:
            raise _fail(
                path,
                f"{_q(name)} has {members[name].info.file_size} bytes in the zip header, "
                f"{BUNDLE_JSON} says {declared} (altered)",
            )
    license_file = license_block["file"]
    if license_file not in table:
        raise _fail(path, f"{BUNDLE_JSON}: the licence file {_short(license_file)} is not in the bundle")
    if MANIFEST not in table:
        raise _fail(path, f"{MANIFEST} is missing from the bundle")
    if table[MANIFEST][0] > MAX_MANIFEST_BYTES:
        raise _fail(path, f"{MANIFEST} is {table[MANIFEST][0]} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
    # 4. every listed entry hashed while decompressed, stopping past its declared size
    manifest_bytes = b""
    for name, (declared, sha) in table.items():
        chunks: Iterable[bytes] = _chunks(fp, members[name], declared, path)
        if name == MANIFEST:
            manifest_bytes = b"".join(chunks)
            chunks = (manifest_bytes,)
        if _digest(chunks) != sha:
            raise _fail(path, f"{_q(name)} does not match its sha256 in {BUNDLE_JSON} (altered or corrupted)")
    # 5. the bundled manifest agrees with bundle.json
    manifest = _parse_json(manifest_bytes, MANIFEST, path)
    for name, entry in _check_table(manifest.get("files"), MANIFEST, path).items():
        listed = table.get(name)
        if listed is None:
            raise _fail(path, f"{_q(name)} is listed in the bundled {MANIFEST} but missing from the bundle")
        if listed != entry:
            raise _fail(path, f"{_q(name)}: the bundled {MANIFEST} and {BUNDLE_JSON} disagree on its size/sha256")
    report = BundleReport(
        path=path,
        target=meta["target"],
        recipe=meta.get("recipe"),
        license_id=license_block.get("id"),
        files=len(table) + 1,
        bytes=sum(size for size, _ in table.values()),
    )
    signature = None
    if BUNDLE_SIGNATURE in members:
        from .signing import MAX_SIGNATURE_BYTES

        signature = _read_small(fp, members[BUNDLE_SIGNATURE], MAX_SIGNATURE_BYTES, path)
    return _Checked(report, table, members, meta_bytes, signature)


def _check_signature(checked: _Checked, trusted_keys, path: Path) -> None:
    """With trusted keys, bundle.sig must sign bundle.json with one of them (see `qwen_edge.signing`)."""
    from . import signing

    keys = signing.load_trusted_keys(trusted_keys)
    signing.verify(checked.meta_bytes, checked.signature, BUNDLE_JSON, keys, str(path))


def _open_bundle(path: Path) -> BinaryIO:
    if not path.is_file():
        raise BundleError(f"{path} does not exist; pass the .zip file `qwen-edge package` wrote")
    try:
        return open(path, "rb")
    except OSError as e:
        raise BundleError(f"{path} cannot be read ({e.strerror})") from None


def verify_bundle(bundle: str | Path, trusted_keys=None) -> BundleReport:
    """Check a bundle offline: a readable archive of safe, distinct, regular-file entries, a well-formed
    bundle.json, every listed file present with its size and sha256 (decompressed with a bound), nothing
    unlisted, and the embedded manifest.json consistent with it. Raises `BundleError` (`UnsafeBundleError`
    for crafted bundles) with one line naming the entry. With `trusted_keys` (public key paths or keys),
    bundle.sig must sign bundle.json with one of them (`qwen_edge.signing.SignatureError` otherwise)."""
    path = Path(bundle)
    with _open_bundle(path) as fp:
        try:
            checked = _verify(fp, path)
            if trusted_keys:
                _check_signature(checked, trusted_keys, path)
            return checked.report
        except OSError as e:
            raise BundleError(f"{path} cannot be read ({e.strerror or e}); re-copy the bundle") from None


# -- unpack --------------------------------------------------------------------------------------


_O_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # lstat: a symlink is not a directory here
    except FileNotFoundError:
        return False


def _target(root: str, name: str, path: Path) -> str:
    """The path of entry `name` under `root` (a real directory this unpack created); makes its folders.

    Every folder on the way must be a real directory, not a symlink, and the result must lie inside `root`.
    """
    parts = name.split("/")
    folder = root
    for part in parts[:-1]:
        folder = os.path.join(folder, part)
        if not os.path.lexists(folder):
            os.mkdir(folder)  # normal permissions (0o777 less the umask)
        if not _is_real_dir(folder):
            raise _unsafe(path, name, f"{folder} is not a real directory (a symlink or a file); nothing followed")
    target = os.path.join(folder, parts[-1])
    real = os.path.realpath(target)
    try:
        inside = os.path.commonpath([real, root]) == root and real != root
    except ValueError:  # another drive
        inside = False
    if not inside:
        raise _unsafe(path, name, f"it resolves to {real}, outside {root}")
    if os.path.lexists(target):
        raise _unsafe(path, name, f"{target} already exists (two entries for one file)")
    return target


def _write_verified(target: str, chunks: Iterable[bytes], sha: str, name: str, path: Path) -> None:
    """Write to a temporary name next to `target`, then rename it into place once its sha256 matched."""
    folder, base = os.path.split(target)
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.part")
    fd = os.open(tmp, _O_FLAGS, 0o666)  # normal permissions (0o666 less the umask); zip modes are ignored
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                h.update(chunk)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != sha:
            raise _fail(path, f"{_q(name)} changed while it was unpacked (it no longer matches its sha256)")
        os.replace(tmp, target)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def _check_dest(dest: Path, force: bool) -> str:
    """What is at `dest` now: "absent", "empty" or "bundle" (an earlier unpack, replaced only with force)."""
    if not dest.name:
        raise QwenEdgeError(f"{dest} is not a directory to unpack into; pass a new directory's path")
    if not dest.parent.is_dir():
        raise QwenEdgeError(f"{dest.parent} does not exist; create it first or unpack elsewhere")
    if dest.is_symlink():
        raise QwenEdgeError(f"{dest} is a symbolic link; unpack into a real directory (links are never followed)")
    if not dest.exists():
        return "absent"
    if not _is_real_dir(str(dest)):
        raise QwenEdgeError(f"{dest} exists and is not a directory; choose another directory")
    if _is_empty_dir(dest):
        return "empty"
    if not force:
        raise QwenEdgeError(
            f"{dest} is not empty; pass --force to replace an earlier unpacked bundle there, or choose a new directory"
        )
    marker = dest / BUNDLE_JSON
    if marker.is_symlink() or not marker.is_file():
        raise QwenEdgeError(
            f"{dest} is not empty and holds no {BUNDLE_JSON}, so it is not an unpacked bundle; "
            "--force replaces only those: empty it yourself or choose a new directory"
        )
    return "bundle"


def _sibling(dest: Path, kind: str) -> Path:
    """A new directory next to `dest` (same file system, so renames are atomic), normal permissions."""
    while True:
        candidate = dest.parent / f".{dest.name}.{kind}-{secrets.token_hex(6)}"
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            continue


def unpack_bundle(bundle: str | Path, dest_dir: str | Path, *, force: bool = False, trusted_keys=None) -> UnpackReport:
    """Verify `bundle` fully (`verify_bundle`), then extract its listed files and bundle.json into `dest_dir`.

    `dest_dir` must not exist or be empty; with `force` it may also hold an earlier unpacked bundle (it has a
    bundle.json), which is then replaced as a whole: links and files in it are removed, never followed or
    written through. Anything else is refused. The files are extracted into a new directory next to
    `dest_dir`, each written under a temporary name and renamed into place once its sha256 matched, with
    normal permissions (zip modes are ignored); only when all are written is that directory renamed to
    `dest_dir`. On any failure it is removed and `dest_dir` is left as it was. With `trusted_keys` the bundle's
    signature is checked first, as in `verify_bundle`, and bundle.sig is unpacked too.
    """
    path = Path(bundle)
    dest = Path(os.path.abspath(dest_dir))
    _check_dest(dest, force)
    with _open_bundle(path) as fp:
        try:
            checked = _verify(fp, path)
            if trusted_keys:
                _check_signature(checked, trusted_keys, path)
        except OSError as e:
            raise BundleError(f"{path} cannot be read ({e.strerror or e}); re-copy the bundle") from None
        need = checked.report.bytes + len(checked.meta_bytes)
        free = shutil.disk_usage(dest.parent).free
        if need > free:
            raise QwenEdgeError(f"unpacking {path} needs {need} bytes, {dest.parent} has {free} free; free up space")
        staging = _sibling(dest, "unpack")
        try:
            root = os.path.realpath(staging)
            for name, (size, sha) in sorted(checked.table.items()):
                target = _target(root, name, path)
                _write_verified(target, _chunks(fp, checked.members[name], size, path), sha, name, path)
            _write_verified(
                _target(root, BUNDLE_JSON, path),
                (checked.meta_bytes,),
                hashlib.sha256(checked.meta_bytes).hexdigest(),
                BUNDLE_JSON,
                path,
            )
            if checked.signature is not None:
                sig = checked.signature
                _write_verified(
                    _target(root, BUNDLE_SIGNATURE, path),
                    (sig,),
                    hashlib.sha256(sig).hexdigest(),
                    BUNDLE_SIGNATURE,
                    path,
                )
            state = _check_dest(dest, force)  # again: it may have changed while the files were written
            if state == "empty":
                os.rmdir(dest)
                try:
                    os.rename(staging, dest)
                except BaseException:
                    os.mkdir(dest)
                    raise
            elif state == "bundle":
                old = _sibling(dest, "old")
                os.rmdir(old)
                os.rename(dest, old)
                try:
                    os.rename(staging, dest)
                except BaseException:
                    os.rename(old, dest)
                    raise
                shutil.rmtree(old, ignore_errors=True)  # removes links, never what they point to
            else:
                os.rename(staging, dest)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise QwenEdgeError(
                    f"unpacking {path} into {dest} failed ({e.strerror or e}); nothing was "
                    f"unpacked and {dest} is as it was"
                ) from e
            raise
    return UnpackReport(checked.report, dest, replaced=state == "bundle")
