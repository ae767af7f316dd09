"""Child-process entry point: generate one RSA key and write it to stdout as PKCS#8 PEM.

It runs in its own interpreter because RSA-4096 takes from seconds to minutes
on armhf, and older cryptography releases hold the GIL while generating,
which would freeze the daemon's event loop. It writes nothing to disk: the
parent stores the key durably, so a killed parent never leaves a key behind
that nobody recorded. The key is made with every core (agent/rsakey.py).
"""

from __future__ import annotations

import sys

from agent import rsakey
from agent.secrecy import no_core_dumps


def main(argv: list[str]) -> int:
    bits, parent = int(argv[0]), int(argv[1])
    no_core_dumps()  # before the key exists: a crash must not write it to disk
    if not rsakey.follow_parent(parent):
        return 1
    key = rsakey.generate(bits)
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    sys.stdout.buffer.write(pem)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
