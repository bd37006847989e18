"""Process tuning at start-up: malloc thresholds and the open-files limit."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from gateway import process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux knobs")


def test_malloc_thresholds_are_taken_on_glibc() -> None:
    libc, _version = os.confstr("CS_GNU_LIBC_VERSION").split()  # type: ignore[union-attr]
    assert libc == "glibc"
    assert process._tune_malloc() is True


def test_open_files_soft_limit_is_raised_to_the_hard_limit() -> None:
    # In a child, so this test process keeps its own limits.
    code = (
        "import resource\n"
        "from gateway.process import tune_process\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "tune_process()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    soft, hard = map(int, out.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20
    assert soft == expected > 256
