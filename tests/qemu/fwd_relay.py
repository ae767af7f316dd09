"""QEMU guestfwd relay: the guest's one permitted address (10.0.2.100:80) to a host loopback port.

QEMU starts one of these per guest connection (``guestfwd=tcp:10.0.2.100:80-cmd:...``) with the
connection on stdin/stdout. It connects to 127.0.0.1:PORT and copies bytes both ways until either
side closes. Only loopback targets are accepted: the guest reaches nothing else on the host.
"""

from __future__ import annotations

import ipaddress
import os
import selectors
import socket
import sys


def main() -> int:
    host, port = sys.argv[1], int(sys.argv[2])
    if not ipaddress.ip_address(host).is_loopback:
        print(f"fwd_relay: refusing non-loopback target {host}", file=sys.stderr)
        return 2
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        print(f"fwd_relay: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    upstream.settimeout(None)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(stdin, selectors.EVENT_READ, "guest")
    sel.register(upstream, selectors.EVENT_READ, "host")
    open_sides = 2
    while open_sides:
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(stdin, 65536)
                if not data:
                    sel.unregister(stdin)
                    upstream.shutdown(socket.SHUT_WR)
                    open_sides -= 1
                else:
                    upstream.sendall(data)
            else:
                data = upstream.recv(65536)
                if not data:
                    sel.unregister(upstream)
                    os.close(stdout)
                    open_sides -= 1
                else:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(stdout, view):]
    return 0


if __name__ == "__main__":
    sys.exit(main())
