"""The device key: generated in a real child process, stored durably (0600), loaded back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent import keys, onboarding, store
from agent.errors import DeviceKeyError, UntrustedFileError
from tests.conftest import DATA, REPO


def test_generates_a_4096_bit_key_in_a_child_process(tmp_path: Path) -> None:
    pem = keys.generate_key_pem()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8
    saved = store.save_device_key(tmp_path, pem)
    assert saved.public.bits == 4096 and saved.public.e == 65537
    path = tmp_path / store.DEVICE_KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = store.load_device_key(tmp_path)
    assert loaded is not None and loaded.key_id == saved.key_id
    assert saved.public.encoded.startswith("AcbBTQRWhcGAARAA")  # every snapd 4096-bit device key does


def test_key_sizes_below_2048_are_refused() -> None:
    with pytest.raises(DeviceKeyError, match="below the minimum"):
        keys.generate_key_pem(1024)


def test_an_existing_key_is_never_replaced_but_adopted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A key that appeared while ours was made is the identity from then on: never replaced, never a second try."""
    first = store.save_device_key(tmp_path, (DATA / "device" / "device-key.pem").read_bytes())
    before = (tmp_path / store.DEVICE_KEY_FILE).read_bytes()
    adopted = store.save_device_key(tmp_path, (DATA / "brand" / "brand-key.pem").read_bytes())
    assert adopted.key_id == first.key_id and (tmp_path / store.DEVICE_KEY_FILE).read_bytes() == before
    assert f"appeared while a key was being generated; adopting it (key {first.key_id})" in caplog.text
    assert store.load_device_key(tmp_path).key_id == first.key_id
    assert [p.name for p in tmp_path.iterdir()] == [store.DEVICE_KEY_FILE]  # no temp left behind


def test_no_key_yet_is_none(tmp_path: Path) -> None:
    assert store.load_device_key(tmp_path) is None


def test_a_world_readable_key_is_refused(tmp_path: Path) -> None:
    store.save_device_key(tmp_path, (DATA / "device" / "device-key.pem").read_bytes())
    (tmp_path / store.DEVICE_KEY_FILE).chmod(0o644)
    with pytest.raises(UntrustedFileError, match=r"readable by others \(mode 0644\); run: chmod 0600 "):
        store.load_device_key(tmp_path)


@pytest.mark.parametrize("pos", [100, 200, 400, 800, 1200, 1600, 2000, 2400, 3000])
def test_a_corrupt_key_never_signs_silently_and_errors_show_no_key_material(pos: int) -> None:
    """Loading may skip the slow RSA validation (cryptography >= 39), so every signature is checked:
    a corrupt key fails to load or to sign, or (damage outside what signing uses) still signs correctly."""
    pem = (DATA / "device" / "device-key.pem").read_bytes()
    broken = pem[:pos] + (b"AAAA" if pem[pos : pos + 4] != b"AAAA" else b"BBBB") + pem[pos + 4 :]
    try:
        key = keys.load_key(broken)
        signature = key.sign(b"message")
    except DeviceKeyError as exc:
        assert "MII" not in str(exc) and len(str(exc)) < 100
        return
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    public = rsa.RSAPublicNumbers(key.public.e, key.public.n).public_key()
    public.verify(signature, b"message", padding.PKCS1v15(), hashes.SHA512())


def _pkcs1_pem(numbers: list[int]) -> bytes:
    """A PKCS#1 RSAPrivateKey of exactly these numbers, whatever they are (cryptography would refuse to build it)."""
    import base64

    body = b"".join(onboarding._der_integer(v.to_bytes(v.bit_length() // 8 + 1, "big")) for v in [0, *numbers])
    der = b"\x30" + onboarding._der_length(len(body)) + body
    lines = [base64.b64encode(der)[i:i + 64] for i in range(0, len(base64.b64encode(der)), 64)]
    return b"-----BEGIN RSA PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END RSA PRIVATE KEY-----\n"


@pytest.mark.parametrize("field", ["d", "p", "dmp1", "dmq1", "iqmp"])
def test_a_key_whose_numbers_do_not_fit_together_is_refused_on_load(field: str) -> None:
    """OpenSSL's RSA_check_key is skipped on load (its primality tests cost ~250 ms on every start); every
    relation it checks between the numbers is checked by the agent instead."""
    n = keys.load_key((DATA / "device" / "device-key.pem").read_bytes()).private.private_numbers()
    values = {"n": n.public_numbers.n, "e": n.public_numbers.e, "d": n.d, "p": n.p, "q": n.q, "dmp1": n.dmp1,
              "dmq1": n.dmq1, "iqmp": n.iqmp}
    values[field] += 2
    pem = _pkcs1_pem([values[k] for k in ("n", "e", "d", "p", "q", "dmp1", "dmq1", "iqmp")])
    with pytest.raises(DeviceKeyError, match="cannot load device key: ValueError"):
        keys.load_key(pem)
    good = _pkcs1_pem([{**values, field: values[field] - 2}[k] for k in ("n", "e", "d", "p", "q", "dmp1", "dmq1", "iqmp")])
    assert keys.load_key(good).key_id == (DATA / "device" / "device-key.id").read_text().strip()


def test_the_load_leaves_cryptographys_own_key_check_on() -> None:
    """cryptography 38's switch is set only around the agent's own load: any other load still checks."""
    from cryptography.hazmat.backends.openssl.backend import backend

    keys.load_key((DATA / "device" / "device-key.pem").read_bytes())
    assert getattr(backend, "_rsa_skip_check_key", False) is False


def test_repr_shows_no_key_material(device_key) -> None:
    assert "DeviceKey(key_id=" in repr(device_key) and "n=" not in repr(device_key)


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_keygen_child_dies_with_its_parent() -> None:
    """A SIGKILLed daemon leaves no orphan burning CPU on a keygen nobody will store."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "from agent import keys; keys.generate_key_pem(16384)"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        deadline = time.monotonic() + 20
        while not (children := _children_of(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children, "the keygen child did not start"
        time.sleep(0.3)  # let the child reach prctl()
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{children[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{children[0]}").exists(), "keygen child outlived its parent"
    finally:
        parent.kill()


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agent import store
    path = Path(sys.argv[1])
    blobs = [bytes([65 + i]) * 300_000 for i in range(2)]
    print("ready", flush=True)
    i = 0
    while True:
        store.write_durable(path, blobs[i % 2])
        i += 1
    """
)


def test_sigkill_during_writes_leaves_old_or_new_never_partial(tmp_path: Path) -> None:
    """Real crashes: SIGKILL a writer at 40 random instants; the file is always whole."""
    import random

    rng = random.Random(4)
    path = tmp_path / "device-key.pem"
    store.write_durable(path, b"A" * 300_000)
    valid = {b"A" * 300_000, b"B" * 300_000}
    mid_write = 0
    for _ in range(40):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                                  env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0, 0.05))
        writer.kill()
        writer.wait()
        assert path.read_bytes() in valid
        assert path.stat().st_mode & 0o777 == 0o600
        mid_write += bool(store.remove_stale_temps(tmp_path))
    assert mid_write > 0, "no kill landed between write and rename"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_rename_keeps_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serial.assertion"
    store.write_durable(path, b"old")

    def crash(*args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.write_durable(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_stale_temps_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".state.json.abc123.tmp").write_bytes(b"half")
    (tmp_path / "state.json").write_bytes(b"{}")
    assert store.remove_stale_temps(tmp_path) == [".state.json.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
