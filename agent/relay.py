"""snapd mode's loopback relay: snapd's device-service.url points here, and each call goes on to the vault.

An asyncio server in the daemon's own loop, on a loopback address only (config.py
refuses any other), so what it learns reaches the driver's state on the loop's
thread; the driver runs the vault calls themselves in a thread. It speaks just
enough HTTP/1.1 for snapd's Go client: one request per connection, a
Content-Length body (Go sends one for both calls), answered with
``Connection: close``. It answers root peers only (snapd), with snapd's Host and
Content-Type and no Origin, a bounded number at once and one exchange at a
time (docs/ubuntu-core.md, "Security"). It holds no registration state and makes
no decision: the driver (snapd.py) does both, through :class:`Handler`.

Every error reaches snapd with ``Content-Type: application/json`` exactly, the
only form in which snapd shows the message (snapd-device-protocol.md §3.3; the
Serial Vault itself says ``application/json; charset=UTF-8``, which snapd
reduces to "unexpected status 400"). The api-key is added by the vault client;
nothing here sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import json
import logging
import sys
from dataclasses import dataclass
from typing import Protocol

from . import registration
from .errors import AgentError, RelayError, RelayRefusedError

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"  # device-service.url is http://HOST:PORT/v1/, as a Serial Vault's base is
ENDPOINTS = ("request-id", "serial")
JSON_TYPE = "application/json"  # exactly this: snapd compares the whole header value
MAX_HEAD = 16 * 1024  # request line and headers; snapd sends well under 1 KiB
MAX_BODY = 1024 * 1024  # a serial-request and a model assertion: a few KiB
# More digits than MAX_BODY has is refused before int(): Python refuses int() of over 4300 digits
# (ValueError), and a long number is no body we take anyway.
MAX_LENGTH_DIGITS = 8
READ_TIMEOUT = 30.0  # a client that sends its request slower than this is not snapd
# Status for a failure with no HTTP answer from the vault. snapd retries what is above 500 (every
# 60 s) and gives up this attempt on anything else, so: above 500 unless a person must act first.
RETRY_STATUS, REFUSED_STATUS = 502, 400


ASSERTION_TYPE = "application/x.ubuntu.assertion"  # what snapd's serial POST carries, exactly
PEER_UID = 0  # snapd runs as root; nobody else has business with the relay
MAX_CONNECTIONS = 8  # snapd makes one call at a time; more at once is someone else's flood
# Waiting longer than this for the exchange before ours, plus our 25 s vault call, would pass the
# 30 s snapd gives one exchange (snapd-device-protocol.md §3.4): answer 503 (snapd retries) instead.
LOCK_WAIT = 4.0
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
# snapd's headers the vault may use (the Serial Vault reads Snap-Device-Capabilities to answer with a
# stream; User-Agent names snapd's version). Nothing else passes, above all no api-key from the client:
# the vault client adds the configured one.
FORWARDED_HEADERS = ("user-agent", "snap-device-capabilities")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query
    headers: dict[str, str]  # names lowercased
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str | None = None


class Handler(Protocol):
    """What the relay asks of the driver: one call per endpoint, each answering what snapd gets.

    ``headers`` are the client's headers the vault may see (forward_headers()), with their usual spelling.
    """

    async def relay_request_id(self, headers: dict[str, str]) -> Response: ...

    async def relay_serial(self, body: bytes, headers: dict[str, str]) -> Response: ...


def forward_headers(request: Request) -> dict[str, str]:
    """The allow-listed headers of ``request``, for the vault; a value that is not visible ASCII is dropped."""
    chosen = {}
    for name in FORWARDED_HEADERS:
        value = _header_value(request.headers.get(name))
        if value:
            chosen["-".join(part.capitalize() for part in name.split("-"))] = value
    return chosen


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_error(status: int, code: str, message: str) -> Response:
    """A JSON error in the Serial Vault's shape, so snapd (and a person with curl) read it the same way."""
    body = {"success": False, "error_code": code, "error_subcode": "", "message": message}
    return Response(status, json.dumps(body).encode("utf-8") + b"\n", JSON_TYPE)


def error_response(error: AgentError) -> Response:
    """The answer for a failure that has no vault answer to pass on (or one we refuse to pass on)."""
    # A request the relay refused is refused whatever retrying does (as the table in docs/ubuntu-core.md says).
    refused = isinstance(error, RelayRefusedError) or registration.needs_person(error)
    status = REFUSED_STATUS if refused else RETRY_STATUS
    return json_error(status, registration.error_code(error), str(error))


