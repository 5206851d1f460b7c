"""peak_rss_mb: this program's own peak, not the peak of the process that started it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qwen_edge.memory import peak_rss_mb

RUNTIMES = Path(__file__).resolve().parents[1] / "runtimes"


def test_peak_grows_with_what_this_process_touches():
    before = peak_rss_mb()
    block = bytearray(256 << 20)
    block[::4096] = b"\x01" * len(block[::4096])
    assert peak_rss_mb() >= before + 200
    del block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss crosses execve on Linux")
def test_a_small_child_of_a_large_process_reports_its_own_peak():
    block = bytearray(1 << 30)  # 1 GiB touched in the parent before it starts the child
    block[::4096] = b"\x01" * len(block[::4096])
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from qwen_edge.memory import peak_rss_mb; print(peak_rss_mb())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(RUNTIMES)], capture_output=True, text=True, check=True)
    del block
    assert float(out.stdout) < 300, out.stdout
