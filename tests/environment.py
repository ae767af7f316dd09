"""What the machine under the tests offers, probed once: a test needing a missing feature skips at once
with the reason, never by timing out on what cannot happen (issue 15: a chroot without / as a mount
point, a container without CAP_SYS_ADMIN)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

import pytest


@functools.cache
def private_mounts() -> str:
    """Why a private mount namespace with mounts of its own cannot be made here; "" when it can."""
    if os.geteuid() != 0:
        return "needs root (mounts in a private mount namespace)"
    missing = [tool for tool in ("unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (util-linux)"
    # What the tests do: unshare --propagation private (which fails where / is no mount point), then a mount.
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/tmp"],
                           capture_output=True, text=True, timeout=10, check=False)
    if probe.returncode != 0:
        return f"no private mount namespace here: {probe.stderr.strip() or f'exit status {probe.returncode}'}"
    return ""


def need_private_mounts() -> None:
    reason = private_mounts()
    if reason:
        pytest.skip(reason)
