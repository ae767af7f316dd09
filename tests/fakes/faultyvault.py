"""The lab vault with the fault matrix's knobs, and records of what it was sent and what it signed.

:class:`FaultyVault` is agent.labvault.LabVault misbehaving on purpose through the hooks LabVault
documents (``received``, ``respond``, ``answer_serial``, ``sign_serial``); with no knob set it
answers exactly as the lab vault does.
"""

from __future__ import annotations

import collections
import dataclasses
import hmac
import http
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from agent import keys, openpgp
from agent.assertions import Assertion, HeaderValue
from agent.labvault import API_PREFIX, PLAIN_TYPE, LabVault, Reply, refusal_reply

_METHODS = {"version": "GET", "health": "GET", "request-id": "POST", "serial": "POST"}


@dataclass(frozen=True, slots=True)
class Forced:
    """A status answered instead of processing; body None means "<code> <reason>\\n" as text/plain."""

    status: int
    retry_after: str | None = None
    body: bytes | None = None
    content_type: str = PLAIN_TYPE


@dataclass
class Faults:
    """Knobs that make the vault misbehave. Set fields directly; the vault reads them under its lock.

    Queues are consumed one entry per matching request: ``status[endpoint]``
    (endpoint "request-id" or "serial"; an int is ``Forced(int)``) is answered
    first, then ``error_code[endpoint]`` (a handled 400 with the real message);
    neither touches nonces or records. ``accepted_times`` answers 202 with an
    empty body to that many otherwise valid /serial requests, before the
    request-id is burned, so the same request can be posted again (as snapd
    does). Every other knob stays in force until changed: ``delay`` (seconds
    before answering any request), and on signed serials ``other_device_key``,
    ``wrong_brand``, ``untrusted_key``, ``bad_signature``, ``assigned_serial`` (what is signed), then
    ``truncate`` (first half only), ``oversize`` (that many bytes of padding
    appended) and ``content_type`` ("" sends none) on the response.
    """

    status: dict[str, list[int | Forced]] = field(default_factory=dict)
    error_code: dict[str, list[str]] = field(default_factory=dict)
    accepted_times: int = 0
    delay: float = 0.0
    truncate: bool = False
    oversize: int = 0
    other_device_key: bool = False
    bad_signature: bool = False
    wrong_brand: str | None = None
    untrusted_key: bool = False
    assigned_serial: str | None = None  # signed instead of the proposed one, as a vault that assigns serials does
    content_type: str | None = None


@cache
def spare_key() -> keys.DeviceKey:
    """A key nobody trusts, for the other_device_key and untrusted_key faults (made once, in-process)."""
    private = rsa.generate_private_key(65537, 2048)
    numbers = private.public_key().public_numbers()
    return keys.DeviceKey(private, openpgp.PublicKey(numbers.n, numbers.e))


def corrupt(assertion: Assertion) -> Assertion:
    """The same assertion with the last byte of its RSA value flipped: valid base64, failing signature."""
    packet = openpgp.decode_v1(assertion.signature, "signature")
    broken = packet[:-1] + bytes([packet[-1] ^ 0x01])
    return dataclasses.replace(assertion, signature=openpgp.encode_v1(broken) + b"\n")


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Forced"
    return f"{status} {phrase}\n".encode("ascii")


class FaultyVault(LabVault):
    """LabVault plus ``faults`` (:class:`Faults`) and records: ``requests`` (a count per (method, path)),
    ``signed`` (every serial signed, in order) and ``seen_headers`` (per request, in order: (path,
    headers with names lowercased); the api-key's value is replaced by "valid" or "invalid", so a
    test can see which one came without the key being kept anywhere)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._knobs = threading.Lock()  # never held while LabVault's own lock is taken
        self.faults = Faults()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.signed: list[Assertion] = []
        self.seen_headers: list[tuple[str, dict[str, str]]] = []

    def received(self, method: str, path: str, headers: Iterable[tuple[str, str]]) -> None:
        seen = {name.lower(): value for name, value in headers}
        if "api-key" in seen:
            matches = hmac.compare_digest(seen["api-key"].encode("utf-8"), self.api_key.encode("utf-8"))
            seen["api-key"] = "valid" if matches else "invalid"
        with self._knobs:
            self.seen_headers.append((path.partition("?")[0], seen))
        super().received(method, path, headers)

    def respond(self, method: str, path: str, api_key: str | None, body: bytes | None) -> Reply:
        path = path.partition("?")[0]
        with self._knobs:
            self.requests[(method, path)] += 1
            delay = self.faults.delay
        if delay > 0:
            time.sleep(delay)
        endpoint = path[len(API_PREFIX):] if path.startswith(API_PREFIX) else ""
        if _METHODS.get(endpoint) == method:
            forced = self._take_forced(endpoint)
            if forced is not None:
                return forced
        return super().respond(method, path, api_key, body)

    def _take_forced(self, endpoint: str) -> Reply | None:
        with self._knobs:
            statuses, codes = self.faults.status.get(endpoint), self.faults.error_code.get(endpoint)
            entry = statuses.pop(0) if statuses else None
            code = codes.pop(0) if codes and entry is None else None
        if code is not None:
            return refusal_reply(code)
        if entry is None:
            return None
        forced = entry if isinstance(entry, Forced) else Forced(entry)
        body = _status_line(forced.status) if forced.body is None else forced.body
        headers = (("Retry-After", forced.retry_after),) if forced.retry_after is not None else ()
        return Reply(forced.status, body, forced.content_type, headers)

    def answer_serial(self, request: Assertion) -> Reply:
        with self._knobs:
            if self.faults.accepted_times > 0:
                self.faults.accepted_times -= 1
                return Reply(202)
        reply = super().answer_serial(request)
        with self._knobs:
            faults = dataclasses.replace(self.faults)
        data = reply.body
        if faults.truncate:
            data = data[: len(data) // 2]
        data += b"x" * faults.oversize
        content_type = reply.content_type if faults.content_type is None else faults.content_type or None
        return dataclasses.replace(reply, body=data, content_type=content_type)

    def sign_serial(self, headers: dict[str, HeaderValue], body: bytes, signer: keys.DeviceKey,
                    created: int) -> Assertion:
        with self._knobs:
            faults = dataclasses.replace(self.faults)
        headers = dict(headers)
        if faults.other_device_key:
            headers["device-key"], headers["device-key-sha3-384"] = spare_key().public.encoded, spare_key().key_id
        if faults.untrusted_key:
            signer = spare_key()
        if faults.wrong_brand:
            headers["authority-id"] = headers["brand-id"] = faults.wrong_brand
        if faults.assigned_serial:
            headers["serial"] = faults.assigned_serial
        signed = super().sign_serial(headers, body, signer, created)
        signed = corrupt(signed) if faults.bad_signature else signed
        with self._knobs:
            self.signed.append(signed)
        return signed
