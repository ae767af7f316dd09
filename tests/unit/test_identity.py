"""Hardware identity, the pure part: rules, assembly, outputs, and the wait loop with a fake monitor.

Nothing here touches udev: the adapter is fed fake pyudev-like objects, and the
wait loop a fake monitor on a pipe. Real udev (umockdev) is in tests/system.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent import config, identity
from agent.errors import IdentityError
from agent.identity import DeviceIdentity, Nic, Rejected, Value
from tests.conftest import DATA

ARM_CPUINFO = ("processor\t: 0\nmodel name\t: ARMv7 Processor rev 4 (v7l)\nHardware\t: BCM2835\n"
               "Serial\t\t: 00000000c0ffee01\n")
# Produced by systemd itself: `systemd-id128 machine-id --app-specific=acc19a96d3d84b07940671c7734ede85`
# on a machine whose /etc/machine-id is the key here.
MACHINE_ID_VECTOR = ("3d1219c7c4c5404aaa1f6d2a48adfda4", "1ba7fe6d5e0247ad8943259fee5b7aef")


def ident(*values: Value, rejected: tuple[Rejected, ...] = ()) -> DeviceIdentity:
    return DeviceIdentity(tuple(values), rejected)


SOC = Value("soc_serial", "00000000c0ffee01", "soc-serial", "/proc/cpuinfo")
MAC = Value("mac", "b8:27:eb:12:34:56", "mac", "/sys/devices/x/net/eth0/address")
WEAK = Value("machine_id", MACHINE_ID_VECTOR[1], "machine-id", "/etc/machine-id", weak=True)
LAA = Rejected("mac_eth0", "02:fc:00:00:00:01", "mac", "/sys/e", "locally administered address")


# ---- values ----------------------------------------------------------------


@pytest.mark.parametrize("value", [
    "", "   ", "0", "00000000", "0000000000000000", "00:00:00:00:00:00", "00000000-0000-0000-0000-000000000000",
    "0x00000000", "FFFFFFFF", "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "To be filled by O.E.M.", "TO BE FILLED BY O.E.M.",
    "Default string", "default STRING", "None", "Not Specified", "not applicable", "System Serial Number",
    "0123456789ABCDEF", "123456789", "03000200-0400-0500-0006-000700080009", "--", "bad\nvalue", "caf\ufffd",
])
def test_not_identities_are_rejected_with_a_reason(value: str) -> None:
    assert identity.check_value(value)
    rejected = identity.accept("dmi_product_serial", value, "dmi", "/sys/x")
    assert isinstance(rejected, Rejected) and rejected.reason == identity.check_value(value)


@pytest.mark.parametrize("value", ["00000000c0ffee01", "PF2ABCDE", ".CN7016349V00HC.", "0x4e3c2a1a",
                                   "4c4c4544-0042-3510-8052-b4c04f4e3232", "1"])
def test_real_serials_are_accepted(value: str) -> None:
    assert identity.check_value(value) is None
    assert identity.accept("soc_serial", value, "soc-serial", "/p") == Value("soc_serial", value, "soc-serial", "/p")


@pytest.mark.parametrize("size", [257, 200 * 1024, 1024 * 1024])
def test_a_value_longer_than_256_bytes_is_rejected_and_not_carried_whole(size: int) -> None:
    """A 200 KiB-1 MiB value would make a serial-request snapd's decoder refuses (issue 11, attack 9)."""
    value = "A" * size
    rejected = identity.accept("soc_serial", value, "static", "config")
    assert isinstance(rejected, Rejected)
    assert rejected.reason == f"{size} bytes long, over the 256 an identity value may be"
    assert len(rejected.value) <= 64  # what `identity` and the journal show of it
    found = identity.build_identity([], {"soc_serial": value})
    assert "soc_serial" not in found.fields(allow_weak=True)
    with pytest.raises(IdentityError, match="soc_serial"):
        identity.proposed_serial(found, "{soc_serial}", allow_weak=True)


def test_256_bytes_is_still_a_value() -> None:
    assert identity.check_value("A" * 256) is None
    assert identity.check_value("\u00e9" * 129) == "258 bytes long, over the 256 an identity value may be"  # UTF-8 bytes


