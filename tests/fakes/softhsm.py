"""A real SoftHSM2 token store for the tests: its own configuration and token directory, tokens made with
softhsm2-util, and the PIN in a 0600 file as the agent wants it.

SoftHSM reads SOFTHSM2_CONF, and lists its tokens, once, when a process first initialises the
module: a token made later is not seen by that process. So the tests use the module from child
processes only (the agent's commands, pkcs11-tool, a PyKCS11 script), each of which sees every token;
the ``softhsm`` fixture sets SOFTHSM2_CONF for them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

MODULE_CANDIDATES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
                     "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so")
SO_PIN = "87654321"
_counter = itertools.count(1)


def module_path() -> str | None:
    return next((m for m in MODULE_CANDIDATES if os.path.exists(m)), None)


def missing() -> str:
    """Why SoftHSM2 tests cannot run here, or "" when they can (make deps installs what they need)."""
    if module_path() is None or shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (apt install softhsm2)"
    try:
        import PyKCS11  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "PyKCS11 is not installed (apt install python3-pykcs11)"
    return ""


@dataclass
class Token:
    label: str
    pin_file: Path
    module: str

    def uri(self, obj: str = "hardware-identity", **query: str) -> str:
        extra = "".join(f"&{k.replace('_', '-')}={v}" for k, v in query.items())
        return f"pkcs11:token={quote(self.label)};object={quote(obj)}?pin-source=file:{self.pin_file}{extra}"


class SoftHsm:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "tokens").mkdir(parents=True, exist_ok=True)
        self.conf = directory / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
                             "log.level = ERROR\nslots.removable = false\n")
        self.module = module_path() or ""
        self.env = {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def token(self, label: str | None = None, pin: str = "1234") -> Token:
        """A new initialised token, and its PIN in a 0600 file."""
        label = label or f"factory-{os.getpid()}-{next(_counter)}"
        self.util("--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", pin)
        pin_file = self.directory / f"{label}.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        return Token(label, pin_file, self.module)

    def import_key(self, token: Token, pem: Path, label: str, key_id: str = "01", pin: str = "1234") -> None:
        """A key pair made outside, imported (softhsm2-util --import of a PKCS#8 PEM)."""
        self.util("--import", str(pem), "--token", token.label, "--label", label, "--id", key_id, "--pin", pin)

    def python(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``script`` in a fresh python3 (PyKCS11 sees the tokens as they are now), argv[1:] = ``args``."""
        import sys

        return subprocess.run([sys.executable, "-c", script, *args], env=self.env, capture_output=True, text=True,
                              timeout=60, check=False)

    def list_objects(self, token: Token) -> str:
        """pkcs11-tool's (OpenSC's) view of the token's objects: an implementation that is not the agent's."""
        done = subprocess.run(["pkcs11-tool", "--module", self.module, "--token-label", token.label, "--login",
                               "--pin", token.pin_file.read_text().strip(), "--list-objects"], env=self.env,
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def util(self, *args: str) -> str:
        done = subprocess.run(["softhsm2-util", *args], env=self.env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout
