"""The agent on emulated armhf boards, from the .deb to a registered serial (issue 6).

Each test boots Debian 12 armhf under qemu-system-arm with systemd as PID 1 and the package
installed; factory-agent.service starts on its own, reads its identity through udev from the
board's virtual hardware and registers with the lab vault on the host's loopback. Every boot
generates a real RSA-4096 key under emulation (12-72 s): the budgets below are generous on purpose.
"""

from __future__ import annotations

import json
import time

import pytest

from agent import assertions, openpgp
from tests.qemu.conftest import HoldingVault
from tests.qemu.scenario import BOOT_BUDGET, check_first_boot, finish, out, signed_for, verify_on_host

pytestmark = pytest.mark.timeout(1800)


# Boards get universally administered MACs (QEMU's default 52:54:00:... is locally administered,
# which the agent rightly refuses as an identity).


def test_first_boot_registers_with_the_device_tree_serial(make_board, vault: HoldingVault, timings):
    board = make_board("board-a", dt_serial="00000000c0ffee42", mac="00:0a:35:c0:ff:42", disk_serial="EMMC-A0001")
    check_first_boot(board, vault, timings)


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
    status = finish(board, board.boot(vault.port), timings, "after_power_cuts", keygen=False)
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
