"""What a test leg runs on, printed before its tests: `python3 -m tests.versions LEG`.

One line each for the interpreter, the distribution, every runtime dependency (agent.bundle's list,
the one a support bundle records, plus h11), the D-Bus library the daemon picks and the test tools.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from agent.bundle import LIBRARIES

TOOLS = ("pytest", "pytest-xdist", "hypothesis", "PyKCS11")


def distribution() -> str:
    try:
        lines = Path("/etc/os-release").read_text().splitlines()
    except OSError as exc:
        return f"unknown (/etc/os-release: {exc.strerror})"
    fields = dict(line.split("=", 1) for line in lines if "=" in line)
    return fields.get("PRETTY_NAME", "unknown").strip('"')


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def main(argv: list[str]) -> int:
    from agent.dbus_service import backend

    leg = argv[0] if argv else "this leg"
    print(f"=== {leg}: python {sys.version.split()[0]} ({sys.executable}) on {distribution()}")
    deps = ", ".join(f"{name} {version(name)}" for name in (*LIBRARIES, "h11"))
    print(f"=== {leg}: {deps}; D-Bus through {backend()[0].__name__}")
    print(f"=== {leg}: {', '.join(f'{name} {version(name)}' for name in TOOLS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
