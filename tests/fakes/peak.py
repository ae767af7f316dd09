"""Peak RSS of a child process, measured so that the test process's own size does not leak into it.

Linux carries a process's peak RSS across fork (the copied mm keeps its high-water mark) and execve
(it is kept in the process's rusage): a daemon started straight from a pytest process that has grown
to 115 MiB reports ru_maxrss >= 115 MiB whatever it does itself. So the command runs as the
grandchild of a small launcher (this file, run as a script): the launcher's own peak, after its
execve, is a fresh interpreter's, and the grandchild's rusage from wait4() is its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LAUNCHER = Path(__file__).resolve()


def run(argv: list[str], peak_file: Path, **popen: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` through the launcher; after it ends, :func:`peak_kib` reads its peak RSS in KiB."""
    return subprocess.Popen([sys.executable, str(LAUNCHER), str(peak_file), *argv], **popen)


def peak_kib(peak_file: Path) -> int:
    return int(peak_file.read_text())


def _launch(peak_file: str, argv: list[str]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    Path(peak_file).write_text(f"{usage.ru_maxrss}\n")
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1], sys.argv[2:]))
