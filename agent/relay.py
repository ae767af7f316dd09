"""snapd mode's loopback relay: snapd's device-service.url points here, and each call goes on to the vault.

An asyncio server in the daemon's own loop, on a loopback address only (config.py
refuses any other), so what it learns reaches the driver's state on the loop's
thread; the driver runs the vault calls themselves in a thread. It parses HTTP/1.1
with h11, and takes what snapd's Go client sends: one request per connection, a
Content-Length body (Go sends one for both calls), answered with
``Connection: close``. It answers only a peer that is a live, established socket
of root (snapd), checked when it connects and again once its request is read,
that carries the relay's token (``device-service.headers``, set by the
prepare-device hook), with snapd's Host and Content-Type and no Origin; a
bounded number of root connections at once and one exchange at a time
(docs/ubuntu-core.md, "Security"). It holds no registration state and makes no
decision: the driver (snapd.py) does both, through :class:`Handler`.

Every error reaches snapd with ``Content-Type: application/json`` exactly, the
only form in which snapd shows the message (snapd-device-protocol.md §3.3; the
Serial Vault itself says ``application/json; charset=UTF-8``, which snapd
reduces to "unexpected status 400"). The api-key is added by the vault client;
nothing here sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import http
import ipaddress
import json
import logging
import os
import secrets
import socket
import struct
import sys
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

import h11

from . import registration, store
from .errors import AgentError, Code, RelayError, RelayRefusedError, StoreError, UntrustedFileError

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"  # device-service.url is http://HOST:PORT/v1/, as a Serial Vault's base is
ENDPOINTS = ("request-id", "serial")
JSON_TYPE = "application/json"  # exactly this: snapd compares the whole header value
MAX_HEAD = 16 * 1024  # request line and headers; snapd sends well under 1 KiB
MAX_BODY = 1024 * 1024  # a serial-request and a model assertion: a few KiB
MAX_LENGTH_DIGITS = 8  # a longer Content-Length (leading zeros included) is no body we take
READ_TIMEOUT = 30.0  # a client that sends its request slower than this is not snapd
# Status for a failure with no HTTP answer from the vault. snapd retries what is above 500 (every
# 60 s) and gives up this attempt on anything else, so: above 500 unless a person must act first.
RETRY_STATUS, REFUSED_STATUS = 503, 400
# Vault answers that mean "not now" but that snapd would take as the end of its attempt (it retries only
# above 500; anything else waits its change backoff, 5 min doubling to 24 h): passed on as RETRY_STATUS,
# with the vault's JSON body, so that snapd tries again in 60 s.
SNAPD_FINAL_TRANSIENT = frozenset({408, 425, 429, 500})


ASSERTION_TYPE = "application/x.ubuntu.assertion"  # what snapd's serial POST carries, exactly
PEER_UID = 0  # snapd runs as root; nobody else has business with the relay
MAX_CONNECTIONS = 8  # root connections at once; snapd makes one call at a time, more is someone else's flood
# A refused peer is answered and closed at once. The first few at a time are given up to a second
# to finish sending (so that closing sends no reset and a person with curl reads the 403); any
# more than that are closed without waiting. None of them ever holds one of the 8 slots.
MAX_DRAINING, DRAIN_SECONDS = 2, 1.0
REFUSAL_LOG_SECONDS = 60.0  # one journal line per uid and minute for refused peers, with a count
# Waiting longer than this for the exchange before ours, plus our 25 s vault call, would pass the
# 30 s snapd gives one exchange (snapd-device-protocol.md §3.4): answer 503 (snapd retries) instead.
LOCK_WAIT = 4.0
PROC_NET_TCP = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2 = 1, 4, 5  # linux/tcp_states.h; "01", "04", "05" in /proc/net/tcp
# Before the request is read (for a slot), a root socket that has shut its sending side (FIN_WAIT, but
# still open: its inode is there) is still root's; before anything is bound or forwarded, ESTABLISHED only.
ESTABLISHED = frozenset({TCP_ESTABLISHED})
OPEN = frozenset({TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2})
# The second factor: a random token that only the agent (its state directory, 0600) and snapd (the
# gadget's device-service.headers, set by the prepare-device hook from GetRegistrationSettings(),
# which only root may call) hold. snapd sends device-service.headers on both calls (req.Header.Set).
TOKEN_HEADER = "Factory-Agent-Relay-Token"
TOKEN_FILE = "relay-token"
TOKEN_BYTES = 32
# snapd's headers the vault may use (the Serial Vault reads Snap-Device-Capabilities to answer with a
# stream; User-Agent names snapd's version). Nothing else passes, above all no api-key from the client:
# the vault client adds the configured one.
FORWARDED_HEADERS = ("user-agent", "snap-device-capabilities")


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # without the query
    headers: dict[str, str]  # names lowercased, each at most once
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


class Refusal(StrEnum):
    """The relay's own error_code values in its JSON answers to snapd (the vault's pass through as they came)."""

    FORBIDDEN = "relay-forbidden"  # not snapd: a wrong peer, Host, Origin or token
    BAD_REQUEST = Code.RELAY_BAD_REQUEST.value  # not HTTP the relay takes, or not a serial-request
    BUSY = "relay-busy"  # another exchange is in progress
    NOT_FOUND = "relay-not-found"
    METHOD = "relay-method"
    UNKNOWN_REQUEST_ID = "relay-unknown-request-id"  # a serial-request on a request-id not handed out lately
    PENDING = "relay-pending"  # secure onboarding: the vault still signs; the agent polls it (snapd.ABSORB_SECONDS)


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
    status = RETRY_STATUS if status in SNAPD_FINAL_TRANSIENT else status
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
    """One request, parsed by h11: request line, headers, a Content-Length body. _BadRequest for anything else.

    A request cut short is answered too (the client may have closed its sending
    side only). Nothing but _BadRequest, ConnectionError, TimeoutError or an
    IncompleteReadError (connected and closed without a byte: nobody to answer)
    leaves here, whatever the bytes.
    """
    try:
        return await _read_request(reader)
    except (_BadRequest, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
        raise
    except h11.RemoteProtocolError as exc:
        if "Transfer-Encoding" in str(exc):  # h11 says 501 for one it does not know: ours is one rule
            raise _BadRequest(411, "the relay takes a body with a Content-Length only") from None
        status = exc.error_status_hint if exc.error_status_hint in (400, 413, 431) else 400
        raise _BadRequest(status, f"malformed request: {printable(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - any other parse failure is the client's malformed request
        raise _BadRequest(400, f"malformed request ({type(exc).__name__})") from None


def printable(text: str, limit: int = 120) -> str:
    """The peer's words for a log line and its answer: one line of printable ASCII, bounded."""
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= limit else shown[:limit] + "..."


