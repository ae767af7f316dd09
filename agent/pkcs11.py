"""The hardware identity key in a PKCS#11 token (an HSM, a secure element, SoftHSM2, a TPM through
tpm2-pkcs11), named by an RFC 7512 URI, through PyKCS11 (python3-pykcs11).

    pkcs11:token=factory;object=hardware-identity?pin-source=file:/etc/factory-agent/token-pin

The private key is made in the token, sensitive and not extractable, and never leaves it: the agent
hashes the request-id itself and asks the token for a raw signature (CKM_RSA_PKCS over the
DigestInfo, or CKM_ECDSA over the digest, whose raw ``r || s`` becomes DER), so every hash works
on every token. The PIN comes from a root-owned 0600 file (``pin-source``), never from the URI,
which sits in a world-readable configuration file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from . import onboarding, store
from .errors import ConfigError, HardwareKeyError, StoreError, UntrustedFileError, conceal
from .onboarding import Hash

PATH_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "object", "id", "type", "slot-id")
QUERY_ATTRIBUTES = ("pin-source", "module-path")
MAX_PIN_BYTES = 256
MAX_MODULE_BYTES = 256 * 1024 * 1024
# The curves' DER OIDs (CKA_EC_PARAMS) and point sizes.
_CURVES = {"p256": (bytes.fromhex("06082a8648ce3d030107"), 32), "p384": (bytes.fromhex("06052b81040022"), 48)}


@dataclass(frozen=True, slots=True)
class Pkcs11Uri:
    """An RFC 7512 URI's attributes (percent-decoded): the token, the object, the PIN's file and the module."""

    text: str
    path: dict[str, bytes]
    query: dict[str, str]

    @property
    def label(self) -> str:
        return self.path.get("object", b"").decode("utf-8", "replace")


def parse_uri(text: str) -> Pkcs11Uri:
    """``pkcs11:ATTR=VALUE;...?QUERY=VALUE&...``; ConfigError names an attribute it does not know (RFC 7512: a
    URI with an attribute the consumer does not understand must not match anything)."""
    if not text.startswith("pkcs11:"):
        raise ConfigError(f"cannot use hardware key {text!r}: not a pkcs11: URI")
    path_part, _, query_part = text[len("pkcs11:"):].partition("?")
    path = _attributes(text, path_part, ";", PATH_ATTRIBUTES)
    query = {k: v.decode("utf-8", "replace") for k, v in _attributes(text, query_part, "&", QUERY_ATTRIBUTES).items()}
    if "object" not in path and "id" not in path:
        raise ConfigError(f"cannot use hardware key {text!r}: name the key with object=LABEL (or id=)")
    if path.get("type", b"private") != b"private":
        raise ConfigError(f"cannot use hardware key {text!r}: type= must be private (the agent signs with it)")
    return Pkcs11Uri(text, path, query)


def _attributes(uri: str, part: str, separator: str, known: tuple[str, ...]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for item in filter(None, part.split(separator)):
        name, sep, value = item.partition("=")
        if name == "pin-value":
            raise ConfigError(f"cannot use hardware key {_shown(uri)!r}: a PIN in the URI would sit in a readable "
                              "configuration file: put it in a root-owned 0600 file and name it with "
                              "pin-source=file:/PATH")
        if not sep or name not in known:
            raise ConfigError(f"cannot use hardware key {_shown(uri)!r}: unknown attribute {name!r} (known: "
                              f"{', '.join(known)})")
        found[name] = unquote(value).encode("utf-8") if name != "id" else _percent_bytes(value)
    return found


def _shown(uri: str) -> str:
    head, _, query = uri.partition("?")
    kept = [q if not q.startswith("pin-value=") else "pin-value=***" for q in query.split("&") if q]
    return head + ("?" + "&".join(kept) if kept else "")


def _percent_bytes(value: str) -> bytes:
    """An id's percent-encoded bytes (``%01%ab``), or its plain text."""
    out, i = bytearray(), 0
    while i < len(value):
        if value[i] == "%" and len(value) >= i + 3:
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out += value[i].encode("utf-8")
            i += 1
    return bytes(out)


# --- the token ---------------------------------------------------------------


