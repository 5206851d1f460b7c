"""Peak resident memory of this process, the one helper the build, `bench` and the benchmarks use."""

from __future__ import annotations

import sys

try:
    import resource
except ImportError:  # Windows
    resource = None


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MB (MiB); None where the OS does not tell (Windows).

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS.
    """
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
