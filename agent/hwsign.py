"""The daemon's request-id signature, made by a child process (``python3 -m agent.hwsign``).

The daemon never loads a PKCS#11 module itself: a vendor's library that hangs or crashes takes a
child with it, not the daemon; the child's wait is bounded; and each signature sees the token as
it is now (a process lists a token's keys once, when it loads the module, so a key made after the
daemon started would stay invisible to it). The child gets what to sign as JSON on stdin, and
prints the body and the key's digest as JSON on stdout; a failure is one line on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AgentError, HardwareKeyError
from .onboarding import Hash, SignatureEncoding

if TYPE_CHECKING:
    from .config import OnboardingConfig

SIGN_TIMEOUT = 60.0  # seconds: a TPM signs in well under one; a token that has not answered by then will not
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True, slots=True)
class Signed:
    body: bytes  # the serial-request body
    digest: str  # the key's hardware-id-key-sha3-384


async def sign(settings: OnboardingConfig, request_id: str, timeout: float = SIGN_TIMEOUT) -> Signed:
    """The body for ``request_id``, signed in a child by the key ``settings`` name; HardwareKeyError with its reason."""
    uri = settings.hardware_key
    order = json.dumps({"key": uri, "module": settings.pkcs11_module, "request-id": request_id,
                        "hash": str(settings.hash), "encoding": str(settings.signature_encoding),
                        "legacy-field": settings.legacy_digest_field}).encode()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "agent.hwsign"]
    try:
        proc = await asyncio.create_subprocess_exec(*command, env=env,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise HardwareKeyError(f"cannot sign the request-id: {exc.strerror}") from None
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(order), timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        proc.kill()
        await asyncio.shield(proc.wait())
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise HardwareKeyError(f"the hardware identity key did not sign within {timeout:g} s ({uri})") from None
    if proc.returncode != 0:
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        said = next((line for line in reversed(lines) if line.startswith(_PREFIX)), "")
        raise HardwareKeyError(said[len(_PREFIX):] or f"cannot sign the request-id: exit status {proc.returncode}")
    answer = json.loads(stdout)
    return Signed(answer["body"].encode("utf-8"), answer["digest"])


_PREFIX = "hwsign: "


def main() -> int:
    from . import hwkey, onboarding
    from .secrecy import no_core_dumps

    no_core_dumps()
    order = json.loads(sys.stdin.buffer.read(64 * 1024))
    try:
        key = hwkey.open_key(order["key"], order["module"])
        body = hwkey.registration_body(key, order["request-id"], Hash(order["hash"]),
                                       SignatureEncoding(order["encoding"]), bool(order["legacy-field"]))
        digest = onboarding.spki_digest(key.public_der())
    except AgentError as exc:
        print(f"{_PREFIX}{exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps({"body": body.decode("utf-8"), "digest": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
