"""Peak resident memory of this process, the one helper the build, `bench` and the benchmarks use."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None

_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process so far, in MB (MiB); None where the OS does not tell (Windows).

    On Linux this is ``VmHWM``, the high-water mark of this program's own memory: ``ru_maxrss`` carries the
    peak of the process that forked it across ``execve``, so a small program started by a large one would
    report the large one's peak. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