def _api() -> Any:
    """PyKCS11, imported only when a pkcs11: key is used."""
    try:
        import PyKCS11  # type: ignore[import-untyped]
    except ImportError:
        raise HardwareKeyError("cannot use a pkcs11: hardware key: the PyKCS11 library is not installed "
                               "(Debian: apt install python3-pykcs11)") from None
    return PyKCS11


@functools.cache
def _library(module: str) -> Any:
    """The loaded module (C_Initialize once per process), after checking that only root can change it."""
    p11 = _api()
    real = Path(os.path.realpath(module))
    try:
        if not store.check_owned(real, MAX_MODULE_BYTES):
            raise HardwareKeyError(f"cannot load PKCS#11 module {module}: no such file")
    except UntrustedFileError as exc:  # a library others can change would run their code as root
        raise HardwareKeyError(f"cannot load PKCS#11 module {module}: {exc}") from None
    # tpm2-pkcs11 and the TSS under it write their own lines to stderr, which is the journal: the agent says
    # what failed itself, in one line. Who wants them sets these variables.
    os.environ.setdefault("TPM2_PKCS11_LOG_LEVEL", "0")
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    library = p11.PyKCS11Lib()
    try:
        library.load(str(real))
    except p11.PyKCS11Error as exc:
        raise HardwareKeyError(f"cannot load PKCS#11 module {module}: {exc} (can it reach its token or TPM?)") from None
    return library


_LOCK = threading.Lock()  # one PKCS#11 session at a time in this process


def token_name(uri: Pkcs11Uri) -> str:
    return repr(uri.path.get("token", b"").decode("utf-8", "replace") or "(any)")


@contextmanager
def session_for(uri: Pkcs11Uri, module: str) -> Iterator[Any]:
    """A read-write session with the URI's token, logged in with the pin-source PIN when there is one."""
    p11 = _api()

    library = _library(module)
    with _LOCK:
        slot = _slot(library, uri)
        try:
            session = library.openSession(slot, p11.CKF_SERIAL_SESSION | p11.CKF_RW_SESSION)
        except p11.PyKCS11Error as exc:
            raise HardwareKeyError(f"cannot open a session with token {token_name(uri)}: {exc}") from None
        try:
            _login(session, uri)
            yield session
        finally:
            with contextlib.suppress(p11.PyKCS11Error):
                session.closeSession()  # also logs out when it was the last session


def _login(session: Any, uri: Pkcs11Uri) -> None:
    p11 = _api()

    pin = read_pin(uri)
    if pin is None:
        return
    try:
        session.login(pin)
    except p11.PyKCS11Error as exc:
        if exc.value != p11.CKR_USER_ALREADY_LOGGED_IN:
            raise HardwareKeyError(_login_failure(token_name(uri), exc)) from None


def find(session: Any, uri: Pkcs11Uri, kind: str) -> Any:
    """The one object of class ``kind`` (CKO_PRIVATE_KEY, CKO_PUBLIC_KEY) the URI names, or None."""
    p11 = _api()

    template = [(p11.CKA_CLASS, getattr(p11, kind))]
    if "object" in uri.path:
        template.append((p11.CKA_LABEL, uri.label))
    if "id" in uri.path:
        template.append((p11.CKA_ID, tuple(uri.path["id"])))
    found = session.findObjects(template)
    if len(found) > 1:
        raise HardwareKeyError(f"{len(found)} keys in token {token_name(uri)} match {uri.text!r}: "
                               "name one with object= and id=")
    return found[0] if found else None


