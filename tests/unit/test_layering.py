"""Imports point one way: the pure core never imports an adapter or does I/O."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
CORE = {"assertions", "openpgp", "errors"}
FORBIDDEN = {"os", "io", "socket", "subprocess", "requests", "pyudev", "dbus_next", "dbus_fast", "systemd",
             "time", "asyncio", "threading", "pathlib", "shutil", "tempfile"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: agent's own modules
                names |= {f".{node.module or alias.name}" for alias in node.names}
            else:
                names.add((node.module or "").split(".")[0])
    return names


def test_core_imports_no_adapter_and_no_io() -> None:
    for name in CORE:
        imports = _imports(AGENT / f"{name}.py")
        own = {i.lstrip(".").split(".")[0] for i in imports if i.startswith(".")}
        assert own <= CORE, f"{name}.py imports adapters {own - CORE}"
        assert not imports & FORBIDDEN, f"{name}.py imports {imports & FORBIDDEN}"
