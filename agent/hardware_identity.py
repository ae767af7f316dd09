"""`factory-agent hardware-identity`: the factory's tooling for secure device onboarding.

On the device: ``init`` makes the hardware identity key once (never replacing one), ``show`` prints
its record (the public key and its digest: nothing secret), ``sign-request-id`` signs a request-id
and prints the registration body. On the factory host: ``assertion`` signs the device's
hardware-identity assertion with the issuer's key, for import into the Model Service.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from . import assertions, config, hwkey, keys, onboarding
from .errors import ConfigError
from .onboarding import Record

MAX_RECORD_BYTES = 64 * 1024


def settings(files: list[Path], key_uri: str | None) -> config.OnboardingConfig:
    """[onboarding] of ``files`` (default: the daemon's files that exist, else the defaults), ``key_uri`` over it."""
    found = files or [f for f in config.default_files() if f.exists()]
    loaded = config.load_onboarding(found) if found else config.OnboardingConfig()
    if key_uri is None:
        return loaded
    if not key_uri.startswith(("file:", "pkcs11:")):
        raise ConfigError(f"cannot use hardware key {key_uri!r}: expected file:/PATH or pkcs11:... (RFC 7512)")
    return dataclasses.replace(loaded, hardware_key=key_uri)


def record_of(key: hwkey.HardwareKey) -> Record:
    return Record.of(key.public_der(), key.key_type, key.uri)


def print_record(record: Record, as_json: bool, out: TextIO = sys.stdout) -> None:
    if as_json:
        print(json.dumps(record.to_json(), indent=2), file=out)
        return
    for name, value in record.to_json().items():
        print(f"{name + ':':<26}{value}", file=out)


def init(cfg: config.OnboardingConfig, key_type: str, as_json: bool) -> int:
    key, made = hwkey.create_key(cfg.hardware_key, key_type, cfg.pkcs11_module)
    if made:
        print(f"factory-agent: made a new {key.key_type} hardware identity key at {key.uri}", file=sys.stderr)
    else:
        print(f"factory-agent: kept the existing {key.key_type} hardware identity key at {key.uri} "
              "(a hardware identity key is never replaced)", file=sys.stderr)
    print_record(record_of(key), as_json)
    return 0


def show(cfg: config.OnboardingConfig, as_json: bool) -> int:
    print_record(record_of(hwkey.open_key(cfg.hardware_key, cfg.pkcs11_module)), as_json)
    return 0


def sign_request_id(cfg: config.OnboardingConfig, request_id: str, as_json: bool) -> int:
    """The registration body for ``request_id``: with --json its exact bytes (what the hook sets)."""
    key = hwkey.open_key(cfg.hardware_key, cfg.pkcs11_module)
    body = hwkey.registration_body(key, request_id, cfg.hash, cfg.signature_encoding, cfg.legacy_digest_field)
    if as_json:
        sys.stdout.buffer.write(body + b"\n")
        return 0
    fields = json.loads(body)
    for name in ("request-id", *sorted(fields)):
        print(f"{name + ':':<26}{request_id if name == 'request-id' else fields[name]}")
    return 0


ASK_TIMEOUT = 120.0  # seconds for the daemon's answer: a TPM signs in well under one, the child is bounded at 60


def sign_via_agent(bus_kind: str, request_id: str) -> int:
    """SignRequestId() on the running agent (snapd mode): the key stays in its process or token. Exit 0 printed
    (the body's exact bytes), 1 the agent refused (one line saying why), 69 no agent or bus."""
    import asyncio

    from . import dbus_service, status
    from .errors import DBUS_ERROR_PREFIX

    async def ask() -> tuple[str | None, list[Any]]:
        bus = await asyncio.wait_for(status.connect_bus(bus_kind), ASK_TIMEOUT)
        try:
            return await asyncio.wait_for(status.call_method(bus, dbus_service.BUS_NAME, dbus_service.OBJECT_PATH,
                                                             dbus_service.INTERFACE, "SignRequestId", "s",
                                                             [request_id]), ASK_TIMEOUT)
        finally:
            bus.disconnect()

    try:
        error, body = asyncio.run(ask())
    except Exception as exc:  # noqa: BLE001 - no bus, or it went away: the libraries share no error base
        print(f"factory-agent: cannot reach the agent on the {bus_kind} bus: {exc or type(exc).__name__}",
              file=sys.stderr)
        return 69
    if error is not None:
        said = str(body[0]) if body else ""
        print(f"factory-agent: the agent did not sign: {error.removeprefix(DBUS_ERROR_PREFIX)}: {said}",
              file=sys.stderr)
        return 69 if error.startswith(status.NO_OWNER) else 1
    sys.stdout.write(str(body[0]) + "\n")
    return 0


def assertion(issuer_key: Path, issuer_id: str, manufacturer: str, hardware_name: str, hardware_id: str,
              key_text: str, timestamp: str | None) -> bytes:
    """A hardware-identity assertion signed with ``issuer_key`` (PEM), checked against its own key."""
    try:
        signer = keys.load_key(issuer_key.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read issuer key {issuer_key}: {exc.strerror}") from None
    stamp = timestamp or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    headers = onboarding.hardware_identity_headers(issuer_id, manufacturer, hardware_name, hardware_id, key_text,
                                                   stamp)
    created = int(assertions.check_timestamp(headers, "timestamp").timestamp())
    signed = assertions.sign(dict(headers), b"", signer.public, signer.sign, created)
    assertions.verify(assertions.decode(signed.encode()), signer.public)
    return signed.encode()


def key_text_from(record_file: str | None, key_text: str | None, cfg: config.OnboardingConfig) -> str:
    """The device's hardware-id-key: given, from a record `show --json` wrote, or this device's own key."""
    if key_text:
        return key_text
    if record_file:
        try:
            if record_file == "-":
                data = sys.stdin.buffer.read(MAX_RECORD_BYTES)
            else:
                with open(record_file, "rb") as f:
                    data = f.read(MAX_RECORD_BYTES)
            value = json.loads(data).get("hardware-id-key")
        except (OSError, ValueError, AttributeError) as exc:
            raise ConfigError(f"cannot read the record {record_file}: {exc}") from None
        if not isinstance(value, str):
            raise ConfigError(f"cannot read the record {record_file}: no \"hardware-id-key\" string in it")
        return value
    return record_of(hwkey.open_key(cfg.hardware_key, cfg.pkcs11_module)).key


def run(args: argparse.Namespace) -> int:
    """``factory-agent hardware-identity ACTION``, as argparse parsed it."""
    cfg = settings([Path(f) for f in args.config], args.key)
    if args.action == "init":
        return init(cfg, args.type, args.json)
    if args.action == "show":
        return show(cfg, args.json)
    if args.action == "sign-request-id":
        if args.bus is not None:
            return sign_via_agent(args.bus, args.request_id)
        return sign_request_id(cfg, args.request_id, args.json)
    text = key_text_from(args.record, args.hardware_id_key, cfg)
    sys.stdout.buffer.write(assertion(Path(args.issuer_key), args.issuer_id, args.manufacturer, args.hardware_name,
                                      args.hardware_id, text, args.timestamp))
    return 0
