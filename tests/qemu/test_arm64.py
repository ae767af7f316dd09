"""The agent on an emulated arm64 board: Debian 13 "trixie" under qemu-system-aarch64 (issue 15).

The same first boot as armhf's (scenario.check_first_boot): systemd as PID 1, the .deb installed
by dpkg, the unit enabled by the package; the serial is the device tree's serial-number, which
arm64 kernels do not copy into /proc/cpuinfo, so the agent reads it from the device tree. The
power cuts, the second board and the refusal stay on armhf.
"""

from __future__ import annotations

import pytest

from tests.qemu.conftest import HoldingVault
from tests.qemu.scenario import check_first_boot

pytestmark = pytest.mark.timeout(1800)


def test_first_boot_registers_with_the_device_tree_serial(make_board, vault: HoldingVault, timings):
    board = make_board("arm64-a", dt_serial="00000000a64c0de1", mac="00:0a:35:a6:40:01", disk_serial="EMMC-A6401",
                       arch="arm64")
    check_first_boot(board, vault, timings)
