"""Who may use the relay: the peer's uid from /proc/net/tcp text and from sock_diag answers, the token, the
headers snapd sends, and the bounds on connections and on waiting for the exchange (a real relay on 127.0.0.1,
the uid lookup faked where a test needs another uid than its own; tests/dbus/test_relay.py has real ones)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import sys
from pathlib import Path

import pytest

from agent import relay

# Rows as the kernel prints them on a little-endian machine: a client (uid 1000) on 127.0.0.1:40000
# connected to the relay on 127.0.0.1:8622, the relay's accepted socket (uid 0) mirroring it, the listener.
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:21AE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 640 1 0 100 0 0 10 0
   1: 0100007F:9C40 0100007F:21AE 01 00000000:00000000 00:00000000 00000000  1000        0 700 1 0 20 4 30 10 -1
   2: 0100007F:21AE 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 701 1 0 20 4 30 10 -1
"""
# A dual-stack client socket (tcp6, IPv4-mapped) of uid 0 on port 40001, and an IPv6 client of uid 65534 on ::1.
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:9C41 0000000000000000FFFF00000100007F:21AE 01 00000000:00000000 00:00000000 00000000     0        0 702 1 0 20 4 30 10 -1
   1: 00000000000000000000000001000000:9C42 00000000000000000000000001000000:21AE 01 00000000:00000000 00:00000000 00000000 65534        0 703 1 0 20 4 30 10 -1
"""  # noqa: E501 - lines as the kernel writes /proc/net/tcp6
# The same peer after it closed its socket: a TIME_WAIT (06) or FIN_WAIT2 (05) mini-socket, uid 0, inode 0; and
# one that shut its sending side only (FIN_WAIT2, still open: its inode is there).
CLOSED = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   1: 0100007F:9C40 0100007F:21AE 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   2: 0100007F:9C41 0100007F:21AE 05 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000000000000
   3: 0100007F:9C42 0100007F:21AE 05 00000000:00000000 00:00000000 00000000  1000        0 705 1 0 20 4 30 10 -1
"""
little = pytest.mark.skipif(sys.byteorder != "little", reason="the sample rows are a little-endian kernel's")


@little
def test_proc_addresses_decode_to_ip_and_port() -> None:
    assert relay.parse_proc_address("0100007F:21AE") == (relay._plain("127.0.0.1"), 8622)
    assert relay.parse_proc_address("0000000000000000FFFF00000100007F:9C41") == (relay._plain("127.0.0.1"), 40001)
    assert relay.parse_proc_address("00000000000000000000000001000000:9C42") == (relay._plain("::1"), 40002)
    with pytest.raises(ValueError):
        relay.parse_proc_address("7F:1")


@little
def test_the_peer_row_gives_the_peers_uid_not_the_relays_own() -> None:
    assert relay.find_peer_uid(TCP, ("127.0.0.1", 40000), ("127.0.0.1", 8622)) == 1000
    assert relay.find_peer_uid(TCP6, ("127.0.0.1", 40001), ("127.0.0.1", 8622)) == 0
    assert relay.find_peer_uid(TCP6, ("::ffff:127.0.0.1", 40001), ("127.0.0.1", 8622)) == 0
    assert relay.find_peer_uid(TCP6, ("::1", 40002), ("::1", 8622)) == 65534


@little
def test_a_closed_peers_mini_socket_tells_no_uid_and_a_half_closed_one_counts_only_before_the_request() -> None:
    for port in (40000, 40001):
        for states in (relay.ESTABLISHED, relay.OPEN):
            assert relay.find_peer_uid(CLOSED, ("127.0.0.1", port), ("127.0.0.1", 8622), states) is None
    assert relay.find_peer_uid(CLOSED, ("127.0.0.1", 40002), ("127.0.0.1", 8622)) is None
    assert relay.find_peer_uid(CLOSED, ("127.0.0.1", 40002), ("127.0.0.1", 8622), relay.OPEN) == 1000


