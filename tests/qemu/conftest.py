"""Fixtures for the QEMU runs: each architecture's image built from dist/'s .deb, and a lab vault on loopback.

These tests run only from `make qemu-test` (FACTORY_AGENT_QEMU=1; tests/conftest.py leaves this
folder out otherwise): each boot is an emulated armhf or arm64 board generating an RSA-4096 key.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.labvault import Reply
from tests.fakes.faultyvault import FaultyVault
from tests.qemu.board import ARCHES, Board, Image, build_image

REPO = Path(__file__).resolve().parents[2]
TIMINGS = Path(os.environ.get("FACTORY_AGENT_QEMU_TIMINGS", REPO / "build" / "qemu-timings.json"))


class HoldingVault(FaultyVault):
    """The lab vault (with its records: ``signed``), able to hold POST /serial (the vault is "working on it") until released.

    While ``hold`` is set, a serial request is recorded in ``held`` and its handler thread
    waits; the test cuts the board's power meanwhile. Releasing answers 503 to whatever is still
    waiting, for a guest that is no longer there.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hold = threading.Event()
        self.release = threading.Event()
        self.held: list[bytes] = []
        self.arrived = threading.Event()

    def respond(self, method: str, path: str, api_key: str | None, body: bytes | None) -> Reply:
        if self.hold.is_set() and method == "POST" and path.partition("?")[0].endswith("/serial"):
            self.held.append(body or b"")
            self.arrived.set()
            self.release.wait(timeout=900)
            return Reply(503, b"held by the test\n")
        return super().respond(method, path, api_key, body)

    @property
    def port(self) -> int:
        return int(self.url.split(":")[2].split("/")[0])

    def stop(self) -> None:
        self.release.set()
        super().stop()


FIGURES: dict[str, object] = {}  # what the `timings` fixture collects, for the terminal summary too


@pytest.fixture(scope="session")
def timings() -> Iterator[dict[str, object]]:
    """Figures the runs measure (keys start with the board's architecture), written to
    build/qemu-timings.json for the docs and the note, and printed at the end of the run."""
    yield FIGURES
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")


def pytest_terminal_summary(terminalreporter) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", f"qemu timings ({TIMINGS})")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {json.dumps(value, sort_keys=True)}")


@pytest.fixture(scope="session")
def images(timings: dict[str, object]) -> Callable[[str], Image]:
    """Each architecture's board image, built once a session when a test first asks for it: from the
    .deb, or a gadget team's own (see README, QEMU test runs).

    FACTORY_AGENT_QEMU_DEB: another .deb of the agent to install (default: dist/'s newest).
    FACTORY_AGENT_QEMU_IMAGE, _KERNEL, _INITRD (armhf) or FACTORY_AGENT_QEMU_ARM64_IMAGE, ... (arm64):
    boot this qcow2 as it is; it must have the agent installed and enabled, and the harness units of
    tests/qemu/guest/ enabled.
    """
    built: dict[str, Image] = {}

    def image(arch: str) -> Image:
        if arch not in built:
            built[arch] = _own_image(arch) or _built_image(arch, timings)
        return built[arch]

    return image


def _own_image(arch: str) -> Image | None:
    prefix = "FACTORY_AGENT_QEMU_" + ("" if arch == "armhf" else f"{arch.upper()}_")
    own = {name: os.environ.get(f"{prefix}{name.upper()}", "") for name in ("image", "kernel", "initrd")}
    if not any(own.values()):
        return None
    missing = [f"{prefix}{name.upper()}" for name, value in own.items() if not value]
    if missing:
        pytest.fail(f"an own image needs its kernel and initrd too: set {', '.join(missing)}")
    return Image(*(Path(own[name]).resolve() for name in ("image", "kernel", "initrd")), ARCHES[arch])


def _built_image(arch: str, timings: dict[str, object]) -> Image:
    deb = os.environ.get("FACTORY_AGENT_QEMU_DEB") or max(glob.glob(str(REPO / "dist" / "factory-agent_*_all.deb")),
                                                          default="", key=os.path.getmtime)
    if not deb:
        pytest.fail("no dist/factory-agent_*_all.deb: run `make deb` (make qemu-test does)")
    image, seconds = build_image(Path(deb), ARCHES[arch])
    timings[f"{arch}_image_build_s"] = round(seconds, 1)
    return image


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HoldingVault]:
    lab = HoldingVault(tmp_path_factory.mktemp("qemu-lab"))
    lab.start()
    yield lab
    lab.stop()


