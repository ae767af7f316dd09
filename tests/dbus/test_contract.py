"""The D-Bus contract, systemd/io.factoryagent.Agent1.xml, is what the real daemon exports.

The daemon runs on a private bus, in both modes, on dbus-next and on dbus-fast; what
org.freedesktop.DBus.Introspectable.Introspect answers for io.factoryagent.Agent1 must be
the contract: the same methods with the same argument types and directions in order (and
the same argument names wherever the library exports names: today neither names an out
argument), the same properties with their types and access, the same signals (none: the
changes go out as org.freedesktop.DBus.Properties.PropertiesChanged, which must be there).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.labvault import LabVault
from tests.conftest import REPO
from tests.dbus.conftest import BUS_NAME, PATH, Daemon, busctl, owned, wait_for, write_config
from tests.fakes.snapdmode import write_snapd_config

CONTRACT = REPO / "systemd" / "io.factoryagent.Agent1.xml"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"


@dataclass(frozen=True, slots=True)
class Arg:
    name: str | None  # None: the library exports no name
    type: str
    direction: str


@dataclass(frozen=True, slots=True)
class Interface:
    methods: dict[str, tuple[Arg, ...]]
    properties: dict[str, tuple[str, str]]  # name -> (type, access)
    signals: dict[str, tuple[Arg, ...]]


def _named(elements: list[ET.Element], what: str) -> dict[str, ET.Element]:
    names = [str(e.get("name")) for e in elements]
    assert len(names) == len(set(names)), f"a {what} is declared twice: {names}"
    return dict(zip(names, elements, strict=True))


def _args(element: ET.Element, default_direction: str) -> tuple[Arg, ...]:
    return tuple(Arg(a.get("name") or None, str(a.get("type")), a.get("direction", default_direction))
                 for a in element.findall("arg"))


def parse_interface(xml: str, name: str = BUS_NAME) -> Interface:
    """The members of interface ``name`` in an introspection document."""
    found = [i for i in ET.fromstring(xml).findall("interface") if i.get("name") == name]
    assert len(found) == 1, f"{len(found)} interfaces {name}"
    interface = found[0]
    return Interface(
        methods={n: _args(m, "in") for n, m in _named(interface.findall("method"), "method").items()},
        properties={n: (str(p.get("type")), str(p.get("access")))
                    for n, p in _named(interface.findall("property"), "property").items()},
        signals={n: _args(s, "out") for n, s in _named(interface.findall("signal"), "signal").items()},
    )


def _same_args(exported: tuple[Arg, ...], contract: tuple[Arg, ...]) -> bool:
    """Types and directions in order; a name only where the library exports one."""
    return len(exported) == len(contract) and all(
        (e.type, e.direction) == (c.type, c.direction) and e.name in (None, c.name)
        for e, c in zip(exported, contract, strict=True))


def differences(exported: Interface, contract: Interface) -> list[str]:
    """Every way the exported interface differs from the contract, one line each (empty: they agree)."""
    found = []
    for kind, compare in (("methods", _same_args), ("signals", _same_args), ("properties", _equal)):
        ours, theirs = getattr(exported, kind), getattr(contract, kind)
        found += [f"{kind}: exported but not in the contract: {n}" for n in sorted(set(ours) - set(theirs))]
        found += [f"{kind}: in the contract but not exported: {n}" for n in sorted(set(theirs) - set(ours))]
        found += [f"{kind}: {n}: exported {ours[n]}, contract {theirs[n]}"
                  for n in sorted(set(ours) & set(theirs)) if not compare(ours[n], theirs[n])]
    return found


def _equal(a: object, b: object) -> bool:
    return a == b


def introspect(address: str) -> str:
    done = busctl(address, "--json=short", "call", BUS_NAME, PATH, "org.freedesktop.DBus.Introspectable", "Introspect")
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    assert reply["type"] == "s"
    return str(reply["data"][0])


def test_the_contract_names_every_argument_and_parses() -> None:
    contract = parse_interface(CONTRACT.read_text())
    assert contract.methods and contract.properties
    for member, args in [*contract.methods.items(), *contract.signals.items()]:
        for arg in args:
            assert arg.name and not re.fullmatch(r"arg_?\d+", arg.name), f"{member}: an unnamed argument {arg}"
    assert all(access == "read" for _, access in contract.properties.values())  # ARCHITECTURE.md: all read-only


ModeConfig = Callable[[Path, LabVault], Path]
MODES: dict[str, ModeConfig] = {
    "standalone": write_config,
    "snapd": lambda tmp, lab: write_snapd_config(tmp, lab.url, lab.directory),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_daemon_exports_the_contract(tmp_path: Path, bus_address: str, backend: str, lab: LabVault,
                                         mode: str) -> None:
    daemon = Daemon(bus_address, backend, MODES[mode](tmp_path, lab), tmp_path / "state")
    try:
        wait_for(lambda: owned(bus_address))
        exported = introspect(bus_address)
    finally:
        stderr = daemon.stop()
    assert "Traceback" not in stderr
    assert differences(parse_interface(exported), parse_interface(CONTRACT.read_text())) == []
    # the contract's EmitsChangedSignal relies on the standard signal
    standard = parse_interface(exported, PROPERTIES_INTERFACE)
    assert [a.type for a in standard.signals["PropertiesChanged"]] == ["s", "a{sv}", "as"]


def test_a_difference_is_seen() -> None:
    """The comparison itself: each kind of drift from the contract is reported."""
    contract = parse_interface(CONTRACT.read_text())
    root = ET.fromstring(CONTRACT.read_text())
    interface = next(i for i in root.findall("interface") if i.get("name") == BUS_NAME)
    state = next(p for p in interface.findall("property") if p.get("name") == "State")
    state.set("type", "u")
    interface.remove(next(p for p in interface.findall("property") if p.get("name") == "Version"))
    out = next(m for m in interface.findall("method") if m.get("name") == "GetSerialAssertion").find("arg")
    assert out is not None
    out.set("type", "ay")
    ET.SubElement(interface, "signal", name="Changed")
    drifted = parse_interface(ET.tostring(root, encoding="unicode"))
    assert differences(drifted, contract) == [
        ("methods: GetSerialAssertion: exported (Arg(name='assertion', type='ay', direction='out'),), "
         "contract (Arg(name='assertion', type='s', direction='out'),)"),
        "signals: exported but not in the contract: Changed",
        "properties: in the contract but not exported: Version",
        "properties: State: exported ('u', 'read'), contract ('s', 'read')",
    ]
    renamed = (Arg("serial", "s", "out"),)
    assert not _same_args(renamed, contract.methods["GetSerialAssertion"])  # a name, where exported, must match
    assert _same_args((Arg(None, "s", "out"),), contract.methods["GetSerialAssertion"])