def test_reasons_say_what_is_wrong() -> None:
    assert identity.check_value("0000") == "all zeros"
    assert identity.check_value("Default string") == "a known placeholder, not a serial"
    assert identity.check_value("") == "empty"
    assert "field name" in identity.accept("bad-name", "x1", "static", "config").reason  # type: ignore[union-attr]


def test_cpuinfo_serial() -> None:
    assert identity.parse_cpuinfo_serial(ARM_CPUINFO) == "00000000c0ffee01"
    assert identity.parse_cpuinfo_serial("processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme\n") is None
    assert identity.parse_cpuinfo_serial("") is None
    zeros = identity.parse_cpuinfo_serial("Serial\t\t: 0000000000000000\n")
    assert zeros == "0000000000000000" and identity.check_value(zeros) == "all zeros"


def test_device_tree_strings_end_at_their_nul() -> None:
    assert identity.decode_attribute(b"00000000c0ffee01\x00") == "00000000c0ffee01"
    assert identity.decode_attribute(b"first\x00second\x00") == "first"
    assert identity.decode_attribute(b" PF2ABCDE\n") == "PF2ABCDE"


# ---- MACs ------------------------------------------------------------------


@pytest.mark.parametrize(("address", "virtual", "assign", "reason"), [
    ("b8:27:eb:12:34:56", False, 0, None),
    ("b8:27:eb:12:34:56", False, None, None),
    ("b8:27:eb:12:34:56", True, 0, "virtual interface (no physical parent device)"),
    ("b8:27:eb:12:34:56", False, 1, "not a permanent address (addr_assign_type 1: random)"),
    ("b8:27:eb:12:34:56", False, 3, "not a permanent address (addr_assign_type 3: set from user space)"),
    ("02:fc:00:00:00:01", False, 0, "locally administered address"),
    ("01:00:5e:00:00:01", False, 0, "multicast address"),
    ("ff:ff:ff:ff:ff:ff", False, 0, "multicast address"),
    ("00:00:00:00:00:00", False, 0, "all zeros"),
    ("", False, 0, "not an EUI-48 MAC address"),
    ("80:00:00:00:00:00:00:00:fe:80:00:00:00:00:00:00:00:11:22:33", False, 0, "not an EUI-48 MAC address"),
])
def test_mac_rules(address: str, virtual: bool, assign: int | None, reason: str | None) -> None:
    assert identity.check_mac(address, virtual=virtual, assign_type=assign) == reason


def test_mac_is_the_lowest_named_accepted_nic() -> None:
    nics = [
        Nic("eth10", "B8:27:EB:00:00:10", "/sys/a/eth10/address", virtual=False, assign_type=0),
        Nic("eth2", "b8-27-eb-00-00-02", "/sys/a/eth2/address", virtual=False),
        Nic("eth0", "02:00:00:00:00:01", "/sys/a/eth0/address", virtual=False, assign_type=0),
        Nic("lo", "00:00:00:00:00:00", "/sys/devices/virtual/net/lo/address", virtual=True),
        Nic("wlan-1.5", "b8:27:eb:00:00:15", "/sys/a/w/address", virtual=False),
    ]
    found = identity.mac_candidates(nics)
    accepted = {c.name: c.value for c in found if isinstance(c, Value)}
    assert accepted == {"mac": "b8:27:eb:00:00:02", "mac_eth2": "b8:27:eb:00:00:02",
                        "mac_eth10": "b8:27:eb:00:00:10", "mac_wlan_1_5": "b8:27:eb:00:00:15"}
    assert [c.name for c in found] == ["mac_eth0", "mac", "mac_eth2", "mac_eth10", "mac_lo", "mac_wlan_1_5"]
    assert {c.name: c.reason for c in found if isinstance(c, Rejected)} == {
        "mac_eth0": "locally administered address", "mac_lo": "virtual interface (no physical parent device)"}


def test_no_accepted_nic_means_no_mac() -> None:
    found = identity.mac_candidates([Nic("eth0", "02:00:00:00:00:01", "/p", virtual=False)])
    assert [type(c) for c in found] == [Rejected]