@pytest.fixture
def make_board(tmp_path: Path, images: Callable[[str], Image], vault: HoldingVault):
    """A board of an architecture (armhf unless named) with its identity, provisioned with the agent's
    config for the lab vault."""

    def make(name: str, dt_serial: str, mac: str, disk_serial: str, api_key: str | None = None,
             arch: str = "armhf") -> Board:
        board = Board(name, tmp_path / name, images(arch), dt_serial=dt_serial, mac=mac, disk_serial=disk_serial,
                      machine_id=os.urandom(16).hex())
        board.write("etc/factory-agent/agent.toml", AGENT_TOML.format(address="10.0.2.100"))
        board.write("etc/factory-agent/api-key", (api_key or vault.api_key) + "\n", mode=0o600)
        shutil.copy(vault.directory / "brand.account-key", board.share / "etc/factory-agent/brand.account-key")
        board.write("guest-test.sh", GUEST_TEST, mode=0o755)
        board.write("vault-port", f"{vault.port}\n")
        return board

    return make


AGENT_TOML = """\
# Written by tests/qemu as a factory's provisioning station would.
brand = "acme"
model = "acme-gw"

[vault]
url = "http://{address}/v1/"
api-key-file = "/etc/factory-agent/api-key"
allow-insecure-http = true
trusted-account-keys = ["/etc/factory-agent/brand.account-key"]

[serial]
template = "{{soc_serial}}"

[identity]
required = ["soc_serial"]
"""

# Runs inside the guest (qemu-test.service, after factory-agent.service has started on its own).
GUEST_TEST = """\
#!/bin/sh
out=/mnt/host/out
t0=$(cut -d' ' -f1 /proc/uptime)
factory-agent status --wait --timeout 840 > $out/status-wait.txt 2>&1
echo $? > $out/status-wait.rc
echo "$t0 $(cut -d' ' -f1 /proc/uptime)" > $out/uptime-wait.txt
factory-agent status --json > $out/status.json 2> $out/status-json.err
busctl get-property io.factoryagent.Agent1 /io/factoryagent/Agent1 io.factoryagent.Agent1 State > $out/busctl-state.txt 2>&1
busctl get-property io.factoryagent.Agent1 /io/factoryagent/Agent1 io.factoryagent.Agent1 Serial > $out/busctl-serial.txt 2>&1
rm -f $out/serial.assertion
cp /var/lib/factory-agent/serial.assertion $out/ 2>/dev/null
stat -c '%a %n' /var/lib/factory-agent /var/lib/factory-agent/* > $out/statedir.txt 2>&1
journalctl -b -u factory-agent --no-pager -o cat > $out/journal.txt 2>&1
journalctl -b -u factory-agent --no-pager -o json > $out/journal.json 2>&1
journalctl -b -o short-monotonic --no-pager > $out/journal-all.txt 2>&1
systemctl show factory-agent -p ActiveState -p SubState -p StatusText -p NRestarts -p Result > $out/unit.txt 2>&1
factory-agent identity --json > $out/identity.json 2>&1
cat /sys/block/vda/serial > $out/disk-serial.txt 2>&1
# restrict=on: the host's loopback (10.0.2.2 in slirp) must be out of reach; only 10.0.2.100:80 is open
python3 -c 'import socket,sys; socket.create_connection(("10.0.2.2", int(sys.argv[1])), timeout=5)' \
    "$(cat /mnt/host/vault-port)" > $out/escape.txt 2>&1 && echo reached >> $out/escape.txt
cat /proc/device-tree/serial-number > $out/dt-serial.txt 2>&1
grep -i '^Serial' /proc/cpuinfo > $out/cpuinfo-serial.txt 2>&1
uname -m > $out/uname-m.txt
systemctl --failed --no-legend --plain > $out/failed-units.txt 2>&1
exit 0
"""
