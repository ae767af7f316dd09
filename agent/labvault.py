"""A local Serial Vault with the real one's device API, signing serials with a brand key it creates.

It is a test and demo tool, not a production vault: its keys sit unencrypted
in its directory and its nonces and signing log live in memory. What a device
sees follows shared/reference/serial-vault-api.md: paths, status codes, JSON
bodies, the processing order of ``/v1/serial`` and when a request-id is burned.
It never misbehaves on purpose; :class:`LabVault` documents the few methods a
subclass may override to do so (the tests' fault knobs live in tests/fakes/).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from . import __version__, assertions, keys, openpgp, store
from .assertions import Assertion, HeaderValue
from .errors import AssertionFormatError, ConfigError, LocalFormatError

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"
ROOT_ID = "lab-root"
ACCOUNT_KEY_SINCE = "2016-01-01T00:00:00Z"  # fixed and early: every timestamp we sign falls after it
NONCE_MAX_AGE = 600.0  # the real vault's nonceMaximumAge
MAX_REQUEST_BODY = 4 * 1024 * 1024
_MAX_DRAIN = 64 * 1024 * 1024  # read (and drop) an oversized body up to this, so the client sees our answer
JSON_TYPE = "application/json; charset=UTF-8"
ASSERTION_TYPE = "application/x.ubuntu.assertion"
PLAIN_TYPE = "text/plain; charset=utf-8"
_BRAND = re.compile(r"[a-z0-9A-Z]{32}|[-a-z0-9]{2,28}")
_MODEL = re.compile(r"[a-z0-9](?:-?[a-z0-9])*")
_REMODEL_HEADERS = ("original-brand-id", "original-model", "original-serial")
UNEXPECTED = "unexpected assertion in the request stream"

# The real vault's messages (service/response/errors.go), by error_code.
MESSAGES = {
    "invalid-api-key": "Invalid API key used",
    "generate-nonce": "Error generating a nonce. Please try again later",
    "empty-data": "No data supplied for signing",
    "invalid-assertion": "The assertion is invalid",
    "invalid-type": "The assertion type must be 'serial'",
    "invalid-second-type": "The 2nd assertion type must be 'model'",
    "mismatched-model": "Model and serial-request assertion do not match",
    "invalid-nonce": "Nonce is invalid or expired",
    "invalid-model": "Cannot find a matching model or sub-store model",
    "invalid-substore": "Cannot find sub-store mapping for the model",
    "create-assertion": "Error converting the serial-request to a serial assertion",
    "signing-assertion": "Error signing the assertion",
    # the lab Model Service's own (agent/labmodel.py): the Model Service's codes are not public
    "unknown-hardware-identity": "No hardware identity is imported for this key",
    "invalid-request-id-signature": "The request-id signature does not verify",
    "invalid-body": "The serial-request body is not a secure onboarding body",
    "serial-required": "A proposed serial is required",
}


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP answer; ``content_type`` None sends no Content-Type."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


class Refusal(Exception):
    """A handled vault error: HTTP 400 with the real JSON body; the message defaults to the real one. A hook
    (answer_serial) raises it to refuse."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code, self.message = code, MESSAGES.get(code, code) if message is None else message

    def reply(self) -> Reply:
        return refusal_reply(self.code, self.message)


def refusal_reply(code: str, message: str | None = None) -> Reply:
    """The real vault's handled error: HTTP 400, its JSON body; the message defaults to the real one for ``code``."""
    text = MESSAGES.get(code, code) if message is None else message
    body = {"success": False, "error_code": code, "error_subcode": "", "message": text, "StatusCode": 400}
    return Reply(400, go_json(body), JSON_TYPE)


