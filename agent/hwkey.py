"""The hardware identity key behind one interface, chosen by its URI: ``file:PATH`` (PKCS#8 PEM, 0600) or
``pkcs11:...`` (RFC 7512: a token, agent/pkcs11.py).

The key is made once per device, at manufacturing, and never replaced: not on re-image, factory
reset or the loss of the state directory (it lives apart from it, on storage that survives a
re-image). Callers get its public half and ask it to sign; the private key never leaves its store.
Signatures are what snapd's verifier accepts: RSA PKCS#1 v1.5, or ECDSA as DER ``SEQUENCE {r, s}``;
never PSS or Ed25519.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

from . import onboarding, store
from .errors import ConfigError, HardwareKeyError, StoreError
from .onboarding import Hash, SignatureEncoding

KEY_TYPES = ("p256", "p384", "rsa2048")  # what `hardware-identity init` makes
DEFAULT_KEY_TYPE = "p256"  # fast on every board, in every TPM, and snapd verifies it with SHA-256
MAX_KEY_BYTES = 16 * 1024


class HardwareKey(Protocol):
    """A hardware identity key wherever it lives: its URI, type (rsa2048, p256, p384), public half, signer."""

    @property
    def uri(self) -> str: ...

    @property
    def key_type(self) -> str: ...

    def public_der(self) -> bytes:
        """The DER SubjectPublicKeyInfo."""
        ...

    def sign(self, message: bytes, hash_name: Hash) -> bytes:
        """``message`` hashed once with ``hash_name`` and signed: PKCS#1 v1.5, or ECDSA in DER."""
        ...


def hash_algorithm(hash_name: Hash) -> Any:
    """cryptography's hash object for ``hash_name``."""
    from cryptography.hazmat.primitives import hashes

    made: dict[Hash, Callable[[], Any]] = {Hash.SHA256: hashes.SHA256, Hash.SHA384: hashes.SHA384,
                                           Hash.SHA512: hashes.SHA512, Hash.SHA3_384: hashes.SHA3_384}
    return made[hash_name]()


