"""snapd's assertion text format: decode, encode, sign, verify, and streams of them.

No I/O. No clock. Bytes and values in, bytes and values out; the signer is a
function. Byte compatibility with snapd 2.57's ``asserts`` package is the
contract, proven by the golden vectors in tests/data.

Layout of one assertion: headers, optionally "\\n\\n" + body, then "\\n\\n" and
the signature block; snapd adds one "\\n" after the signature. The signature
covers the content (headers and body) exactly. Decoding keeps the original
bytes, so re-encoding a decoded assertion is byte-identical, and keeps every
header, known or not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from . import onboarding, openpgp
from .errors import AssertionFormatError, BadSignatureError, LocalFormatError

HeaderValue: TypeAlias = str | list["HeaderValue"] | dict[str, "HeaderValue"]
Headers = Mapping[str, HeaderValue]

MAX_HEADERS_SIZE = 128 * 1024
MAX_BODY_SIZE = 2 * 1024 * 1024
MAX_SIGNATURE_SIZE = 128 * 1024
MAX_STREAM_ASSERTIONS = 64

NLNL = b"\n\n"
_NAME = re.compile(r"[a-z](?:-?[a-z0-9])*")
_INT = re.compile(r"0|[1-9][0-9]{0,17}")
_MODEL = re.compile(r"[a-z0-9](?:-?[a-z0-9])*")
_ACCOUNT_ID = re.compile(r"[a-z0-9A-Z]{32}|[-a-z0-9]{2,28}")
_HARDWARE_NAME = re.compile(r"[a-zA-Z0-9](?:-?[a-zA-Z0-9])*")  # snapd's model-name syntax, upper case allowed
_BRAND = re.compile(r"[a-z0-9A-Z]{32}|[-a-z0-9]{2,28}")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")

# snapd 2.57's assertion types: name -> primary key headers, in order.
PRIMARY_KEYS: dict[str, tuple[str, ...]] = {
    "account": ("account-id",),
    "account-key": ("public-key-sha3-384",),
    "base-declaration": ("series",),
    "hardware-identity": ("issuer-id", "hardware-id-key-sha3-384"),
    "model": ("series", "brand-id", "model"),
    "preseed": ("series", "brand-id", "model", "system-label"),
    "repair": ("brand-id", "repair-id"),
    "serial": ("brand-id", "model", "serial"),
    "snap-build": ("snap-sha3-384",),
    "snap-declaration": ("series", "snap-id"),
    "snap-developer": ("snap-id", "publisher-id"),
    "snap-revision": ("snap-sha3-384", "provenance"),
    "store": ("store",),
    "system-user": ("brand-id", "email"),
    "validation": ("series", "snap-id", "approved-snap-id", "approved-snap-revision"),
    "validation-set": ("series", "account-id", "name", "sequence"),
    # self-signed, sent on the wire, no authority
    "account-key-request": ("public-key-sha3-384",),
    "device-session-request": ("brand-id", "model", "serial"),
    "serial-request": (),
}
NO_AUTHORITY = frozenset({"account-key-request", "device-session-request", "serial-request"})
# Optional primary keys: absent means this value, and the signer omits it.
_PRIMARY_KEY_DEFAULTS = {("snap-revision", "provenance"): "global-upload"}
_META = ("type", "format", "authority-id", "signatory-id", "revision", "body-length", "sign-key-sha3-384")


def _fail(msg: str) -> AssertionFormatError:
    return AssertionFormatError(msg)


def is_model_name(name: str) -> bool:
    """snapd's model-name rule (lowercase letters, digits, single inner hyphens)."""
    return bool(_MODEL.fullmatch(name))


@dataclass(frozen=True, slots=True)
class Assertion:
    """One decoded (or freshly signed) assertion; ``content`` is exactly what was signed."""

    headers: dict[str, HeaderValue]
    body: bytes
    content: bytes
    signature: bytes

    @property
    def type(self) -> str:
        return self.header("type")

    @property
    def sign_key_id(self) -> str:
        return self.header("sign-key-sha3-384")

    @property
    def revision(self) -> int:
        return _int_header(self.headers, "revision")

    def header(self, name: str, default: str | None = None) -> str:
        """A string header; ``default`` (or an error when None) if it is absent."""
        value = self.headers.get(name, default)
        if not isinstance(value, str):
            raise _fail(f"{name!r} header is {'missing' if value is None else 'not a string'}")
        return value

    def encode(self) -> bytes:
        return self.content + NLNL + self.signature

    def signature_packet(self) -> openpgp.Signature:
        return openpgp.parse_signature(self.signature)