async def _read_request(reader: asyncio.StreamReader) -> Request:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    head: tuple[str, str, dict[str, str]] | None = None
    body = bytearray()
    received = False
    pending = b""  # read, not yet given to h11: the head gets MAX_HEAD bytes at most, however they came
    fed = 0
    while True:
        try:
            event = conn.next_event()
        except ValueError:  # h11 0.14's int() of a Content-Length of over 4300 digits: no body we take anyway
            raise _BadRequest(413, f"the request body exceeds {MAX_BODY} bytes") from None
        if event is h11.NEED_DATA:
            if head is None and fed >= MAX_HEAD:  # h11 bounds an incomplete head only, not one that came whole
                raise _BadRequest(431, f"the request's headers exceed {MAX_HEAD} bytes")
            data = pending or await reader.read(64 * 1024)
            if not data and not received:
                raise asyncio.IncompleteReadError(b"", None)
            received = received or bool(data)
            if head is None and data:
                data, pending = data[:MAX_HEAD - fed], data[MAX_HEAD - fed:]
            else:
                pending = b""
            fed += len(data)
            conn.receive_data(data)  # b"": the peer closed its side
        elif isinstance(event, h11.Request):
            head = _head(event)
        elif isinstance(event, h11.Data):
            body += event.data  # h11 stops at the Content-Length, which _head() capped at MAX_BODY
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None  # h11 gives a Request first
            return Request(head[0], head[1], head[2], bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise _BadRequest(400, "the request ended before its end")
        else:  # h11.PAUSED cannot come before the end of the first request
            raise _BadRequest(400, f"unexpected HTTP event {type(event).__name__}")


def _head(event: h11.Request) -> tuple[str, str, dict[str, str]]:
    """Method, path and headers of a request h11 accepted, if the relay takes it; else _BadRequest."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in event.headers:
        name = raw_name.decode("ascii").lower()  # h11 allows token characters only in names
        if name in headers:  # Go sends each header once; two Hosts or Content-Types are someone else's
            raise _BadRequest(400, f"the header {printable(name, 40)} appears twice")
        headers[name] = raw_value.decode("latin-1")
    if "transfer-encoding" in headers:
        raise _BadRequest(411, "the relay takes a body with a Content-Length only")
    # h11 has refused conflicting Content-Length headers, merged identical ones and checked the digits.
    declared = headers.get("content-length", "0")
    if len(declared) > MAX_LENGTH_DIGITS or int(declared) > MAX_BODY:
        raise _BadRequest(413, f"the request body exceeds {MAX_BODY} bytes")
    target = event.target.decode("latin-1")
    return event.method.decode("latin-1"), target.partition("?")[0], headers


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


def find_peer_uid(table: str, peer: tuple[str, int], own: tuple[str, int],
                  states: frozenset[int] = ESTABLISHED) -> int | None:
    """The uid owning the live socket at ``peer`` connected to ``own``, from /proc/net/tcp{,6} text; else None.

    The peer's row has the peer as local address and us as remote (our own
    accepted socket is the mirror row, with our uid, and must not match). Only
    a row in one of ``states`` (ESTABLISHED, ``01``, unless told) with an inode
    counts: once a process closes its socket the kernel keeps a FIN_WAIT or
    TIME_WAIT mini-socket listed with uid 0 and inode 0, which says nothing
    about who sent the request.
    """
    want = ((_plain(peer[0]), peer[1]), (_plain(own[0]), own[1]))
    for line in table.splitlines()[1:]:
        fields = line.split()
        try:
            if (parse_proc_address(fields[1]), parse_proc_address(fields[2])) == want:
                if int(fields[3], 16) not in states or int(fields[9]) == 0:
                    return None
                return int(fields[7])
        except (ValueError, IndexError):
            continue
    return None


def proc_peer_uid(peer: tuple[str, int], own: tuple[str, int], states: frozenset[int] = ESTABLISHED) -> int | None:
    """The peer's uid from /proc/net/tcp{,6} (blocking; the fallback where sock_diag is not allowed)."""
    for path in PROC_NET_TCP:
        try:
            with open(path, encoding="ascii", errors="replace") as table:
                uid = find_peer_uid(table.read(), peer, own, states)
        except OSError:
            continue
        if uid is not None:
            return uid
    return None


