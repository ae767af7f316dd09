"""snapd mode's loopback relay: snapd's device-service.url points here, and each call goes on to the vault.

An asyncio server in the daemon's own loop, on a loopback address only (config.py
refuses any other), so what it learns reaches the driver's state on the loop's
thread; the driver runs the vault calls themselves in a thread. It speaks just
enough HTTP/1.1 for snapd's Go client: one request per connection, a
Content-Length body (Go sends one for both calls), answered with
``Connection: close``. It holds no state and makes no decision: the driver
(snapd.py) does both, through :class:`Handler`.

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
import json
import logging
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
    """What the relay asks of the driver: one call per endpoint, each answering what snapd gets."""

    async def relay_request_id(self) -> Response: ...

    async def relay_serial(self, body: bytes) -> Response: ...


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


def format_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{API_PREFIX}"


class Relay:
    """The listening relay. A bug while answering is logged, answered 500, and raised by :meth:`watch`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.url = ""
        self._server: asyncio.Server | None = None
        self._bug: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host``:``port`` (0: any free port); returns the URL for device-service.url."""
        try:
            self._server = await asyncio.start_server(self._connection, host, port, limit=MAX_HEAD)
        except OSError as exc:
            raise RelayError(f"cannot listen on {format_url(host, port)} for snapd: {exc.strerror or exc}") from None
        self.url = format_url(host, self._server.sockets[0].getsockname()[1])
        return self.url

    async def watch(self) -> None:
        """Returns never; raises the first bug met while answering (the daemon exits, systemd restarts it)."""
        await self._bug

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await read_request(reader)
        except _BadRequest as exc:
            log.warning("relay: refused a malformed request: %s", exc)
            return json_error(exc.status, "relay-bad-request", str(exc))
        endpoint = request.path[len(API_PREFIX):] if request.path.startswith(API_PREFIX) else ""
        if endpoint not in ENDPOINTS:
            return json_error(404, "relay-not-found", f"the relay serves {API_PREFIX}request-id and {API_PREFIX}serial only")
        if request.method != "POST":
            return json_error(405, "relay-method", f"{API_PREFIX}{endpoint} takes POST only")
        if endpoint == "request-id":
            return await self.handler.relay_request_id()
        return await self.handler.relay_serial(request.body)