def _diag_answer(state: int, uid: int, inode: int, sport: int = 40000, dport: int = 8622) -> bytes:
    """An inet_diag_msg as the kernel sends it for 127.0.0.1:sport -> 127.0.0.1:dport."""
    src = dst = socket.inet_aton("127.0.0.1").ljust(16, b"\0")
    msg = struct.pack("=BBBB", socket.AF_INET, state, 0, 0) + struct.pack("!HH16s16s", sport, dport, src, dst) + \
        struct.pack("=III", 0, 1, 2) + struct.pack("=IIIII", 0, 0, 0, uid, inode)
    return struct.pack("=IHHII", 16 + len(msg), relay.SOCK_DIAG_BY_FAMILY, 0, 1, 0) + msg


def test_a_sock_diag_answer_counts_only_an_established_socket_with_an_inode() -> None:
    ip = socket.inet_aton("127.0.0.1")
    assert relay.parse_diag_answer(_diag_answer(1, 1000, 700), ip, 40000, ip, 8622) == 1000
    assert relay.parse_diag_answer(_diag_answer(1, 0, 700), ip, 40000, ip, 8622) == 0
    assert relay.parse_diag_answer(_diag_answer(6, 0, 0), ip, 40000, ip, 8622) is None  # TIME_WAIT
    assert relay.parse_diag_answer(_diag_answer(5, 0, 0), ip, 40000, ip, 8622, relay.OPEN) is None  # closed
    assert relay.parse_diag_answer(_diag_answer(1, 0, 0), ip, 40000, ip, 8622) is None  # no inode
    assert relay.parse_diag_answer(_diag_answer(5, 1000, 705), ip, 40000, ip, 8622) is None  # half-closed
    assert relay.parse_diag_answer(_diag_answer(5, 1000, 705), ip, 40000, ip, 8622, relay.OPEN) == 1000
    assert relay.parse_diag_answer(_diag_answer(1, 0, 700, sport=40001), ip, 40000, ip, 8622) is None  # not it
    enoent = struct.pack("=IHHII", 36, relay.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -2) + b"\0" * 16
    assert relay.parse_diag_answer(enoent, ip, 40000, ip, 8622) is None
    with pytest.raises(OSError):
        relay.parse_diag_answer(struct.pack("=IHHII", 36, relay.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -1), ip,
                                40000, ip, 8622)
    with pytest.raises(OSError):
        relay.parse_diag_answer(b"short", ip, 40000, ip, 8622)