# NETLINK_SOCK_DIAG (linux/sock_diag.h, linux/inet_diag.h): ask the kernel for exactly one socket.
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLMSG_ERROR = 0x1, 0x2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ_V2 = struct.Struct("=BBBBI")  # sdiag_family, sdiag_protocol, idiag_ext, pad, idiag_states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport (big-endian), src, dst; then if and cookie, host order
_SOCKID_TAIL = struct.Struct("=III")  # idiag_if, idiag_cookie[2]
_DIAG_MSG = struct.Struct("=BBBB")  # idiag_family, idiag_state, idiag_timer, idiag_retrans (then the sockid)
_DIAG_MSG_TAIL = struct.Struct("=IIIII")  # idiag_expires, idiag_rqueue, idiag_wqueue, idiag_uid, idiag_inode
_DIAG_MSG_SIZE = _DIAG_MSG.size + _SOCKID.size + _SOCKID_TAIL.size + _DIAG_MSG_TAIL.size  # 72


def diag_request(family: int, src: bytes, sport: int, dst: bytes, dport: int, seq: int = 1) -> bytes:
    """An inet_diag_req_v2 for the TCP socket bound to ``src:sport`` and connected to ``dst:dport``."""
    sockid = _SOCKID.pack(sport, dport, src.ljust(16, b"\0"), dst.ljust(16, b"\0")) + \
        _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    body = _REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_ESTABLISHED) + sockid
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + body


