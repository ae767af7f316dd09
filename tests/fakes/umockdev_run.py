"""Run a command inside a umockdev testbed: fake sysfs devices, real libudev, real uevents.

Usage (umockdev's LD_PRELOAD library must be active from process start, so this
script runs under the wrapper and the command inherits LD_PRELOAD and UMOCKDEV_DIR):

    umockdev-wrapper /usr/bin/python3 tests/fakes/umockdev_run.py \\
        [--devices FILE.umockdev]... [--root DIR]... \\
        [--hotplug FILE.umockdev [--hotplug-delay SECONDS]] [--timeout SECONDS] -- COMMAND...

--devices   devices in umockdev-record's text format (P:/E:/A:/L: blocks), added before COMMAND starts
--root      a directory copied into the testbed root, for files that are not devices
            (sys/firmware/devicetree/base/serial-number, proc/cpuinfo: the preload library
            serves /proc files from the testbed when they exist there)
--hotplug   devices added HOTPLUG_DELAY seconds after COMMAND started; umockdev emits an
            "add" uevent for each block, in file order (so list parents first)

The exit status is COMMAND's (124 if it ran out of --timeout and was killed). Needs
/usr/bin/python3 with python3-gi and gir1.2-umockdev-1.0 (the interpreter that runs
COMMAND can be any).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", action="append", default=[], type=Path)
    parser.add_argument("--root", action="append", default=[], type=Path)
    parser.add_argument("--hotplug", type=Path)
    parser.add_argument("--hotplug-delay", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    testbed = UMockdev.Testbed.new()  # sets UMOCKDEV_DIR in this process's environment
    if not UMockdev.in_mock_environment():
        parser.error("run me under umockdev-wrapper")
    for path in args.devices:
        testbed.add_from_string(path.read_text())
    for tree in args.root:
        shutil.copytree(tree, testbed.get_root_dir(), dirs_exist_ok=True, symlinks=True)
    child = subprocess.Popen(args.command)  # env=None: the C environment, UMOCKDEV_DIR included
    deadline = time.monotonic() + args.timeout
    if args.hotplug is not None:
        try:
            child.wait(timeout=args.hotplug_delay)
        except subprocess.TimeoutExpired:
            testbed.add_from_string(args.hotplug.read_text())
    try:
        return child.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return 124


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