def key_type_of(public: Any) -> str:
    """rsa2048 (or rsaN of another size), p256 or p384; HardwareKeyError for any key snapd cannot verify."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048:
        return f"rsa{public.key_size}"
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name in ("secp256r1", "secp384r1"):
        return {"secp256r1": "p256", "secp384r1": "p384"}[public.curve.name]
    if isinstance(public, rsa.RSAPublicKey):
        what = f"a {public.key_size}-bit RSA key"
    elif isinstance(public, ec.EllipticCurvePublicKey):
        what = f"an ECDSA key on {public.curve.name}"
    else:
        what = f"an {type(public).__name__.lstrip('_').removesuffix('PublicKey')} key"
    raise HardwareKeyError(f"cannot use {what} as the hardware identity key: snapd verifies only RSA (2048 bits or "
                           "more, PKCS#1 v1.5) and ECDSA P-256 or P-384 signatures")


@dataclass(frozen=True)
class FileKey:
    """A key in a PKCS#8 PEM file, root's (or ours) and 0600."""

    path: Path
    private: Any  # cryptography private key

    @property
    def uri(self) -> str:
        return f"file:{self.path}"

    @property
    def key_type(self) -> str:
        return key_type_of(self.private.public_key())

    def public_der(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return bytes(self.private.public_key().public_bytes(serialization.Encoding.DER,
                                                            serialization.PublicFormat.SubjectPublicKeyInfo))

    def sign(self, message: bytes, hash_name: Hash) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec, padding

        if self.key_type.startswith("rsa"):
            return bytes(self.private.sign(message, padding.PKCS1v15(), hash_algorithm(hash_name)))
        return bytes(self.private.sign(message, ec.ECDSA(hash_algorithm(hash_name))))  # DER, as snapd wants it


def file_path(uri: str) -> Path | None:
    """The path of a ``file:PATH`` (or ``file:///PATH``) URI, None for another scheme; ConfigError if not absolute."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme != "file":
        return None
    if rest.startswith("//"):
        authority, _, rest = rest[2:].partition("/")
        if authority not in ("", "localhost"):
            raise ConfigError(f"cannot use hardware key {uri!r}: a file: URI names a local file, not a host")
        rest = "/" + rest
    path = unquote(rest)
    if not path.startswith("/") or "\0" in path:
        raise ConfigError(f"cannot use hardware key {uri!r}: expected file:/ABSOLUTE/PATH")
    return Path(path)


def open_key(uri: str, module: str = "") -> HardwareKey:
    """The key at ``uri`` (``module``: the PKCS#11 module for a pkcs11: URI without module-path); HardwareKeyError
    when it is not there or cannot be used, with what to run in the message."""
    if uri.startswith("pkcs11:"):
        from . import pkcs11

        parsed = pkcs11.parse_uri(uri)
        return pkcs11.Pkcs11Key(parsed, _module(parsed, module))
    path = _path(uri)
    try:
        pem = store.read_owned(path, MAX_KEY_BYTES, private=True)
    except StoreError as exc:
        raise HardwareKeyError(f"cannot use the hardware identity key: {exc}") from None
    if pem is None:
        raise HardwareKeyError(f"no hardware identity key at {path}: make it once, at the factory, with: "
                               "factory-agent hardware-identity init")
    return FileKey(path, _load_private(pem, path))


def create_key(uri: str, key_type: str = DEFAULT_KEY_TYPE, module: str = "") -> tuple[HardwareKey, bool]:
    """The key at ``uri``, made (``key_type``) only if there is none: (key, made). An existing key is never
    replaced, whatever its type; in a token it is made there, and never leaves it."""
    if key_type not in KEY_TYPES:
        raise ConfigError(f"cannot make a {key_type!r} hardware identity key: choose one of {', '.join(KEY_TYPES)}")
    if uri.startswith("pkcs11:"):
        from . import pkcs11

        parsed = pkcs11.parse_uri(uri)
        return pkcs11.create(parsed, _module(parsed, module), key_type)
    path = _path(uri)
    try:
        return open_key(uri), False
    except HardwareKeyError:
        if path.exists() or path.is_symlink():
            raise  # there is one, but it cannot be used: never replace it
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        store.write_durable(path, _generate_pem(key_type), mode=0o600, replace=False)
    except FileExistsError:
        pass  # another `init` was quicker: keep its key
    except OSError as exc:
        raise HardwareKeyError(f"cannot store the hardware identity key in {path}: {exc.strerror or exc}") from None
    return open_key(uri), True


def _path(uri: str) -> Path:
    path = file_path(uri)
    if path is None:
        raise ConfigError(f"cannot use hardware key {uri!r}: expected file:/PATH or pkcs11:... (RFC 7512)")
    return path


def _module(uri: Any, configured: str) -> str:
    module = uri.query.get("module-path") or configured
    if not module:
        raise ConfigError(f"cannot use hardware key {uri.text!r}: no PKCS#11 module: set [onboarding] "
                          "pkcs11-module (or module-path= in the URI)")
    return str(module)


def _generate_pem(key_type: str) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private: Any
    if key_type == "rsa2048":
        private = rsa.generate_private_key(65537, 2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1() if key_type == "p256" else ec.SECP384R1())
    return bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _load_private(pem: bytes, path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise HardwareKeyError(f"cannot use the hardware identity key in {path}: not an unencrypted PEM "
                               f"private key ({exc})") from None
    key_type_of(private.public_key())
    return private


def registration_body(key: HardwareKey, request_id: str, hash_name: Hash,
                      encoding: SignatureEncoding = SignatureEncoding.BASE64, legacy_field: bool = True) -> bytes:
    """The serial-request body for ``request_id``: signed over its exact UTF-8 bytes by ``key``, as snapd 2.77.1
    sends what a prepare-serial-request hook set."""
    check_request_id(request_id)
    signature = key.sign(request_id.encode("utf-8"), hash_name)
    digest = onboarding.spki_digest(key.public_der())
    text = onboarding.encode_signature(signature, encoding)
    return onboarding.registration_body(digest, text, hash_name, legacy_field)


def check_request_id(request_id: str) -> None:
    """ConfigError unless ``request_id`` looks like a vault's request-id as it was issued: a signature over
    anything else (snapctl's trailing newline included) is refused by the service."""
    if not request_id or request_id != request_id.strip() or not request_id.isprintable() or len(request_id) > 1024:
        raise ConfigError(f"cannot sign request-id {request_id[:80]!r}: it must be the vault's request-id exactly, "
                          "without surrounding white space (snapctl get prints a trailing newline: strip it)")