def parse_diag_answer(data: bytes, src: bytes, sport: int, dst: bytes, dport: int,
                      states: frozenset[int] = ESTABLISHED) -> int | None:
    """The uid in the kernel's answer to diag_request(), if it is that socket, in ``states``, with an inode.

    None for "no such socket" (ENOENT) and for any socket not in that state (a
    TIME_WAIT or FIN_WAIT mini-socket has uid 0 and inode 0); OSError for any
    other netlink error, so that the caller falls back to /proc.
    """
    if len(data) < _NLMSGHDR.size:
        raise OSError(errno.EPROTO, "short netlink answer")
    length, kind, _, _, _ = _NLMSGHDR.unpack_from(data)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
        if -code == errno.ENOENT:
            return None
        raise OSError(-code, os.strerror(-code))
    if kind != SOCK_DIAG_BY_FAMILY or length < _NLMSGHDR.size + _DIAG_MSG_SIZE or len(data) < length:
        raise OSError(errno.EPROTO, f"unexpected netlink answer (type {kind}, {len(data)} bytes)")
    at = _NLMSGHDR.size
    _, state, _, _ = _DIAG_MSG.unpack_from(data, at)
    got_sport, got_dport, got_src, got_dst = _SOCKID.unpack_from(data, at + _DIAG_MSG.size)
    _, _, _, uid, inode = _DIAG_MSG_TAIL.unpack_from(data, at + _DIAG_MSG.size + _SOCKID.size + _SOCKID_TAIL.size)
    wanted = (sport, dport, src.ljust(16, b"\0"), dst.ljust(16, b"\0"))
    if (got_sport, got_dport, got_src, got_dst) != wanted or state not in states or inode == 0:
        return None
    return int(uid)


def diag_peer_uid(peer: tuple[str, int], own: tuple[str, int], states: frozenset[int] = ESTABLISHED) -> int | None:
    """The peer's uid through NETLINK_SOCK_DIAG; OSError where the kernel or a sandbox does not allow it.

    The peer's socket is the one bound to ``peer`` and connected to ``own``. An
    IPv4 peer may be an AF_INET socket or a dual-stack AF_INET6 one (with
    IPv4-mapped addresses): both are asked for.
    """
    src_ip, dst_ip = _plain(peer[0]), _plain(own[0])
    if isinstance(src_ip, ipaddress.IPv4Address) and isinstance(dst_ip, ipaddress.IPv4Address):
        asks = [(socket.AF_INET, src_ip.packed, dst_ip.packed),
                (socket.AF_INET6, ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + src_ip.packed).packed,
                 ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + dst_ip.packed).packed)]
    elif isinstance(src_ip, ipaddress.IPv6Address) and isinstance(dst_ip, ipaddress.IPv6Address):
        asks = [(socket.AF_INET6, src_ip.packed, dst_ip.packed)]
    else:
        return None
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)  # the kernel answers within the send; this only bounds a surprise
        for seq, (family, src, dst) in enumerate(asks, 1):
            nl.send(diag_request(family, src, peer[1], dst, own[1], seq))
            uid = parse_diag_answer(nl.recv(8192), src, peer[1], dst, own[1], states)
            if uid is not None:
                return uid
    return None


def read_peer_uid(peer: tuple[str, int], own: tuple[str, int], states: frozenset[int] = ESTABLISHED) -> int | None:
    """The uid of the live socket at ``peer`` connected to ``own``; None when it cannot be told.

    NETLINK_SOCK_DIAG first (one exact lookup, no table to read); /proc/net/tcp{,6}
    where netlink is refused (a sandbox without it). Neither counts a socket
    that is not in ``states`` (ESTABLISHED unless told) or has no inode.
    """
    try:
        return diag_peer_uid(peer, own, states)
    except OSError as exc:
        log.debug("relay: sock_diag unavailable (%s); reading /proc/net/tcp", exc)
    return proc_peer_uid(peer, own, states)


def load_token(directory: Path) -> str:
    """The relay's token from ``directory``/relay-token (0600, the agent's own), made on first use (blocking).

    It is kept across restarts on purpose: snapd keeps the device-service.headers
    the hook set for the whole attempt, and a request-serial task that resumes
    after a reboot or a snapd restart does not run the hook again, so a token
    new at each start would lock snapd out until its next attempt (5 min to
    24 h later). A file that is not what we wrote (not a regular file, another
    owner, readable by others, not 64 hex digits) is replaced, with a warning.
    """
    path = directory / TOKEN_FILE
    try:
        text = store.read_owned(path, 2 * TOKEN_BYTES + 1, private=True)
    except UntrustedFileError as exc:
        log.warning("replacing %s: %s", path, str(exc).removeprefix(f"cannot use {path}: "))
        return _new_token(path)
    except StoreError as exc:
        raise RelayError(str(exc)) from None
    if text is None:
        return _new_token(path)
    token = text.decode("ascii", "replace").strip()
    if len(token) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in token):
        return token
    log.warning("replacing %s: not a token", path)
    return _new_token(path)