def go_json(value: dict[str, Any]) -> bytes:
    """What Go's json.Encoder writes: compact, HTML-escaped, one trailing newline."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char in "&<>\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text.encode("utf-8") + b"\n"


NOT_FOUND = Reply(404, b"404 page not found\n", PLAIN_TYPE, (("X-Content-Type-Options", "nosniff"),))
VERSION = Reply(200, go_json({"version": __version__, "revision": "lab"}), JSON_TYPE)
HEALTH = Reply(200, go_json({"database": "healthy"}), JSON_TYPE)


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@lru_cache(maxsize=8)
def _load_key(pem: bytes) -> keys.DeviceKey:
    """keys.load_key, remembered: its RSA check costs ~0.25 s per 4096-bit key, and tests build many vaults."""
    return keys.load_key(pem)


def _yaml_serial(body: bytes) -> str:
    """The top-level ``serial:`` value of a YAML body, "" if none (a line parse, not a YAML parser)."""
    for line in body.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key == "serial":
            value = value.strip()
            end = value.find(value[0], 1) if value[:1] in ("'", '"') else -1
            return value[1:end] if end > 0 else value.split(" #", 1)[0].strip()
    return ""


class LabVault:
    """The lab vault: one brand, one model, one api-key; files in ``directory``, state in memory.

    Hooks: a subclass (a test's misbehaving vault) may override these, and only these, to answer
    what this vault never would. Each is called from the request's own thread.

    - :meth:`received` sees each request's path and headers before it is answered (here: a debug log line);
    - :meth:`respond` makes each request's :class:`Reply`: a subclass may answer something else, wait,
      or change the reply ``super().respond`` made;
    - :meth:`answer_serial` answers a ``/serial`` request that passed every check made before its
      request-id is burned (right api-key, a well-formed, self-signed stream);
    - :meth:`sign_serial` signs the serial assertion (with the vault's lock held): a subclass may
      change its headers or signing key, or the assertion it returns.
    """

    def __init__(self, directory: Path, brand: str = "acme", model: str = "acme-gw", api_key: str | None = None,
                 now: Callable[[], float] = time.time, key_bits: int = keys.DEVICE_KEY_BITS,
                 require_api_key: bool = True) -> None:
        if not _BRAND.fullmatch(brand) or not _MODEL.fullmatch(model):
            raise ConfigError(f"cannot set up lab vault: invalid brand {brand!r} or model {model!r}")
        self.brand, self.model = brand, model
        self._directory, self._now = Path(directory), now
        self._lock = threading.Lock()
        self._nonces: dict[str, float] = {}
        self.require_api_key = require_api_key  # False: a Model Service model onboarded with hardware identity
        self._revisions: dict[tuple[str, str, str], int] = {}
        self._device_keys: set[str] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url = ""
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._root_key, self._brand_key = self._load_keys(key_bits)
        self._api_key = self._load_api_key(api_key)
        self._write_assertions()

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def brand_key(self) -> keys.DeviceKey:
        return self._brand_key

    @property
    def api_key(self) -> str:
        return self._api_key

    @property
    def url(self) -> str:
        """The base URL ("http://127.0.0.1:PORT/v1/") while serving, else ""."""
        return self._url

    # --- files -------------------------------------------------------------

    def _load_keys(self, bits: int) -> tuple[keys.DeviceKey, keys.DeviceKey]:
        """root-key.pem and brand-key.pem, generated (in parallel child processes) only if missing."""
        paths = [self._directory / "root-key.pem", self._directory / "brand-key.pem"]
        missing = [path for path in paths if not path.exists()]
        if missing:
            for path, pem in zip(missing, _generate_pems(bits, len(missing))):
                try:
                    store.write_durable(path, pem, mode=0o600, replace=False)
                except FileExistsError:
                    pass  # another vault on this directory was quicker: use its key
        root, brand = (_load_key(path.read_bytes()) for path in paths)
        return root, brand

    def _load_api_key(self, given: str | None) -> str:
        path = self._directory / "api-key"
        if given is None and path.exists():
            given = path.read_text(encoding="utf-8").strip()
        key = secrets.token_hex(16) if given is None else given.strip()
        if not key:
            raise ConfigError(f"cannot set up lab vault: empty api-key (given or in {path})")
        store.write_durable(path, key.encode("utf-8") + b"\n", mode=0o600)
        return key

    def _write_assertions(self) -> None:
        """trusted.assert, brand-chain.assert, brand.account-key and model.assert, signed afresh."""
        created = int(self._now())
        stamp = rfc3339(created)
        root, brand = self._root_key, self._brand_key

        def sign(headers: dict[str, HeaderValue], signer: keys.DeviceKey = root, body: bytes = b"") -> Assertion:
            return assertions.sign(headers, body, signer.public, signer.sign, created)

        root_account = sign(_account(ROOT_ID, "lab vault throw-away root", stamp))
        root_account_key = sign(_account_key(ROOT_ID, root.public), body=root.public.encoded.encode("utf-8"))
        brand_account = sign(_account(self.brand, self.brand, stamp))
        brand_account_key = sign(_account_key(self.brand, brand.public), body=brand.public.encoded.encode("utf-8"))
        model = sign({"type": "model", "authority-id": self.brand, "series": "16", "brand-id": self.brand,
                      "model": self.model, "architecture": "amd64", "gadget": "pc", "kernel": "pc-kernel",
                      "timestamp": stamp}, brand)
        files = {
            "trusted.assert": assertions.encode_stream([root_account, root_account_key]),
            "brand-chain.assert": assertions.encode_stream([brand_account, brand_account_key]),
            "brand.account-key": brand_account_key.encode(),
            "model.assert": model.encode(),
        }
        for name, data in files.items():
            store.write_durable(self._directory / name, data, mode=0o644)

    # --- the device API ----------------------------------------------------

    def received(self, method: str, path: str, headers: Iterable[tuple[str, str]]) -> None:
        """Hook: one request's headers, before it is answered; logged at debug level, never the api-key's value."""
        shown = ", ".join(f"{name}: {'(hidden)' if name.lower() == 'api-key' else value}" for name, value in headers)
        log.debug("lab vault: %s %s with %s", method, path.partition("?")[0], shown)

    def respond(self, method: str, path: str, api_key: str | None, body: bytes | None) -> Reply:
        """Hook: the answer to one request; ``body`` None means it was larger than MAX_REQUEST_BODY."""
        path = path.partition("?")[0]
        routes: dict[str, tuple[str, Callable[[str | None, bytes | None], Reply]]] = {
            "version": ("GET", lambda key, body: VERSION), "health": ("GET", lambda key, body: HEALTH),
            "request-id": ("POST", self._request_id), "serial": ("POST", self._serial)}
        endpoint = path[len(API_PREFIX):] if path.startswith(API_PREFIX) else ""
        if endpoint not in routes:
            return NOT_FOUND
        allowed, handler = routes[endpoint]
        if method != allowed:
            return Reply(405)
        try:
            return handler(api_key, body)
        except Refusal as refusal:
            log.info("lab vault refused %s: %s: %s", endpoint, refusal.code, refusal.message)
            return refusal.reply()

    def _check_api_key(self, api_key: str | None) -> None:
        if not self.require_api_key:
            return
        if not api_key or not hmac.compare_digest(api_key.encode("utf-8"), self._api_key.encode("utf-8")):
            raise Refusal("invalid-api-key")

    def _request_id(self, api_key: str | None, body: bytes | None) -> Reply:
        self._check_api_key(api_key)
        with self._lock:
            now = self._now()
            self._purge_nonces(now)
            nonce = hashlib.sha1(f"{secrets.token_hex(32)}{int(now)}".encode("ascii")).hexdigest()
            self._nonces[nonce] = now
        return Reply(200, go_json({"success": True, "message": "", "request-id": nonce}), JSON_TYPE)

    def issued(self, request_id: str) -> bool:
        """Whether ``request_id`` was issued here, is unspent and not expired (nothing is burned)."""
        with self._lock:
            self._purge_nonces(self._now())
            return request_id in self._nonces

    def spend(self, request_id: str) -> None:
        """Burn ``request_id`` (a hook refusing a request that used it)."""
        with self._lock:
            self._nonces.pop(request_id, None)

    def _purge_nonces(self, now: float) -> None:
        for nonce in [n for n, issued in self._nonces.items() if now - issued > NONCE_MAX_AGE]:
            del self._nonces[nonce]

    def _serial(self, api_key: str | None, body: bytes | None) -> Reply:
        """Steps 1-9 of the reference's table leave the request-id alone; step 10 burns it."""
        self._check_api_key(api_key)
        return self.answer_serial(_check_stream(body))

    def answer_serial(self, request: Assertion) -> Reply:
        """Hook: step 10 on, for a serial-request that passed steps 1-9: burn its request-id, sign, answer."""
        with self._lock:
            self._purge_nonces(self._now())
            if self._nonces.pop(request.header("request-id"), None) is None:
                raise Refusal("invalid-nonce")
            if (request.header("brand-id"), request.header("model")) != (self.brand, self.model):
                raise Refusal("invalid-model")
            serial = _serial_number(request)
            if not serial:
                raise Refusal("create-assertion")
            signed = self._sign_serial(request, serial)
        return Reply(200, signed.encode(), ASSERTION_TYPE)

    def _sign_serial(self, request: Assertion, serial: str) -> Assertion:
        """Sign and record the serial (the caller holds the lock); duplicates only bump the revision."""
        record = (self.brand, self.model, serial)
        device_key, device_key_id = request.header("device-key"), request.sign_key_id
        if record in self._revisions or device_key_id in self._device_keys:
            log.warning("duplicate-assertion: serial %s and/or device key %s were already used to sign a device",
                        serial, device_key_id)
        revision = self._revisions.get(record, 0) + 1
        now = self._now()
        headers: dict[str, HeaderValue] = {
            "type": "serial", "authority-id": self.brand, "revision": str(revision), "brand-id": self.brand,
            "model": self.model, "serial": serial, "device-key": device_key,
            "device-key-sha3-384": device_key_id, "timestamp": rfc3339(now),
        }
        try:
            signed = self.sign_serial(headers, request.body, self._brand_key, int(now))
        except LocalFormatError as exc:
            log.info("lab vault cannot make serial %r: %s", serial, exc)
            raise Refusal("create-assertion") from None
        self._revisions[record] = revision
        self._device_keys.add(request.sign_key_id)
        return signed

    def sign_serial(self, headers: dict[str, HeaderValue], body: bytes, signer: keys.DeviceKey,
                    created: int) -> Assertion:
        """Hook: the serial assertion with ``headers`` and ``body``, signed by ``signer`` at ``created``."""
        return assertions.sign(headers, body, signer.public, signer.sign, created)

    # --- serving -----------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve in a background thread; returns the base URL."""
        if self._server is not None:
            raise RuntimeError("lab vault is already serving")
        server = _Server((host, port), self, ssl_context)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="lab-vault", daemon=True)
        self._thread.start()
        shown = f"[{host}]" if ":" in host else host
        self._url = f"{'https' if ssl_context else 'http'}://{shown}:{server.server_address[1]}{API_PREFIX}"
        return self._url

    def stop(self) -> None:
        """Stop serving and close the listening socket (a no-op when not serving)."""
        server, thread, self._server, self._thread, self._url = self._server, self._thread, None, None, ""
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join()

    def __enter__(self) -> LabVault:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


KEYGEN_PROGRESS_EVERY = 15.0  # seconds between "still making keys" lines (RSA-4096 takes minutes on armhf)


def _generate_pems(bits: int, count: int) -> list[bytes]:
    """``count`` new RSA keys made side by side in child processes, saying so while it takes."""
    log.info("lab vault: making %d RSA-%d key(s), one child process each (on a slow board this takes minutes)",
             count, bits)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(keys.generate_key_pem, bits) for _ in range(count)]
        while wait(futures, timeout=KEYGEN_PROGRESS_EVERY).not_done:
            log.info("lab vault: still making keys (%.0f s)", time.monotonic() - started)
        pems = [future.result() for future in futures]
    log.info("lab vault: keys made in %.1f s", time.monotonic() - started)
    return pems


