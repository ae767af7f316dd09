"""The Serial Vault's device API: one HTTP attempt per call, every failure a typed error.

Blocking (requests); the daemon calls it from a thread. No retries, no
sleeps: registration.py decides what happens after a failure. Each call is
bounded by (connect, read) timeouts, an overall deadline and a response size
cap, so that a cancelled caller never leaves a thread hanging for long. TLS
trusts the system store (not certifi) or the configured ca-file; proxies
come from the environment. The api-key travels in its header and nowhere
else: not in errors, not in logs.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import json
import os
import re
import socket
import ssl
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
import urllib3

from . import __version__
from .config import VaultConfig
from .errors import VaultClockSkew, VaultRejected, VaultTransient, VaultUnavailable, one_line

ASSERTION_TYPE = "application/x.ubuntu.assertion"
MAX_RESPONSE_BYTES = 1024 * 1024  # a serial is ~2 KiB; anything near this is not one
_CHUNK = 16 * 1024
MAX_QUOTED = 300  # characters of the vault's error_code or message that reach LastErrorMessage and the log
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also says yes to "²" and "\u0661" (Arabic-Indic one), which int() refuses
_SYSTEM_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem")
# Refusals that mean "not now" rather than "no": retried with backoff.
_TRANSIENT_STATUS = {408, 425, 429}
# errno values of a network that is not there (yet), as opposed to a vault that answers badly.
_NO_NETWORK = {errno.ENETUNREACH, errno.ENETDOWN, errno.EHOSTUNREACH, errno.ECONNREFUSED, errno.EADDRNOTAVAIL}
# x509 verify codes that mean the device clock is outside the certificate's validity.
_X509_NOT_YET_VALID, _X509_EXPIRED = 9, 10


@dataclass(frozen=True, slots=True)
class Signed:
    body: bytes


@dataclass(frozen=True, slots=True)
class Pending:
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class Exchange:
    """snapd mode: the vault's answer to one relayed call, as it came, whatever its status."""

    status: int
    headers: requests.structures.CaseInsensitiveDict[str]
    body: bytes
    url: str = ""

    @property
    def retry_after(self) -> float | None:
        return parse_retry_after(self.headers.get("Retry-After"), time.time())

    def refusal(self) -> VaultRejected | VaultTransient:
        """The typed error of an answer that is not a success, as the other calls raise it."""
        return _status_error(self.status, self.headers, self.body, self.url)