# --- header grammar --------------------------------------------------------


def parse_headers(block: bytes) -> dict[str, HeaderValue]:
    """The header block (no trailing "\\n\\n") as a dict in wire order."""
    text = _utf8(block, "header")
    lines = text.split("\n")
    headers: dict[str, HeaderValue] = {}
    i = 0
    while i < len(lines):
        name, sep, _ = lines[i].partition(":")
        if not sep:
            raise _fail(f"header entry missing ':' separator: {lines[i]!r}")
        if not _NAME.fullmatch(name):
            raise _fail(f"invalid header name: {name!r}")
        value, i = _parse_entry(lines, i, len(name) + 1, 0)
        if name in headers:
            raise _fail(f"repeated header: {name!r}")
        headers[name] = value
    return headers


def _parse_entry(lines: list[str], first: int, consumed: int, indent: int) -> tuple[HeaderValue, int]:
    entry = lines[first]
    if consumed < len(entry):
        if entry[consumed] != " ":
            raise _fail(f"header entry should have a space or newline (for multiline) before value: {entry!r}")
        return entry[consumed + 1 :], first + 1
    base = " " * (indent + 2)
    if first + 1 < len(lines) and lines[first + 1].startswith(base):
        rest = lines[first + 1][len(base) :]
        if rest.startswith("-"):
            return _parse_list(lines, first + 1, indent)
        if rest and rest[0] != " ":
            return _parse_map(lines, first + 1, indent)
    return _parse_text(lines, first + 1, indent)


def _parse_text(lines: list[str], first: int, indent: int) -> tuple[str, int]:
    prefix = " " * (indent + 4)
    end = first
    while end < len(lines) and lines[end].startswith(prefix):
        end += 1
    if end == first:
        found = repr(lines[first]) if first < len(lines) else "EOF"
        raise _fail(f"expected {len(prefix)} chars nesting prefix after multiline introduction {lines[first - 1]!r}: {found}")
    return "\n".join(line[len(prefix) :] for line in lines[first:end]), end


def _parse_list(lines: list[str], first: int, indent: int) -> tuple[list[HeaderValue], int]:
    prefix = " " * indent + "  -"
    items: list[HeaderValue] = []
    j = first
    while j < len(lines) and lines[j].startswith(prefix):
        value, j = _parse_entry(lines, j, len(prefix), indent + 2)
        items.append(value)
    return items, j


def _parse_map(lines: list[str], first: int, indent: int) -> tuple[dict[str, HeaderValue], int]:
    prefix = " " * (indent + 2)
    entries: dict[str, HeaderValue] = {}
    j = first
    while j < len(lines) and lines[j].startswith(prefix):
        key, sep, _ = lines[j][len(prefix) :].partition(":")
        if not sep:
            raise _fail(f"map entry missing ':' separator: {lines[j][len(prefix):]!r}")
        if not _NAME.fullmatch(key):
            raise _fail(f"invalid map entry key: {key!r}")
        value, j = _parse_entry(lines, j, len(prefix) + len(key) + 1, len(prefix))
        if key in entries:
            raise _fail(f"repeated map entry: {key!r}")
        entries[key] = value
    return entries, j


def format_header(name: str, value: HeaderValue) -> list[str]:
    """The lines of one header as snapd writes it; [] for an empty list or map (omitted)."""
    if not _NAME.fullmatch(name):
        raise LocalFormatError(f"invalid header name: {name!r}")
    out: list[str] = []
    _append_entry(out, name + ":", value, 0)
    return out