def _new_token(path: Path) -> str:
    """A fresh token, written as every state file is (temp, fsync, rename over whatever was there, dir fsync)."""
    token = secrets.token_hex(TOKEN_BYTES)
    try:
        store.write_durable(path, token.encode("ascii") + b"\n", mode=0o600)
    except OSError as exc:
        raise RelayError(f"cannot write {path}: {exc.strerror or exc}") from None
    return token


def token_headers(token: str) -> str:
    """The value of snapd's device-service.headers: a JSON object of strings (compact, one line)."""
    return json.dumps({TOKEN_HEADER: token}, separators=(",", ":"))


def check_request_headers(request: Request, own_hosts: tuple[str, ...]) -> Response | None:
    """What snapd's Go client sends and a browser or a rebinding page cannot: anything else is refused."""
    if "origin" in request.headers:
        return json_error(403, Refusal.FORBIDDEN, "the relay takes no requests from web pages (Origin header)")
    if request.headers.get("host", "").lower() not in own_hosts:
        return json_error(403, Refusal.FORBIDDEN, f"the relay answers for Host {own_hosts[0]} only")
    if request.method == "POST" and request.path == API_PREFIX + "serial" and \
            request.headers.get("content-type") != ASSERTION_TYPE:
        return json_error(415, Refusal.BAD_REQUEST, f"{API_PREFIX}serial takes Content-Type {ASSERTION_TYPE} only")
    return None


def format_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{API_PREFIX}"


def token_matches(request: Request, token: str) -> bool:
    """Whether ``request`` carries the relay's token (compared in constant time)."""
    sent = request.headers.get(TOKEN_HEADER.lower(), "")
    return hmac.compare_digest(sent.encode("latin-1"), token.encode("ascii"))