# ---- machine-id --------------------------------------------------------------


def test_machine_id_is_weak_and_app_specific_as_systemd_computes_it() -> None:
    found = identity.machine_id_candidate(MACHINE_ID_VECTOR[0] + "\n", "/etc/machine-id")
    assert found == Value("machine_id", MACHINE_ID_VECTOR[1], "machine-id", "/etc/machine-id", weak=True)


@pytest.mark.parametrize(("text", "reason"), [
    ("uninitialized\n", "not initialized yet (first boot)"),
    ("", "empty"),
    ("0" * 32, "all zeros"),
    ("3D1219C7C4C5404AAA1F6D2A48ADFDA4", "not 32 lowercase hexadecimal digits"),
    ("3d1219c7-c4c5-404a-aa1f-6d2a48adfda4", "not 32 lowercase hexadecimal digits"),
])
def test_bad_machine_ids_are_rejected(text: str, reason: str) -> None:
    found = identity.machine_id_candidate(text, "/etc/machine-id")
    assert isinstance(found, Rejected) and found.reason == reason


# ---- assembly ----------------------------------------------------------------


def test_machine_id_is_always_the_last_resort() -> None:
    assert identity.source_order(["soc-serial", "mac", "soc-serial"]) == ["soc-serial", "mac", "machine-id"]
    assert identity.source_order(["machine-id", "dmi"]) == ["machine-id", "dmi"]
    assert identity.source_order([]) == ["machine-id"]
    with pytest.raises(IdentityError, match=r"unknown source.*tpm"):
        identity.source_order(["tpm"])


def test_static_fields_come_first_and_override() -> None:
    found = [SOC, Value("soc_serial", "2CB1C1D4F0A0F0D4", "soc-serial", "/sys/devices/soc0/serial_number"),
             Value("soc_serial", SOC.value, "soc-serial", "/sys/firmware/devicetree/base/serial-number"), MAC, WEAK]
    result = identity.build_identity(found, {"mac": "00:11:22:33:44:55", "label": "ACME-LABEL-7", "bad-name": "x",
                                             "board": "Default string"})
    assert [(v.name, v.value, v.source, v.path) for v in result.values] == [
        ("mac", "00:11:22:33:44:55", "static", "config"), ("label", "ACME-LABEL-7", "static", "config"),
        ("soc_serial", SOC.value, "soc-serial", "/proc/cpuinfo"), ("machine_id", WEAK.value, "machine-id", WEAK.path)]
    reasons = {(r.name, r.value): r.reason for r in result.rejected}
    assert reasons[("soc_serial", "2CB1C1D4F0A0F0D4")] == "overridden by soc-serial value from /proc/cpuinfo"
    assert reasons[("mac", MAC.value)] == "overridden by static value from config"
    assert reasons[("board", "Default string")] == "a known placeholder, not a serial"
    assert "field name" in reasons[("bad-name", "x")]
    assert len(result.rejected) == 4  # the device-tree serial, equal to cpuinfo's, is no news


def test_fields_and_missing_handle_weak_values() -> None:
    found = ident(SOC, WEAK)
    assert found.fields() == {"soc_serial": SOC.value, "machine_id": WEAK.value}
    assert found.fields(allow_weak=False) == {"soc_serial": SOC.value}
    assert found.missing(["soc_serial", "machine_id", "mac", "mac"]) == ["mac"]
    assert found.missing(["soc_serial", "machine_id"], allow_weak=False) == ["machine_id"]


def test_explain_missing_names_each_field_and_why() -> None:
    unreadable = Rejected("dmi_product_serial", "", "dmi", "/sys/d/product_serial", "cannot read: permission denied")
    found = ident(WEAK, rejected=(LAA, unreadable))
    text = identity.explain_missing(found, ["mac", "dmi_product_serial", "machine_id", "soc_serial"], allow_weak=False)
    assert "mac: 02:fc:00:00:00:01 at /sys/e: locally administered address" in text
    assert "dmi_product_serial: unreadable at /sys/d/product_serial: cannot read: permission denied" in text
    assert "machine_id: only weak identity" in text and "soc_serial: no candidate found" in text


