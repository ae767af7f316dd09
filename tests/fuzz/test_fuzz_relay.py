"""Fuzzing the relay's HTTP parser (h11 underneath) and the relay itself on loopback.

Targets (each a hypothesis test):

- ``relay.read_request`` on arbitrary bytes, delivered in arbitrary pieces: only the relay's
  ``_BadRequest`` (with one of the statuses it documents) or, for no byte at all,
  ``IncompleteReadError`` escapes, and a request that parses has a body of exactly its
  Content-Length, at most MAX_BODY, no Transfer-Encoding and each header once;
- ``relay.read_request`` on requests shaped like snapd's, with structured edits (a header
  twice, conflicting Content-Lengths, a Transfer-Encoding, a body longer or shorter than
  declared, odd spacing, non-ASCII): the oracle says which must be refused;
- a real :class:`relay.Relay` on 127.0.0.1 fed the same requests through a socket (as root, the
  only peer it answers): every answer is one HTTP response, errors as ``application/json``, the
  driver is reached only by a well-formed request with the token, and nothing is a bug.

The example count per target is ``$FACTORY_AGENT_FUZZ_EXAMPLES`` (default 300), as in
tests/fuzz/test_fuzz.py; ``make fuzz`` runs 100,000 per target (its loop collects every test in
tests/fuzz).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from agent import relay

EXAMPLES = int(os.environ.get("FACTORY_AGENT_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                       HealthCheck.large_base_example])
STATUSES = {400, 411, 413, 431}  # what read_request refuses with
TOKEN = "5a" * relay.TOKEN_BYTES


def _parse(data: bytes, cuts: list[int]) -> relay.Request | BaseException:
    """read_request over ``data`` delivered in pieces cut at ``cuts``, then EOF."""
    async def go() -> relay.Request:
        reader = asyncio.StreamReader(limit=relay.MAX_HEAD)
        loop = asyncio.get_running_loop()
        at = 0
        for cut in [*sorted({c for c in cuts if 0 < c < len(data)}), len(data)]:
            loop.call_soon(reader.feed_data, data[at:cut])
            at = cut
        loop.call_soon(reader.feed_eof)
        return await relay.read_request(reader)

    try:
        return asyncio.run(go())
    except (relay._BadRequest, asyncio.IncompleteReadError) as exc:
        return exc


def _check(data: bytes, got: relay.Request | BaseException) -> None:
    if isinstance(got, asyncio.IncompleteReadError):
        assert data == b"", "IncompleteReadError for a request that sent bytes"
        event("nothing sent")
        return
    if isinstance(got, relay._BadRequest):
        assert got.status in STATUSES, got.status
        assert "\n" not in str(got) and "\r" not in str(got) and str(got).isprintable(), repr(str(got))
        event(f"refused {got.status}")
        return
    assert isinstance(got, relay.Request)
    event("parsed")
    assert "transfer-encoding" not in got.headers
    assert len(got.body) == int(got.headers.get("content-length", "0")) <= relay.MAX_BODY
    assert all(name == name.lower() for name in got.headers)
    assert "?" not in got.path


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(0, 2048), max_size=6))
@example(b"", [])
@example(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", [])
@example(b"POST / HTTP/1.1\r\nHost: h\r\n" + b"X: " + b"y" * (relay.MAX_HEAD + 10) + b"\r\n\r\n", [])
def test_read_request_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    _check(data, _parse(data, cuts))


NAMES = ["Host", "User-Agent", "Content-Length", "Content-Type", "Transfer-Encoding", "Origin", "Accept-Encoding",
         "Snap-Device-Capabilities", relay.TOKEN_HEADER, "Api-Key", "X-\u00e9", "Bad Name", "", "Content-length"]
VALUES = ["127.0.0.1:8622", "0", "5", "4, 5", "5, 5", "-1", "00000005", "chunked", "identity", "gzip",
          relay.ASSERTION_TYPE, "serial-stream", TOKEN, " padded ", "\u2603", "\x00", "a\rb", "9" * 30, ""]
SEPARATORS = [b"\r\n", b"\n", b"\r"]


@st.composite
def snapd_like(draw: st.DrawFn) -> tuple[bytes, dict[str, list[str]]]:
    """A request as snapd sends it, then edited: (bytes, the headers it carries by lowercased name)."""
    method = draw(st.sampled_from(["POST", "GET", "post", "POST /x", ""]))
    target = draw(st.sampled_from(["/v1/serial", "/v1/request-id", "/v1/serial?x=1", "*", "/v1/s\u00e9rial", ""]))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 extra", ""]))
    body = draw(st.binary(max_size=64))
    headers = [("Host", "127.0.0.1:8622"), ("User-Agent", "snapd/2.57.6"), ("Content-Length", str(len(body))),
               ("Content-Type", relay.ASSERTION_TYPE), (relay.TOKEN_HEADER, TOKEN)]
    for _ in range(draw(st.integers(0, 4))):
        edit = draw(st.sampled_from(["add", "drop", "change", "twice"]))
        if edit == "add":
            headers.insert(draw(st.integers(0, len(headers))), (draw(st.sampled_from(NAMES)), draw(st.sampled_from(VALUES))))
        elif headers and edit == "drop":
            headers.pop(draw(st.integers(0, len(headers) - 1)))
        elif headers and edit == "change":
            i = draw(st.integers(0, len(headers) - 1))
            headers[i] = (headers[i][0], draw(st.sampled_from(VALUES)))
        elif headers:
            headers.append(headers[draw(st.integers(0, len(headers) - 1))])
    sep = draw(st.sampled_from(SEPARATORS)) if draw(st.booleans()) else b"\r\n"
    head = sep.join([f"{method} {target} {version}".encode()] +
                    [f"{name}: {value}".encode() for name, value in headers]) + sep + sep
    body = body + draw(st.sampled_from([b"", b"x", b"xxxxxxxxxx"])) if draw(st.booleans()) else body
    carried: dict[str, list[str]] = {}
    for name, value in headers:
        carried.setdefault(name.lower(), []).append(value)
    return head + body, carried


@FUZZ
@given(snapd_like(), st.lists(st.integers(0, 512), max_size=4))
@example((b"POST /v1/serial HTTP/1.1\r\nTransfer-Encoding: x\r\nHost: h\r\n\r\n", {"transfer-encoding": ["x"],
                                                                                 "host": ["h"]}), [])  # h11: 501
def test_read_request_snapd_like(request: tuple[bytes, dict[str, list[str]]], cuts: list[int]) -> None:
    data, carried = request
    got = _parse(data, cuts)
    _check(data, got)
    if isinstance(got, relay.Request):
        lengths = {part.strip() for value in carried.get("content-length", []) for part in value.split(",")}
        assert len(lengths) <= 1, f"conflicting Content-Length accepted: {carried['content-length']}"
        assert len(carried.get("host", [])) <= 1 and len(carried.get(relay.TOKEN_HEADER.lower(), [])) <= 1  # never twice
        assert "transfer-encoding" not in carried


class _Recording:
    """The driver's side of the relay: records what reached it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    async def relay_request_id(self, headers: dict[str, str]) -> relay.Response:
        self.calls.append(("request-id", b""))
        return relay.Response(200, b'{"request-id": "x"}', relay.JSON_TYPE)

    async def relay_serial(self, body: bytes, headers: dict[str, str]) -> relay.Response:
        self.calls.append(("serial", body))
        return relay.json_error(400, "relay-bad-request", "not a serial-request")


