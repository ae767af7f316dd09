"""The agent on emulated armhf boards, from the .deb to a registered serial (issue 6).

Each test boots Debian 12 armhf under qemu-system-arm with systemd as PID 1 and the package
installed; factory-agent.service starts on its own, reads its identity through udev from the
board's virtual hardware and registers with the lab vault on the host's loopback. Every boot
generates a real RSA-4096 key under emulation (12-72 s): the budgets below are generous on purpose.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from agent import assertions, openpgp
from tests.qemu.board import Board, Boot
from tests.qemu.conftest import HoldingVault

pytestmark = pytest.mark.timeout(1800)

BOOT_BUDGET = 900.0  # one boot, from QEMU start to power-off: ~20 s of boot, keygen up to minutes


def finish(board: Board, boot: Boot, timings: dict[str, object], label: str) -> dict[str, object]:
    """Let the guest run its checks and power off; what it saw, as files in board.out."""
    boot.wait_for(r"QEMU_TEST_BEGIN", timeout=300)
    rc = boot.wait(BOOT_BUDGET)
    assert rc == 0, f"QEMU exited {rc}:\n{boot.tail()}"
    log = (board.out / "guest-test.log").read_text()
    assert (board.out / "rc").read_text().strip() == "0", log
    t0, t1 = (float(x) for x in (board.out / "uptime-wait.txt").read_text().split())
    status = json.loads((board.out / "status.json").read_text() or "{}")
    timings[label] = {"boot_to_payload_s": round(t0, 1), "uptime_at_done_s": round(t1, 1),
                      "qemu_run_s": round(boot.elapsed(), 1)}
    return status


def out(board: Board, name: str) -> str:
    return (board.out / name).read_text(errors="replace")


def keygen_seconds(board: Board) -> float | None:
    """From the journal: `state generating-key` to the next state, in guest monotonic seconds."""
    stamps = {}
    for line in out(board, "journal-all.txt").splitlines():
        if "factory-agent" not in line or "state " not in line:
            continue
        stamp = float(line[1:line.index("]")])
        if "state generating-key" in line:
            stamps.setdefault("start", stamp)
        elif "start" in stamps and "end" not in stamps:
            stamps["end"] = stamp
    return round(stamps["end"] - stamps["start"], 1) if len(stamps) == 2 else None


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


# Boards get universally administered MACs (QEMU's default 52:54:00:... is locally administered,
# which the agent rightly refuses as an identity).


def test_first_boot_registers_with_the_device_tree_serial(make_board, vault: HoldingVault, timings):
    board = make_board("board-a", dt_serial="00000000c0ffee42", mac="00:0a:35:c0:ff:42", disk_serial="EMMC-A0001")
    boot = board.boot(vault.port)
    status = finish(board, boot, timings, "first_boot")

    assert out(board, "uname-m.txt").strip() == "armv7l"
    assert "00000000c0ffee42" in out(board, "cpuinfo-serial.txt")
    assert out(board, "disk-serial.txt").strip() == "EMMC-A0001"
    escape = out(board, "escape.txt")
    assert "reached" not in escape and "Error" in escape, f"the guest reached the host's loopback: {escape}"
    assert out(board, "status-wait.rc").strip() == "0", out(board, "status-wait.txt")
    assert out(board, "busctl-state.txt").strip() == 's "registered"'
    assert out(board, "busctl-serial.txt").strip() == 's "00000000c0ffee42"'
    assert status["state"] == "registered" and status["serial"] == "00000000c0ffee42"
    assert status["identity"]["soc_serial"] == "00000000c0ffee42"
    assert status["identity"]["mac"] == "00:0a:35:c0:ff:42"
    # the one the vault signed is the one proposed from the device tree, and it verifies on the host
    serial = verify_on_host(board, vault)
    assert serial.header("serial") == "00000000c0ffee42"
    assert serial.header("device-key-sha3-384") == status["device-key-id"]
    assert len(signed_for(vault, "00000000c0ffee42")) == 1
    # the unit as systemd ran it: active, no restarts, private state
    unit = out(board, "unit.txt")
    assert "ActiveState=active" in unit and "NRestarts=0" in unit, unit
    modes = dict(line.split(" ", 1)[::-1] for line in out(board, "statedir.txt").splitlines())
    assert modes["/var/lib/factory-agent"] == "700"
    assert modes["/var/lib/factory-agent/device-key.pem"] == "600"
    timings["first_boot"]["keygen_s"] = keygen_seconds(board)  # type: ignore[index]


def test_second_board_gets_its_own_serial(make_board, vault: HoldingVault, timings):
    board = make_board("board-b", dt_serial="00000000b0a4d002", mac="00:0a:35:b0:a4:02", disk_serial="EMMC-B0002")
    status = finish(board, board.boot(vault.port), timings, "second_board")
    assert out(board, "status-wait.rc").strip() == "0", out(board, "status-wait.txt")
    assert status["serial"] == "00000000b0a4d002"
    assert status["identity"]["mac"] == "00:0a:35:b0:a4:02"
    serial = verify_on_host(board, vault)
    assert serial.header("serial") == "00000000b0a4d002"
    keys = {a.header("device-key-sha3-384") for a in vault.signed}
    assert len(keys) == len(vault.signed), "two boards, or two signings, shared a device key"
    timings["second_board"]["keygen_s"] = keygen_seconds(board)  # type: ignore[index]


def test_power_cuts_during_keygen_and_while_the_vault_holds_the_request(make_board, vault: HoldingVault,
                                                                        timings):
    board = make_board("board-c", dt_serial="00000000c0a7c003", mac="00:0a:35:c0:a7:03", disk_serial="EMMC-C0003")

    # 1. power cut while the key is being generated (no key is durable yet)
    boot = board.boot(vault.port)
    boot.wait_for(r"state generating-key", timeout=300)
    time.sleep(3)
    boot.power_cut()

    # 2. power cut while the vault holds the serial request (the key is durable by then)
    vault.hold.set()
    try:
        boot = board.boot(vault.port)
        assert vault.arrived.wait(timeout=BOOT_BUDGET), f"no serial request arrived:\n{boot.tail()}"
        boot.power_cut()
    finally:
        vault.hold.clear()
        vault.release.set()
    (held,) = vault.held
    request = assertions.decode_stream(held)[0]
    assert request.type == "serial-request"
    held_key = openpgp.decode_public_key(request.header("device-key")).key_id

    # 3. the next boot finishes with the key that was durable, and one serial
    status = finish(board, board.boot(vault.port), timings, "after_power_cuts")
    assert out(board, "status-wait.rc").strip() == "0", out(board, "status-wait.txt")
    assert status["state"] == "registered" and status["serial"] == "00000000c0a7c003"
    assert status["device-key-id"] == held_key, "the board made a second key after a power cut"
    serial = verify_on_host(board, vault)
    assert serial.header("device-key-sha3-384") == held_key
    assert len(signed_for(vault, "00000000c0a7c003")) == 1
    listing = out(board, "statedir.txt")
    assert listing.count("serial.assertion") == 1 and ".tmp" not in listing, listing


def test_wrong_api_key_blocks_with_the_vaults_code_and_the_action(make_board, vault: HoldingVault, timings):
    board = make_board("board-d", dt_serial="00000000dead0004", mac="00:0a:35:de:ad:04", disk_serial="EMMC-D0004",
                       api_key="not-the-models-api-key")
    status = finish(board, board.boot(vault.port), timings, "refused")
    assert out(board, "status-wait.rc").strip() == "1", out(board, "status-wait.txt")
    assert status["state"] == "blocked"
    assert status["last-error"] == "invalid-api-key"
    assert "api-key" in status["action"]
    text = out(board, "status-wait.txt")
    assert "blocked" in text and "invalid-api-key" in text and status["action"] in text, text
    journal = out(board, "journal.txt")
    assert "invalid-api-key" in journal and status["action"] in journal, journal
    assert "not-the-models-api-key" not in journal + text + json.dumps(status)
    assert out(board, "busctl-state.txt").strip() == 's "blocked"'
    assert not signed_for(vault, "00000000dead0004")
