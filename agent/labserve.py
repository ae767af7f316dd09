"""`factory-agent lab-vault`: a LabVault served on HOST:PORT, over HTTPS with a CA it makes, rehearsing failures.

A factory rehearses its line against this before it meets the real vault: the vault's
outage (``--fail 503 --times 3``), a refusal that needs a person (``--refuse invalid-api-key``),
a slow vault (``--delay 5``), a vault at its capacity (``--rate 5``), and TLS with a private CA
(``--self-signed``) exactly as the agent's ``vault.ca-file`` will see it in production.
"""

from __future__ import annotations

import datetime
import http
import ipaddress
import logging
import math
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from . import store
from .errors import ConfigError
from .labvault import API_PREFIX, PLAIN_TYPE, LabVault, Reply, refusal_reply
from .vault import certificate_validity

log = logging.getLogger(__name__)

DEVICE_ENDPOINTS = ("request-id", "serial")  # what a rehearsal acts on: /v1/version and /v1/health stay healthy
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE = "ca.pem", "ca-key.pem", "tls-cert.pem", "tls-key.pem"
CA_DAYS, CERT_DAYS = 3650, 397  # a lab CA outlives the lab; the server certificate as long as browsers allow
RENEW_BEFORE = datetime.timedelta(days=7)  # a certificate this close to its end is made anew at start
BACKDATE = datetime.timedelta(days=2)  # a board whose clock lags a little still sees them valid


@dataclass(frozen=True, slots=True)
class Rehearsal:
    """What the first ``times`` device requests (None: every one) get: each answered ``delay`` seconds
    late, with ``fail`` (an HTTP status) or ``refuse`` (a vault error code, HTTP 400 with the real body)
    instead of the real answer; ``endpoints`` limits it to request-id or serial."""

    fail: int | None = None
    refuse: str | None = None
    times: int | None = None
    delay: float = 0.0
    retry_after: int | None = None
    endpoints: tuple[str, ...] = DEVICE_ENDPOINTS

    def reply(self) -> Reply | None:
        """The planned failure's answer; None when the rehearsal plays no failure (a delay alone)."""
        if self.refuse is not None:
            return refusal_reply(self.refuse)
        if self.fail is None:
            return None
        if self.fail == 202:  # accepted: poll later, as a vault that signs asynchronously answers
            return Reply(202, b"", None, (("Retry-After", str(self.retry_after)),) if self.retry_after is not None else ())
        try:
            reason = http.HTTPStatus(self.fail).phrase
        except ValueError:
            reason = "Error"
        headers = (("Retry-After", str(self.retry_after)),) if self.retry_after is not None else ()
        return Reply(self.fail, f"{self.fail} {reason}\n".encode(), PLAIN_TYPE, headers)

    def describe(self) -> str:
        what = [f"refuse {self.refuse}" if self.refuse else f"fail with HTTP {self.fail}" if self.fail else ""]
        what += [f"answer {self.delay:g} s late"] if self.delay else []
        count = {None: "every device request", 1: "the first device request"}.get(
            self.times, f"the first {self.times} device requests")
        return f"{', '.join(w for w in what if w)} on {count}, on {' and '.join(self.endpoints)}"