# ---- serial, body, JSON, text ------------------------------------------------


def test_proposed_serial() -> None:
    found = ident(SOC, MAC, WEAK)
    assert identity.proposed_serial(found, "{soc_serial}", allow_weak=False) == "00000000c0ffee01"
    assert identity.proposed_serial(found, "ACME-{soc_serial:.8}-{mac}", allow_weak=False) == \
        "ACME-00000000-b8:27:eb:12:34:56"
    assert identity.proposed_serial(found, "VM-{machine_id}", allow_weak=True) == "VM-" + WEAK.value


@pytest.mark.parametrize(("template", "allow_weak", "message"), [
    ("{dmi_product_serial}", True, "no identity field 'dmi_product_serial'"),
    ("{machine_id}", False, "no identity field 'machine_id' (only as weak identity"),
    ("{soc_serial}/{mac}", True, "without '/'"),
    ("", True, "non-empty"),
    ("{0}", True, "not a plain field name"),
    ("{}", True, "not a plain field name"),
    ("{mac.upper}", True, "not a plain field name"),
    ("{mac[0]}", True, "not a plain field name"),
    ("{soc_serial", True, "cannot use serial template"),
    ("{soc_serial:{width}}", True, "cannot build proposed serial"),
    ("{soc_serial:d}", True, "cannot build proposed serial"),
    ("a\n{soc_serial}", True, "printable"),
])
def test_proposed_serial_errors(template: str, allow_weak: bool, message: str) -> None:
    with pytest.raises(IdentityError, match=message.replace("(", r"\(").replace(".", r"\.")):
        identity.proposed_serial(ident(SOC, MAC, WEAK), template, allow_weak)


def test_registration_body_matches_the_snapd_vector() -> None:
    assert identity.registration_body(ident(SOC, MAC, WEAK), allow_weak=False) == (DATA / "body.yaml").read_bytes()
    with_weak = identity.registration_body(ident(SOC, MAC, WEAK), allow_weak=True)
    assert with_weak.endswith(f'  machine-id: "{WEAK.value}"\n'.encode())
    mac_if = Value("mac_wlan_1_5", "b8:27:eb:00:00:15", "mac", "/p")
    assert identity.registration_body(ident(mac_if), allow_weak=False) == \
        b'hardware:\n  mac-wlan-1-5: "b8:27:eb:00:00:15"\n'
    assert identity.registration_body(ident(WEAK), allow_weak=False) == b"hardware: {}\n"


def test_registration_body_quotes_what_yaml_would_misread() -> None:
    odd = ident(Value("label", 'say "hi" \\ caf\u00e9 #1: x', "static", "config"),
                Value("yes", "y1", "static", "config"))
    body = identity.registration_body(odd, allow_weak=False)
    assert body == b'hardware:\n  label: "say \\"hi\\" \\\\ caf\\u00e9 #1: x"\n  "yes": "y1"\n'
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(body) == {"hardware": {"label": 'say "hi" \\ caf\u00e9 #1: x', "yes": "y1"}}
    assert yaml.safe_load((DATA / "body.yaml").read_bytes()) == yaml.safe_load(
        identity.registration_body(ident(SOC, MAC), allow_weak=False))


def test_json_round_trip() -> None:
    found = ident(SOC, MAC, WEAK, rejected=(LAA,))
    data = json.loads(json.dumps(found.to_json()))
    assert data == {
        "version": 1,
        "values": [
            {"name": "soc_serial", "value": SOC.value, "source": "soc-serial", "path": "/proc/cpuinfo", "weak": False},
            {"name": "mac", "value": MAC.value, "source": "mac", "path": MAC.path, "weak": False},
            {"name": "machine_id", "value": WEAK.value, "source": "machine-id", "path": WEAK.path, "weak": True},
        ],
        "rejected": [{"name": "mac_eth0", "value": "02:fc:00:00:00:01", "source": "mac", "path": "/sys/e",
                      "reason": "locally administered address"}],
    }
    assert DeviceIdentity.from_json(data) == found
    assert DeviceIdentity.from_json(dict(data, future_key=1)) == found
    assert DeviceIdentity.from_json({"version": 1, "values": [], "rejected": []}) == ident()


