"""The OpenPGP subset snapd uses: v1 key and signature blocks, key ids, RSA signatures.

No I/O. No clock. Signing takes the creation time and an RSA signer function
from the caller, so this module never sees a key file.

snapd encodes keys and signatures as base64 of ``0x01`` + one RFC 4880 v4
packet, wrapped at 76 columns. Public keys are always re-serialised with the
fixed 2016-01-01 creation time, and a key id is the unpadded base64url
SHA3-384 of those bytes; so ids depend only on (n, e).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from .errors import AssertionFormatError, BadSignatureError

V1 = 0x01
FIXED_KEY_TIME = 1451606400  # 2016-01-01T00:00:00Z, snapd's v1FixedTimestamp
LINE_LENGTH = 76
TAG_SIGNATURE = 2
TAG_PUBLIC_KEY = 6
ALGO_RSA = 1
SIG_BINARY = 0x00
HASH_SHA512 = 10
SUBPACKET_CREATION_TIME = 2
# Subpackets whose critical bit we can honour: we read the creation time and
# may ignore who claims to be the issuer (the assertion names its key by id).
_KNOWN_SUBPACKETS = {SUBPACKET_CREATION_TIME, 16, 33}
# Accepted digests on verification (snapd only produces SHA-512; gpg-made
# brand signatures follow snapd's digest preference). No SHA-1, no MD5.
_HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    8: ("sha256", hashes.SHA256),
    9: ("sha384", hashes.SHA384),
    10: ("sha512", hashes.SHA512),
    11: ("sha224", hashes.SHA224),
}
MIN_RSA_BITS = 2048

Signer = Callable[[bytes], bytes]
"""Returns the RSA PKCS#1 v1.5 SHA-512 signature of a message (it hashes the message itself)."""


def _fail(msg: str) -> AssertionFormatError:
    return AssertionFormatError(msg)


# --- v1 text blocks --------------------------------------------------------


def encode_v1(packet: bytes) -> bytes:
    """Base64 of 0x01 + packet, 76 columns, no trailing newline."""
    flat = base64.b64encode(bytes([V1]) + packet)
    return b"\n".join(flat[i : i + LINE_LENGTH] for i in range(0, len(flat), LINE_LENGTH))