class Pkcs11Key:
    """A key pair in a token, found by the URI's token and object attributes; one session per operation."""

    def __init__(self, uri: Pkcs11Uri, module: str) -> None:
        self._uri, self._module = uri, module
        with session_for(uri, module) as session:
            if find(session, uri, "CKO_PRIVATE_KEY") is None:
                raise NoKeyError(f"no private key {uri.label!r} in token {token_name(uri)}: make it once, at the "
                                 "factory, with: factory-agent hardware-identity init")
            self._public, self._type = _public_key(session, find(session, uri, "CKO_PUBLIC_KEY"), uri.label)

    @property
    def uri(self) -> str:
        return self._uri.text

    @property
    def key_type(self) -> str:
        return self._type

    def public_der(self) -> bytes:
        return self._public

    def sign(self, message: bytes, hash_name: Hash) -> bytes:
        p11 = _api()

        with session_for(self._uri, self._module) as session:
            private = find(session, self._uri, "CKO_PRIVATE_KEY")
            if private is None:
                raise HardwareKeyError(f"the private key {self._uri.label!r} is gone from token "
                                       f"{token_name(self._uri)}")
            try:
                if self._type.startswith("rsa"):
                    data = onboarding.digest_info(message, hash_name)
                    return bytes(session.sign(private, data, p11.Mechanism(p11.CKM_RSA_PKCS)))
                raw = bytes(session.sign(private, onboarding.digest(message, hash_name),
                                         p11.Mechanism(p11.CKM_ECDSA)))
            except p11.PyKCS11Error as exc:
                raise HardwareKeyError(f"the token {token_name(self._uri)} did not sign: {exc}") from None
        return onboarding.der_ecdsa(raw)  # snapd refuses the raw r || s a token returns


class NoKeyError(HardwareKeyError):
    """The token is there and answers, but holds no such key (yet)."""


def _slot(library: Any, uri: Pkcs11Uri) -> int:
    """The one slot whose token matches the URI's token attributes."""
    p11 = _api()

    wanted = {name: uri.path[name] for name in ("token", "manufacturer", "serial", "model") if name in uri.path}
    seen, matching = [], []
    try:
        slots = library.getSlotList(tokenPresent=True)
        for slot in slots:
            info = library.getTokenInfo(slot)
            have = {"token": info.label, "manufacturer": info.manufacturerID, "serial": info.serialNumber,
                    "model": info.model}
            seen.append(str(have["token"]).strip())
            if "slot-id" in uri.path and uri.path["slot-id"] != str(slot).encode():
                continue
            if all(str(have[k]).strip().encode("utf-8") == v for k, v in wanted.items()):
                matching.append(slot)
    except p11.PyKCS11Error as exc:
        raise HardwareKeyError(f"cannot list the PKCS#11 tokens: {exc}") from None
    if not matching:
        name = uri.path.get("token", b"").decode("utf-8", "replace")
        raise HardwareKeyError(f"no PKCS#11 token {name!r} present (tokens: {', '.join(map(repr, seen)) or 'none'}): "
                               "check that the token is connected and initialised, and the URI's token=")
    if len(matching) > 1:
        raise HardwareKeyError(f"{len(matching)} PKCS#11 tokens match {uri.text!r}: name one with token= or serial=")
    return int(matching[0])


def read_pin(uri: Pkcs11Uri) -> str | None:
    """The user PIN from the file ``pin-source`` names (root's or ours, 0600), None without one."""
    source = uri.query.get("pin-source")
    if source is None:
        return None
    if not source.startswith("file:"):
        raise ConfigError(f"cannot use pin-source {source!r}: expected file:/PATH")
    path = Path(source[len("file:"):].removeprefix("//"))
    try:
        data = store.read_owned(path, MAX_PIN_BYTES, private=True)
    except StoreError as exc:
        raise HardwareKeyError(f"cannot read the token's PIN: {exc}") from None
    if data is None:
        raise HardwareKeyError(f"cannot read the token's PIN: no file {path} (pin-source)")
    pin = data.decode("utf-8", "replace").strip("\r\n")
    if len(pin) >= 4:  # a shorter one would turn every such number in a message into ***
        conceal([pin])
    return pin


def _login_failure(token: str, exc: Any) -> str:
    p11 = _api()

    what = {p11.CKR_PIN_INCORRECT: "refused the PIN in pin-source (a token locks after a few wrong PINs)",
            p11.CKR_PIN_LOCKED: "is locked after too many wrong PINs: its security officer must set a new "
                                    "user PIN (pkcs11-tool --init-pin, softhsm2-util or the HSM's tool)",
            p11.CKR_PIN_EXPIRED: "says the PIN has expired: set a new one with the token's tool"}
    return f"the token {token} {what.get(exc.value, f'refused the login: {exc}')}"