def _entry(**changes: Any) -> dict[str, Any]:
    return dict({"name": "mac", "value": "v", "source": "mac", "path": "/p", "weak": False}, **changes)


@pytest.mark.parametrize("data", [
    None, [], "x", {}, {"version": 2, "values": [], "rejected": []}, {"version": 1, "values": []},
    {"version": 1, "values": {}, "rejected": []}, {"version": 1, "values": ["x"], "rejected": []},
    {"version": 1, "values": [_entry(value=1)], "rejected": []},
    {"version": 1, "values": [_entry(weak="no")], "rejected": []},
    {"version": 1, "values": [_entry(source="tpm")], "rejected": []},
    {"version": 1, "values": [_entry(name="bad name")], "rejected": []},
    {"version": 1, "values": [_entry(), _entry()], "rejected": []},
    {"version": 1, "values": [], "rejected": [_entry()]},  # no reason
])
def test_from_json_refuses_bad_input(data: Any) -> None:
    with pytest.raises(IdentityError, match="cannot decode identity"):
        DeviceIdentity.from_json(data)


def test_format_identity() -> None:
    text = identity.format_identity(ident(SOC, WEAK, rejected=(LAA,)))
    lines = text.splitlines()
    assert lines[0] == "soc_serial  00000000c0ffee01  (soc-serial: /proc/cpuinfo)"
    assert lines[1].endswith("(machine-id: /etc/machine-id) (weak)")
    assert lines[2:] == ["rejected:", "  mac_eth0    02:fc:00:00:00:01  (mac: /sys/e): locally administered address"]
    assert identity.format_identity(ident()) == "no identity found"


# ---- the adapter, fed fake pyudev objects ------------------------------------


class FakeDevice:
    def __init__(self, sys_path: Path, subsystem: str, attrs: dict[str, str], parent: object | None = None) -> None:
        self.sys_path, self.sys_name, self.subsystem, self.parent = str(sys_path), sys_path.name, subsystem, parent
        self.attributes = SimpleNamespace(get=lambda name: attrs[name].encode() if name in attrs else None)


class FakeContext:
    def __init__(self, *devices: FakeDevice, error: OSError | None = None) -> None:
        self.devices, self.error = devices, error

    def list_devices(self, subsystem: str) -> list[FakeDevice]:
        if self.error:
            raise self.error
        return [d for d in self.devices if d.subsystem == subsystem]