def system_ca_bundle() -> str:
    """The OS trust store, as a path requests accepts (file or directory)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, *_SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return candidate
    return paths.capath or "/etc/ssl/certs"


class Vault:
    """A client for one vault base URL (ending in /), e.g. https://vault.example.com/v1/."""

    def __init__(self, cfg: VaultConfig, user_agent: str = f"factory-agent/{__version__}") -> None:
        self.cfg = cfg
        self.session = requests.Session()
        # Passed on every request: a session-level value loses to $REQUESTS_CA_BUNDLE (requests #3829).
        self.verify = cfg.ca_file or system_ca_bundle()
        # Connection: close, so that every call connects afresh and its deadline knows the socket.
        # Accept-Encoding: identity: nothing to decode, so the size cap counts what is used (see _read_capped).
        self.session.headers.update({"User-Agent": user_agent, "Connection": "close", "Accept-Encoding": "identity"})
        if cfg.api_key:  # a device onboarding with its hardware identity sends none
            self.session.headers["api-key"] = cfg.api_key
        self.session.mount("https://", _Adapter(max_retries=0))
        self.session.mount("http://", _Adapter(max_retries=0))

    def close(self) -> None:
        self.session.close()

    def fetch_request_id(self) -> str:
        status, headers, body = self._post("request-id", None, {})
        if status != 200:
            raise _status_error(status, headers, body, self.cfg.url + "request-id")
        data = _json(body)
        request_id = data.get("request-id") if isinstance(data, dict) else None
        if not isinstance(request_id, str) or not request_id:
            raise VaultTransient(f"POST {self.cfg.url}request-id: cannot read the vault's request-id answer: "
                                 "no request-id in it")
        return request_id

    def post_serial(self, stream: bytes) -> Signed | Pending:
        """POST the serial-request stream; the body of a 200/201 is checked by the caller."""
        status, headers, body = self._post("serial", stream, {"Content-Type": ASSERTION_TYPE})
        if status in (200, 201):
            return Signed(body)
        if status == 202:
            return Pending(parse_retry_after(headers.get("Retry-After"), time.time()))
        raise _status_error(status, headers, body, self.cfg.url + "serial")

    def forward(self, path: str, data: bytes | None, content_type: str | None = None,
                headers: dict[str, str] | None = None) -> Exchange:
        """snapd mode: POST snapd's request to ``path`` ("request-id" or "serial") with the api-key added.

        ``headers`` are snapd's that the relay lets through (relay.FORWARDED_HEADERS);
        the api-key and Content-Type are always ours. Any HTTP answer comes back as
        it is, for the relay to pass on; no answer raises the same typed errors as
        the other calls.
        """
        sent = {k: v for k, v in (headers or {}).items() if k.lower() not in ("api-key", "content-type", "connection")}
        if content_type:
            sent["Content-Type"] = content_type
        return Exchange(*self._post(path, data, sent), url=self.cfg.url + path)

    def _post(
        self, path: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, requests.structures.CaseInsensitiveDict[str], bytes]:
        url = self.cfg.url + path
        with _Deadline(self.cfg.timeout) as deadline:
            try:
                with self.session.post(url, data=data, headers=headers, stream=True, allow_redirects=False, verify=self.verify,
                                       timeout=(self.cfg.connect_timeout, self.cfg.timeout)) as resp:
                    try:
                        body = _read_capped(resp)
                    except VaultTransient as exc:  # its own words, and where they came from
                        raise VaultTransient(f"POST {url}: {exc}") from None
                    if deadline.fired.is_set():
                        raise _DeadlinePassed()
                    return resp.status_code, resp.headers, body
            except (_DeadlinePassed, requests.exceptions.RequestException) as exc:
                if deadline.fired.is_set():
                    raise VaultTransient(f"the vault's answer from {url} did not arrive within {self.cfg.timeout:g} s") from None
                if isinstance(exc, requests.exceptions.SSLError):
                    raise _tls_error(exc, url, self.cfg.ca_file or "") from None
                if isinstance(exc, requests.exceptions.ConnectionError):
                    if _no_network(exc):
                        raise VaultUnavailable(f"cannot reach the vault at {url}: {_cause(exc)}") from None
                    raise VaultTransient(f"cannot talk to the vault at {url}: {_cause(exc)}") from None
                if isinstance(exc, requests.exceptions.Timeout):
                    raise VaultTransient(f"the vault at {url} did not answer in time") from None
                raise VaultTransient(f"cannot talk to the vault at {url}: {_cause(exc)}") from None
            except OSError as exc:  # not wrapped by requests: a CA file that vanished after the config was loaded
                raise VaultTransient(f"cannot talk to the vault at {url}: {_cause(exc)}") from None


class _DeadlinePassed(Exception):
    pass


_calls = threading.local()  # .deadline: the _Deadline of the call in progress on this thread


