"""Artifact.open time: every file hashed (`--verify full`) against a stamped open (`auto`, the default).

    python benchmarks/open_time.py ARTIFACT [ARTIFACT ...]

The page cache is warm (one size-only open first), so "full" is the hashing itself, not the disk.
Stamps go to a temporary directory, never the app cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from qwen_edge.artifact import Artifact


def _timed(path: str, stamps: str, verify: str) -> float:
    start = time.perf_counter()
    Artifact.open(path, verify=verify, stamp_dir=stamps)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+")
    parser.add_argument("-r", type=int, default=5, help="repetitions of each mode (default 5)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}")
    for path in args.artifacts:
        stamps = tempfile.mkdtemp(prefix="qwen-edge-stamps-")
        try:
            Artifact.open(path, verify="size")
            total = sum(e["size"] for e in Artifact.open(path, verify="none").files.values())
            full = [_timed(path, stamps, "full") for _ in range(args.r)]  # each also writes the stamp
            auto = [_timed(path, stamps, "auto") for _ in range(args.r)]
        finally:
            shutil.rmtree(stamps, ignore_errors=True)
        print(
            f"{path} ({total / 1e6:.0f} MB): full {statistics.median(full) * 1000:.0f} ms, "
            f"stamped {statistics.median(auto) * 1000:.2f} ms (median of {args.r})"
        )


if __name__ == "__main__":
    main()