def _append_entry(out: list[str], intro: str, value: HeaderValue, indent: int) -> None:
    if isinstance(value, str):
        if "\n" not in value:
            out.append(f"{intro} {value}")
            return
        prefix = " " * (indent + 4)
        out.append(intro)
        out.extend(prefix + line for line in value.split("\n"))
    elif isinstance(value, list):
        if value:
            out.append(intro)
            for item in value:
                _append_entry(out, " " * indent + "  -", item, indent + 2)
    elif isinstance(value, dict):
        if value:
            out.append(intro)
            prefix = " " * (indent + 2)
            for key in sorted(value):
                if not _NAME.fullmatch(key):
                    raise LocalFormatError(f"invalid map entry key: {key!r}")
                _append_entry(out, f"{prefix}{key}:", value[key], len(prefix))
    else:
        raise LocalFormatError(f"header values must be strings, lists or maps, not {type(value).__name__}")


# --- checks shared by decoding and signing ---------------------------------


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(f"{what} is not utf8") from None


def _int_header(headers: Headers, name: str) -> int:
    value = headers.get(name, "0")
    if not isinstance(value, str) or not _INT.fullmatch(value):
        raise _fail(f"{name!r} header is not a valid integer: {value!r}")
    return int(value)


def _string(headers: Headers, name: str) -> str:
    value = headers.get(name)
    if not isinstance(value, str) or not value:
        raise _fail(f"{name!r} header is mandatory and must be a non-empty string")
    return value


def _check_key_id(headers: Headers, name: str) -> str:
    value = _string(headers, name)
    if len(value) != 64 or not re.fullmatch(r"[A-Za-z0-9_-]{64}", value):
        raise _fail(f"{name!r} header is not a sha3-384 key id")
    return value


def check_timestamp(headers: Headers, name: str) -> datetime:
    value = _string(headers, name)
    if not _RFC3339.fullmatch(value):
        raise _fail(f"{name!r} header is not an RFC 3339 time: {value!r}")
    try:
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        raise _fail(f"{name!r} header is not a valid time: {value!r}") from None


def _check_assertion(headers: Headers, body: bytes) -> None:
    """What snapd's assemble() checks, for every type, plus the types we consume."""
    if _int_header(headers, "body-length") != len(body):
        raise _fail(f"assertion body length and declared body-length don't match: {len(body)} != {headers.get('body-length')}")
    _utf8(body, "assertion body")
    _check_key_id(headers, "sign-key-sha3-384")
    kind = _string(headers, "type")
    if kind not in PRIMARY_KEYS:
        raise _fail(f"unknown assertion type: {kind!r}")
    if kind in NO_AUTHORITY:
        if "authority-id" in headers or "signatory-id" in headers:
            raise _fail(f"{kind!r} assertion cannot have authority-id set")
    else:
        _string(headers, "authority-id")
    _int_header(headers, "format")
    _int_header(headers, "revision")
    for key in PRIMARY_KEYS[kind]:
        if (key in headers or (kind, key) not in _PRIMARY_KEY_DEFAULTS) and "/" in _string(headers, key):
            raise _fail(f"{key!r} primary key header cannot contain '/'")
    _TYPE_CHECKS.get(kind, _no_check)(headers, body)


def _no_check(headers: Headers, body: bytes) -> None:
    pass


def _check_device_key(headers: Headers, id_header: str) -> None:
    key = openpgp.decode_public_key(_string(headers, "device-key"))
    if key.key_id != _check_key_id(headers, id_header):
        raise _fail(f"device key does not match {id_header}")


def _check_serial_request(headers: Headers, body: bytes) -> None:
    _string(headers, "brand-id")
    _string(headers, "request-id")
    if not _MODEL.fullmatch(_string(headers, "model")):
        raise _fail(f"invalid model name: {headers['model']!r}")
    _check_device_key(headers, "sign-key-sha3-384")


def _check_serial(headers: Headers, body: bytes) -> None:
    if not _BRAND.fullmatch(_string(headers, "brand-id")):
        raise _fail(f"invalid brand-id: {headers['brand-id']!r}")
    if not _MODEL.fullmatch(_string(headers, "model")):
        raise _fail(f"invalid model name: {headers['model']!r}")
    _check_device_key(headers, "device-key-sha3-384")
    check_timestamp(headers, "timestamp")