def _account(account_id: str, display_name: str, stamp: str) -> dict[str, HeaderValue]:
    return {"type": "account", "authority-id": ROOT_ID, "account-id": account_id, "display-name": display_name,
            "timestamp": stamp, "username": account_id, "validation": "verified"}


def _account_key(account_id: str, public: openpgp.PublicKey) -> dict[str, HeaderValue]:
    return {"type": "account-key", "authority-id": ROOT_ID, "public-key-sha3-384": public.key_id,
            "account-id": account_id, "name": "lab", "since": ACCOUNT_KEY_SINCE}


def _serial_number(request: Assertion) -> str:
    header = request.headers.get("serial")
    return header if isinstance(header, str) and header else _yaml_serial(request.body)


def _check_stream(body: bytes | None) -> Assertion:
    """Steps 2-9: the serial-request of a well-formed, self-signed, consistent stream."""
    if body is None:
        raise Refusal("invalid-assertion", f"request body exceeds {MAX_REQUEST_BODY} bytes")
    if not body:
        raise Refusal("empty-data")
    try:
        stream = assertions.decode_stream(body)
    except AssertionFormatError as exc:
        raise Refusal("invalid-assertion", str(exc)) from None
    request, rest = stream[0], stream[1:]
    if request.type != "serial-request":
        raise Refusal("invalid-type")
    if (rest and rest[0].type != "model") or (len(rest) > 1 and rest[1].type != "serial"):
        raise Refusal("invalid-second-type")
    if len(rest) > 2:
        raise Refusal("invalid-assertion", UNEXPECTED)
    try:
        assertions.verify(request, openpgp.decode_public_key(request.header("device-key")))
    except AssertionFormatError as exc:
        raise Refusal("invalid-assertion", "could not validate serial-request self-signature "
                       f"(failed signature verification: openpgp: invalid signature: {exc})") from None
    pair = ("brand-id", "model")
    if rest and [rest[0].headers.get(h) for h in pair] != [request.headers.get(h) for h in pair]:
        raise Refusal("mismatched-model")
    if all(request.headers.get(h) for h in _REMODEL_HEADERS):
        raise Refusal("invalid-substore")  # a remodel needs a sub-store mapping; this vault has none
    if len(rest) > 1:
        raise Refusal("invalid-assertion", UNEXPECTED)
    return request


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with daemon threads; TLS handshakes happen in the connection's thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], vault: LabVault, context: ssl.SSLContext | None) -> None:
        self.vault, self.context = vault, context
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        """HTTPServer's, without its reverse DNS lookup of the host (getfqdn can stall for seconds)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_Handler.timeout)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.debug("lab vault: TLS handshake with %s failed: %s", client_address, exc)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("lab vault: error while serving %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    """Reads one request, asks the vault, writes its Reply. HTTP/1.0: one request per connection."""

    timeout = 30.0

    def version_string(self) -> str:
        return "lab-vault"

    def _dispatch(self) -> None:
        vault = cast(_Server, self.server).vault
        body = self._read_body()
        if isinstance(body, Reply):
            self._send(body)
            return
        try:
            vault.received(self.command, self.path, self.headers.items())
            reply = vault.respond(self.command, self.path, self.headers.get("api-key"), body)
        except Exception:  # a bug: answer like a Go panic, and keep serving
            log.exception("lab vault: internal error on %s %s", self.command, self.path)
            reply = Reply(500, go_json({"success": False, "error_code": "server-error", "error_subcode": "",
                                        "message": "internal server error", "StatusCode": 500}), JSON_TYPE)
        self._send(reply)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes | None | Reply:
        """The body by Content-Length; None when over the cap (drained so the client reads our answer)."""
        declared = self.headers.get("Content-Length", "0").strip()
        if not declared.isdigit():
            return Reply(400, b"400 Bad Request", PLAIN_TYPE)
        remaining, kept = int(declared), bytearray()
        if remaining > _MAX_DRAIN:
            return None
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
            if len(kept) <= MAX_REQUEST_BODY:
                kept += chunk
        return bytes(kept) if len(kept) <= MAX_REQUEST_BODY else None

    def _send(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            if reply.content_type is not None:
                self.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError) as exc:
            log.debug("lab vault: client went away: %s", exc)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.debug("lab vault: %s " + format, self.address_string(), *args)
