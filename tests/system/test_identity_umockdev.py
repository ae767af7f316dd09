"""Hardware identity against real libudev and real uevents, on umockdev testbeds.

umockdev's preload library must be active from process start, so each case runs
`umockdev-wrapper /usr/bin/python3 tests/fakes/umockdev_run.py ... -- <this
interpreter> -c CHILD`: the helper builds the testbed (tests/data/umockdev), the
child calls agent.identity and prints its result as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import config, identity
from agent.errors import IdentityError
from agent.identity import DeviceIdentity
from tests.conftest import DATA, REPO

TESTBEDS = DATA / "umockdev"
HELPER = REPO / "tests" / "fakes" / "umockdev_run.py"
MACHINE_ID = "3d1219c7c4c5404aaa1f6d2a48adfda4"

# The command under test: IdentityConfig fields and read_identity's path arguments from argv[1].
CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path
from agent import config, errors, identity
args = json.loads(sys.argv[1])
identity.RESCAN_SECONDS = args.pop("rescan", identity.RESCAN_SECONDS)
gather, paths = args.pop("gather"), {k: Path(v) for k, v in args.pop("paths").items()}
cfg = config.IdentityConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
start = time.monotonic()
try:
    found = asyncio.run(identity.gather_identity(cfg, **paths)) if gather else identity.read_identity(cfg, **paths)
    out = {"identity": found.to_json()}
except errors.IdentityError as exc:
    out = {"error": str(exc)}
print(json.dumps(dict(out, elapsed=time.monotonic() - start)))
"""


@functools.cache
def umockdev_missing() -> str | None:
    if shutil.which("umockdev-wrapper") is None:
        return "umockdev-wrapper is not installed (Debian package umockdev)"
    probe = "import gi; gi.require_version('UMockdev', '1.0'); from gi.repository import UMockdev"
    if subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True, check=False).returncode != 0:
        return "the UMockdev GI typelib is not usable by /usr/bin/python3 (packages gir1.2-umockdev-1.0, python3-gi)"
    return None


@pytest.fixture
def machine_id(tmp_path: Path) -> Path:
    """The machine-id file for a testbed run (umockdev leaves /etc alone); skips without umockdev."""
    if why := umockdev_missing():
        pytest.skip(why)
    path = tmp_path / "machine-id"
    path.write_text(MACHINE_ID + "\n")
    return path


