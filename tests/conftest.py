"""Shared fixtures: the snapd-made vectors in tests/data and throw-away keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from agent import keys, openpgp

DATA = Path(__file__).resolve().parent / "data"
REPO = DATA.parent.parent

# The emulated armhf boards boot for minutes each: only `make qemu-test` runs them.
collect_ignore = [] if os.environ.get("FACTORY_AGENT_QEMU") == "1" else ["qemu"]


@pytest.fixture(scope="session")
def data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def device_key() -> keys.DeviceKey:
    """The vectors' RSA-4096 device key (PKCS#1 PEM, as snapd generated it)."""
    return keys.load_key((DATA / "device" / "device-key.pem").read_bytes())


@pytest.fixture(scope="session")
def brand_key() -> keys.DeviceKey:
    return keys.load_key((DATA / "brand" / "brand-key.pem").read_bytes())


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One lab vault directory per session: its RSA-4096 root and brand keys are generated once."""
    from agent.labvault import LabVault

    directory = tmp_path_factory.mktemp("lab")
    LabVault(directory)
    return directory


@pytest.fixture
def lab(lab_dir: Path):
    """A lab vault serving on 127.0.0.1 with the session's keys and fresh nonces, counters and faults."""
    from tests.fakes.faultyvault import FaultyVault

    vault = FaultyVault(lab_dir)
    vault.start()
    yield vault
    vault.stop()


@pytest.fixture(scope="session")
def small_key() -> keys.DeviceKey:
    """A 2048-bit key for tests that sign many times; never a product default."""
    private = rsa.generate_private_key(65537, 2048)
    numbers = private.public_key().public_numbers()
    return keys.DeviceKey(private, openpgp.PublicKey(numbers.n, numbers.e))


def pytest_report_header() -> list[str]:
    """Which leg this is: the interpreter and the versions of every dependency."""
    import importlib.metadata as md
    import sys

    names = ["cryptography", "requests", "pyudev", "dbus-next", "systemd-python", "h11", "hypothesis"]
    versions = []
    for name in names:
        try:
            versions.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            versions.append(f"{name} missing")
    return [f"python {sys.version.split()[0]} at {sys.executable}", "deps: " + ", ".join(versions)]


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory):
    """A SoftHSM2 token store for the session; SOFTHSM2_CONF is set for this process and its children."""
    from tests.fakes.softhsm import SoftHsm, missing

    if reason := missing():
        pytest.skip(reason)
    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    yield hsm
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous
