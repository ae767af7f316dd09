"""gpg as an independent OpenPGP verifier for what the agent signs.

gpg imports only a transferable public key (key packet, user id, self
signature), so this builds one for an RSA key with the key packet snapd
uses (2016-01-01 creation time), then asks gpg for its verdict on a
detached signature. The self signature is computed here with plain hashlib
and the RSA key, independently of agent.openpgp's signing code.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

from agent import keys, openpgp

USER_ID = b"factory-agent test key"


def _subpacket(kind: int, data: bytes) -> bytes:
    return bytes([len(data) + 1, kind]) + data


def fingerprint(key: keys.DeviceKey) -> bytes:
    """The v4 fingerprint: SHA-1 over the key packet body (fixed 2016 creation time)."""
    _, key_body = openpgp.read_packet(key.public.packet, "public key")
    return hashlib.sha1(b"\x99" + struct.pack(">H", len(key_body)) + key_body).digest()


def transferable_public_key(key: keys.DeviceKey) -> bytes:
    key_packet = key.public.packet
    _, key_body = openpgp.read_packet(key_packet, "public key")
    fingerprint_ = fingerprint(key)
    hashed = (
        _subpacket(2, struct.pack(">I", openpgp.FIXED_KEY_TIME))
        + _subpacket(27, b"\x03")  # may certify and sign
        + _subpacket(33, b"\x04" + fingerprint_)
    )
    hashed_part = bytes([4, 0x13, 1, 10]) + struct.pack(">H", len(hashed)) + hashed
    message = (
        b"\x99" + struct.pack(">H", len(key_body)) + key_body
        + b"\xb4" + struct.pack(">I", len(USER_ID)) + USER_ID
        + hashed_part + b"\x04\xff" + struct.pack(">I", len(hashed_part))
    )
    unhashed = _subpacket(16, fingerprint_[-8:])
    value = key.sign(message)
    sig_body = (
        hashed_part + struct.pack(">H", len(unhashed)) + unhashed
        + hashlib.sha512(message).digest()[:2] + openpgp.mpi(int.from_bytes(value, "big"))
    )
    return key_packet + openpgp.packet(13, USER_ID) + openpgp.packet(2, sig_body)


def gpg(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--status-fd", "1", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


@contextlib.contextmanager
def keyring(home: Path, key: keys.DeviceKey) -> Iterator[Path]:
    """A gpg home at ``home`` holding ``key``'s public key; its gpg-agent is stopped on the way out.

    gpg starts a gpg-agent for the home on first use and the agent outlives gpg: without the
    ``gpgconf --kill`` one daemon per home would keep running after the suite.
    """
    home.mkdir(mode=0o700, exist_ok=True)
    try:
        import_key(home, key)
        yield home
    finally:
        stop_agents(home)


def stop_agents(home: Path) -> None:
    done = subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def import_key(home: Path, key: keys.DeviceKey) -> None:
    """Imports into an existing home: use it inside ``keyring``, which stops the home's agent."""
    path = home / f"{key.key_id}.gpg"
    path.write_bytes(transferable_public_key(key))
    done = gpg(home, "--import", str(path))
    assert "IMPORT_OK" in done.stdout, done.stdout + done.stderr


def with_issuer_hint(signature_block: bytes, key: keys.DeviceKey) -> bytes:
    """The signature packet with an Issuer subpacket added to its *unhashed* area.

    snapd's signatures name no issuer (the assertion names the key), and gpg
    only looks keys up by issuer. The unhashed area is outside what is
    signed, so adding the hint there leaves the hashed data, the hash tag,
    the RSA value and its bit count exactly as snapd wrote them.
    """
    tag, body = openpgp.read_packet(openpgp.decode_v1(signature_block, "signature"), "signature")
    hashed_end = 6 + int.from_bytes(body[4:6], "big")
    unhashed_len = int.from_bytes(body[hashed_end : hashed_end + 2], "big")
    unhashed = body[hashed_end + 2 : hashed_end + 2 + unhashed_len] + _subpacket(16, fingerprint(key)[-8:])
    rest = body[hashed_end + 2 + unhashed_len :]
    return openpgp.packet(tag, body[:hashed_end] + struct.pack(">H", len(unhashed)) + unhashed + rest)


def verify_detached(
    home: Path, content: bytes, signature_block: bytes, key: keys.DeviceKey
) -> subprocess.CompletedProcess[str]:
    """gpg --verify of the signature packet, with ``key``'s issuer hint added."""
    (home / "content").write_bytes(content)
    (home / "content.sig").write_bytes(with_issuer_hint(signature_block, key))
    return gpg(home, "--verify", str(home / "content.sig"), str(home / "content"))
