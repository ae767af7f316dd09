"""An emulated ARM board: QEMU ``-M virt`` booting the test image with a chosen identity.

Two architectures (:data:`ARCHES`): armhf (Debian 12, qemu-system-arm, cortex-a15) and arm64
(Debian 13, qemu-system-aarch64, cortex-a53), both TCG with the console on ttyAMA0 (PL011).

A :class:`Board` owns a copy-on-write overlay of the cached image (so its disk survives its own
reboots and power cuts), a device tree carrying its serial number and model, a MAC, a disk
serial, a machine-id, and a host folder shared over 9p: ``etc/`` there is copied over the guest's
/etc before the agent starts (the factory's provisioning step), ``guest-test.sh`` is what the
harness unit runs, and ``out/`` is where the guest leaves what it saw.

The guest's only way out is QEMU's user-mode network with ``restrict=on`` and one ``guestfwd``:
10.0.2.100:80 inside is a relay (fwd_relay.py) to one loopback port on the host.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VAULT_ADDRESS = "10.0.2.100"  # what the guest dials; QEMU hands the connection to fwd_relay.py
MEMORY_MB = 1024
CPUS = 2


@dataclass(frozen=True)
class Arch:
    """How QEMU emulates one Debian architecture's board (build-image.sh --arch NAME makes its image)."""

    name: str  # the Debian architecture
    qemu: str
    machine: str  # -M
    cpu: str
    uname: str  # `uname -m` in the guest


ARCHES = {arch.name: arch for arch in (
    Arch("armhf", "qemu-system-arm", "virt,highmem=off", "cortex-a15", "armv7l"),
    Arch("arm64", "qemu-system-aarch64", "virt", "cortex-a53", "aarch64"),
)}


@dataclass(frozen=True)
class Image:
    """The cached image with the package installed, and the kernel and initrd that boot it."""

    image: Path
    kernel: Path
    initrd: Path
    arch: Arch = ARCHES["armhf"]


def build_image(deb: Path, arch: Arch) -> tuple[Image, float]:
    """Run build-image.sh (cached layers make this seconds when nothing changed); its duration."""
    started = time.monotonic()
    done = subprocess.run(["sh", str(HERE / "build-image.sh"), "--arch", arch.name, str(deb)],
                          stdout=subprocess.PIPE, text=True, check=True, timeout=3600)
    paths = dict(line.split("=", 1) for line in done.stdout.split())
    image = Image(Path(paths["image"]), Path(paths["kernel"]), Path(paths["initrd"]), arch)
    return image, time.monotonic() - started


