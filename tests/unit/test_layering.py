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


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """A helper two modules share is public (or moved): snapd.py once called daemon._check and friends."""
    own = {path.stem for path in AGENT.glob("*.py")}
    for path in AGENT.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
                    for alias in node.names if alias.name in own}
        reached = sorted(f"{node.value.id}.{node.attr}" for node in ast.walk(tree)
                         if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                         and node.value.id in imported and node.attr.startswith("_") and not node.attr.startswith("__"))
        assert not reached, f"{path.name} uses private names {reached}"


def test_snapd_mode_reuses_the_standalone_vault_client_and_reconcile() -> None:
    """One vault property (snapd mode only shortens the timeout), one serial-adoption rule."""
    import inspect

    from agent import registration, snapd

    assert "vault" not in vars(snapd.SnapdDriver)
    assert "reconcile_snapd(" in inspect.getsource(registration.reconcile)