def _check_account_key(headers: Headers, body: bytes) -> None:
    _string(headers, "account-id")
    check_timestamp(headers, "since")
    if "until" in headers:
        check_timestamp(headers, "until")
    key = openpgp.decode_public_key(body)
    if key.key_id != _check_key_id(headers, "public-key-sha3-384"):
        raise _fail("public key does not match included public-key-sha3-384")


def _check_hardware_identity(headers: Headers, body: bytes) -> None:
    """snapd's assembleHardwareIdentity (2.73+), but for parsing the key's DER: the issuer signs for itself,
    and the digest is over the key's header text (shared/reference/secure-onboarding.md §3)."""
    issuer = _string(headers, "issuer-id")
    if not _ACCOUNT_ID.fullmatch(issuer):
        raise _fail(f"invalid issuer-id: {issuer!r}")
    if issuer != headers.get("authority-id"):
        raise _fail("issuer id must match authority id")
    _string(headers, "manufacturer")
    _string(headers, "hardware-id")
    if not _HARDWARE_NAME.fullmatch(_string(headers, "hardware-name")):
        raise _fail(f"invalid hardware-name: {headers['hardware-name']!r}")
    key = _string(headers, "hardware-id-key")
    if onboarding.key_digest(key) != _string(headers, "hardware-id-key-sha3-384"):
        raise _fail("hardware id key does not match provided hash")


_TYPE_CHECKS = {"serial-request": _check_serial_request, "serial": _check_serial, "account-key": _check_account_key,
                "hardware-identity": _check_hardware_identity}


def _assemble(head: bytes, body: bytes, content: bytes, signature: bytes) -> Assertion:
    headers = parse_headers(head)
    if not signature.strip(b"\n\r"):
        raise _fail("empty assertion signature")
    _check_assertion(headers, body)
    return Assertion(headers, body, content, signature)


# --- decoding --------------------------------------------------------------


def decode(data: bytes) -> Assertion:
    """One encoded assertion (as snapd's Decode: the signature follows the last "\\n\\n")."""
    if len(data) > MAX_HEADERS_SIZE + MAX_BODY_SIZE + MAX_SIGNATURE_SIZE + 8:
        raise _fail("assertion exceeds the maximum size")
    split = data.rfind(NLNL)
    if split == -1:
        raise _fail("assertion content/signature separator not found")
    content, signature = data[:split], data[split + 2 :]
    head, sep, body = content.partition(NLNL)
    if len(head) > MAX_HEADERS_SIZE or len(signature) > MAX_SIGNATURE_SIZE:
        raise _fail("assertion headers or signature exceed the maximum size")
    return _assemble(head, body if sep else b"", content, signature)


def decode_stream(data: bytes) -> list[Assertion]:
    """Every assertion of a stream, as snapd's Decoder reads one."""
    result: list[Assertion] = []
    pos = 0
    while pos < len(data):
        if len(result) == MAX_STREAM_ASSERTIONS:
            raise _fail(f"more than {MAX_STREAM_ASSERTIONS} assertions in one stream")
        assertion, pos = _decode_next(data, pos)
        result.append(assertion)
    return result


def _read_until_nlnl(data: bytes, pos: int, limit: int, what: str) -> tuple[bytes, int]:
    """Bytes from pos through the next "\\n\\n" (or to the end); bounded like snapd's readUntil."""
    end = data.find(NLNL, pos, pos + limit)
    if end == -1:
        if len(data) - pos > limit:
            raise _fail(f"maximum size exceeded while reading assertion {what}")
        return data[pos:], len(data)
    return data[pos : end + 2], end + 2


def _decode_next(data: bytes, pos: int) -> tuple[Assertion, int]:
    head_sep, pos = _read_until_nlnl(data, pos, MAX_HEADERS_SIZE, "headers")
    if not head_sep.endswith(NLNL):
        raise _fail("unexpected EOF in assertion headers")
    head = head_sep[:-2]
    length = _int_header(parse_headers(head), "body-length")
    if length > MAX_BODY_SIZE:
        raise _fail(f"assertion body length {length} exceeds maximum body size")
    body = data[pos : pos + length]
    if len(body) != length:
        raise _fail("unexpected EOF in assertion body")
    pos += length
    trailer, pos = _read_until_nlnl(data, pos, MAX_SIGNATURE_SIZE, "trailer")
    if trailer == NLNL:
        signature, pos = _read_until_nlnl(data, pos, MAX_SIGNATURE_SIZE, "signature")
        content = head_sep + body
    elif length > 0:
        raise _fail("missing content/signature separator")
    else:
        signature, content = trailer, head
    if signature.endswith(NLNL):
        signature = signature[:-1]
    return _assemble(head, body, content, signature), pos


