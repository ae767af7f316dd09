"""A real software TPM 2.0 (swtpm) on loopback, and tpm2-pkcs11 in front of it: the TPM path of the hardware
identity key, as a board with a TPM has it (there through /dev/tpmrm0).

swtpm runs as a child of the test (never daemonised: the test stops and reaps it); tpm2-pkcs11 talks to
it through the swtpm TCTI and keeps its store (the TPM-wrapped key blobs) in a temporary directory.
The token is made through PKCS#11 itself (C_InitToken, C_InitPIN with OpenSC's pkcs11-tool), so no
resource manager is needed.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

SO_PIN = "87654321"


def module_path() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/pkcs11/libtpm2_pkcs11.so") + glob.glob("/usr/lib/pkcs11/libtpm2_pkcs11.so"))
    return found[0] if found else None


def missing() -> str:
    """Why the TPM tests cannot run here, or "" (make deps installs swtpm, tpm2-pkcs11 and OpenSC)."""
    for tool, package in (("swtpm", "swtpm"), ("pkcs11-tool", "opensc")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt install {package})"
    if module_path() is None:
        return "tpm2-pkcs11 is not installed (apt install libtpm2-pkcs11-1 libtss2-tcti-swtpm0)"
    if not glob.glob("/usr/lib/*/libtss2-tcti-swtpm.so*"):
        return "the swtpm TCTI is not installed (apt install libtss2-tcti-swtpm0)"
    return ""


def _free_port_pair() -> int:
    """A loopback port P with P + 1 free too: the swtpm TCTI finds the control channel at the next port."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return int(port)
    raise AssertionError("no two free loopback ports in a row")


class SoftwareTpm:
    """swtpm on two loopback ports, a tpm2-pkcs11 store, and one token with its PIN in a 0600 file."""

    def __init__(self, directory: Path, label: str = "tpm-factory", pin: str = "1234") -> None:
        self.directory, self.label = directory, label
        (directory / "state").mkdir(parents=True)
        (directory / "store").mkdir()
        self.port = _free_port_pair()
        control = self.port + 1
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={directory / 'state'}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={control},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.module = module_path() or ""
        self.env = {**os.environ, "TPM2_PKCS11_TCTI": f"swtpm:host=127.0.0.1,port={self.port}",
                    "TPM2_PKCS11_STORE": str(directory / "store"), "TPM2_PKCS11_LOG_LEVEL": "0"}
        self.pin_file = directory / "pin"
        self.pin_file.write_text(pin + "\n")
        self.pin_file.chmod(0o600)
        try:
            self._wait_listening()
            self.tool("--init-token", "--label", label, "--so-pin", SO_PIN)
            self.tool("--token-label", label, "--login", "--login-type", "so", "--so-pin", SO_PIN, "--init-pin",
                      "--pin", pin)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                said = self.proc.stderr.read() if self.proc.stderr else b""
                raise AssertionError(f"swtpm exited ({self.proc.returncode}): {said!r}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("swtpm did not listen within 20 s")

    def uri(self, obj: str = "hardware-identity") -> str:
        return f"pkcs11:token={quote(self.label)};object={quote(obj)}?pin-source=file:{self.pin_file}"

    def tool(self, *args: str) -> str:
        """OpenSC's pkcs11-tool on the TPM's token."""
        done = subprocess.run(["pkcs11-tool", "--module", self.module, *args], env=self.env, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
