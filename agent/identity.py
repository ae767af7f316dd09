"""Hardware identity: the values that identify this device, where each was read, and why others were refused.

The first half is pure (plain values in, values out: classification, the serial
template, the registration body, JSON). The second half is the only code that
touches udev (pyudev, blocking) and the files behind it. Only IdentityError escapes.

Field names (``[serial] template`` names and ``[identity.static]`` keys), by source:
``soc_serial`` (/proc/cpuinfo Serial, soc0 serial_number, device-tree serial-number,
first found wins); ``mmc_cid``, ``mmc_serial`` (one card: eMMC before SD, then by
name); ``mac`` (the lowest-named accepted NIC, digit runs compared as numbers:
eth2 before eth10) and ``mac_<ifname>`` per accepted NIC; ``dmi_product_serial``,
``dmi_product_uuid``, ``dmi_board_serial``; ``machine_id`` (always weak, always
read last); static fields override same-named ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import hashlib
import hmac
import json
import logging
import re
import string
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pyudev  # type: ignore[import-untyped]

from . import config
from .errors import IdentityError

log = logging.getLogger(__name__)

SOURCES = ("soc-serial", "mmc-cid", "mac", "dmi", "machine-id", "static")
SUBSYSTEMS = {"soc-serial": "soc", "mmc-cid": "mmc", "mac": "net", "dmi": "dmi"}  # whose uevents matter
DMI_FIELDS = {a: "dmi_" + a for a in ("product_serial", "product_uuid", "board_serial")}  # attribute -> field
# What firmware and vendors ship in place of a real serial, compared case-insensitively.
PLACEHOLDERS = frozenset({
    "none", "null", "n/a", "na", "unknown", "not specified", "not applicable", "not available", "not present",
    "system serial number", "chassis serial number", "base board serial number", "serial number", "serial",
    "default string", "to be filled by o.e.m.", "to be filled by oem", "o.e.m.", "oem", "invalid",
    "0123456789abcdef", "0123456789", "123456789", "1234567890", "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009", "00020003-0004-0005-0006-000700080009",  # dummy UUID, both byte orders
})
ADDR_ASSIGN = {1: "random", 2: "stolen from another device", 3: "set from user space"}
# machine-id(5): the ID "must not be used directly" off the machine. systemd's rule is an app-specific
# HMAC (sd_id128_get_machine_app_specific): `systemd-id128 machine-id --app-specific=<this>` prints ours.
MACHINE_ID_APP = bytes.fromhex("acc19a96d3d84b07940671c7734ede85")
# uevents can be missed (no udevd, attributes that settle after the uevent, /etc/machine-id is
# a plain file): while waiting, read again at least this often.
RESCAN_SECONDS = 5.0
_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_YAML_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True, slots=True)
class Value:
    """One identity field found, with where it was read."""

    name: str
    value: str
    source: str  # one of SOURCES
    path: str  # a sysfs path, /proc/cpuinfo, /etc/machine-id, or "config"
    weak: bool = False  # not hardware: a cloned image would share it


@dataclasses.dataclass(frozen=True, slots=True)
class Rejected:
    """A candidate refused, with why (value "" when it could not be read)."""

    name: str
    value: str
    source: str
    path: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """The accepted values in preference order (static first), and the refused candidates."""

    values: tuple[Value, ...]
    rejected: tuple[Rejected, ...]

    def fields(self, allow_weak: bool = True) -> dict[str, str]:
        """name -> value, in preference order; weak values only when ``allow_weak``."""
        found: dict[str, str] = {}
        for v in self.values:
            if allow_weak or not v.weak:
                found.setdefault(v.name, v.value)
        return found

    def missing(self, required: Iterable[str], allow_weak: bool = True) -> list[str]:
        """The ``required`` names not in :meth:`fields`, in the given order."""
        have = self.fields(allow_weak)
        return [name for name in dict.fromkeys(required) if name not in have]

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form (``identity --json``, the state file)::

            {"version": 1,
             "values": [{"name": str, "value": str, "source": str, "path": str, "weak": bool}, ...],
             "rejected": [{"name": str, "value": str, "source": str, "path": str, "reason": str}, ...]}

        ``values`` is in preference order. Keys may be added, never renamed.
        """
        return {"version": 1, "values": [dataclasses.asdict(v) for v in self.values],
                "rejected": [dataclasses.asdict(r) for r in self.rejected]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceIdentity:
        """The inverse of :meth:`to_json`: unknown keys are ignored, anything malformed is an IdentityError."""
        try:
            if not isinstance(data, Mapping) or data.get("version") != 1:
                raise ValueError("not a version 1 identity object")
            values = _json_entries(data, "values", Value, Value.__match_args__)
            identity = cls(tuple(values), tuple(_json_entries(data, "rejected", Rejected, Rejected.__match_args__)))
        except ValueError as exc:
            raise IdentityError(f"cannot decode identity: {exc}") from None
        if len(identity.fields()) != len(values):
            raise IdentityError("cannot decode identity: a field name appears twice in values")
        return identity


def _json_entries(data: Mapping[str, Any], key: str, kind: Callable[..., _T], names: tuple[str, ...]) -> list[_T]:
    entries = data.get(key)
    if not isinstance(entries, list):
        raise ValueError(f"{key!r} must be a list")
    found = []
    for entry in entries:
        args = {n: entry.get(n, False if n == "weak" else None) for n in names} if isinstance(entry, Mapping) else {}
        if not args or not all(isinstance(v, bool if n == "weak" else str) for n, v in args.items()) \
                or not _FIELD.fullmatch(args["name"]) or args["source"] not in SOURCES:
            raise ValueError(f"bad entry in {key!r}: {entry!r}")
        found.append(kind(**args))
    return found


# ---- pure: classification, assembly, output --------------------------------


# Longest identity value taken, in UTF-8 bytes. A serial, a CID or a MAC is tens of bytes; a sysfs attribute
# or static value of 200 KiB would make a serial-request of hundreds of KB, which snapd's decoder refuses.
MAX_VALUE_BYTES = 256
_SHOWN_REJECTED = 64  # characters of a rejected value kept for `identity` and the logs


def check_value(value: str) -> str | None:
    """Why ``value`` cannot be an identity (empty, zeros, a placeholder, too long...), or None if it can."""
    if len(value) > MAX_VALUE_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_VALUE_BYTES:
        return f"{len(value.encode('utf-8', 'surrogatepass'))} bytes long, over the {MAX_VALUE_BYTES} an identity value may be"
    low = value.strip().lower()
    digits = low.removeprefix("0x")
    if not low:
        return "empty"
    if not value.isprintable() or "\ufffd" in value:
        return "not printable text"
    if "0" in digits and set(digits) <= set("0-: "):
        return "all zeros"
    if "f" in digits and set(digits) <= set("f-: "):
        return "all ones (ff...)"
    if low in PLACEHOLDERS:
        return "a known placeholder, not a serial"
    if not any(c.isalnum() for c in low):
        return "no letters or digits"
    return None


def accept(name: str, value: str, source: str, path: str, weak: bool = False) -> Value | Rejected:
    """A Value, or a Rejected saying why ``value`` (or ``name``) does not qualify."""
    reason = check_value(value) if _FIELD.fullmatch(name) else "not a field name (a letter, then letters, digits, _)"
    if reason is None:
        return Value(name, value, source, path, weak)
    shown = value if len(value) <= _SHOWN_REJECTED else value[:_SHOWN_REJECTED - 3] + "..."
    return Rejected(name, shown, source, path, reason)


def decode_attribute(raw: bytes) -> str:
    """A sysfs attribute or device-tree string: up to the first NUL, whitespace stripped."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def parse_cpuinfo_serial(text: str) -> str | None:
    """The ``Serial`` line of /proc/cpuinfo (ARM kernels), or None when there is none."""
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon and key.strip().lower() == "serial":
            return value.strip()
    return None


def check_mac(address: str, *, virtual: bool, assign_type: int | None) -> str | None:
    """Why ``address`` (lowercase, colons) is not a hardware identity, or None if it is one."""
    if virtual:
        return "virtual interface (no physical parent device)"
    if assign_type is not None and assign_type != 0:
        return f"not a permanent address (addr_assign_type {assign_type}: {ADDR_ASSIGN.get(assign_type, 'unknown')})"
    if not re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", address):
        return "not an EUI-48 MAC address"
    if address == "00:00:00:00:00:00":
        return "all zeros"
    if int(address[:2], 16) & 0x01:
        return "multicast address"
    if int(address[:2], 16) & 0x02:
        return "locally administered address"
    return None


def mac_field(ifname: str) -> str:
    """``mac_<ifname>``, every character but ASCII letters and digits turned into ``_``."""
    return "mac_" + re.sub(r"[^A-Za-z0-9]", "_", ifname)


def natural_key(name: str) -> tuple[tuple[str, int], ...]:
    """Sort key comparing digit runs as numbers: eth2 before eth10."""
    return tuple((text, int(num) if num else -1) for text, num in re.findall(r"(\D*)(\d*)", name))


@dataclasses.dataclass(frozen=True, slots=True)
class Nic:
    """What the MAC rules need to know about one network interface."""

    ifname: str
    address: str
    path: str  # the sysfs path of its address attribute
    virtual: bool
    assign_type: int | None = None


def mac_candidates(nics: Iterable[Nic]) -> list[Value | Rejected]:
    """``mac_<ifname>`` per accepted NIC, preceded by ``mac`` for the lowest-named one."""
    found: list[Value | Rejected] = []
    for nic in sorted(nics, key=lambda n: natural_key(n.ifname)):
        name, address = mac_field(nic.ifname), nic.address.strip().lower().replace("-", ":")
        reason = check_mac(address, virtual=nic.virtual, assign_type=nic.assign_type)
        if reason is not None:
            found.append(Rejected(name, address, "mac", nic.path, reason))
            continue
        if not any(isinstance(c, Value) for c in found):
            found.append(Value("mac", address, "mac", nic.path))
        found.append(Value(name, address, "mac", nic.path))
    return found


def machine_id_candidate(text: str, path: str) -> Value | Rejected:
    """``machine_id``: the app-specific form of a valid machine-id, always weak (images get cloned)."""
    text = text.strip()
    reason = "not initialized yet (first boot)" if text == "uninitialized" else check_value(text)
    if reason is None and not re.fullmatch(r"[0-9a-f]{32}", text):
        reason = "not 32 lowercase hexadecimal digits"
    if reason is not None:
        return Rejected("machine_id", text[:64], "machine-id", path, reason)
    digest = bytearray(hmac.new(bytes.fromhex(text), MACHINE_ID_APP, hashlib.sha256).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x40  # a version 4 UUID, as systemd makes it
    digest[8] = (digest[8] & 0x3F) | 0x80
    return Value("machine_id", digest.hex(), "machine-id", path, weak=True)


def source_order(sources: Iterable[str]) -> list[str]:
    """The configured sources without repeats, then ``machine-id`` as the last resort."""
    order = list(dict.fromkeys(sources))
    unknown = [s for s in order if s not in SUBSYSTEMS and s != "machine-id"]
    if unknown:
        raise IdentityError(f"cannot read identity: unknown source(s) {', '.join(unknown)}")
    return order if "machine-id" in order else [*order, "machine-id"]


def build_identity(found: Iterable[Value | Rejected], static: Mapping[str, str]) -> DeviceIdentity:
    """Static fields first, then ``found`` in order; the first value of a name wins."""
    values: dict[str, Value] = {}
    rejected: list[Rejected] = []
    for c in [*(accept(name, value, "static", "config") for name, value in static.items()), *found]:
        kept = values.get(c.name)
        if isinstance(c, Rejected):
            rejected.append(c)
        elif kept is None:
            values[c.name] = c
        elif kept.value != c.value:
            why = f"overridden by {kept.source} value from {kept.path}"
            rejected.append(Rejected(c.name, c.value, c.source, c.path, why))
    return DeviceIdentity(tuple(values.values()), tuple(rejected))


def explain_missing(identity: DeviceIdentity, missing: Iterable[str], allow_weak: bool) -> str:
    """For each missing field, what there was instead: a weak value, rejected candidates."""
    parts = []
    weak = {} if allow_weak else {v.name: v.value for v in identity.values if v.weak}
    for name in missing:
        why = [f"only weak identity {weak[name]} (identity.allow-weak is false)"] if name in weak else []
        why += [f"{r.value or 'unreadable'} at {r.path}: {r.reason}" for r in identity.rejected
                if r.name == name or r.name.startswith(name + "_")]
        parts.append(f"{name}: {'; '.join(why) or 'no candidate found'}")
    return "; ".join(parts)


def proposed_serial(identity: DeviceIdentity, template: str, allow_weak: bool) -> str:
    """``template`` filled from :meth:`DeviceIdentity.fields`: a usable serial, or an IdentityError.

    A placeholder may name alternatives, ``{soc_serial|mmc_cid|mac}``: the
    first field this device has is used, so one template serves a line of
    mixed boards.
    """
    fields = identity.fields(allow_weak)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise IdentityError(f"cannot use serial template {template!r}: {exc}") from None
    chosen: dict[str, str] = {}
    for name in names:
        choices = name.split("|")
        if not all(_FIELD.fullmatch(choice) for choice in choices):
            raise IdentityError(f"cannot use serial template {template!r}: {{{name}}} is not a plain field name"
                                " (or an a|b list of them)")
        found = next((fields[choice] for choice in choices if choice in fields), None)
        if found is None:
            weak = [c for c in choices if c in identity.fields()]
            hint = " (only as weak identity: set identity.allow-weak to use it)" if weak else ""
            raise IdentityError(f"cannot build proposed serial from {template!r}: no identity field {name!r}{hint}")
        chosen[name] = found
    try:
        serial = template.format_map(chosen)
    except (ValueError, KeyError) as exc:
        raise IdentityError(f"cannot build proposed serial from {template!r}: {exc}") from None
    if not serial or "/" in serial or not serial.isprintable():
        raise IdentityError(f"cannot use proposed serial {serial!r}: it must be non-empty printable text without '/'")
    return serial


def registration_body(identity: DeviceIdentity, allow_weak: bool) -> bytes:
    """The serial-request body: ``hardware:`` then ``  <name-with-hyphens>: "<value>"`` per field in
    preference order (:meth:`DeviceIdentity.fields`), values JSON-quoted (valid YAML double-quoted)."""
    fields = identity.fields(allow_weak)
    if not fields:
        return b"hardware: {}\n"
    lines = ["hardware:"]
    for name, value in fields.items():
        key = name.replace("_", "-")
        lines.append(f"  {json.dumps(key) if key.lower() in _YAML_WORDS else key}: {json.dumps(value)}")
    return ("\n".join(lines) + "\n").encode("ascii")


def format_identity(identity: DeviceIdentity) -> str:
    """Human text: one line per value (source, path, weak), then the rejected ones; no final newline."""
    if not identity.values and not identity.rejected:
        return "no identity found"
    width = max(len(name) for name in [*(v.name for v in identity.values), *(r.name for r in identity.rejected)])
    lines = [f"{v.name:<{width}}  {v.value}  ({v.source}: {v.path}){' (weak)' if v.weak else ''}"
             for v in identity.values]
    if identity.rejected:
        lines.append("rejected:")
        lines += [f"  {r.name:<{width}}  {r.value or '-'}  ({r.source}: {r.path}): {r.reason}"
                  for r in identity.rejected]
    return "\n".join(lines)


# ---- the udev adapter (blocking) --------------------------------------------


def read_identity(cfg: config.IdentityConfig, *, cpuinfo: Path = Path("/proc/cpuinfo"),
                  machine_id: Path = Path("/etc/machine-id"),
                  devicetree: Path = Path("/sys/firmware/devicetree/base"),
                  context: pyudev.Context | None = None) -> DeviceIdentity:
    """Enumerate udev and read the files behind each configured source, in order (blocking)."""
    order = source_order(cfg.sources)
    try:
        ctx = context if context is not None else pyudev.Context()
        readers: dict[str, Callable[[], list[Value | Rejected]]] = {
            "soc-serial": lambda: _read_soc(ctx, cpuinfo, devicetree),
            "mmc-cid": lambda: _read_mmc(ctx),
            "mac": lambda: mac_candidates(_read_nics(ctx)),
            "dmi": lambda: _read_dmi(ctx),
            "machine-id": lambda: _file_candidate(machine_id, "machine_id", "machine-id", machine_id_candidate),
        }
        found = [c for source in order for c in readers[source]()]
    except (OSError, ImportError, UnicodeDecodeError, pyudev.DeviceNotFoundError) as exc:
        raise IdentityError(f"cannot read hardware identity through udev: {exc}") from exc
    return build_identity(found, cfg.static)


def _read_file(path: Path) -> tuple[bytes | None, str | None]:
    """(content, None), (None, None) when absent, or (None, why) when unreadable."""
    try:
        return path.read_bytes(), None
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except PermissionError:
        return None, "cannot read: permission denied (readable by root only?)"
    except OSError as exc:
        return None, f"cannot read: {exc.strerror or exc}"


def _attr(dev: Any, attr: str) -> tuple[str | None, str | None]:
    raw = dev.attributes.get(attr)
    if raw is not None:
        return decode_attribute(raw), None
    # libudev answers None for a missing and for an unreadable attribute alike: the file tells which.
    data, why = _read_file(Path(dev.sys_path, attr))
    return (None if data is None else decode_attribute(data)), why


def _attr_candidate(dev: Any, attr: str, name: str, source: str) -> list[Value | Rejected]:
    value, why = _attr(dev, attr)
    path = f"{dev.sys_path}/{attr}"
    if why is not None:
        return [Rejected(name, "", source, path, why)]
    return [] if value is None else [accept(name, value, source, path)]


def _file_candidate(path: Path, name: str, source: str,
                    make: Callable[[str, str], Value | Rejected | None]) -> list[Value | Rejected]:
    data, why = _read_file(path)
    if why is not None:
        return [Rejected(name, "", source, str(path), why)]
    found = None if data is None else make(data.decode("utf-8", "replace"), str(path))
    return [] if found is None else [found]


def _devices(ctx: Any, subsystem: str) -> list[Any]:
    return sorted(ctx.list_devices(subsystem=subsystem), key=lambda d: natural_key(str(d.sys_name)))


def _read_soc(ctx: Any, cpuinfo: Path, devicetree: Path) -> list[Value | Rejected]:
    """``soc_serial``: /proc/cpuinfo Serial, then soc0's serial_number, then the device-tree serial-number."""
    def from_cpuinfo(text: str, path: str) -> Value | Rejected | None:
        serial = parse_cpuinfo_serial(text)
        return None if serial is None else accept("soc_serial", serial, "soc-serial", path)

    def from_devicetree(text: str, path: str) -> Value | Rejected:
        return accept("soc_serial", decode_attribute(text.encode()), "soc-serial", path)

    found = _file_candidate(cpuinfo, "soc_serial", "soc-serial", from_cpuinfo)
    for dev in _devices(ctx, "soc"):
        found += _attr_candidate(dev, "serial_number", "soc_serial", "soc-serial")
    return found + _file_candidate(devicetree / "serial-number", "soc_serial", "soc-serial", from_devicetree)


def _read_mmc(ctx: Any) -> list[Value | Rejected]:
    """``mmc_cid`` and ``mmc_serial`` of the first card with a valid cid: eMMC (type MMC) before SD, then by name."""
    cards = [(kind, dev) for dev in _devices(ctx, "mmc") if (kind := _attr(dev, "type")[0]) in ("MMC", "SD")]
    found: list[Value | Rejected] = []
    for _, dev in sorted(cards, key=lambda card: card[0] != "MMC"):  # stable: name order within a type
        cid = _attr_candidate(dev, "cid", "mmc_cid", "mmc-cid")
        if cid and isinstance(cid[0], Value):  # an SD card moves between boards: eMMC comes first
            return [*found, *cid, *_attr_candidate(dev, "serial", "mmc_serial", "mmc-cid")]
        found += cid
    return found


def _read_nics(ctx: Any) -> list[Nic]:
    """Every net device; physical = has a parent device and is not under /sys/devices/virtual."""
    nics = []
    for dev in _devices(ctx, "net"):
        assign = _attr(dev, "addr_assign_type")[0]
        nics.append(Nic(ifname=str(dev.sys_name), address=_attr(dev, "address")[0] or "",
                        path=f"{dev.sys_path}/address",
                        virtual=dev.parent is None or "/devices/virtual/" in str(dev.sys_path),
                        assign_type=int(assign) if assign and assign.isdigit() else None))
    return nics


def _read_dmi(ctx: Any) -> list[Value | Rejected]:
    """``dmi_*`` from the dmi device (product_serial and board_serial are readable by root only)."""
    return [c for dev in _devices(ctx, "dmi") if dev.sys_name == "id"
            for attr, name in DMI_FIELDS.items() for c in _attr_candidate(dev, attr, name, "dmi")]


# ---- waiting for hot-plugged devices (asyncio) ------------------------------


Waiting = Callable[[tuple[str, ...], float], None]  # (missing fields, unix time the wait ends): told before each wait


async def gather_identity(cfg: config.IdentityConfig, waiting: Waiting | None = None, **kwargs: Any) -> DeviceIdentity:
    """:func:`read_identity` (``kwargs`` go to it), waiting up to ``cfg.wait_seconds`` for
    ``cfg.required`` fields, reading again on each udev event of a relevant subsystem."""
    monitor = _start_monitor(cfg.sources) if cfg.required and cfg.wait_seconds > 0 else None
    return await wait_for_identity(cfg, functools.partial(read_identity, cfg, **kwargs), monitor, waiting)


def subsystems_for(sources: Iterable[str]) -> list[str]:
    """The udev subsystems whose events may change what ``sources`` find."""
    return sorted({SUBSYSTEMS[s] for s in sources if s in SUBSYSTEMS})


def _start_monitor(sources: Iterable[str]) -> Any | None:
    """A started udev monitor filtered to the sources' subsystems, or None (rescans alone then serve)."""
    try:
        monitor = pyudev.Monitor.from_netlink(pyudev.Context())
        for subsystem in subsystems_for(sources):
            monitor.filter_by(subsystem)
        monitor.start()  # before the first enumeration, so that no device slips in between
    except (OSError, ImportError, ValueError) as exc:
        log.warning("cannot watch udev events (%s): reading again every %g s instead", exc, RESCAN_SECONDS)
        return None
    return monitor


async def wait_for_identity(cfg: config.IdentityConfig, read: Callable[[], DeviceIdentity],
                            monitor: Any | None, waiting: Waiting | None = None) -> DeviceIdentity:
    """Call ``read`` in a thread until ``cfg.required`` is met, else IdentityError after ``cfg.wait_seconds``.

    ``monitor``: a started pyudev Monitor (or anything with ``fileno()`` and
    ``poll(timeout=0)``), or None to rely on rescans every RESCAN_SECONDS.
    ``waiting`` hears, before each wait, the fields still missing and when the wait ends (the daemon shows them).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.wait_seconds
    ends_at = time.time() + cfg.wait_seconds
    changed = asyncio.Event()
    if monitor is not None:
        loop.add_reader(monitor.fileno(), drain_monitor, monitor, subsystems_for(cfg.sources), changed)
    try:
        while True:
            changed.clear()  # before reading: an event during the read means another read
            identity = await asyncio.to_thread(read)
            missing = identity.missing(cfg.required, allow_weak=cfg.allow_weak)
            remaining = deadline - loop.time()
            if not missing:
                return identity
            if remaining <= 0:
                raise IdentityError(f"cannot find required identity field(s) {', '.join(missing)} after "
                                    f"{cfg.wait_seconds:g} s: {explain_missing(identity, missing, cfg.allow_weak)}")
            log.info("waiting up to %.0f s for identity field(s) %s", remaining, ", ".join(missing))
            if waiting is not None:
                waiting(tuple(missing), ends_at)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, RESCAN_SECONDS)):
                    await changed.wait()
    finally:
        if monitor is not None:
            loop.remove_reader(monitor.fileno())


def drain_monitor(monitor: Any, subsystems: Iterable[str], changed: asyncio.Event) -> None:
    """Reader callback: take every queued event without blocking; set ``changed`` when one is
    relevant, or when some were lost (ENOBUFS: the socket overflowed, so enumerate again)."""
    try:
        while (device := monitor.poll(timeout=0)) is not None:
            if device.subsystem in subsystems:
                changed.set()
    except OSError as exc:
        if exc.errno != errno.ENOBUFS:
            log.warning("cannot receive udev events (%s): reading again every %g s instead", exc, RESCAN_SECONDS)
            asyncio.get_running_loop().remove_reader(monitor.fileno())
        changed.set()