def encode_stream(assertions: Iterable[Assertion]) -> bytes:
    """Assertions separated by one empty line, ending in one "\\n" (snapd's Encoder)."""
    parts = []
    for assertion in assertions:
        encoded = assertion.encode()
        parts.append(encoded if encoded.endswith(b"\n") else encoded + b"\n")
    return b"\n".join(parts)


# --- signing and verifying -------------------------------------------------


def build_content(headers: Headers, body: bytes = b"") -> bytes:
    """The signed content for ``headers`` and ``body``, in the order snapd's signer emits.

    ``headers`` must hold ``type`` and ``sign-key-sha3-384``; ``body-length``
    is set here. Order: type, format (> 0), authority-id (and a differing
    signatory-id), revision (> 0), the type's primary key, the rest sorted
    bytewise, body-length (body only), sign-key-sha3-384.
    """
    final = {k: v for k, v in headers.items() if k != "body-length"}
    if body:
        final["body-length"] = str(len(body))
    try:
        _check_assertion(final, body)
    except AssertionFormatError as exc:
        raise LocalFormatError(f"cannot sign assertion: {exc}") from None
    kind = _string(final, "type")
    order = ["type"]
    if _int_header(final, "format") > 0:
        order.append("format")
    if kind not in NO_AUTHORITY:
        order.append("authority-id")
        if final.get("signatory-id", final["authority-id"]) != final["authority-id"]:
            order.append("signatory-id")
    if _int_header(final, "revision") > 0:
        order.append("revision")
    order += [k for k in PRIMARY_KEYS[kind] if final.get(k) != _PRIMARY_KEY_DEFAULTS.get((kind, k))]
    order += sorted(k for k in final if k not in _META and k not in PRIMARY_KEYS[kind])
    order += ["body-length"] if body else []
    order.append("sign-key-sha3-384")
    lines = [line for name in order for line in format_header(name, final[name])]
    text = "\n".join(lines).encode("utf-8")
    return text + NLNL + body if body else text


def sign(headers: Headers, body: bytes, key: openpgp.PublicKey, signer: openpgp.Signer, created: int) -> Assertion:
    """Sign ``headers`` + ``body`` with the private half of ``key`` (via ``signer``) at time ``created``."""
    final = dict(headers)
    final["sign-key-sha3-384"] = key.key_id
    content = build_content(final, body)
    signature = openpgp.make_signature(content, created, signer) + b"\n"
    head = content.partition(NLNL)[0]
    return Assertion(parse_headers(head), body, content, signature)


def build_serial_request(
    *,
    brand: str,
    model: str,
    request_id: str,
    device_key: openpgp.PublicKey,
    signer: openpgp.Signer,
    created: int,
    serial: str = "",
    body: bytes = b"",
) -> Assertion:
    """The serial-request snapd would send, signed by the device key."""
    headers: dict[str, HeaderValue] = {
        "type": "serial-request",
        "brand-id": brand,
        "model": model,
        "request-id": request_id,
        "device-key": device_key.encoded,
    }
    if serial:
        headers["serial"] = serial
    return sign(headers, body, device_key, signer, created)


def verify(assertion: Assertion, key: openpgp.PublicKey) -> None:
    """Raise BadSignatureError unless ``assertion`` is signed by ``key``."""
    if assertion.sign_key_id != key.key_id:
        raise BadSignatureError(f"assertion is signed by key {assertion.sign_key_id}, not by {key.key_id}")
    openpgp.verify_signature(assertion.content, assertion.signature_packet(), key)


def account_public_key(account_key: Assertion) -> openpgp.PublicKey:
    """The public key an account-key assertion carries (its id already checked on decode)."""
    if account_key.type != "account-key":
        raise _fail(f"expected an account-key assertion, got {account_key.type!r}")
    return openpgp.decode_public_key(account_key.body)
