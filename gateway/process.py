"""Process-wide settings a long-running relay wants before it serves anything.

- glibc's malloc gives buffers above 128 KiB their own mmap and returns freed memory at
  the top of the heap to the kernel. A relay allocates and frees such buffers for every
  read and write, so each one page-faults its memory in again: measured at 15% of the
  CPU per GB relayed over TLS. Larger thresholds keep those buffers in the heap for
  reuse; memory a busy relay freed stays mapped (at most the trim threshold) until
  reused.
- The soft open-files limit is often 1,024 while the hard limit is far higher; every
  session holds at least one socket, so take what the hard limit allows (what nginx's
  ``worker_rlimit_nofile`` and systemd's ``LimitNOFILE=`` do).
"""

from __future__ import annotations

import ctypes
import logging
import resource
import sys

log = logging.getLogger("tunnelgate.process")

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024  # above the largest read, write or window piece we allocate
TRIM_THRESHOLD = 16 * 1024 * 1024


def tune_process() -> None:
    _tune_malloc()
    _raise_open_files_limit()


def _tune_malloc() -> bool:
    """Best effort: only glibc has these knobs (musl and macOS do without)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return True
    log.debug("mallopt refused the thresholds; keeping malloc's defaults")
    return False


def _raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-files limit from %s: %s", soft, exc)
