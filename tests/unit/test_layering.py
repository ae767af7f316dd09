"""Imports point one way: the pure core never imports an adapter or does I/O."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"
CORE = {"assertions", "openpgp", "registration", "serials", "errors", "onboarding"}
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


def _agent_imports(path: Path) -> set[str]:
    """The agent modules ``path`` imports, wherever the import statement is (lazy and TYPE_CHECKING ones too)."""
    own = {p.stem for p in AGENT.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {alias.name for alias in node.names if alias.name in own}
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("agent.")}
    return found & own - {path.stem}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in ``graph`` (module -> modules it imports), or [] if there is none."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return []
        for imported in sorted(graph.get(name, ())):
            if found := visit(imported, [*path, name]):
                return found
        done.add(name)
        return []

    for name in sorted(graph):
        if found := visit(name, []):
            return found
    return []


def test_the_import_graph_of_agent_has_no_cycle() -> None:
    """A lazy import once hid daemon.py <-> snapd.py; every import statement counts, wherever it is."""
    graph = {path.stem: _agent_imports(path) for path in AGENT.glob("*.py")}
    assert _cycle(graph) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check itself finds one


def test_drivers_hold_a_session_and_subclass_nothing() -> None:
    """Modes by composition: no driver is another's subclass, and each holds the one shared Session."""
    import inspect

    from agent import daemon, session, snapd, standalone

    for driver in (standalone.StandaloneDriver, snapd.SnapdDriver):
        assert driver.__bases__ == (object,), driver
        assert inspect.signature(driver.__init__).parameters["session"].annotation == "Session", driver
    assert not [cls for cls in vars(session).values() if inspect.isclass(cls) and cls.__module__ == "agent.session"
                and issubclass(cls, (standalone.StandaloneDriver, snapd.SnapdDriver))]
    wiring = {name for name, value in vars(daemon).items() if inspect.isfunction(value) and value.__module__ == "agent.daemon"}
    assert wiring == {"main", "make_driver", "_publish_on_bus"}  # daemon.py only wires


def test_snapd_mode_reuses_the_standalone_vault_client_and_reconcile() -> None:
    """One vault client (snapd mode only shortens the timeout), one serial-adoption rule."""
    import inspect

    from agent import registration, session, snapd, standalone

    for driver in (standalone.StandaloneDriver, snapd.SnapdDriver):
        assert "VaultClient(vault, new_vault)" in inspect.getsource(driver)
    assert "vault.Vault(cfg)" in inspect.getsource(session.new_vault)
    assert "reconcile_snapd(" in inspect.getsource(registration.reconcile)