def test_read_identity_through_a_fake_udev(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(ARM_CPUINFO)
    (tmp_path / "machine-id").write_text(MACHINE_ID_VECTOR[0] + "\n")
    usb = FakeDevice(tmp_path / "usb1", "usb", {})
    context = FakeContext(
        FakeDevice(tmp_path / "mmc1:0001", "mmc", {"type": "SD", "cid": "sdcid0001", "serial": "0x1"}),
        FakeDevice(tmp_path / "mmc0:0001", "mmc", {"type": "SDIO"}),
        FakeDevice(tmp_path / "mmc2:0001", "mmc", {"type": "MMC", "cid": "00000000", "serial": "0x0"}),
        FakeDevice(tmp_path / "mmc3:0001", "mmc", {"type": "MMC", "cid": "emmccid0003", "serial": "0x3"}),
        FakeDevice(tmp_path / "eth0", "net", {"address": "b8:27:eb:12:34:56", "addr_assign_type": "0"}, parent=usb),
        FakeDevice(tmp_path / "devices/virtual/net/lo", "net", {"address": "00:00:00:00:00:00"}, parent=usb),
    )
    cfg = config.IdentityConfig(sources=("mmc-cid", "mac", "soc-serial"))
    found = identity.read_identity(cfg, cpuinfo=tmp_path / "cpuinfo", machine_id=tmp_path / "machine-id",
                                   devicetree=tmp_path / "no-dt", context=context)
    assert list(found.fields()) == ["mmc_cid", "mmc_serial", "mac", "mac_eth0", "soc_serial", "machine_id"]
    assert found.fields()["mmc_cid"] == "emmccid0003"  # eMMC before SD, the all-zero eMMC refused
    assert [(r.name, r.reason) for r in found.rejected] == [("mmc_cid", "all zeros"),
                                                           ("mac_lo", "virtual interface (no physical parent device)")]


def test_unreadable_attributes_are_rejected_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dmi = tmp_path / "dmi" / "id"
    (dmi / "board_serial").mkdir(parents=True)  # read() fails with EISDIR
    (dmi / "product_serial").write_text("root only")
    real_read = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path.name == "product_serial":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    context = FakeContext(FakeDevice(dmi, "dmi", {"product_uuid": "4c4c4544-0042-3510-8052-b4c04f4e3232"}))
    cfg = config.IdentityConfig(sources=("dmi",))
    found = identity.read_identity(cfg, machine_id=tmp_path / "none", context=context)
    assert found.fields() == {"dmi_product_uuid": "4c4c4544-0042-3510-8052-b4c04f4e3232"}
    assert [(r.name, r.value, r.reason) for r in found.rejected] == [
        ("dmi_product_serial", "", "cannot read: permission denied (readable by root only?)"),
        ("dmi_board_serial", "", "cannot read: Is a directory")]


def test_udev_failures_become_identity_errors(tmp_path: Path) -> None:
    context = FakeContext(error=OSError(errno.ENOMEM, "Cannot allocate memory"))
    with pytest.raises(IdentityError, match=r"cannot read hardware identity through udev: .*Cannot allocate memory"):
        identity.read_identity(config.IdentityConfig(), machine_id=tmp_path / "none", context=context)


# ---- waiting: the loop with a fake monitor on a pipe ---------------------------


class FakeMonitor:
    """poll(timeout=0) hands out queued events (or raises a queued OSError); the pipe makes it readable."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.queue: list[object] = []

    def fileno(self) -> int:
        return self.read_fd

    def push(self, item: object) -> None:
        self.queue.append(item)
        os.write(self.write_fd, b"x")

    def poll(self, timeout: float) -> object | None:
        assert timeout == 0
        if not self.queue:
            return None
        os.read(self.read_fd, 1)
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return item

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Reader:
    """read_identity's stand-in: the mac appears once ``plugged`` is set; counts its calls."""

    def __init__(self) -> None:
        self.calls, self.plugged = 0, False

    def __call__(self) -> DeviceIdentity:
        self.calls += 1
        return ident(MAC, WEAK) if self.plugged else ident(WEAK, rejected=(LAA,))


def wait(cfg: config.IdentityConfig, reader: Reader, monitor: FakeMonitor | None,
         during: Any = None) -> tuple[DeviceIdentity | IdentityError, float]:
    async def main() -> tuple[DeviceIdentity | IdentityError, float]:
        loop = asyncio.get_running_loop()
        if during is not None:
            loop.call_later(0.1, during)
        start = loop.time()
        try:
            result: DeviceIdentity | IdentityError = await identity.wait_for_identity(cfg, reader, monitor)
        except IdentityError as exc:
            result = exc
        if monitor is not None:
            assert not loop.remove_reader(monitor.fileno()), "the reader must be removed on the way out"
        return result, loop.time() - start
    try:
        return asyncio.run(main())
    finally:
        if monitor is not None:
            monitor.close()


def plug(reader: Reader, monitor: FakeMonitor, event: object) -> Any:
    def act() -> None:
        reader.plugged = True
        monitor.push(event)
    return act


MAC_REQUIRED = config.IdentityConfig(sources=("mac",), required=("mac",), wait_seconds=3.0)


def test_nothing_required_reads_once() -> None:
    reader = Reader()
    result, _ = wait(config.IdentityConfig(), reader, None)
    assert result == ident(WEAK, rejected=(LAA,)) and reader.calls == 1


def test_a_relevant_event_reads_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "RESCAN_SECONDS", 60.0)
    reader, monitor = Reader(), FakeMonitor()
    result, elapsed = wait(MAC_REQUIRED, reader, monitor, plug(reader, monitor, SimpleNamespace(subsystem="net")))
    assert isinstance(result, DeviceIdentity) and result.fields()["mac"] == MAC.value
    assert reader.calls == 2 and elapsed < 1.0


