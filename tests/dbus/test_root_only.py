"""Retry() and GetRegistrationSettings() are root's even where the bus policy lets anyone call them.

On Ubuntu Core the agent's D-Bus slot gets snapd's policy, which lets any user send to the name; the
agent then checks the caller's uid itself (GetConnectionUnixUser). Here a private system-like
dbus-daemon loads a policy shaped like snapd's, the real daemon runs as root, and uid 65534 calls.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.labvault import LabVault
from tests.dbus.conftest import BUS_NAME, PATH, seed_key, wait_for, write_config
from tests.dbus.test_flood import SystemBus, SystemDaemon, private_system_bus

NOBODY = 65534
# What snapd writes for a `dbus` slot on the system bus: root owns the name, anyone may send to it.
SNAPD_LIKE_POLICY = f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy user="root"><allow own="{BUS_NAME}"/></policy>
  <policy context="default"><allow send_destination="{BUS_NAME}"/></policy>
</busconfig>
"""


@pytest.fixture
def open_bus() -> Iterator[SystemBus]:
    with private_system_bus(SNAPD_LIKE_POLICY) as bus:
        yield bus


def call(address: str, uid: int, member: str, *args: str) -> subprocess.CompletedProcess[str]:
    as_user = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    return subprocess.run([*as_user, "busctl", f"--address={address}", "call", BUS_NAME, PATH, BUS_NAME, member,
                           *args], capture_output=True, text=True, timeout=20, check=False)


def test_nobody_is_refused_by_the_agent_where_the_bus_lets_it_through(tmp_path: Path, open_bus: SystemBus,
                                                                       backend: str, lab: LabVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    daemon = SystemDaemon(open_bus, backend, write_config(tmp_path, lab), state)
    try:
        wait_for(lambda: call(open_bus.address, 0, "GetSerialAssertion").returncode == 0)  # registered, name owned
        # The bus lets nobody through (a method the agent does not guard answers it) ...
        served = call(open_bus.address, NOBODY, "GetSerialAssertion")
        assert served.returncode == 0 and "type: serial" in served.stdout, served.stderr
        # ... the agent does not.
        for member, args in (("Retry", ()), ("GetRegistrationSettings", ()), ("SignRequestId", ("s", "REQ-1"))):
            refused = call(open_bus.address, NOBODY, member, *args)  # busctl shows AccessDenied as "Access denied"
            assert refused.returncode != 0 and "Access denied" in refused.stderr, refused
            assert f"refused {member} from :" in daemon.stderr()  # the agent's refusal, not the bus's
        assert call(open_bus.address, 0, "Retry").returncode == 0
        as_root = call(open_bus.address, 0, "GetRegistrationSettings")
        assert "the agent runs in standalone mode" in as_root.stderr, as_root  # past the check, to the daemon
        signing = call(open_bus.address, 0, "SignRequestId", "s", "REQ-1")
        assert "signs its own request-ids" in signing.stderr, signing
        assert "takes (s)" in call(open_bus.address, 0, "SignRequestId").stderr  # no argument: refused, not a crash
        daemon.check_alive()
    finally:
        log = daemon.stop()
    assert log.count("root only") == 3 and "Traceback" not in log
