"""A loopback TCP server that answers each connection from a script: for answers no real server gives.

Each script entry is a function (socket, request bytes) -> None that writes
whatever it likes: a truncated body, a slow drip, a reset. Requests are
recorded. Used where the lab vault cannot express the misbehaviour.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

Reply = Callable[[socket.socket, bytes], None]


def http_reply(status: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Reply:
    def reply(conn: socket.socket, request: bytes) -> None:
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)

    return reply


class RawServer:
    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1/"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.replies:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                request = read_request(conn)
                self.requests.append(request)
                try:
                    self.replies.pop(0)(conn, request)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def read_request(conn: socket.socket) -> bytes:
    """One HTTP request: the head, then a body of Content-Length bytes (less if the peer closes first)."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