class _Deadline:
    """The whole exchange, status line and headers included, ends ``seconds`` after it began.

    Each recv is bounded by the read timeout, but a vault that drips a byte
    every few seconds would never trip it: when the deadline passes, every
    socket this call connected is shut down, which ends any blocked read at
    once. The sockets are taken when they connect (see _Adapter), because
    http.client lets go of a socket whose response will close the connection.
    """

    def __init__(self, seconds: float) -> None:
        self.fired = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        _calls.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        _calls.deadline = None

    def watch(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            fired = self.fired.is_set()
        if fired:
            _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self.fired.set()
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watch(sock: socket.socket | None) -> None:
    deadline = getattr(_calls, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _watch(self.sock)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _watch(self.sock)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter, with connections whose sockets the call's _Deadline can shut down."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # a SOCKS manager brings its own connection classes
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager


def _read_capped(resp: requests.Response) -> bytes:
    """The body, at most MAX_RESPONSE_BYTES received and at most as much once decoded.

    The bytes are read as they came (``decode_content=False``): urllib3 would decode every
    Content-Encoding in a chain before anything here counts a byte, and ``gzip, gzip`` turns 7 KB
    into gigabytes. We ask for ``identity``; an answer that is encoded all the same is decoded here,
    each layer capped (see _decoded). The caller's _Deadline bounds the time.
    """
    declared = resp.headers.get("Content-Length")
    if declared and _DIGITS.fullmatch(declared) and int(declared) > MAX_RESPONSE_BYTES:
        raise VaultTransient(f"the vault's answer is too large ({declared} bytes)")
    chunks, size = [], 0
    try:
        for chunk in resp.raw.stream(_CHUNK, decode_content=False):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise VaultTransient(f"the vault's answer is too large (over {MAX_RESPONSE_BYTES} bytes)")
            chunks.append(chunk)
    except urllib3.exceptions.HTTPError as exc:  # as requests' iter_content() would have wrapped it
        wrapped = {urllib3.exceptions.ReadTimeoutError: requests.exceptions.ConnectionError,
                   urllib3.exceptions.SSLError: requests.exceptions.SSLError}.get(type(exc),
                                                                                  requests.exceptions.ChunkedEncodingError)
        raise wrapped(exc) from exc
    return _decoded(b"".join(chunks), resp.headers.get("Content-Encoding", ""))


# Content-Encodings decoded here (a single one, as a proxy may add despite Accept-Encoding: identity).
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
MAX_ENCODINGS = 1


def _decoded(body: bytes, header: str) -> bytes:
    """``body`` with its Content-Encoding undone, never past MAX_RESPONSE_BYTES; else VaultTransient naming it."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip() and c.strip().lower() != "identity"]
    if not codings:
        return body
    if len(codings) > MAX_ENCODINGS or codings[0] not in _DECODERS:
        raise VaultTransient(f"the vault's answer has Content-Encoding {_quoted(header.strip())!r}, which the agent "
                             f"does not decode (it asks for identity)")
    decoder = zlib.decompressobj(_DECODERS[codings[0]])
    try:
        out = decoder.decompress(body, MAX_RESPONSE_BYTES + 1)
    except zlib.error:
        raise VaultTransient(f"the vault's answer is not valid {codings[0]} (Content-Encoding)") from None
    if len(out) > MAX_RESPONSE_BYTES or decoder.unconsumed_tail:
        raise VaultTransient(f"the vault's answer is too large once decoded ({codings[0]} to over "
                             f"{MAX_RESPONSE_BYTES} bytes)")
    return out


# How long a vault's own trouble (5xx) may last before a person should call its operator: the agent's backoff
# reaches its cap within minutes, and a vault restart or a database fail-over is over well within half an hour.
OPERATOR_AFTER_MINUTES = 30


def _status_error(
    status: int, headers: requests.structures.CaseInsensitiveDict[str], body: bytes, url: str = ""
) -> VaultRejected | VaultTransient:
    retry_after = parse_retry_after(headers.get("Retry-After"), time.time())
    code, message = _json_error(headers, body)
    where = f"POST {url}: " if url else ""
    if status >= 500 or status in _TRANSIENT_STATUS:
        detail = (f": {code}: {message}" if message else f": {code}") if code else ""
        text = f"{where}the vault answered HTTP {status}{detail}"
        if status >= 500:
            text += (f"; the trouble is on the vault's side, the agent retries on its own; if it lasts past "
                     f"{OPERATOR_AFTER_MINUTES} minutes, call the vault's operator")
        return VaultTransient(text, retry_after, code, status)
    if code:
        refusal = f"the vault refused: {code}: {message}" if message else f"the vault refused: {code}"
        return VaultRejected(f"{where}{refusal}", code, retry_after)
    text = f"{where}the vault answered HTTP {status}"
    if status == 404:
        text += ("; no such endpoint: vault.url must be the vault's API base ending in /v1/ "
                 "(e.g. https://vault.example.com:8443/v1/), which the agent completes with request-id and serial")
    return VaultRejected(text, f"http-{status}", retry_after)


def _json_error(headers: requests.structures.CaseInsensitiveDict[str], body: bytes) -> tuple[str, str]:
    """(error_code, message) of the vault's JSON error body, or ("", "")."""
    if headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
        return "", ""
    data = _json(body)
    if not isinstance(data, dict):
        return "", ""
    code, message = data.get("error_code"), data.get("message")
    return (_quoted(code) if isinstance(code, str) else ""), (_quoted(message) if isinstance(message, str) else "")


def _json(body: bytes) -> Any:
    """The JSON value of ``body``, or None when it is not JSON (or nested beyond the parser's depth)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _quoted(text: str) -> str:
    """The vault's own words as we repeat them: one line, and not at length."""
    text = one_line(text.strip())
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED - 3] + "..."


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return float(value)  # inf for an absurd number of digits: the core caps what it honours
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _causes(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        reason = getattr(current, "reason", None)
        context = None if current.__suppress_context__ else current.__context__  # "raise ... from None" hides it
        current = current.__cause__ or context or nested or (reason if isinstance(reason, BaseException) else None)
    return seen


def _no_network(exc: BaseException) -> bool:
    for cause in _causes(exc):
        if isinstance(cause, socket.gaierror):
            return True  # DNS: no network yet, or no such name; both need the network to fix
        if isinstance(cause, OSError) and cause.errno in _NO_NETWORK:
            return True
    return False


def _tls_error(exc: BaseException, url: str, ca_file: str = "") -> VaultClockSkew | VaultRejected:
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            cert = presented_certificate(url)
            if cause.verify_code in (_X509_NOT_YET_VALID, _X509_EXPIRED):
                now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                window = f"valid from {cert.window()}" if cert and cert.window() else "validity window unknown"
                return VaultClockSkew(f"the vault's TLS certificate is not valid at this device's time: "
                                      f"{cause.verify_message} (POST {url}: device time {now}, certificate {window})")
            text = f"cannot trust the vault's TLS certificate at {url}: {cause.verify_message}"
            if cert is not None:
                text += f"; presented: {cert.describe()}; {_diagnosis(cert, ca_file)}"
            return VaultRejected(text, "tls-certificate")
    return VaultRejected(f"cannot set up TLS with the vault at {url}: {_cause(exc)}", "tls-certificate")


@dataclass(frozen=True, slots=True)
class Certificate:
    """What a server presented, read without trusting it (only to be shown)."""

    subject: str
    issuer: str
    sha256: str  # hex, colon-separated, as openssl x509 -fingerprint -sha256 shows it
    not_before: datetime | None  # aware UTC; None when the certificate could not be parsed
    not_after: datetime | None
    issuer_key_id: str = ""  # hex of its AuthorityKeyIdentifier, when it has one: tells two CAs of one name apart

    def window(self, stamp: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
        """"FROM to UNTIL" in ``stamp``'s format, "" when unknown."""
        if self.not_before is None or self.not_after is None:
            return ""
        return f"{self.not_before:{stamp}} to {self.not_after:{stamp}}"

    def describe(self) -> str:
        text = f"subject {self.subject!r}, issuer {self.issuer!r}, SHA-256 {self.sha256}"
        return text + (f", valid {self.window()}" if self.window() else "")


CERT_FETCH_TIMEOUT = 3.0  # seconds for the second, diagnostic connection


def presented_certificate(url: str, timeout: float = CERT_FETCH_TIMEOUT) -> Certificate | None:
    """The certificate ``url``'s server presents, fetched on a separate short connection without verification.

    Used only to describe a failure: nothing is sent, and nothing of it is trusted. None when it cannot be had.
    The connection goes straight to the host, not through a proxy from the environment.
    """
    parts = urllib3.util.parse_url(url)
    if parts.scheme != "https" or not parts.host:
        return None
    return fetch_certificate(parts.host, parts.port or 443, timeout)


def fetch_certificate(host: str, port: int, timeout: float = CERT_FETCH_TIMEOUT) -> Certificate | None:
    """The certificate ``host``:``port`` presents, unverified and only to be shown; None when it cannot be had."""
    try:  # the stdlib's fetch-only helper: its unverified handshake never carries a request
        der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, port), timeout=timeout))
    except (OSError, ValueError):
        return None
    return describe_certificate(der) if der else None