def decode_v1(text: bytes, kind: str) -> bytes:
    """The packet inside a v1 block; like Go's base64, only CR and LF are skipped."""
    flat = text.replace(b"\n", b"").replace(b"\r", b"")
    if not flat:
        raise _fail(f"cannot decode {kind}: no data")
    # Python's decoder ignores data after the padding ("...ld==" + "=="); Go's rejects it, as must we.
    if len(flat) % 4 or b"=" in flat.rstrip(b"=") or len(flat) - len(flat.rstrip(b"=")) > 2:
        raise _fail(f"cannot decode {kind}: base64 of {len(flat)} characters is not whole, padded quanta")
    try:
        raw = base64.b64decode(flat, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(f"cannot decode {kind}: {exc}") from None
    if not raw:
        raise _fail(f"cannot decode {kind}: base64 without data")
    if raw[0] != V1:
        raise _fail(f"unsupported {kind} format version: {raw[0]}")
    return raw[1:]


# --- packets ---------------------------------------------------------------


def packet(tag: int, body: bytes) -> bytes:
    """A new-format packet, with the shortest length encoding (as x/crypto writes it)."""
    n = len(body)
    if n < 192:
        length = bytes([n])
    elif n < 8384:
        length = bytes([((n - 192) >> 8) + 192, (n - 192) & 0xFF])
    else:
        length = b"\xff" + struct.pack(">I", n)
    return bytes([0xC0 | tag]) + length + body


def read_packet(data: bytes, kind: str) -> tuple[int, bytes]:
    """(tag, body) of the single packet that ``data`` must be exactly."""
    if len(data) < 2 or not data[0] & 0x80:
        raise _fail(f"cannot decode {kind}: not an OpenPGP packet")
    if data[0] & 0x40:
        tag, (length, start) = data[0] & 0x3F, _new_length(data, kind)
    else:
        tag, (length, start) = (data[0] >> 2) & 0x0F, _old_length(data, kind)
    if start + length != len(data):
        raise _fail(f"cannot decode {kind}: packet length {length} does not match the data")
    return tag, data[start:]


def _new_length(data: bytes, kind: str) -> tuple[int, int]:
    first = data[1]
    if first < 192:
        return first, 2
    if first < 224 and len(data) >= 3:
        return ((first - 192) << 8) + data[2] + 192, 3
    if first == 255 and len(data) >= 6:
        return struct.unpack(">I", data[2:6])[0], 6
    raise _fail(f"cannot decode {kind}: unsupported packet length")


def _old_length(data: bytes, kind: str) -> tuple[int, int]:
    size = {0: 1, 1: 2, 2: 4}.get(data[0] & 0x03)
    if size is None or len(data) < 1 + size:
        raise _fail(f"cannot decode {kind}: unsupported packet length")
    return int.from_bytes(data[1 : 1 + size], "big"), 1 + size


def mpi(value: int) -> bytes:
    """An RFC 4880 multiprecision integer: bit count, then minimal big-endian bytes."""
    bits = value.bit_length()
    return struct.pack(">H", bits) + value.to_bytes((bits + 7) // 8, "big")


class _Reader:
    """Bounds-checked reads over a packet body; every shortfall is a typed error."""

    def __init__(self, data: bytes, kind: str) -> None:
        self.data, self.pos, self.kind = data, 0, kind

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _fail(f"cannot decode {self.kind}: truncated packet")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def mpi_bytes(self) -> tuple[int, bytes]:
        bits = self.uint(2)
        return bits, self.take((bits + 7) // 8)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _fail(f"cannot decode {self.kind}: spurious trailing data")


# --- public keys -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An RSA public key as snapd sees it: (n, e) and nothing else."""

    n: int
    e: int

    @property
    def packet(self) -> bytes:
        body = b"\x04" + struct.pack(">I", FIXED_KEY_TIME) + bytes([ALGO_RSA])
        return packet(TAG_PUBLIC_KEY, body + mpi(self.n) + mpi(self.e))

    @property
    def encoded(self) -> str:
        """The ``device-key`` header / account-key body text."""
        return encode_v1(self.packet).decode("ascii")

    @property
    def key_id(self) -> str:
        digest = hashlib.sha3_384(bytes([V1]) + self.packet).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    @property
    def bits(self) -> int:
        return self.n.bit_length()


def decode_public_key(text: str | bytes) -> PublicKey:
    """(n, e) from a v1 public-key block; the creation time it carried is dropped, as snapd does."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    tag, body = read_packet(decode_v1(raw, "public key"), "public key")
    if tag != TAG_PUBLIC_KEY:
        raise _fail(f"expected public key, got packet tag {tag}")
    rd = _Reader(body, "public key")
    version, _created, algo = rd.byte(), rd.uint(4), rd.byte()
    if version != 4:
        raise _fail(f"unsupported public key packet version: {version}")
    if algo != ALGO_RSA:
        raise _fail(f"expected RSA public key, got algorithm {algo}")
    n, e = (int.from_bytes(rd.mpi_bytes()[1], "big") for _ in range(2))
    rd.end()
    if n.bit_length() < MIN_RSA_BITS or e < 3 or e % 2 == 0:
        raise _fail(f"unacceptable RSA public key ({n.bit_length()} bits, e={e})")
    return PublicKey(n, e)


# --- signatures ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """A parsed v4 signature packet; ``hashed_part`` is version..hashed subpackets as sent."""

    sig_type: int
    pk_algo: int
    hash_algo: int
    hashed_part: bytes
    hash_tag: bytes
    value: bytes
    created: int


def _trailer(hashed_part: bytes) -> bytes:
    return hashed_part + b"\x04\xff" + struct.pack(">I", len(hashed_part))


def make_signature(content: bytes, created: int, sign: Signer) -> bytes:
    """snapd's signature block over ``content``: v4, binary, RSA, SHA-512, creation time only.

    ``created`` is truncated to 32 bits like Go's uint32 conversion. The RSA
    value's bit count is written as 8 x its byte length (snapd's x/crypto
    quirk), which byte-identity with snapd requires.
    """
    subpacket = bytes([5, SUBPACKET_CREATION_TIME]) + struct.pack(">I", created & 0xFFFFFFFF)
    hashed_part = bytes([4, SIG_BINARY, ALGO_RSA, HASH_SHA512]) + struct.pack(">H", len(subpacket)) + subpacket
    message = content + _trailer(hashed_part)
    value = sign(message)
    tag = hashlib.sha512(message).digest()[:2]
    body = hashed_part + b"\x00\x00" + tag + struct.pack(">H", 8 * len(value)) + value
    return encode_v1(packet(TAG_SIGNATURE, body))


def parse_signature(text: bytes) -> Signature:
    tag, body = read_packet(decode_v1(text, "signature"), "signature")
    if tag != TAG_SIGNATURE:
        raise _fail(f"expected signature, got packet tag {tag}")
    rd = _Reader(body, "signature")
    version, sig_type, pk_algo, hash_algo = (rd.byte() for _ in range(4))
    if version != 4:
        raise _fail(f"unsupported signature packet version: {version}")
    hashed = rd.take(rd.uint(2))
    rd.take(rd.uint(2))  # unhashed subpackets: unauthenticated, never trusted
    hash_tag, (_bits, value) = rd.take(2), rd.mpi_bytes()
    rd.end()
    created = _creation_time(hashed)
    return Signature(sig_type, pk_algo, hash_algo, body[: 6 + len(hashed)], hash_tag, value, created)


def _creation_time(area: bytes) -> int:
    rd, created = _Reader(area, "signature subpackets"), None
    while rd.pos < len(area):
        first = rd.byte()
        if first < 192:
            length = first
        elif first < 255:
            length = ((first - 192) << 8) + rd.byte() + 192
        else:
            length = rd.uint(4)
        if length < 1:
            raise _fail("cannot decode signature: empty subpacket")
        kind, data = rd.byte(), rd.take(length - 1)
        if kind & 0x80 and kind & 0x7F not in _KNOWN_SUBPACKETS:
            raise _fail(f"cannot decode signature: unknown critical subpacket {kind & 0x7F}")
        if kind & 0x7F == SUBPACKET_CREATION_TIME:
            if len(data) != 4:
                raise _fail("cannot decode signature: bad creation time subpacket")
            created = int.from_bytes(data, "big")
    if created is None:
        raise _fail("cannot decode signature: no creation time")
    return created


def verify_signature(content: bytes, sig: Signature, key: PublicKey) -> None:
    """Raise BadSignatureError unless ``sig`` is ``key``'s signature over ``content``."""
    if sig.sig_type != SIG_BINARY or sig.pk_algo != ALGO_RSA:
        raise BadSignatureError(f"unsupported signature (type {sig.sig_type}, algorithm {sig.pk_algo})")
    if sig.hash_algo not in _HASHES:
        raise BadSignatureError(f"unsupported signature hash algorithm {sig.hash_algo}")
    name, algorithm = _HASHES[sig.hash_algo]
    digest = hashlib.new(name, content + _trailer(sig.hashed_part)).digest()
    if digest[:2] != sig.hash_tag:
        raise BadSignatureError("hash tag doesn't match")
    size = (key.n.bit_length() + 7) // 8
    value = sig.value.lstrip(b"\x00")
    if len(value) > size:
        raise BadSignatureError("signature value is larger than the key")
    try:
        rsa_key = rsa.RSAPublicNumbers(key.e, key.n).public_key()
        rsa_key.verify(value.rjust(size, b"\x00"), digest, padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except InvalidSignature:
        raise BadSignatureError("RSA verification failed") from None
    except ValueError as exc:
        raise BadSignatureError(f"cannot use public key: {exc}") from None