def test_real_sockets_through_sock_diag_and_proc_agree() -> None:
    """Our own connection (uid as we run), open, then closed: the kernel's two interfaces say the same."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client = socket.create_connection(server.getsockname())
        accepted, peer = server.accept()
        with accepted:
            own = accepted.getsockname()
            assert relay.diag_peer_uid(peer, own) == relay.proc_peer_uid(peer, own) == os.geteuid()
            client.close()
            for _ in range(100):  # the FIN arrives at once on loopback; look until the state changed
                if relay.diag_peer_uid(peer, own, relay.OPEN) is None:
                    break
                asyncio.run(asyncio.sleep(0.01))
            assert relay.diag_peer_uid(peer, own, relay.OPEN) is None and relay.proc_peer_uid(peer, own, relay.OPEN) is None


def test_the_token_is_kept_0600_and_a_file_that_is_not_ours_is_replaced(tmp_path: Path) -> None:
    token = relay.load_token(tmp_path)
    path = tmp_path / relay.TOKEN_FILE
    assert len(token) == 64 and path.stat().st_mode & 0o777 == 0o600 and relay.load_token(tmp_path) == token
    path.chmod(0o644)  # readable by others: a new one, 0600
    replaced = relay.load_token(tmp_path)
    assert replaced != token and path.stat().st_mode & 0o777 == 0o600
    path.unlink()
    (tmp_path / "elsewhere").write_text("ab" * 32 + "\n")
    path.symlink_to(tmp_path / "elsewhere")  # not followed: replaced by a file of ours
    linked = relay.load_token(tmp_path)
    assert linked != "ab" * 32 and not path.is_symlink() and (tmp_path / "elsewhere").read_text() == "ab" * 32 + "\n"
    path.write_text("short\n")
    path.chmod(0o600)
    assert relay.load_token(tmp_path) not in ("short", linked)
    assert json.loads(relay.token_headers(token)) == {relay.TOKEN_HEADER: token}


def test_a_request_without_the_token_never_reaches_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "read_peer_uid", lambda peer, own, states=None: 0)

    class Counting(_SlowHandler):
        calls = 0

        async def relay_request_id(self, headers: dict[str, str]) -> relay.Response:
            Counting.calls += 1
            return await super().relay_request_id(headers)

    async def go(token_line: str) -> bytes:
        handler = Counting()
        handler.release.set()
        server = relay.Relay(handler, TOKEN)
        await server.start("127.0.0.1", 0)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"POST /v1/request-id HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{token_line}"
                         "Content-Length: 0\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer
        finally:
            server.close()

    for line in ("", f"{relay.TOKEN_HEADER}: {'cd' * 32}\r\n", f"{relay.TOKEN_HEADER}: {TOKEN[:-2]}\r\n",
                 f"{relay.TOKEN_HEADER}: {TOKEN}\r\n{relay.TOKEN_HEADER}: {TOKEN}\r\n"):
        answer = asyncio.run(go(line))
        assert _status(answer) in (400, 403), answer
    assert Counting.calls == 0
    assert _status(asyncio.run(go(f"{relay.TOKEN_HEADER.lower()}: {TOKEN}\r\n"))) == 200 and Counting.calls == 1


@little
def test_no_row_or_a_garbled_table_tells_no_uid() -> None:
    assert relay.find_peer_uid(TCP, ("127.0.0.1", 40009), ("127.0.0.1", 8622)) is None
    assert relay.find_peer_uid(TCP, ("127.0.0.1", 8622), ("127.0.0.1", 9999)) is None
    assert relay.find_peer_uid("header\n  0: junk\n  1: 0100007F:9C40 0100007F:21AE 01 x y z notanumber\n",
                               ("127.0.0.1", 40000), ("127.0.0.1", 8622)) is None
    assert relay.find_peer_uid("", ("127.0.0.1", 40000), ("127.0.0.1", 8622)) is None


HOSTS = ("127.0.0.1:8622", "localhost:8622")
TOKEN = "ab" * relay.TOKEN_BYTES


def _request(path: str = "/v1/serial", **headers: str) -> relay.Request:
    return relay.Request("POST", path, {k.replace("_", "-"): v for k, v in headers.items()}, b"")


def test_what_snapd_sends_passes() -> None:
    assert relay.check_request_headers(_request(host="127.0.0.1:8622", content_type=relay.ASSERTION_TYPE), HOSTS) is None
    assert relay.check_request_headers(_request("/v1/request-id", host="localhost:8622"), HOSTS) is None


@pytest.mark.parametrize("request_, status", [
    (_request(host="127.0.0.1:8622", content_type=relay.ASSERTION_TYPE, origin="http://evil.example"), 403),
    (_request(host="evil.example:8622", content_type=relay.ASSERTION_TYPE), 403),  # DNS rebinding
    (_request(host="127.0.0.1:9999", content_type=relay.ASSERTION_TYPE), 403),
    (_request(content_type=relay.ASSERTION_TYPE), 403),  # no Host at all
    (_request(host="127.0.0.1:8622", content_type="text/plain"), 415),  # a form post from a page
    (_request(host="127.0.0.1:8622", content_type=relay.ASSERTION_TYPE + "; charset=utf-8"), 415),
    (_request(host="127.0.0.1:8622"), 415),
], ids=["origin", "rebinding", "other-port", "no-host", "text-plain", "parameter", "no-type"])
def test_what_a_browser_or_another_client_sends_is_refused(request_: relay.Request, status: int) -> None:
    refused = relay.check_request_headers(request_, HOSTS)
    assert refused is not None and refused.status == status and refused.content_type == "application/json"


class _SlowHandler:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def relay_request_id(self, headers: dict[str, str]) -> relay.Response:
        await self.release.wait()
        return relay.Response(200, b'{"request-id": "x"}', "application/json")

    async def relay_serial(self, body: bytes, headers: dict[str, str]) -> relay.Response:
        return relay.Response(200)


async def _post(port: int, path: str = "/v1/request-id") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{relay.TOKEN_HEADER}: {TOKEN}\r\n"
                 "Content-Length: 0\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ")[1])


def test_a_second_exchange_waits_a_bounded_time_then_gets_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "read_peer_uid", lambda peer, own, states=None: 0)
    monkeypatch.setattr(relay, "LOCK_WAIT", 0.2)

    async def go() -> tuple[bytes, bytes]:
        handler = _SlowHandler()
        server = relay.Relay(handler, TOKEN)
        await server.start("127.0.0.1", 0)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        try:
            first = asyncio.ensure_future(_post(port))
            await asyncio.sleep(0.1)
            second = await asyncio.wait_for(_post(port), 5)
            handler.release.set()
            return await first, second
        finally:
            server.close()

    first, second = asyncio.run(go())
    assert _status(first) == 200
    assert _status(second) == 503 and json.loads(second.partition(b"\r\n\r\n")[2])["error_code"] == "relay-busy"
    assert b"Content-Type: application/json\r\n" in second


def test_connections_beyond_the_limit_get_503_and_the_relay_serves_after(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "read_peer_uid", lambda peer, own, states=None: 0)
    monkeypatch.setattr(relay, "MAX_CONNECTIONS", 2)

    async def go() -> tuple[bytes, bytes]:
        handler = _SlowHandler()
        handler.release.set()
        server = relay.Relay(handler, TOKEN)
        await server.start("127.0.0.1", 0)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]  # send nothing
            await asyncio.sleep(0.1)
            beyond = await asyncio.wait_for(_post(port), 5)
            for _, writer in idle:
                writer.close()
            await asyncio.sleep(0.1)
            return beyond, await asyncio.wait_for(_post(port), 5)
        finally:
            server.close()

    beyond, after = asyncio.run(go())
    assert _status(beyond) == 503 and b'"relay-busy"' in beyond
    assert _status(after) == 200


def test_a_peer_whose_uid_is_not_root_or_unknown_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go(uid: int | None) -> bytes:
        monkeypatch.setattr(relay, "read_peer_uid", lambda peer, own, states=None: uid)
        server = relay.Relay(_SlowHandler(), TOKEN)
        await server.start("127.0.0.1", 0)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        try:
            return await asyncio.wait_for(_post(port), 5)
        finally:
            server.close()

    for uid in (1000, None):
        answer = asyncio.run(go(uid))
        assert _status(answer) == 403 and json.loads(answer.partition(b"\r\n\r\n")[2])["error_code"] == "relay-forbidden"


def test_only_allow_listed_headers_go_on_to_the_vault() -> None:
    request = relay.Request("POST", "/v1/serial", {
        "user-agent": "snapd/2.57.6", "snap-device-capabilities": "serial-stream", "api-key": "from-the-client",
        "host": "127.0.0.1:8622", "content-type": "text/plain", "cookie": "x", "x-extra": "y"}, b"")
    assert relay.forward_headers(request) == {"User-Agent": "snapd/2.57.6", "Snap-Device-Capabilities": "serial-stream"}
    odd = relay.Request("POST", "/v1/serial", {"user-agent": "snapd\r\nApi-Key: x", "snap-device-capabilities": "\u00e9"}, b"")
    assert relay.forward_headers(odd) == {}


def test_a_refused_peer_reads_its_403_even_after_sending_a_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal is sent before the request is read; what the peer sent is taken in, so closing sends no reset."""
    monkeypatch.setattr(relay, "read_peer_uid", lambda peer, own, states=None: 1000)

    async def go() -> bytes:
        server = relay.Relay(_SlowHandler(), TOKEN)
        await server.start("127.0.0.1", 0)
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = b"x" * 200_000
            writer.write(f"POST /v1/serial HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            await writer.drain()
            await asyncio.sleep(0.2)  # the relay has answered and (before the fix) closed by now
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer
        finally:
            server.close()

    answer = asyncio.run(go())
    assert _status(answer) == 403 and b'"relay-forbidden"' in answer