@dataclass
class Board:
    name: str
    root: Path
    image: Image
    dt_serial: str
    mac: str
    disk_serial: str
    machine_id: str
    model: str = "Acme Gateway 3000 (QEMU)"
    boots: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.share.mkdir(parents=True, exist_ok=True)
        (self.share / "out").mkdir(exist_ok=True)
        self.disk = self.root / "disk.qcow2"
        if not self.disk.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(self.image.image), "-F", "qcow2",
                            str(self.disk)], check=True)
        self.dtb = self.root / "board.dtb"

    @property
    def share(self) -> Path:
        return self.root / "share"

    @property
    def out(self) -> Path:
        return self.share / "out"

    def write(self, relative: str, content: str | bytes, mode: int = 0o644) -> Path:
        """A file in the share (``etc/...`` lands in the guest's /etc at its next boot)."""
        path = self.share / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)
        return path

    @property
    def arch(self) -> Arch:
        return self.image.arch

    def _args(self, vault_port: int) -> list[str]:
        relay = f"{sys.executable} {HERE / 'fwd_relay.py'} 127.0.0.1 {vault_port}"
        append = f"console=ttyAMA0 root=/dev/vda rw panic=-1 systemd.machine_id={self.machine_id}"
        return [
            self.arch.qemu, "-M", self.arch.machine, "-cpu", self.arch.cpu, "-smp", str(CPUS),
            "-m", str(MEMORY_MB),
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", append,
            # writeback (not unsafe): a guest fsync reaches the host file, so SIGKILL is a power cut
            "-drive", f"if=none,id=hd0,file={self.disk},format=qcow2,cache=writeback",
            "-device", f"virtio-blk-device,drive=hd0,serial={self.disk_serial}",
            "-netdev", f"user,id=n0,restrict=on,guestfwd=tcp:{VAULT_ADDRESS}:80-cmd:{relay}",
            "-device", f"virtio-net-device,netdev=n0,mac={self.mac}",
            "-fsdev", f"local,id=fs0,path={self.share},security_model=none",
            "-device", "virtio-9p-device,fsdev=fs0,mount_tag=hostshare",
            "-device", "virtio-rng-device",
            "-display", "none", "-monitor", "none", "-no-reboot",
        ]

    def _make_dtb(self, args: list[str]) -> None:
        """QEMU's own device tree for exactly these arguments, with serial-number and model added.

        With -dtb QEMU uses the file as it is, so it must come from the same memory, CPUs and
        devices; the per-boot random seeds are dropped so no boot reuses another's.
        """
        if self.dtb.exists():
            return
        raw = self.root / "virt.dtb"
        args = list(args)
        index = args.index("-M")
        args[index + 1] = f"{self.arch.machine},dumpdtb={raw}"
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(raw)], check=True, stdout=subprocess.PIPE,
                             text=True).stdout
        dts = "\n".join(line for line in dts.splitlines() if not re.search(r"\b(rng-seed|kaslr-seed)\b", line))
        dts = re.sub(r"^/ \{\n", f'/ {{\n\tserial-number = "{self.dt_serial}";\n\tmodel = "{self.model}";\n', dts,
                     count=1, flags=re.M)
        dts = re.sub(r'^\tmodel = "linux,dummy-virt";\n', "", dts, flags=re.M)
        subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-o", str(self.dtb)], input=dts, text=True,
                       check=True)

    def boot(self, vault_port: int) -> Boot:
        args = self._args(vault_port)
        self._make_dtb(args)
        self.boots += 1
        for stale in ("rc", "guest-test.log"):
            (self.out / stale).unlink(missing_ok=True)
        console = self.root / f"console-{self.boots}.log"
        args += ["-dtb", str(self.dtb), "-serial", f"file:{console}"]
        (self.root / "qemu-args.txt").write_text(" ".join(args) + "\n")
        with open(self.root / f"qemu-{self.boots}.log", "wb") as messages:
            process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=messages, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        return Boot(self, process, console, time.monotonic())


@dataclass
class Boot:
    board: Board
    process: subprocess.Popen[bytes]
    console: Path
    started: float

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first console line matching ``pattern``; raises if QEMU exits or time runs out."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.M)
        while True:
            match = regex.search(self.console_text())
            if match:
                return match
            if self.process.poll() is not None:
                raise AssertionError(f"{self.board.name}: QEMU exited ({self.process.returncode}) before "
                                     f"{pattern!r}; console tail:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.board.name}: no {pattern!r} within {timeout:.0f} s; "
                                     f"console tail:\n{self.tail()}")
            time.sleep(0.25)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def power_cut(self) -> None:
        """SIGKILL QEMU: the guest gets no chance to flush anything it had not already synced."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def wait(self, timeout: float) -> int:
        """Wait for the guest to power itself off; on timeout it is killed and the test fails."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.power_cut()
            raise AssertionError(f"{self.board.name}: still running after {timeout:.0f} s; console tail:\n"
                                 f"{self.tail()}") from None

    def tail(self, lines: int = 40) -> str:
        """The console's last lines, and whatever QEMU itself said."""
        text = "\n".join(self.console_text().splitlines()[-lines:])
        qemu = self.console.with_name(self.console.name.replace("console", "qemu"))
        said = qemu.read_text(errors="replace").strip() if qemu.exists() else ""
        return text + (f"\n[qemu] {said}" if said else "")