def _exchange(data: bytes) -> tuple[bytes, list[tuple[str, bytes]], bool]:
    """``data`` sent to a real relay on 127.0.0.1: (the answer, what reached the driver, whether it met a bug)."""
    async def go() -> tuple[bytes, list[tuple[str, bytes]], bool]:
        handler = _Recording()
        server = relay.Relay(handler, TOKEN)
        await server.start("127.0.0.1", 0)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # Host as the relay's own address, so that a well-formed request can reach the driver.
            writer.write(data.replace(b"127.0.0.1:8622", f"127.0.0.1:{port}".encode()))
            await writer.drain()
            try:  # no half-close: snapd never does
                answer = await asyncio.wait_for(reader.read(), 2)
            except TimeoutError:  # a request still waiting for bytes the relay was told would come
                answer = b""
            writer.close()
            await asyncio.sleep(0)
            return answer, handler.calls, server._bug.done()
        finally:
            server.close()

    return asyncio.run(go())


@pytest.mark.skipif(os.geteuid() != 0, reason="the relay answers root only")
@FUZZ
@given(snapd_like())
def test_the_relay_on_loopback(request: tuple[bytes, dict[str, list[str]]]) -> None:
    data, carried = request
    # A body shorter than declared waits for the rest (30 s): those are the parser's targets above.
    _, ended, body = data.partition(b"\r\n\r\n")
    declared = [int(v) for v in carried.get("content-length", []) if v.isascii() and v.isdigit()]
    if not ended or any(length > len(body) for length in declared):
        return
    answer, calls, bug = _exchange(data)
    assert not bug
    if not answer:  # the relay gave up on an incomplete request (it reads until its timeout, then closes)
        event("no answer")
        return
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), answer
    status = int(status_line.split(b" ")[1])
    head_lines, _, answer_body = rest.partition(b"\r\n\r\n")
    event(f"status {status}")
    if calls:
        assert carried.get(relay.TOKEN_HEADER.lower()) == [TOKEN] and len(calls) == 1
        assert "origin" not in carried and len(carried.get("host", [])) == 1
    if status >= 400:
        assert b"Content-Type: application/json\r\n" in head_lines + b"\r\n"
        assert json.loads(answer_body)["error_code"].startswith("relay-")
    if carried.get(relay.TOKEN_HEADER.lower()) != [TOKEN]:
        assert not calls, "a request without the token reached the driver"


def test_a_socket_peer_is_root_here() -> None:
    """The loopback target needs the real peer check to pass: the test process's own sockets are root's."""
    if os.geteuid() != 0:
        pytest.skip("not root")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, peer = server.accept()
            with accepted:
                assert relay.read_peer_uid(peer, accepted.getsockname()) == 0
                assert client.getsockname() == peer