class RehearsalVault(LabVault):
    """The lab vault playing a :class:`Rehearsal` through its ``respond`` hook; otherwise the lab vault."""

    def __init__(self, directory: Path, rehearsal: Rehearsal, **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.rehearsal = rehearsal
        self._played = 0
        self._count = threading.Lock()

    def respond(self, method: str, path: str, api_key: str | None, body: bytes | None) -> Reply:
        shown = path.partition("?")[0]
        played = self._take() if shown.removeprefix(API_PREFIX) in self.rehearsal.endpoints else None
        if played is None:
            return super().respond(method, path, api_key, body)
        if self.rehearsal.delay:
            time.sleep(self.rehearsal.delay)
        planned = self.rehearsal.reply()
        reply = planned or super().respond(method, path, api_key, body)
        what = f"{self.rehearsal.refuse or reply.status} to {method} {shown}"
        late = f" {self.rehearsal.delay:g} s late" if self.rehearsal.delay else ""
        of = f" ({played} of {self.rehearsal.times})" if self.rehearsal.times is not None else ""
        log.info("lab vault rehearsal: answered %s%s%s", what, late, of)
        if played == self.rehearsal.times:
            log.info("lab vault rehearsal: %s; answering normally from now on",
                     "the rehearsed request answered" if played == 1 else f"all {played} rehearsed requests answered")
        return reply

    def _take(self) -> int | None:
        """The number of this rehearsed request (1, 2, ...), or None once ``times`` have been."""
        with self._count:
            if self.rehearsal.times is not None and self._played >= self.rehearsal.times:
                return None
            self._played += 1
            return self._played


class RateLimit:
    """A token bucket: ``rate`` tokens a second, holding as many (at least one): a burst of one second's worth."""

    def __init__(self, rate: float, clock: Any = time.monotonic) -> None:
        self.rate, self.capacity, self.clock = rate, max(1.0, rate), clock
        self.tokens, self.stamp = self.capacity, clock()
        self._lock = threading.Lock()

    def take(self) -> float | None:
        """None when a token was taken; else the seconds until the next one."""
        with self._lock:
            now = self.clock()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return None
            return (1.0 - self.tokens) / self.rate


_ADMITTED, _REFUSED, _SERIALS = 1, 2, 3  # RateLimitedVault._tally's counts, after the second


class RateLimitedVault(LabVault):
    """The lab vault at a capacity of ``rate`` registrations a second, as a loaded vault's front answers.

    The request-id is the admission: over the cap it is answered 429 with Retry-After (the whole seconds
    until the next token, at least 1). A serial-request is never refused for load: it carries a request-id
    the vault admitted, and refusing it would waste that nonce. Each second with device requests is logged
    as one line: admitted, refused and serial-requests, with the cap.
    """

    def __init__(self, *args: Any, rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit = RateLimit(rate)
        self._tally: list[int] = [0, 0, 0, 0]  # the second (unix time), then the counts at _ADMITTED, _REFUSED, _SERIALS
        self._tallying = threading.Lock()

    def respond(self, method: str, path: str, api_key: str | None, body: bytes | None) -> Reply:
        endpoint = path.partition("?")[0].removeprefix(API_PREFIX)
        if endpoint not in DEVICE_ENDPOINTS or method != "POST":
            return super().respond(method, path, api_key, body)
        wait = self.limit.take() if endpoint == "request-id" else None
        self._tally_request(_SERIALS if endpoint == "serial" else _REFUSED if wait is not None else _ADMITTED)
        if wait is None:
            return super().respond(method, path, api_key, body)
        return Reply(429, b"429 Too Many Requests\n", PLAIN_TYPE, (("Retry-After", str(max(1, math.ceil(wait)))),))

    def _tally_request(self, index: int) -> None:
        """One device request, counted at ``index`` of this second's tally."""
        second = int(time.time())
        with self._tallying:
            if second != self._tally[0]:
                self._flush()
                self._tally = [second, 0, 0, 0]
            self._tally[index] += 1

    def _flush(self) -> None:
        second, admitted, refused, serials = self._tally
        if admitted or refused or serials:
            log.info("lab vault rate: second %d: %d admitted, %d refused, %d serial-requests (cap %g/s)",
                     second, admitted, refused, serials, self.limit.rate)

    def stop(self) -> None:
        super().stop()
        with self._tallying:
            self._flush()
            self._tally = [0, 0, 0, 0]


# --- a private CA for an HTTPS lab ---------------------------------------------


def self_signed(directory: Path, host: str, now: datetime.datetime | None = None) -> tuple[Path, Path, Path]:
    """DIR/ca.pem (the agent's vault.ca-file) and the certificate and key it signed for ``host`` and loopback.

    Made once and kept: a restart serves the same CA, so agents configured with it go on trusting the
    vault. The server certificate is made anew when it does not name ``host``, is not the CA's, or nears its end.
    """
    from cryptography.hazmat.primitives.asymmetric import ec

    now = now or datetime.datetime.now(datetime.UTC)
    names = tuple(dict.fromkeys((*LOOPBACK_NAMES, host, socket.gethostname())))
    ca = _load_pair(directory / CA_FILE, directory / CA_KEY_FILE, now)
    if ca is None:
        log.info("lab vault: making a private CA in %s", directory / CA_FILE)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("factory-agent lab vault CA", ca_key, ca_key, None, (), now, CA_DAYS), ca_key
        _write_pair(directory / CA_FILE, directory / CA_KEY_FILE, *ca)
    leaf = _load_pair(directory / CERT_FILE, directory / KEY_FILE, now)
    if leaf is None or not _fits(leaf[0], ca[0], names):
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf = _certificate(f"factory-agent lab vault {host}", leaf_key, ca[1], ca[0], names, now, CERT_DAYS), leaf_key
        _write_pair(directory / CERT_FILE, directory / KEY_FILE, *leaf)
    return directory / CA_FILE, directory / CERT_FILE, directory / KEY_FILE


def _certificate(common_name: str, key: Any, signer: Any, issuer: Any, names: tuple[str, ...],
                 now: datetime.datetime, days: int) -> Any:
    """A CA certificate when ``issuer`` is None (self-signed), else a TLS server certificate for ``names``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    builder = (x509.CertificateBuilder().subject_name(subject).public_key(public)
               .issuer_name(subject if issuer is None else issuer.subject)
               .serial_number(x509.random_serial_number()).not_valid_before(now - BACKDATE)
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=0 if issuer is None else None),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=issuer is None,
                                            crl_sign=issuer is None, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True))
    if issuer is not None:
        builder = (builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signer, hashes.SHA256())


def _general_name(name: str) -> Any:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _load_pair(cert_path: Path, key_path: Path, now: datetime.datetime) -> tuple[Any, Any] | None:
    """The certificate and its key, if both load, belong together and stay valid past RENEW_BEFORE."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    begins, ends = certificate_validity(cert)
    same = cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    return (cert, key) if same and begins <= now and now + RENEW_BEFORE < ends else None


def _fits(cert: Any, ca: Any, names: tuple[str, ...]) -> bool:
    """``cert`` was signed by ``ca`` and names every one of ``names``."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec

    try:  # the CA is ours, always ECDSA (cryptography 38 has no verify_directly_issued_by)
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        named = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (InvalidSignature, x509.ExtensionNotFound, TypeError, ValueError):
        return False
    return cert.issuer == ca.subject and all(_general_name(name) in named for name in names)


def _write_pair(cert_path: Path, key_path: Path, cert: Any, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    store.write_durable(key_path, pem, mode=0o600)
    store.write_durable(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


# --- the command ---------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) as (host, port)."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"cannot use listen address {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def tls_context(certfile: str | Path | None, keyfile: str | Path | None) -> ssl.SSLContext | None:
    """A server context with the certificate chain in ``certfile`` (key in ``keyfile``, or in it); None for HTTP."""
    if certfile is None:
        if keyfile is not None:
            raise ConfigError("cannot use a TLS key without a certificate")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {certfile}: {exc}") from None
    return context


@dataclass(frozen=True, slots=True)
class Options:
    """What `factory-agent lab-vault` was asked: where, as whom, with what TLS and which rehearsal."""

    directory: Path
    listen: str = "127.0.0.1:0"
    brand: str = "acme"
    model: str = "acme-gw"
    api_key: str | None = None
    certfile: str | Path | None = None
    keyfile: str | Path | None = None
    self_signed: bool = False
    rehearsal: Rehearsal | None = None
    hardware_identity: bool = False  # a lab Model Service: no api-key, hardware identities checked
    rate: float | None = None  # registrations a second before the vault answers 429 (RateLimitedVault)


def serve(options: Options) -> int:
    """Run a lab vault until SIGTERM or SIGINT; prints one line saying where, writes DIR/url. Returns 0."""
    host, port = parse_listen(options.listen)
    if host not in LOOPBACK_NAMES:
        log.warning("lab vault listening on %s, which is not a loopback address", host)
    vault = _make_vault(options)
    ca_file = None
    context = tls_context(options.certfile, options.keyfile)
    if options.self_signed:
        ca_file, cert, key = self_signed(vault.directory, host)
        context = tls_context(cert, key)
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            url = vault.start(host, port, context)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {options.listen}: {exc.strerror or exc}") from None
        store.write_durable(vault.directory / "url", url.encode("utf-8") + b"\n", mode=0o644)
        print(_listening(vault, url, ca_file), flush=True)
        if options.rehearsal is not None:
            log.info("lab vault rehearsal: %s", options.rehearsal.describe())
        if options.rate is not None:
            log.info("lab vault rate: %g registrations a second; request-ids over it answered 429 with Retry-After",
                     options.rate)
        while not stopped.wait(1.0):
            pass
    finally:
        vault.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _make_vault(options: Options) -> LabVault:
    from .labmodel import ModelServiceVault

    kind: type[LabVault] = ModelServiceVault if options.hardware_identity else LabVault
    args: tuple[Any, ...] = (options.directory,)
    kwargs: dict[str, Any] = {"brand": options.brand, "model": options.model, "api_key": options.api_key}
    if options.rehearsal is not None:  # the rehearsal's respond, then kind's
        kind = type(f"Rehearsal{kind.__name__}", (RehearsalVault, kind), {})
        args += (options.rehearsal,)
    if options.rate is not None:  # the cap first: a refused request plays no rehearsal
        kind = type(f"RateLimited{kind.__name__}", (RateLimitedVault, kind), {})
        kwargs["rate"] = options.rate
    return kind(*args, **kwargs)


def _listening(vault: LabVault, url: str, ca_file: Path | None) -> str:
    where = vault.directory
    line = f"lab vault listening on {url} (brand {vault.brand}, model {vault.model}); trust {where / 'brand.account-key'}"
    from .labmodel import ModelServiceVault

    if isinstance(vault, ModelServiceVault):
        line += f"; hardware identity, no api-key: import hardware-identity assertions into {vault.import_dir}"
    else:
        line += f"; api-key in {where / 'api-key'}"
    return line + (f"; vault.ca-file {ca_file}" if ca_file else "")