def describe_certificate(der: bytes) -> Certificate:
    """Subject, issuer, fingerprint and validity of a DER certificate (the fingerprint alone if it does not parse)."""
    digest = hashlib.sha256(der).hexdigest().upper()
    sha256 = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))
    try:
        from cryptography import x509  # python3-cryptography; without it, the fingerprint alone
    except ImportError:
        return Certificate("?", "?", sha256, None, None)
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return Certificate("?", "?", sha256, None, None)
    before, after = certificate_validity(cert)
    return Certificate(_quoted(cert.subject.rfc4514_string()), _quoted(cert.issuer.rfc4514_string()), sha256,
                       before, after, _key_id(cert, authority=True))


def certificate_validity(cert: Any) -> tuple[datetime, datetime]:
    """A cryptography x509 certificate's notBefore and notAfter, as aware UTC datetimes."""
    before = getattr(cert, "not_valid_before_utc", None)  # cryptography >= 42; Debian 12's 38 has the naive ones
    after = getattr(cert, "not_valid_after_utc", None)
    if before is None or after is None:
        before, after = (cert.not_valid_before.replace(tzinfo=UTC),
                         cert.not_valid_after.replace(tzinfo=UTC))
    return before, after


def _key_id(cert: Any, authority: bool) -> str:
    from cryptography import x509
    try:
        if authority:
            value = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        else:
            value = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, ValueError):
        return ""
    return value.hex() if isinstance(value, bytes) else ""


