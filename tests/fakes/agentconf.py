"""An agent configuration that trusts a lab vault, and a pre-seeded device key, for tests and the bench."""

from __future__ import annotations

import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def write_agent_config(directory: Path, url: str, lab_dir: Path, *, template: str, soc_serial: str,
                       api_key_file: Path | None = None, vault_extra: str = "", hardware_key: str = "",
                       pkcs11_module: str = "") -> Path:
    """``directory``/agent.toml: the lab vault at ``url``, its trust chain, a static SoC serial. With
    ``hardware_key`` (a key URI): secure onboarding with that key, and no api-key."""
    path = directory / "agent.toml"
    api_key = "" if hardware_key else f'api-key-file = "{api_key_file or lab_dir / "api-key"}"'
    onboarding = (f'[onboarding]\nmethod = "hardware-identity"\nhardware-key = "{hardware_key}"\n'
                  f'pkcs11-module = "{pkcs11_module}"\n') if hardware_key else ""
    path.write_text(f"""
model-assertion = "{lab_dir / 'model.assert'}"
[vault]
url = "{url}"
allow-insecure-http = true
{api_key}
trusted-account-keys = ["{lab_dir / 'brand.account-key'}"]
{vault_extra}
[serial]
template = "{template}"
[identity]
wait-seconds = 0
[identity.static]
soc_serial = "{soc_serial}"
{onboarding}""")
    return path


def copy_lab_keys(lab_dir: Path, directory: Path) -> Path:
    """``directory`` (made, 0700) holding the session's lab root and brand keys: a lab vault on it makes no key."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("root-key.pem", "brand-key.pem"):
        shutil.copy2(lab_dir / name, directory / name)
    return directory


def seed_key(state: Path, pem: Path = DATA / "device" / "device-key.pem") -> None:
    """A device key as if an earlier boot had generated it (the daemon adopts it at start)."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.copy(pem, state / "device-key.pem")
    (state / "device-key.pem").chmod(0o600)
