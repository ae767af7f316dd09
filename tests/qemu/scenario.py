"""What the QEMU tests of every board share: running a boot to its end, reading what the guest saw,
the figures, and the first-boot scenario itself (test_armhf.py and test_arm64.py run it)."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

from agent import assertions, openpgp
from tests.qemu.board import Board, Boot
from tests.qemu.conftest import HoldingVault

BOOT_BUDGET = 900.0  # one boot, from QEMU start to power-off: ~20 s of boot, keygen up to minutes


def finish(board: Board, boot: Boot, timings: dict[str, object], label: str, keygen: bool = True) -> dict[str, object]:
    """Let the guest run its checks and power off; what it saw, as files in board.out.

    The boot's figures land in ``timings["<arch>_<label>"]``; ``keygen=False`` for a board whose key
    an earlier boot made (its `generating-key` step only loads it).
    """
    boot.wait_for(r"QEMU_TEST_BEGIN", timeout=300)
    rc = boot.wait(BOOT_BUDGET)
    assert rc == 0, f"QEMU exited {rc}:\n{boot.tail()}"
    log = (board.out / "guest-test.log").read_text()
    assert (board.out / "rc").read_text().strip() == "0", log
    t0, t1 = (float(x) for x in (board.out / "uptime-wait.txt").read_text().split())
    status = json.loads((board.out / "status.json").read_text() or "{}")
    states = state_times(board)
    registered = next((stamp for stamp, state in states if state == "registered"), None)
    timings[f"{board.arch.name}_{label}"] = {
        "boot_to_payload_s": round(t0, 1), "uptime_at_done_s": round(t1, 1), "qemu_run_s": round(boot.elapsed(), 1),
        "boot_to_registered_s": None if registered is None else round(registered, 1),
        "keygen_s": keygen_seconds(states) if keygen else None}
    return status


def out(board: Board, name: str) -> str:
    return (board.out / name).read_text(errors="replace")


def state_times(board: Board) -> list[tuple[float, str]]:
    """The agent's `state X` lines in the journal: (guest monotonic seconds, X), in order."""
    found = []
    for line in out(board, "journal-all.txt").splitlines():
        match = re.match(r"\[\s*([0-9.]+)\].*factory-agent.*\bstate ([a-z-]+)", line)
        if match:
            found.append((float(match[1]), match[2]))
    return found


def keygen_seconds(states: list[tuple[float, str]]) -> float | None:
    """`state generating-key` to the next state, in guest monotonic seconds."""
    for (start, state), (end, _) in itertools.pairwise(states):
        if state == "generating-key":
            return round(end - start, 1)
    return None


def verify_on_host(board: Board, vault: HoldingVault) -> assertions.Assertion:
    """The serial copied out of the guest verifies here, with the brand's account-key, by the CLI."""
    path = board.out / "serial.assertion"
    done = subprocess.run([sys.executable, "-m", "agent", "verify", str(path), "--account-key",
                           str(vault.directory / "brand.account-key")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (serial,) = assertions.decode_stream(path.read_bytes())
    return serial


def signed_for(vault: HoldingVault, serial: str) -> list[assertions.Assertion]:
    return [a for a in vault.signed if a.header("serial") == serial]


def check_first_boot(board: Board, vault: HoldingVault, timings: dict[str, object]) -> None:
    """Boot a fresh board: the package's unit registers it with its device-tree serial, on its own."""
    serial_number, mac = board.dt_serial, board.mac
    status = finish(board, board.boot(vault.port), timings, "first_boot")

    assert out(board, "uname-m.txt").strip() == board.arch.uname
    assert out(board, "dt-serial.txt").rstrip("\0\n") == serial_number
    if board.arch.name == "armhf":  # 32-bit ARM kernels show the device tree's serial-number there
        assert serial_number in out(board, "cpuinfo-serial.txt")
    assert out(board, "disk-serial.txt").strip() == board.disk_serial
    escape = out(board, "escape.txt")
    assert "reached" not in escape and "Error" in escape, f"the guest reached the host's loopback: {escape}"
    assert out(board, "status-wait.rc").strip() == "0", out(board, "status-wait.txt")
    assert out(board, "busctl-state.txt").strip() == 's "registered"'
    assert out(board, "busctl-serial.txt").strip() == f's "{serial_number}"'
    assert status["state"] == "registered" and status["serial"] == serial_number
    assert status["identity"]["soc_serial"] == serial_number
    assert status["identity"]["mac"] == mac
    # read from the board's hardware: /proc/cpuinfo on armhf, the device tree itself on arm64
    identity = json.loads(out(board, "identity.json"))
    soc = next(v for v in identity["values"] if v["name"] == "soc_serial")
    where = "/proc/cpuinfo" if board.arch.name == "armhf" else "/serial-number"
    assert soc["value"] == serial_number and soc["source"] == "soc-serial" and soc["path"].endswith(where), soc
    # the one the vault signed is the one proposed from the device tree, and it verifies on the host
    serial = verify_on_host(board, vault)
    assert serial.header("serial") == serial_number
    assert serial.header("device-key-sha3-384") == status["device-key-id"]
    # an RSA-4096 key made in the guest (seconds on arm64 under TCG, minutes on armhf)
    assert openpgp.decode_public_key(serial.header("device-key")).n.bit_length() == 4096
    assert len(signed_for(vault, serial_number)) == 1
    # the unit as systemd ran it: active, no restarts, private state
    unit = out(board, "unit.txt")
    assert "ActiveState=active" in unit and "NRestarts=0" in unit, unit
    modes = dict(line.split(" ", 1)[::-1] for line in out(board, "statedir.txt").splitlines())
    assert modes["/var/lib/factory-agent"] == "700"
    assert modes["/var/lib/factory-agent/device-key.pem"] == "600"
    # a clean journal: nothing at error level or worse from the agent, no traceback, no failed unit
    entries = [json.loads(line) for line in out(board, "journal.json").splitlines() if line.startswith("{")]
    errors = [e.get("MESSAGE") for e in entries if int(e.get("PRIORITY", 6)) <= 3]
    assert errors == [], errors
    assert "Traceback" not in out(board, "journal.txt"), out(board, "journal.txt")
    assert out(board, "failed-units.txt").strip() == "", out(board, "failed-units.txt")
