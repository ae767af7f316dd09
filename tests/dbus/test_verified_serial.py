"""Serve only what was verified (issue 11, attacks 8 and 9): the real daemon on a private bus, on both libraries.

GetSerialAssertion answers from the serial this process verified; a serial.assertion swapped on disk
while the daemon runs is reported in the journal and never served; one found bad at a restart is
refused with a D-Bus error, not served. A serial other than the proposed one is reported with both
values on D-Bus and in the journal.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.dbus.conftest import BUS_NAME, PATH, Daemon, busctl, get_property, owned, seed_key, wait_for, write_config
from tests.fakes.faultyvault import FaultyVault


def get_serial(address: str) -> subprocess.CompletedProcess[str]:
    return busctl(address, "call", BUS_NAME, PATH, BUS_NAME, "GetSerialAssertion")


def swapped(text: str) -> str:
    """The same assertion with its serial header changed: what a local root process could write in its place."""
    return text.replace("serial: DBUS-0000000000dbus01", "serial: DBUS-planted-serial", 1)


def test_a_serial_swapped_on_disk_is_reported_and_never_served(tmp_path: Path, bus_address: str, backend: str,
                                                               lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "State") == 's "registered"')
        served = get_serial(bus_address)
        assert served.returncode == 0 and "DBUS-0000000000dbus01" in served.stdout
        path = state / "serial.assertion"
        planted = tmp_path / "planted"
        planted.write_text(swapped(path.read_text()))
        planted.chmod(0o644)
        planted.rename(path)  # replaced whole, as a rename by another root process does
        again = get_serial(bus_address)
        assert again.returncode == 0 and again.stdout == served.stdout and "planted" not in again.stdout
    finally:
        stderr = daemon.stop()
    assert f"{path} changed on disk after it was verified; serving the verified serial DBUS-0000000000dbus01" in stderr
    assert "Traceback" not in stderr


def test_after_a_restart_a_bad_serial_on_disk_is_refused_not_served(tmp_path: Path, bus_address: str, backend: str,
                                                                    lab: FaultyVault) -> None:
    state, config = tmp_path / "state", write_config(tmp_path, lab)
    seed_key(state)
    first = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "State") == 's "registered"')
    finally:
        first.stop()
    path = state / "serial.assertion"
    path.write_text(swapped(path.read_text()))  # its signature no longer verifies
    daemon = Daemon(bus_address, backend, config, state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "State") == 's "registered"')
        refused = get_serial(bus_address)
        assert refused.returncode != 0 and "planted" not in refused.stdout
        assert f"cannot serve {path}: it is not this device's verified serial" in refused.stderr, refused.stderr
    finally:
        stderr = daemon.stop()
    assert f"refusing to serve {path}" in stderr and "Traceback" not in stderr


def test_a_serial_other_than_the_proposed_one_is_reported_with_both(tmp_path: Path, bus_address: str, backend: str,
                                                                   lab: FaultyVault) -> None:
    state = tmp_path / "state"
    seed_key(state)
    lab.faults.assigned_serial = "VAULT-ASSIGNED-7"
    daemon = Daemon(bus_address, backend, write_config(tmp_path, lab), state)
    try:
        wait_for(lambda: owned(bus_address) and get_property(bus_address, "State") == 's "registered"')
        assert get_property(bus_address, "Serial") == 's "VAULT-ASSIGNED-7"'
        assert get_property(bus_address, "LastError") == 's "serial-not-proposed"'
        note = "the vault signed serial VAULT-ASSIGNED-7, not the proposed DBUS-0000000000dbus01"
        assert note in get_property(bus_address, "LastErrorMessage")
        assert get_property(bus_address, "Action") == 's ""'
    finally:
        stderr = daemon.stop()
    assert note in stderr