def passed_on(status: int, content_type: str | None, body: bytes, error: AgentError | None = None) -> Response:
    """The vault's answer for snapd: a success as it came; a refusal as JSON snapd shows.

    A refusal whose body is the vault's JSON object keeps its bytes, and so the
    vault's own message; any other body (a proxy's HTML, a bare 503) is replaced
    by one made of ``error``, the typed error the driver recorded for it.
    """
    if status < 300:
        return Response(status, body, _header_value(content_type))
    if _is_json_object(body):
        return Response(status, body, JSON_TYPE)
    if error is None:
        return json_error(status, f"http-{status}", f"the vault answered HTTP {status}")
    return json_error(status, registration.error_code(error), str(error))


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


def _header_value(value: str | None) -> str | None:
    """A header value we can repeat: visible ASCII only (anything else is dropped, not mangled)."""
    if value is None or not value.isascii() or not value.isprintable():
        return None
    return value


def encode_response(response: Response) -> bytes:
    try:
        phrase = http.HTTPStatus(response.status).phrase
    except ValueError:
        phrase = "Status"
    lines = [f"HTTP/1.1 {response.status} {phrase}"]
    if response.content_type:
        lines.append(f"Content-Type: {response.content_type}")
    lines += [f"Content-Length: {len(response.body)}", "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + response.body


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request: request line, headers, a Content-Length body. _BadRequest for anything else.

    A request cut short is answered too (the client may have closed its sending
    side only). Nothing but _BadRequest, ConnectionError or TimeoutError leaves
    here, whatever the bytes.
    """
    try:
        return await _read_request(reader)
    except (_BadRequest, ConnectionError, TimeoutError):
        raise
    except asyncio.IncompleteReadError as exc:
        if exc.expected is None and not exc.partial:
            raise  # connected and closed without a byte: nobody to answer
        raise _BadRequest(400, "the request ended before its end") from None
    except Exception as exc:  # noqa: BLE001 - any other parse failure is the client's malformed request
        raise _BadRequest(400, f"malformed request ({type(exc).__name__})") from None


async def _read_request(reader: asyncio.StreamReader) -> Request:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _BadRequest(431, f"the request's headers exceed {MAX_HEAD} bytes") from None
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name.strip() != name:
            raise _BadRequest(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "the relay takes a body with a Content-Length only")
    declared = headers.get("content-length", "0")
    if not (declared.isascii() and declared.isdigit()):
        raise _BadRequest(400, "invalid Content-Length")
    if len(declared) > MAX_LENGTH_DIGITS:
        raise _BadRequest(413, f"the request body exceeds {MAX_BODY} bytes")
    if int(declared) > MAX_BODY:
        raise _BadRequest(413, f"the request body exceeds {MAX_BODY} bytes")
    body = await reader.readexactly(int(declared))
    return Request(parts[0], parts[1].partition("?")[0], headers, body)


def parse_proc_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``0100007F:1F90`` from /proc/net/tcp{,6}: the address as 32-bit words in host byte order, the port in hex.

    An IPv4-mapped IPv6 address (a dual-stack socket) comes back as IPv4.
    """
    hex_ip, _, hex_port = text.partition(":")
    if len(hex_ip) not in (8, 32) or not hex_port:
        raise ValueError(f"not a /proc/net/tcp address: {text!r}")
    raw = b"".join(int(hex_ip[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(hex_ip), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, int(hex_port, 16)


def _plain(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address)
    return ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip


def find_peer_uid(table: str, peer: tuple[str, int], own: tuple[str, int]) -> int | None:
    """The uid owning the socket at ``peer`` connected to ``own``, from /proc/net/tcp{,6} text; None if absent.

    The peer's row has the peer as local address and us as remote (our own
    accepted socket is the mirror row, with our uid, and must not match).
    """
    want = ((_plain(peer[0]), peer[1]), (_plain(own[0]), own[1]))
    for line in table.splitlines()[1:]:
        fields = line.split()
        try:
            if (parse_proc_address(fields[1]), parse_proc_address(fields[2])) == want:
                return int(fields[7])
        except (ValueError, IndexError):
            continue
    return None


def read_peer_uid(peer: tuple[str, int], own: tuple[str, int]) -> int | None:
    """The peer's uid from the kernel's TCP tables (blocking); None when it cannot be told."""
    for path in PROC_NET_TCP:
        try:
            with open(path, encoding="ascii", errors="replace") as table:
                uid = find_peer_uid(table.read(), peer, own)
        except OSError:
            continue
        if uid is not None:
            return uid
    return None


def check_request_headers(request: Request, own_hosts: tuple[str, ...]) -> Response | None:
    """What snapd's Go client sends and a browser or a rebinding page cannot: anything else is refused."""
    if "origin" in request.headers:
        return json_error(403, "relay-forbidden", "the relay takes no requests from web pages (Origin header)")
    if request.headers.get("host", "").lower() not in own_hosts:
        return json_error(403, "relay-forbidden", f"the relay answers for Host {own_hosts[0]} only")
    if request.method == "POST" and request.path == API_PREFIX + "serial" and \
            request.headers.get("content-type") != ASSERTION_TYPE:
        return json_error(415, "relay-bad-request", f"{API_PREFIX}serial takes Content-Type {ASSERTION_TYPE} only")
    return None


def format_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{API_PREFIX}"


class Relay:
    """The listening relay. A bug while answering is logged, answered 500, and raised by :meth:`watch`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.url = ""
        self._server: asyncio.Server | None = None
        self._own: tuple[str, int] = ("", 0)
        self._own_hosts: tuple[str, ...] = ()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._exchange = asyncio.Lock()
        self._bug: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host``:``port`` (0: any free port); returns the URL for device-service.url."""
        try:
            self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD)
        except OSError as exc:
            raise RelayError(f"cannot listen on {format_url(host, port)} for snapd: {exc.strerror or exc}") from None
        port = self._server.sockets[0].getsockname()[1]
        self.url = format_url(host, port)
        shown = f"[{host}]" if ":" in host else host
        self._own, self._own_hosts = (host, port), (f"{shown}:{port}".lower(), f"localhost:{port}")
        return self.url

    async def watch(self) -> None:
        """Returns never; raises the first bug met while answering (the daemon exits, systemd restarts it)."""
        await self._bug

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            log.warning("relay: refused a connection: %d already open", MAX_CONNECTIONS)
            await self._answer(writer, json_error(503, "relay-busy", "the relay is busy; try again"), reader)
            return
        async with self._slots:
            refused = await self._check_peer(writer)
            if refused is not None:
                await self._answer(writer, refused, reader)  # not one byte of its request is parsed
                return
            await self._serve(reader, writer)

    async def _answer(self, writer: asyncio.StreamWriter, response: Response, reader: asyncio.StreamReader) -> None:
        """Answer without reading the request; then take in what it sent (briefly), so closing sends no reset."""
        try:
            writer.write(encode_response(response))
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(1.0):
                while await reader.read(MAX_HEAD):
                    pass
        except (ConnectionError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            response = await self._respond(reader)
            writer.write(encode_response(response))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            log.debug("relay: the client went away: %s", exc)
        except Exception as exc:  # a bug: never a traceback to the client; stop the daemon
            log.error("relay: internal error", exc_info=exc)
            with contextlib.suppress(ConnectionError):
                writer.write(encode_response(json_error(500, "internal", "internal error in the factory-agent relay; "
                                                                         "its journal has the details")))
            if not self._bug.done():
                self._bug.set_exception(exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _check_peer(self, writer: asyncio.StreamWriter) -> Response | None:
        """None for a peer running as root (snapd); a 403 for any other, or one whose uid cannot be told."""
        peer = writer.get_extra_info("peername")
        try:
            uid = await asyncio.to_thread(read_peer_uid, (peer[0], peer[1]), self._own) if peer else None
        except (ValueError, TypeError, IndexError, OSError):  # an address we cannot read: refuse
            uid = None
        if uid == PEER_UID:
            return None
        who = "a peer whose uid cannot be told" if uid is None else f"a process of uid {uid}"
        log.warning("relay: refused %s at %s: only snapd (uid %d) may use the relay", who, peer, PEER_UID)
        return json_error(403, "relay-forbidden", f"only snapd (uid {PEER_UID}) may use the relay")

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await read_request(reader)
        except _BadRequest as exc:
            log.warning("relay: refused a malformed request: %s", exc)
            return json_error(exc.status, "relay-bad-request", str(exc))
        refused = check_request_headers(request, self._own_hosts)
        if refused is not None:
            log.warning("relay: refused a request: %s", json.loads(refused.body)["message"])
            return refused
        endpoint = request.path[len(API_PREFIX):] if request.path.startswith(API_PREFIX) else ""
        if endpoint not in ENDPOINTS:
            return json_error(404, "relay-not-found", f"the relay serves {API_PREFIX}request-id and {API_PREFIX}serial only")
        if request.method != "POST":
            return json_error(405, "relay-method", f"{API_PREFIX}{endpoint} takes POST only")
        try:
            async with asyncio.timeout(LOCK_WAIT):
                await self._exchange.acquire()
        except TimeoutError:
            log.warning("relay: answered 503: another exchange held the relay for over %g s", LOCK_WAIT)
            return json_error(503, "relay-busy", "the relay is busy with another exchange; try again")
        try:  # one exchange at a time: snapd makes one call at a time, and so must anyone else
            if endpoint == "request-id":
                return await self.handler.relay_request_id(forward_headers(request))
            return await self.handler.relay_serial(request.body, forward_headers(request))
        finally:
            self._exchange.release()