def test_an_overflow_reads_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "RESCAN_SECONDS", 60.0)
    reader, monitor = Reader(), FakeMonitor()
    overflow = OSError(errno.ENOBUFS, "No buffer space available")
    result, elapsed = wait(MAC_REQUIRED, reader, monitor, plug(reader, monitor, overflow))
    assert isinstance(result, DeviceIdentity) and reader.calls == 2 and elapsed < 1.0


def test_other_subsystems_do_not_read_again_but_rescans_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "RESCAN_SECONDS", 0.5)
    reader, monitor = Reader(), FakeMonitor()
    result, elapsed = wait(MAC_REQUIRED, reader, monitor, plug(reader, monitor, SimpleNamespace(subsystem="block")))
    assert isinstance(result, DeviceIdentity) and reader.calls == 2 and 0.4 < elapsed < 1.5


def test_a_broken_monitor_falls_back_to_rescans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "RESCAN_SECONDS", 0.3)
    reader, monitor = Reader(), FakeMonitor()
    monitor.push(OSError(errno.EBADMSG, "Bad message"))
    result, _ = wait(MAC_REQUIRED, reader, monitor, lambda: setattr(reader, "plugged", True))
    assert isinstance(result, DeviceIdentity)


def test_timeout_names_what_is_missing_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "RESCAN_SECONDS", 0.2)
    cfg = config.IdentityConfig(sources=("mac",), required=("mac", "machine_id"), wait_seconds=0.5)
    reader = Reader()
    result, elapsed = wait(cfg, reader, FakeMonitor())
    assert isinstance(result, IdentityError) and 0.5 <= elapsed < 1.5 and reader.calls >= 3
    assert str(result).startswith("cannot find required identity field(s) mac, machine_id after 0.5 s: ")
    assert "mac: 02:fc:00:00:00:01 at /sys/e: locally administered address" in str(result)
    assert "machine_id: only weak identity" in str(result)


def test_weak_identity_satisfies_required_when_allowed() -> None:
    cfg = config.IdentityConfig(required=("machine_id",), wait_seconds=0.0, allow_weak=True)
    result, _ = wait(cfg, Reader(), None)
    assert isinstance(result, DeviceIdentity)


def test_template_alternatives_take_the_first_field_present() -> None:
    found = identity.build_identity(
        [identity.Value("mac", "b8:27:eb:12:34:56", "mac", "/sys/class/net/eth0/address"),
         identity.Value("machine_id", "ab" * 16, "machine-id", "/etc/machine-id", weak=True)], {})
    assert identity.proposed_serial(found, "L1-{soc_serial|mac}", allow_weak=False) == "L1-b8:27:eb:12:34:56"
    assert identity.proposed_serial(found, "{soc_serial|machine_id}", allow_weak=True) == "ab" * 16
    with pytest.raises(IdentityError, match="only as weak identity"):
        identity.proposed_serial(found, "{soc_serial|machine_id}", allow_weak=False)
    with pytest.raises(IdentityError, match="not a plain field name"):
        identity.proposed_serial(found, "{soc_serial||mac}", allow_weak=False)


def test_each_wait_tells_the_missing_fields_and_when_the_wait_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """What identifying shows (WaitingFor, Deadline): told before every wait, with one deadline throughout."""
    monkeypatch.setattr(identity, "RESCAN_SECONDS", 0.2)
    cfg = config.IdentityConfig(sources=("mac",), required=("mac", "machine_id"), wait_seconds=0.5)
    told: list[tuple[tuple[str, ...], float]] = []
    before = time.time()

    async def main() -> None:
        with pytest.raises(IdentityError):
            await identity.wait_for_identity(cfg, Reader(), None, lambda missing, until: told.append((missing, until)))
    asyncio.run(main())
    assert len(told) >= 2 and {missing for missing, _ in told} == {("mac", "machine_id")}
    assert len({until for _, until in told}) == 1 and before + 0.5 <= told[0][1] <= time.time() + 0.5
