"""Secrets stay in the process: no core dump of the daemon or its key generation child.

A core of the daemon holds the api-key and, after the first boot, the device
key's PEM; a core written to the state directory, /var/crash or the journal
(systemd-coredump) would hand them to whoever reads it. ``RLIMIT_CORE`` 0
stops the kernel from writing a core file; ``PR_SET_DUMPABLE`` 0 also stops
a core handed to a pipe (core_pattern ``|...``), which ignores the limit, and
keeps other processes of the same uid from ptrace-attaching or reading
/proc/PID/mem. The unit adds ``LimitCORE=0``.
"""

from __future__ import annotations

import ctypes
import resource

_PR_SET_DUMPABLE = 4


def no_core_dumps() -> None:
    """Make this process (and what it execs, for the limit) write no core and admit no same-uid tracer."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the limit still holds
        pass
