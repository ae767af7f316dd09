"""What the agent signs verifies under gpg, an OpenPGP implementation that is not ours."""

from __future__ import annotations

import shutil

import pytest

from agent import assertions
from tests import gpg
from tests.conftest import DATA

pytestmark = pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg (Debian package gnupg) is not installed")


@pytest.fixture
def home(tmp_path, device_key):
    with gpg.keyring(tmp_path / "gnupg", device_key) as home:
        yield home


def _signed_request(device_key, created=1_750_000_000) -> assertions.Assertion:
    return assertions.build_serial_request(
        brand="acme", model="acme-gw", request_id="REQ-gpg", device_key=device_key.public,
        signer=device_key.sign, created=created, serial="ACME-gpg", body=b"hardware:\n  mac: x\n",
    )


def test_gpg_accepts_our_serial_request(home, device_key) -> None:
    request = _signed_request(device_key)
    done = gpg.verify_detached(home, request.content, request.signature, device_key)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GOODSIG" in done.stdout and "VALIDSIG" in done.stdout


def test_gpg_rejects_a_tampered_copy(home, device_key) -> None:
    request = _signed_request(device_key)
    tampered = request.content.replace(b"ACME-gpg", b"ACME-gpH")
    done = gpg.verify_detached(home, tampered, request.signature, device_key)
    assert done.returncode != 0
    assert "BADSIG" in done.stdout and "GOODSIG" not in done.stdout


def test_gpg_accepts_snapd_vectors(home, device_key, brand_key, tmp_path) -> None:
    request = assertions.decode((DATA / "serial-request-body.assert").read_bytes())
    assert "GOODSIG" in gpg.verify_detached(home, request.content, request.signature, device_key).stdout
    serial = assertions.decode((DATA / "serial.assert").read_bytes())
    with gpg.keyring(tmp_path / "brand-gnupg", brand_key) as brand_home:
        assert "GOODSIG" in gpg.verify_detached(brand_home, serial.content, serial.signature, brand_key).stdout


def test_gpg_accepts_snapds_4096_bit_count_quirk(home, device_key) -> None:
    """A signature whose RSA value has a zero top byte, written with bit count 4096 as snapd does."""
    for created in range(1_750_000_000, 1_750_004_000):
        request = _signed_request(device_key, created)
        if request.signature_packet().value[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero byte found")
    done = gpg.verify_detached(home, request.content, request.signature, device_key)
    assert "GOODSIG" in done.stdout, done.stdout + done.stderr
