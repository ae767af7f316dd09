"""The QEMU harness's shell scripts (tests/qemu) are POSIX sh and shellcheck-clean.

They run as root on the host (build-image.sh) and inside the guest (initrd /init, the harness
entry), where a quoting slip is a lost afternoon; the boots themselves run only in `make qemu-test`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

QEMU = Path(__file__).resolve().parents[1] / "qemu"
SCRIPTS = [QEMU / "build-image.sh", QEMU / "initrd-init", QEMU / "guest" / "qemu-test-entry"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_posix_sh_and_shellcheck_clean(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n")
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck (Debian package shellcheck; make deps) is not installed")
    done = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
