"""Giving memory the process freed back to the system.

glibc's malloc keeps freed memory in its heap for reuse, and returns only the free top of the
heap on its own. After a burst, such as the hundreds of DTLS handshakes of a mesh coming back
after a restart (about 70 KB of OpenSSL state each, freed by the tunnels once their keys are
handed over), that free memory sits between live allocations and would stay in the RSS for
good. malloc_trim(0) hands every free page back; it takes a few milliseconds on a heap of a
hundred megabytes, so the supervisor calls it now and then. On a C library without it (musl)
`trim` does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("sdwan.common.heap")

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int
except (OSError, AttributeError):
    _malloc_trim = None


def trim() -> bool:
    """Return free heap pages to the system; True when the C library could do it."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
