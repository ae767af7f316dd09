"""What the .deb that the boards install ships (dpkg-deb -c, an independent reader): the unit, the bus
policy and contract, the man page, and the documentation a technician reads without network."""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _contents() -> set[str]:
    deb = os.environ.get("FACTORY_AGENT_QEMU_DEB") or max(glob.glob(str(REPO / "dist" / "factory-agent_*_all.deb")),
                                                          default="", key=os.path.getmtime)
    if not deb:
        pytest.fail("no dist/factory-agent_*_all.deb: run `make deb` (make qemu-test does)")
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True, timeout=60).stdout
    return {line.split()[-1].lstrip(".") for line in listing.splitlines() if line.strip()}


def test_the_package_ships_the_docs_the_unit_the_policy_and_the_man_page() -> None:
    files = _contents()
    docs = {f"/usr/share/doc/factory-agent/{path.name}" for path in [REPO / "README.md", *REPO.glob("docs/*.md")]}
    assert len(docs) > 1
    # dh_installdocs may compress the larger ones: either name is the document
    missing = [d for d in sorted(docs) if d not in files and f"{d}.gz" not in files]
    assert missing == [], missing
    units = {"/lib/systemd/system/factory-agent.service", "/usr/lib/systemd/system/factory-agent.service"}
    assert len(units & set(files)) == 1, units & set(files)  # where the suite's dh_installsystemd puts it
    for path in ("/usr/share/factory-agent/hooks/prepare-serial-request",
                 "/usr/share/dbus-1/system.d/io.factoryagent.Agent1.conf",
                 "/usr/share/dbus-1/interfaces/io.factoryagent.Agent1.xml", "/usr/share/man/man1/factory-agent.1.gz",
                 "/usr/bin/factory-agent"):
        assert path in files, path