def _public_key(session: Any, public: Any, label: str) -> tuple[bytes, str]:
    """The DER SubjectPublicKeyInfo of a public key object (EC point and curve, or RSA modulus and exponent)
    and its type (rsaN, p256, p384); HardwareKeyError for a key snapd could not verify."""
    p11 = _api()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if public is None:
        raise HardwareKeyError(f"the token holds no public key {label!r} beside its private key: make the pair "
                               "with factory-agent hardware-identity init")
    key_type = session.getAttributeValue(public, [p11.CKA_KEY_TYPE])[0]
    key: Any
    if key_type == p11.CKK_RSA:
        modulus, exponent = session.getAttributeValue(public, [p11.CKA_MODULUS, p11.CKA_PUBLIC_EXPONENT])
        key = rsa.RSAPublicNumbers(int.from_bytes(bytes(exponent), "big"),
                                   int.from_bytes(bytes(modulus), "big")).public_key()
        if key.key_size < 2048:
            raise HardwareKeyError(f"cannot use key {label!r}, a {key.key_size}-bit RSA key: snapd verifies RSA "
                                   "of 2048 bits or more")
        name = f"rsa{key.key_size}"
    elif key_type == p11.CKK_EC:
        params, point = (bytes(v) for v in session.getAttributeValue(public, [p11.CKA_EC_PARAMS,
                                                                             p11.CKA_EC_POINT]))
        found = next((n for n, (oid, _) in _CURVES.items() if oid == params), None)
        if found is None:
            raise HardwareKeyError(f"cannot use key {label!r}: its curve is not P-256 or P-384, which snapd verifies")
        name = found
        curve = ec.SECP256R1() if name == "p256" else ec.SECP384R1()
        key = ec.EllipticCurvePublicKey.from_encoded_point(curve, _ec_point(point, _CURVES[name][1]))
    else:
        raise HardwareKeyError(f"cannot use key {label!r}: snapd verifies only RSA and ECDSA P-256 or P-384 keys")
    return bytes(key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)), name


def _ec_point(value: bytes, size: int) -> bytes:
    """CKA_EC_POINT as the spec says (a DER OCTET STRING around the point) or as some tokens give it (bare)."""
    length = 1 + 2 * size
    if len(value) == length + 2 and value[:2] == bytes([0x04, length]):
        return value[2:]
    return value


def create(uri: Pkcs11Uri, module: str, key_type: str) -> tuple[Pkcs11Key, bool]:
    """The key at ``uri``, generated in the token (sensitive, not extractable) only if it is not there."""
    p11 = _api()

    try:
        return Pkcs11Key(uri, module), False
    except NoKeyError:
        pass
    label = [(p11.CKA_LABEL, uri.label)] if "object" in uri.path else []
    ident = [(p11.CKA_ID, tuple(uri.path["id"]))] if "id" in uri.path else []
    public = [(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY), (p11.CKA_TOKEN, True), (p11.CKA_PRIVATE, False),
              (p11.CKA_VERIFY, True), *label, *ident]
    private = [(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY), (p11.CKA_TOKEN, True), (p11.CKA_PRIVATE, True),
               (p11.CKA_SENSITIVE, True), (p11.CKA_EXTRACTABLE, False), (p11.CKA_SIGN, True),
               *label, *ident]
    if key_type == "rsa2048":
        public += [(p11.CKA_MODULUS_BITS, 2048), (p11.CKA_PUBLIC_EXPONENT, (1, 0, 1))]
        mechanism = p11.MechanismRSAGENERATEKEYPAIR
    else:
        public += [(p11.CKA_EC_PARAMS, tuple(_CURVES[key_type][0]))]
        mechanism = p11.MechanismECGENERATEKEYPAIR
    with session_for(uri, module) as session:
        if find(session, uri, "CKO_PRIVATE_KEY") is None:  # still none, now that we hold the session lock
            try:
                session.generateKeyPair(public, private, mecha=mechanism)
            except p11.PyKCS11Error as exc:
                raise HardwareKeyError(f"the token {token_name(uri)} could not make a {key_type} key: {exc}") from None
    return Pkcs11Key(uri, module), True