class _RefusalLog:
    """One journal line per uid and minute for refused peers, so that a flood cannot fill the journal."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}  # who -> (when logged, refused since)

    def refused(self, who: str, peer: object, reason: str) -> None:
        now = time.monotonic()
        logged, since = self._last.get(who, (float("-inf"), 0))
        if now - logged < REFUSAL_LOG_SECONDS:
            self._last[who] = (logged, since + 1)
            return
        more = f" ({since} more refused since the last line)" if since else ""
        log.warning("relay: refused %s at %s: %s%s", who, peer, reason, more)
        if len(self._last) > 1024:  # a flood from many uids: forget, at worst log again
            self._last.clear()
        self._last[who] = (now, 0)


class Relay:
    """The listening relay. A bug while answering is logged, answered 500, and raised by :meth:`watch`.

    ``token`` is the second factor: a request without it is refused (load_token()).
    """

    def __init__(self, handler: Handler, token: str) -> None:
        if len(token) < 32:
            raise ValueError("the relay's token is too short")
        self.handler = handler
        self.token = token
        self.url = ""
        self._server: asyncio.Server | None = None
        self._own_hosts: tuple[str, ...] = ()
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)  # root peers only
        self._draining = 0
        self._exchange = asyncio.Lock()
        self._refusals = _RefusalLog()
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
        self._own_hosts = (f"{shown}:{port}".lower(), f"localhost:{port}")
        return self.url

    async def watch(self) -> None:
        """Returns never; raises the first bug met while answering (the daemon exits, systemd restarts it)."""
        await self._bug

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection. Whatever the peer does (hang up, reset, send junk), no traceback reaches the journal."""
        try:
            await self._handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:  # the peer went away
            log.debug("relay: the client went away: %s", exc)
        except Exception as exc:  # a bug: never a traceback to the client; stop the daemon
            log.error("relay: internal error", exc_info=exc)
            with contextlib.suppress(OSError, RuntimeError):
                writer.write(encode_response(json_error(500, Code.INTERNAL, "internal error in the factory-agent relay; "
                                                                         "its journal has the details")))
            if not self._bug.done():
                self._bug.set_exception(exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, own = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        # First the peer, before it takes a slot: a refused peer never holds one.
        refused = await self._check_peer(peer, own, OPEN)
        if refused is not None:
            await self._refuse(writer, refused, reader)
            return
        if self._slots.locked():
            log.warning("relay: refused a connection: %d already open", MAX_CONNECTIONS)
            await self._refuse(writer, json_error(503, Refusal.BUSY, "the relay is busy; try again"), reader)
            return
        async with self._slots:
            response = await self._respond(reader, peer, own)
            writer.write(encode_response(response))
            await writer.drain()

    async def _refuse(self, writer: asyncio.StreamWriter, response: Response, reader: asyncio.StreamReader) -> None:
        """Answer without reading the request, and close. The first MAX_DRAINING refused connections at a time
        take in what their peer still sends for up to DRAIN_SECONDS, so closing sends no reset; the rest close
        at once."""
        writer.write(encode_response(response))
        await writer.drain()
        if self._draining >= MAX_DRAINING:
            return
        self._draining += 1
        try:
            writer.write_eof()
            async with asyncio.timeout(DRAIN_SECONDS):
                while await reader.read(MAX_HEAD):
                    pass
        except TimeoutError:
            pass
        finally:
            self._draining -= 1

    async def _check_peer(self, peer: object, own: object, states: frozenset[int] = ESTABLISHED) -> Response | None:
        """None for a live socket of root (snapd) in ``states``; a 403 for any other, or one that cannot be told."""
        where: tuple[str, int] | None = None
        mine: tuple[str, int] | None = None
        if isinstance(peer, tuple) and isinstance(own, tuple):  # else the peer was gone before it was accepted
            with contextlib.suppress(IndexError, ValueError, TypeError):
                where, mine = (str(peer[0]), int(peer[1])), (str(own[0]), int(own[1]))
        uid = None
        if where is not None and mine is not None:
            try:
                uid = await asyncio.to_thread(read_peer_uid, where, mine, states)
            except (ValueError, TypeError, IndexError, OSError):  # an address we cannot read: refuse
                uid = None
        if uid == PEER_UID:
            return None
        who = "a peer with no live socket (gone, or its uid cannot be told)" if uid is None else f"a process of uid {uid}"
        self._refusals.refused(who, peer, f"only snapd (uid {PEER_UID}) may use the relay")
        return json_error(403, Refusal.FORBIDDEN, f"only snapd (uid {PEER_UID}) may use the relay")

    async def _respond(self, reader: asyncio.StreamReader, peer: object, own: object) -> Response:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await read_request(reader)
        except _BadRequest as exc:
            log.warning("relay: refused a malformed request: %s", exc)
            return json_error(exc.status, Refusal.BAD_REQUEST, str(exc))
        # Again, now that the request is in: the socket that sent it must still be root's, live and
        # established. One that sent and closed at once is a mini-socket now, whoever sent it.
        refused = await self._check_peer(peer, own, ESTABLISHED)
        if refused is not None:
            return refused
        if not token_matches(request, self.token):
            self._refusals.refused("a root process without the relay's token", peer,
                                   "only snapd holds it (device-service.headers, set by the prepare-device hook)")
            return json_error(403, Refusal.FORBIDDEN, "only snapd may use the relay: no or a wrong relay token "
                                                      "(the prepare-device hook sets it in device-service.headers)")
        refused = check_request_headers(request, self._own_hosts)
        if refused is not None:
            log.warning("relay: refused a request: %s", json.loads(refused.body)["message"])
            return refused
        endpoint = request.path[len(API_PREFIX):] if request.path.startswith(API_PREFIX) else ""
        if endpoint not in ENDPOINTS:
            return json_error(404, Refusal.NOT_FOUND, f"the relay serves {API_PREFIX}request-id and {API_PREFIX}serial only")
        if request.method != "POST":
            return json_error(405, Refusal.METHOD, f"{API_PREFIX}{endpoint} takes POST only")
        try:
            async with asyncio.timeout(LOCK_WAIT):
                await self._exchange.acquire()
        except TimeoutError:
            log.warning("relay: answered 503: another exchange held the relay for over %g s", LOCK_WAIT)
            return json_error(503, Refusal.BUSY, "the relay is busy with another exchange; try again")
        try:  # one exchange at a time: snapd makes one call at a time, and so must anyone else
            if endpoint == "request-id":
                return await self.handler.relay_request_id(forward_headers(request))
            return await self.handler.relay_serial(request.body, forward_headers(request))
        finally:
            self._exchange.release()