_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def _ca_names(ca_file: str) -> set[tuple[str, str]] | None:
    """(subject, subject key id) of each certificate in ``ca_file``, or None when they cannot be read."""
    try:
        from cryptography import x509
        with open(ca_file, "rb") as f:
            pems = _PEM_CERT.findall(f.read(MAX_RESPONSE_BYTES))
        loaded = [x509.load_pem_x509_certificate(pem) for pem in pems]
    except (ImportError, OSError, ValueError):
        return None
    return {(_quoted(c.subject.rfc4514_string()), _key_id(c, authority=False)) for c in loaded}


def _diagnosis(cert: Certificate, ca_file: str) -> str:
    """Proxy or portal (issuer not the configured CA) vs a missing vault.ca-file, as far as the certificate says."""
    if not ca_file:
        self_signed = " (self-signed)" if cert.subject == cert.issuer else ""
        return (f"vault.ca-file is not set and the system store does not trust its issuer{self_signed}: "
                f"set vault.ca-file to the CA that signed the vault's certificate")
    names = _ca_names(ca_file)
    if names is not None and not any(subject == cert.issuer and (not key_id or not cert.issuer_key_id
                                                                 or key_id == cert.issuer_key_id)
                                     for subject, key_id in names):
        return (f"its issuer is not the CA in vault.ca-file ({ca_file}): a proxy or captive portal may be answering "
                f"in the vault's place, or vault.ca-file is the wrong CA")
    return f"it is issued by the CA in vault.ca-file ({ca_file}) but does not verify: check its name against vault.url"


def _cause(exc: BaseException) -> str:
    """The innermost readable reason, without URLs' query strings or headers."""
    for cause in reversed(_causes(exc)):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    text = str(_causes(exc)[-1])
    return text.split("(Caused by")[0].strip()[:200] or type(exc).__name__