def run(testbed: str | None, machine_id: Path, *, hotplug: str | None = None, gather: bool = False,
        cpuinfo: Path | None = None, **cfg: Any) -> dict[str, Any]:
    """Run CHILD in a testbed; return its JSON ({"identity": ...} or {"error": ...}, and "elapsed")."""
    setup = []
    if testbed is not None:
        setup += ["--devices", str(TESTBEDS / f"{testbed}.umockdev")]
        if (TESTBEDS / f"{testbed}.root").is_dir():
            setup += ["--root", str(TESTBEDS / f"{testbed}.root")]
    if hotplug is not None:
        setup += ["--hotplug", str(TESTBEDS / f"{hotplug}.umockdev"), "--hotplug-delay", "1"]
    paths = {"machine_id": str(machine_id)} | ({"cpuinfo": str(cpuinfo)} if cpuinfo else {})
    args = json.dumps(dict(cfg, gather=gather, paths=paths))
    done = subprocess.run(
        ["umockdev-wrapper", "/usr/bin/python3", str(HELPER), *setup, "--timeout", "20", "--",
         sys.executable, "-W", "error::DeprecationWarning", "-c", CHILD, args],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(json.loads(done.stdout.splitlines()[-1]))


def read(testbed: str, machine_id: Path, **kwargs: Any) -> DeviceIdentity:
    out = run(testbed, machine_id, **kwargs)
    assert "identity" in out, out
    return DeviceIdentity.from_json(out["identity"])


def where(found: DeviceIdentity) -> dict[str, tuple[str, str]]:
    return {v.name: (v.value, v.path) for v in found.values}


def reasons(found: DeviceIdentity) -> dict[str, str]:
    return {f"{r.name} {r.path}": r.reason for r in found.rejected}


ETH0 = "/sys/devices/soc0/soc/2100000.bus/2184200.usb/ci_hdrc.1/usb1/1-1/1-1:1.0/net/eth0/address"
EMMC = "/sys/devices/soc0/soc/2100000.bus/2198000.mmc/mmc_host/mmc2/mmc2:0001"


def test_armhf_board(machine_id: Path) -> None:
    found = read("armhf-board", machine_id)
    assert where(found) == {
        "soc_serial": ("00000000c0ffee01", "/proc/cpuinfo"),
        "mmc_cid": ("450100444734303038024e3c2a1a7b00", f"{EMMC}/cid"),
        "mmc_serial": ("0x4e3c2a1a", f"{EMMC}/serial"),
        "mac": ("b8:27:eb:12:34:56", ETH0),
        "mac_eth0": ("b8:27:eb:12:34:56", ETH0),
        "machine_id": (identity.machine_id_candidate(MACHINE_ID, "").value, str(machine_id)),
    }
    assert reasons(found) == {
        "soc_serial /sys/devices/soc0/serial_number": "overridden by soc-serial value from /proc/cpuinfo",
        "mac_lo /sys/devices/virtual/net/lo/address": "virtual interface (no physical parent device)",
    }
    assert identity.proposed_serial(found, "{soc_serial}", allow_weak=False) == "00000000c0ffee01"
    assert identity.registration_body(found, allow_weak=False).startswith(
        b'hardware:\n  soc-serial: "00000000c0ffee01"\n  mmc-cid: "450100444734303038024e3c2a1a7b00"\n')


def test_armhf_board_without_cpuinfo_serial(machine_id: Path, tmp_path: Path) -> None:
    """A 64-bit kernel has no Serial in cpuinfo: soc0 comes next, then the device tree."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n")
    found = read("armhf-board", machine_id, cpuinfo=cpuinfo, sources=["mac", "soc-serial"])
    assert list(found.fields()) == ["mac", "mac_eth0", "soc_serial", "machine_id"]
    assert where(found)["soc_serial"] == ("2CB1C1D4F0A0F0D4", "/sys/devices/soc0/serial_number")
    assert reasons(found)["soc_serial /sys/firmware/devicetree/base/serial-number"] == \
        "overridden by soc-serial value from /sys/devices/soc0/serial_number"


def test_x86_machine_with_dmi(machine_id: Path) -> None:
    found = read("x86-dmi", machine_id, sources=["soc-serial", "dmi", "mac"])
    nic = "/sys/devices/pci0000:00/0000:00:1f.6/net/enp0s31f6/address"
    dmi = "/sys/devices/virtual/dmi/id"
    assert {k: v for k, v in where(found).items() if k != "machine_id"} == {
        "dmi_product_serial": ("PF2ABCDE", f"{dmi}/product_serial"),
        "dmi_product_uuid": ("4c4c4544-0042-3510-8052-b4c04f4e3232", f"{dmi}/product_uuid"),
        "dmi_board_serial": (".CN7016349V00HC.", f"{dmi}/board_serial"),
        "mac": ("3c:52:82:0a:0b:0c", nic),
        "mac_enp0s31f6": ("3c:52:82:0a:0b:0c", nic),
    }
    assert identity.proposed_serial(found, "{dmi_product_serial}", allow_weak=False) == "PF2ABCDE"
    with pytest.raises(IdentityError, match="no identity field 'soc_serial'"):
        identity.proposed_serial(found, "{soc_serial}", allow_weak=False)


def test_placeholders_leave_only_the_weak_machine_id(machine_id: Path) -> None:
    found = read("placeholders", machine_id, sources=["soc-serial", "mmc-cid", "mac", "dmi"])
    assert found.values == (identity.machine_id_candidate(MACHINE_ID, str(machine_id)),)
    assert found.values[0].weak and found.fields(allow_weak=False) == {}
    by_name = {r.name: r.reason for r in found.rejected}
    assert by_name == {
        "soc_serial": "all zeros",
        "mmc_cid": "all zeros",
        "mac_br0": "virtual interface (no physical parent device)",
        "mac_eth0": "locally administered address",
        "mac_eth1": "not a permanent address (addr_assign_type 1: random)",
        "dmi_product_serial": "a known placeholder, not a serial",
        "dmi_product_uuid": "a known placeholder, not a serial",
        "dmi_board_serial": "a known placeholder, not a serial",
    }
    assert len([r for r in found.rejected if r.name == "soc_serial"]) == 2  # /proc/cpuinfo and soc0
    with pytest.raises(IdentityError, match="only as weak identity"):
        identity.proposed_serial(found, "VM-{machine_id}", allow_weak=False)
    assert identity.proposed_serial(found, "VM-{machine_id}", allow_weak=True) == "VM-" + found.values[0].value
    assert identity.registration_body(found, allow_weak=False) == b"hardware: {}\n"


def test_gather_returns_at_once_when_nothing_is_missing(machine_id: Path) -> None:
    out = run("armhf-board", machine_id, gather=True, required=["soc_serial", "mac"], wait_seconds=10.0)
    assert DeviceIdentity.from_json(out["identity"]).fields()["mac"] == "b8:27:eb:12:34:56"
    assert out["elapsed"] < 1.0


def test_hotplugged_nic_is_found_by_its_uevent(machine_id: Path) -> None:
    """The NIC appears 1 s after start; rescans are pushed out to 30 s, so only the uevent can find it."""
    out = run(None, machine_id, hotplug="hotplug-nic", gather=True, sources=["mac"], required=["mac"],
              wait_seconds=10.0, rescan=30.0)
    assert "identity" in out, out
    assert DeviceIdentity.from_json(out["identity"]).fields(allow_weak=False) == {
        "mac": "00:e0:4c:68:01:02", "mac_eth0": "00:e0:4c:68:01:02"}
    assert 0.5 <= out["elapsed"] < 5.0


def test_required_nic_that_never_comes_is_a_clear_error(machine_id: Path) -> None:
    out = run("placeholders", machine_id, gather=True, sources=["mac"], required=["mac"], wait_seconds=1.0)
    assert out["error"].startswith("cannot find required identity field(s) mac after 1 s: mac: ")
    assert "02:fc:00:00:00:01 at /sys/devices/pci0000:00/0000:00:03.0/virtio2/net/eth0/address: " \
           "locally administered address" in out["error"]
    assert 1.0 <= out["elapsed"] < 3.0


def test_this_machine_and_systemd_agree_on_the_machine_id() -> None:
    """No umockdev: the real udev of this machine, and systemd's own app-specific id as the reference."""
    if shutil.which("systemd-id128") is None or not Path("/etc/machine-id").is_file():
        pytest.skip("needs systemd-id128 and /etc/machine-id")
    app = identity.MACHINE_ID_APP.hex()
    expected = subprocess.run(["systemd-id128", "machine-id", f"--app-specific={app}"], capture_output=True,
                              text=True, check=True).stdout.strip()
    found = identity.read_identity(config.IdentityConfig())
    assert found.fields()["machine_id"] == expected and found.values[-1].weak
