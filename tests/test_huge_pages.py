"""`jambalab.bench.machine.huge_pages()` says truthfully whether torch's CPU allocator gets
transparent huge pages (THP_MEM_ALLOC_ENABLE, read by torch once, at its first allocation).

Each case runs in a fresh interpreter with the variable set or not before torch is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import torch
from jambalab.bench.machine import huge_pages
x = torch.ones(32 * 2**20)                  # 128 MiB, above torch's 2 MiB THP threshold
x += 1                                      # touch every page
huge = 0
for line in open("/proc/self/smaps_rollup"):
    if line.startswith("AnonHugePages:"):
        huge = int(line.split()[1])
print(huge, huge_pages())
"""


def _run(env_value: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=120).stdout.strip()
    huge, report = out.split(" ", 1)
    return int(huge), report


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return None


@pytest.mark.skipif(_thp_mode() != "madvise" or not Path("/proc/self/smaps_rollup").exists(),
                    reason="needs Linux with transparent huge pages in madvise mode")
def test_huge_pages_report_matches_what_the_allocator_got():
    huge, report = _run("1")
    assert report == "on (kernel THP madvise)"
    assert huge > 0                          # KiB in 2 MiB pages (how many depends on fragmentation)
    for value, shown in ((None, "unset"), ("0", "0")):
        huge, report = _run(value)
        assert report == f"off (kernel THP madvise, THP_MEM_ALLOC_ENABLE={shown})"
        assert huge == 0
