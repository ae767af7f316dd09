"""A device-service client that behaves as snapd 2.57 does (shared/reference/snapd-device-protocol.md §3).

It reads the gadget settings the prepare-device hook set (device-service.url,
device-service.headers, registration.proposed-serial, registration.body), then
makes one registration
attempt as snapd's request-serial task does: POST request-id (no body, no
Content-Type; 200 and a JSON ``request-id`` required), then the serial-request
signed by its own device key plus the model assertion, as one stream, with
snapd's headers; device-service.headers on both calls, set over snapd's own
(handlers_serial.go applyHeaders: req.Header.Set), Content-Type last. 200/201: exactly one serial, with the device's brand, model and
key id. 202: the identical request again after the poll delay. Above 500: the
whole exchange again after the retry delay (a fresh request-id unless polling).
Anything else ends the attempt with the message snapd would log: the JSON
``message`` only when Content-Type is exactly application/json.

With ``hook`` (snapd 2.74 and later, secure onboarding): after each fresh request-id, the
gadget's prepare-serial-request hook runs (``hook(request_id)`` returns the JSON body it set) and
the serial-request carries that body. snapd 2.74-2.77 then fail the attempt at any re-execution of
the task, a 202 poll or a retry after a status above 500 alike, because they read the stored JSON
object back as a string (shared/reference/secure-onboarding.md §8, confirmed by snapd 2.77.1's own
code): this client does the same, so a relay that lets a 202 through fails it as snapd would.

http.client, not requests: nothing shared with the agent's vault client.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import assertions, keys
from agent.errors import AgentError

USER_AGENT = "snapd/2.57.6 (series 16) ubuntu-core/22 (amd64) linux/6.1.0-test"
USER_AGENT_2_77 = "snapd/2.77.1 (series 16) ubuntu-core/24 (amd64) linux/6.8.0-test"  # the 2.74+ flow's (hook=)
DEFECT = ('internal error: cannot unmarshal snap "gadget" option "registration.body" into *string: json: cannot '
          'unmarshal object into Go value of type string')  # snapd 2.77.1, snapd-flow/poll-202
ASSERTION_TYPE = "application/x.ubuntu.assertion"


@dataclass
class Answer:
    status: int
    content_type: str | None
    body: bytes


@dataclass
class Attempt:
    """How one attempt ended: ``serial`` set on success, ``error`` (snapd's log text) otherwise."""

    serial: assertions.Assertion | None = None
    error: str = ""
    answers: list[tuple[str, Answer]] = field(default_factory=list)  # (endpoint, answer), in order


class Retry(Exception):
    """snapd would retry this step after 60 s (status above 500)."""


def _decodes_as_error(data: dict[str, object]) -> bool:
    """Whether Go would decode ``data`` into snapd's error struct (message string, error_list of objects)."""
    if "message" in data and not isinstance(data["message"], (str, type(None))):
        return False
    errors = data.get("error_list")
    if errors is not None and not (isinstance(errors, list) and all(isinstance(e, dict) for e in errors)):
        return False
    return all(not isinstance(e, dict) or isinstance(e.get("message", ""), (str, type(None)))
               for e in errors or [])


class SnapdClient:
    def __init__(self, settings: Mapping[str, Any], key: keys.DeviceKey, model: assertions.Assertion,
                 brand: str | None = None, poll_delay: float = 0.1, retry_delay: float = 0.1, max_rounds: int = 5,
                 hook: Callable[[str], str] | None = None) -> None:
        base = settings["device-service.url"]
        self.base = base if base.endswith("/") else base + "/"  # snapd appends the slash
        self.proposed_serial = settings.get("registration.proposed-serial", "")
        self.body = settings.get("registration.body", "").encode("utf-8")
        service_headers = settings.get("device-service.headers") or {}  # a map, as snapctl stored the JSON object
        if isinstance(service_headers, str):
            service_headers = json.loads(service_headers)
        self.service_headers: dict[str, str] = dict(service_headers)
        self.key, self.model = key, model
        self.brand = brand or model.header("brand-id")
        self.poll_delay, self.retry_delay, self.max_rounds = poll_delay, retry_delay, max_rounds
        self.extra_headers: dict[str, str] = {}  # what snapd never sends, for tests of what the relay passes on
        self.hook = hook  # prepare-serial-request (snapd >= 2.74): request-id -> the JSON body it set
        self.user_agent = USER_AGENT_2_77 if hook is not None else USER_AGENT

    def _post(self, endpoint: str, body: bytes | None, headers: dict[str, str]) -> Answer:
        url = urllib.parse.urljoin(self.base, endpoint)  # RFC 3986 resolution, as Go's ResolveReference
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)  # snapd's 30 s
        try:
            content_type = {k: v for k, v in headers.items() if k == "Content-Type"}
            sent = {"User-Agent": self.user_agent, **self.extra_headers,
                    **{k: v for k, v in headers.items() if k != "Content-Type"}, **self.service_headers,
                    **content_type, "Content-Length": str(len(body or b""))}
            conn.request("POST", parts.path, body=body or b"", headers=sent)
            response = conn.getresponse()
            return Answer(response.status, response.getheader("Content-Type"), response.read())
        finally:
            conn.close()

    @staticmethod
    def message(answer: Answer) -> str:
        """snapd's text for a failed status: the JSON message only for Content-Type exactly application/json."""
        if answer.content_type == "application/json":
            try:
                data = json.loads(answer.body)
            except ValueError:
                data = None
            if isinstance(data, dict) and not _decodes_as_error(data):
                data = None  # Go's json.Unmarshal into its error struct fails: only the status is shown
            if isinstance(data, dict):
                if data.get("message"):
                    return str(data["message"])
                errors = data.get("error_list")
                if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                    return str(errors[0].get("message") or "")
        return f"unexpected status {answer.status}"

    def request_id(self, attempt: Attempt) -> str:
        """request-id as snapd reads it: undecodable JSON is retried, an empty or missing id is a hard error."""
        answer = self._post("request-id", None, {})
        attempt.answers.append(("request-id", answer))
        if answer.status > 500:
            raise Retry(f"cannot retrieve request-id for making a request for a serial: unexpected status {answer.status}")
        if answer.status != 200:
            raise ValueError(f"cannot retrieve request-id for making a request for a serial: {self.message(answer)}")
        try:
            data = json.loads(answer.body)
            request_id = data.get("request-id", "") if isinstance(data, dict) else None
            if not isinstance(request_id, str):
                raise ValueError("request-id is not a string")
        except ValueError:  # snapd: a decode error is a retryable one
            raise Retry("cannot read request-id") from None
        if not request_id:
            raise ValueError("cannot retrieve request-id for making a request for a serial: empty request-id")
        return request_id

    def serial_request(self, request_id: str, brand: str | None = None, model: str | None = None,
                       key: keys.DeviceKey | None = None) -> bytes:
        """The stream snapd posts: serial-request (its device key, the hook's serial and body) + model."""
        key = key or self.key
        body = self.hook(request_id).encode("utf-8") if self.hook is not None else self.body
        request = assertions.build_serial_request(
            brand=brand or self.brand, model=model or self.model.header("model"), request_id=request_id,
            device_key=key.public, signer=key.sign, created=int(time.time()),
            serial=self.proposed_serial, body=body)
        return assertions.encode_stream([request, self.model])

    def post_serial(self, stream: bytes, attempt: Attempt) -> Answer:
        answer = self._post("serial", stream, {"Snap-Device-Capabilities": "serial-stream",
                                               "Content-Type": ASSERTION_TYPE})
        attempt.answers.append(("serial", answer))
        return answer

    def register(self, key: keys.DeviceKey | None = None, brand: str | None = None) -> Attempt:
        """One attempt, as snapd's request-serial task makes it, retries and polls included."""
        key = key or self.key
        attempt = Attempt()
        stream: bytes | None = None  # kept only while polling (snapd saves it after a 202)
        hooked = False  # the hook stored its JSON body: a re-run of the task (a poll, a retry) reads it back and fails
        for _ in range(self.max_rounds):
            if hooked:
                attempt.error = DEFECT
                return attempt
            try:
                if stream is None:
                    fresh = self.serial_request(self.request_id(attempt), brand=brand, key=key)
                    hooked = self.hook is not None
                answer = self.post_serial(stream or fresh, attempt)
            except Retry:
                time.sleep(self.retry_delay)
                continue
            except ValueError as exc:
                attempt.error = str(exc)
                return attempt
            if answer.status in (200, 201):
                try:
                    return self._accept(answer, key, attempt)
                except AgentError:  # snapd: an undecodable serial stream is broken I/O, retried every 60 s
                    time.sleep(self.retry_delay)
                    continue
            if answer.status == 202:
                stream = stream or fresh
                time.sleep(self.poll_delay)
                continue
            if answer.status > 500:
                time.sleep(self.retry_delay)
                continue
            attempt.error = f"cannot deliver device serial request: {self.message(answer)}"
            return attempt
        attempt.error = "gave up after too many rounds"
        return attempt

    def _accept(self, answer: Answer, key: keys.DeviceKey, attempt: Attempt) -> Attempt:
        """§2.4 steps 1-3: decodes, exactly one serial, and it is this device's."""
        serials = [a for a in assertions.decode_stream(answer.body) if a.type == "serial"]
        if len(serials) != 1:
            attempt.error = f"cannot accept {len(serials)} serial assertions"
            return attempt
        serial = serials[0]
        got = (serial.header("brand-id"), serial.header("model"), serial.header("device-key-sha3-384"))
        if got != (self.brand, self.model.header("model"), key.key_id):
            attempt.error = "obtained serial assertion does not match provided device identity information"
            return attempt
        attempt.serial = serial
        return attempt
