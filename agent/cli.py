"""Command line: ``factory-agent`` and ``python3 -m agent``.

Every failure the agent expects becomes one line on stderr and an exit
status; tracebacks are for bugs, and even those print one line unless
FACTORY_AGENT_DEBUG=1 asks for the whole story.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from . import __version__, assertions, errors, keys, openpgp, secrecy, store
from .errors import AgentError, AssertionFormatError, ConfigError, UntrustedFileError

if TYPE_CHECKING:
    from . import config

EX_UNAVAILABLE = 69  # no D-Bus library, no bus, no daemon (as status says it)
EX_SOFTWARE = 70
EX_CONFIG = 78
STATE_DIR_HELP = "state directory (default: $STATE_DIRECTORY, else /var/lib/factory-agent)"
CONFIG_HELP = ("configuration file (repeatable, later wins; default /etc/factory-agent/agent.toml and "
               "agent.toml.d/*.toml)")
BUS_HELP = "the bus the daemon is on (default: system)"
RUN_EXIT = """exit status:
  0   registered (--once), or stopped by SIGTERM/SIGINT
  1   blocked (--once), or the state directory cannot be used (--once)
  3   --once --timeout passed before registered or blocked
  78  configuration error (systemd does not restart it)"""


def resolve_state_dir(arg: str | None, environ: os._Environ[str] | dict[str, str]) -> Path:
    """--state-dir, else systemd's $STATE_DIRECTORY (first entry), else the default."""
    if arg:
        return Path(arg)
    from_systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(from_systemd) if from_systemd else store.DEFAULT_DIR


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def cmd_key(args: argparse.Namespace) -> int:
    secrecy.no_core_dumps()
    state_dir = resolve_state_dir(args.state_dir, os.environ)
    key = store.load_device_key(state_dir)
    if key is None and args.generate:
        store.Store(state_dir).prepare()  # the lock: never beside a running agent's own generation
        started = time.monotonic()
        key = store.save_device_key(state_dir, keys.generate_key_pem(args.bits))
        print(f"generated {key.public.bits}-bit device key in {time.monotonic() - started:.1f} s", file=sys.stderr)
    if key is None:
        print(f"factory-agent: no device key in {state_dir} (use --generate)", file=sys.stderr)
        return 1
    print(key.public.encoded if args.public else key.key_id)
    return 0


def cmd_serial_request(args: argparse.Namespace) -> int:
    state_dir = resolve_state_dir(args.state_dir, os.environ)
    key = store.load_device_key(state_dir)
    if key is None:
        print(f"factory-agent: no device key in {state_dir}", file=sys.stderr)
        return 1
    body = _read(args.body_file, "body file") if args.body_file else b""
    request = assertions.build_serial_request(
        brand=args.brand, model=args.model, request_id=args.request_id, device_key=key.public,
        signer=key.sign, created=int(time.time()), serial=args.serial or "", body=body,
    )
    sys.stdout.buffer.write(request.encode())
    return 0


def _signing_key(assertion: assertions.Assertion, known: dict[str, openpgp.PublicKey]) -> openpgp.PublicKey:
    if assertion.type in ("serial-request", "device-session-request") and assertion.sign_key_id not in known:
        return openpgp.decode_public_key(assertion.header("device-key"))
    if assertion.sign_key_id not in known:
        raise AssertionFormatError(f"no trusted account-key {assertion.sign_key_id}")
    return known[assertion.sign_key_id]


def cmd_verify(args: argparse.Namespace) -> int:
    known = {}
    for path in args.account_key:
        for ak in assertions.decode_stream(_read(path, "account-key file")):
            if ak.type == "account-key":
                known[ak.header("public-key-sha3-384")] = assertions.account_public_key(ak)
    failed = 0
    for assertion in assertions.decode_stream(_read(args.file, "assertion file")):
        names = assertions.PRIMARY_KEYS[assertion.type] or ("brand-id", "model", "serial")
        pk = "/".join(v for k in names if isinstance(v := assertion.headers.get(k), str))
        try:
            assertions.verify(assertion, _signing_key(assertion, known))
            print(f"{assertion.type} {pk}: verified, signed by {assertion.sign_key_id}")
        except AssertionFormatError as exc:
            failed += 1
            print(f"{assertion.type} {pk}: NOT verified: {exc}")
    return 1 if failed else 0


def _load_config(args: argparse.Namespace, without_api_key: bool = False) -> config.Config:
    from . import config

    return config.load([Path(f) for f in args.config] if args.config else None, without_api_key=without_api_key)


def _http_error(text: str) -> int:
    if not text.isdigit() or not (400 <= int(text) <= 599 or int(text) == 202):
        raise argparse.ArgumentTypeError(f"must be 202 or an HTTP error status from 400 to 599, not {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def _whole_seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a whole number of seconds, not {text!r}")
    return int(text)


def _delay(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else _positive(text)


def _vault_code(text: str) -> str:
    from .labvault import MESSAGES  # only when --refuse is given: the CLI's other commands do without it

    if text not in MESSAGES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of the vault's error codes: {', '.join(MESSAGES)}")
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a positive number of registrations a second, not {text!r}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from . import daemon, systemd

    secrecy.no_core_dumps()  # before the api-key is read
    systemd.setup_logging()

    def load() -> config.Config:  # at start, and again at each Retry()
        cfg = _load_config(args)
        systemd.redact([cfg.vault.api_key])  # defence in depth: it is never logged, and never shown if it were
        errors.conceal([cfg.vault.api_key])  # nor quoted in an error message, whoever wrote the text
        return cfg

    blocked = None
    try:
        cfg = load()
    except errors.SecretUnreadableError as exc:  # the daemon stays up, blocked on it, until Retry() reads it
        if args.once:
            raise
        cfg, blocked = _load_config(args, without_api_key=True), exc
    state_dir = resolve_state_dir(args.state_dir, os.environ)
    try:
        return asyncio.run(daemon.main(cfg, state_dir, once=args.once, bus=args.bus, reload=load, blocked=blocked,
                                       timeout=args.timeout))
    except asyncio.CancelledError:  # SIGTERM/SIGINT: a clean stop
        return 0


def cmd_identity(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from . import config, identity

    use_config = args.config or config.DEFAULT_FILE.exists()
    cfg = _load_config(args).identity if use_config else config.IdentityConfig()
    found = asyncio.run(identity.gather_identity(cfg)) if cfg.required else identity.read_identity(cfg)
    if args.json:
        print(json.dumps(found.to_json(), indent=2, sort_keys=True))
    else:
        print(identity.format_identity(found))
    return 0


def _bus_client() -> ModuleType | None:
    """agent.status, or None (and why, on stderr) when no D-Bus library can be used: exit 69 then."""
    try:
        from . import status
    except errors.BusError as exc:
        print(f"factory-agent: cannot reach the daemon: {exc}", file=sys.stderr)
        return None
    return status


def cmd_status(args: argparse.Namespace) -> int:
    import asyncio

    status = _bus_client()
    if status is None:
        return EX_UNAVAILABLE
    return int(asyncio.run(status.run(args.bus, wait=args.wait, timeout=args.timeout, as_json=args.json,
                                      follow=args.follow, long=args.long,
                                      state_dir=resolve_state_dir(args.state_dir, os.environ),
                                      config_files=[Path(f) for f in args.config] or None)))


def cmd_retry(args: argparse.Namespace) -> int:
    import asyncio

    status = _bus_client()
    if status is None:
        return EX_UNAVAILABLE
    return int(asyncio.run(status.retry(args.bus)))


def cmd_check(args: argparse.Namespace) -> int:
    from . import check

    return check.main([Path(f) for f in args.config] or None, resolve_state_dir(args.state_dir, os.environ), args.json)


def cmd_registration_settings(args: argparse.Namespace) -> int:
    if _bus_client() is None:
        return EX_UNAVAILABLE
    from . import settings

    return settings.run(args.bus, args.timeout, args.json)


def cmd_support_bundle(args: argparse.Namespace) -> int:
    from . import bundle

    return bundle.run(args.output, args.bus, args.config, resolve_state_dir(args.state_dir, os.environ))


def cmd_lab_vault(args: argparse.Namespace) -> int:
    from . import labserve, systemd

    systemd.setup_logging()  # its progress and each rehearsed failure, on stderr
    rehearsal = None
    if args.fail is not None or args.refuse is not None or args.delay:
        rehearsal = labserve.Rehearsal(fail=args.fail, refuse=args.refuse, times=args.times, delay=args.delay,
                                       retry_after=args.retry_after,
                                       endpoints=tuple(args.endpoint or labserve.DEVICE_ENDPOINTS))
    return labserve.serve(labserve.Options(Path(args.dir), args.listen, args.brand, args.model, args.api_key,
                                           args.tls_cert, args.tls_key, args.self_signed, rehearsal,
                                           args.hardware_identity, args.rate))


def cmd_hardware_identity(args: argparse.Namespace) -> int:
    from . import hardware_identity

    return hardware_identity.run(args)


def _lab_vault_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with a lab-vault command line that argparse alone cannot tell, or None."""
    plays = args.fail is not None or args.refuse is not None
    if (args.times is not None or args.endpoint) and not (plays or args.delay):
        return "lab-vault: --times and --endpoint need --fail, --refuse or --delay"
    if args.retry_after is not None and args.fail is None:
        return "lab-vault: --retry-after needs --fail"
    if args.self_signed and (args.tls_cert or args.tls_key):
        return "lab-vault: --self-signed makes its own certificate: drop --tls-cert and --tls-key"
    return None


def _add_hardware_identity(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .onboarding import DEFAULT_HARDWARE_KEY

    p = sub.add_parser(
        "hardware-identity", help="the hardware identity key for secure device onboarding, and its factory records",
        description="Secure device onboarding: the device proves itself with a hardware identity key made once at "
                    "manufacturing (never replaced: not on re-image, factory reset or the loss of the state "
                    "directory) instead of a shared api-key. The key is [onboarding] hardware-key of the "
                    f"configuration (default {DEFAULT_HARDWARE_KEY}); nothing here prints or exports its private half.",
        epilog="exit status: 0 done, 1 no key or it cannot be used (the message says what to run), 2 usage, "
               "78 a configuration or issuer-key error")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, text: str, description: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=text, description=description, epilog=p.epilog)
        a.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="configuration file for [onboarding] (repeatable; default the daemon's files that exist)")
        a.add_argument("--key", metavar="URI", help="the key's URI, over [onboarding] hardware-key (file:/PATH, or "
                                                     "pkcs11:token=T;object=O?pin-source=file:/PATH)")
        return a

    a = action("init", "make the key if there is none (never replace one) and print its record",
               "Make the hardware identity key if there is none, durably, mode 0600, its directory 0700; an "
               "existing key is kept, whatever its type. Prints the record, as show does.")
    a.add_argument("--type", choices=["p256", "p384", "rsa2048"], default="p256",
                   help="ECDSA P-256 or P-384, or RSA-2048 (PKCS#1 v1.5): what snapd verifies (default p256)")
    a.add_argument("--json", action="store_true", help="the record as JSON")
    a = action("show", "print the key's record: hardware-id-key, its digest, type and location",
               "Print the record the factory signs a hardware-identity assertion from: hardware-id-key (one line of "
               "base64 of the DER SubjectPublicKeyInfo), hardware-id-key-sha3-384 (base64url of SHA3-384 over that "
               "text, as snapd computes it), the key type and where it lives.")
    a.add_argument("--json", action="store_true", help="the record as JSON (what `assertion --record` reads)")
    a = action("sign-request-id", "sign a request-id and print the registration body",
               "Sign REQUEST_ID's exact UTF-8 bytes with the key and [onboarding] hash, and print the serial-request "
               "body: hardware-id-key-sha3-384 (and hardware-id-key-sha384, which snapd 2.74-2.77 require, unless "
               "[onboarding] legacy-digest-field = false), request-id-signature, signature-hash-algorithm.")
    a.add_argument("request_id", metavar="REQUEST_ID", help="the vault's request-id, exactly (no trailing newline)")
    a.add_argument("--json", action="store_true", help="the body's exact bytes: compact JSON, keys sorted "
                                                       "(what the prepare-serial-request hook sets)")
    a.add_argument("--bus", choices=["system", "session"],
                   help="ask the running agent to sign (D-Bus SignRequestId, root only; snapd mode): the key never "
                        "leaves its process or token; prints the body's exact bytes (exit 69: no agent)")
    a = action("assertion", "sign a hardware-identity assertion with the issuer's key (on the factory host)",
               "Print a hardware-identity assertion for the device's key, signed by the issuer (authority-id = "
               "issuer-id), for import into the Model Service. The key comes from --hardware-id-key, from --record "
               "(what `show --json` printed on the device), or else from this machine's own key.")
    a.add_argument("--issuer-key", required=True, metavar="PEM", help="the issuer's private key (RSA, PEM)")
    a.add_argument("--issuer-id", required=True, metavar="ID", help="the issuer's account id (e.g. the brand)")
    a.add_argument("--manufacturer", required=True, metavar="M", help="the manufacturer's name")
    a.add_argument("--hardware-name", required=True, metavar="N", help="the hardware's name (model-name syntax)")
    a.add_argument("--hardware-id", required=True, metavar="H", help="this device's hardware id")
    a.add_argument("--record", metavar="FILE", help="the device's record (`show --json`; - for stdin)")
    a.add_argument("--hardware-id-key", metavar="TEXT", help="the device's hardware-id-key text itself")
    a.add_argument("--timestamp", metavar="RFC3339", help="the assertion's timestamp (default now)")
    p.set_defaults(func=cmd_hardware_identity)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="factory-agent", description="First-boot device registration agent: gathers the hardware identity, "
        "makes the device key and obtains a signed serial assertion from the brand's Serial Vault.",
        epilog="Run `factory-agent COMMAND --help` for each command; man factory-agent(1) has the troubleshooting "
               "table. Exit status common to all: 2 usage error, 70 internal error (a bug), 78 configuration error, "
               "130 interrupted.")
    parser.add_argument("--version", action="version", version=f"factory-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the daemon: register this device with the Serial Vault",
                       description="Register this device: load the state directory, gather the identity, make the "
                                   "device key, ask the vault for a serial, and report each step on D-Bus "
                                   "(io.factoryagent.Agent1), to systemd and to the journal. Without --once it serves "
                                   "status until stopped; a block waits for `factory-agent retry`.",
                       epilog=RUN_EXIT, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="configuration file (repeatable, later wins; default /etc/factory-agent/agent.toml"
                        " and agent.toml.d/*.toml)")
    p.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    p.add_argument("--bus", choices=["system", "session", "none"], default="system",
                   help="where to publish io.factoryagent.Agent1 (default: system; none: no D-Bus)")
    p.add_argument("--once", action="store_true", help="exit 0 when registered, 1 when blocked")
    p.add_argument("--timeout", type=_positive, default=0.0, metavar="SECONDS",
                   help="with --once: give up after this long, exit 3 (default 0: no limit)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="the daemon's state over D-Bus (exit 0 registered, 1 blocked, 2 in progress, "
                                      "3 --wait timed out, 69 no daemon)",
                       description="Show the daemon's state, read over D-Bus; with no daemon, say why (kill switch, "
                                   "unit, configuration, what state.json records) and what to run next.",
                       epilog="exit status: 0 registered, 1 blocked, 2 in progress, 3 --wait/--follow timed out, "
                              "69 no daemon (or no D-Bus library)")
    p.add_argument("--json", action="store_true", help="a stable JSON document (schema 1)")
    p.add_argument("--wait", action="store_true", help="follow the daemon until registered or blocked")
    p.add_argument("--follow", action="store_true",
                   help="one line per change (with --json: one JSON object per line) until --timeout or the daemon "
                        "leaves")
    p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="give up waiting after this long (exit 3; default 0: no limit)")
    p.add_argument("--long", action="store_true",
                   help="add the step history with times (as snap tasks shows a change); \"history\" in --json")
    p.add_argument("--state-dir", metavar="DIR",
                   help="with no daemon, the state directory whose state.json is reported (default "
                        "/var/lib/factory-agent)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="with no daemon, the configuration checked for the error that stops it (repeatable; default "
                        "the daemon's)")
    p.add_argument("--bus", choices=["system", "session"], default="system", help=BUS_HELP)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("retry", help="Retry() on the daemon (root only): read the configuration and secrets again "
                                     "and start a fresh attempt (exit 0 asked, 1 refused, 69 no daemon)",
                       description="Ask the running daemon for a fresh attempt after fixing what blocked it: it reads "
                                   "the configuration and secrets (api-key, ca-file, trusted keys, template) again, "
                                   "and the state directory if it could not be used. Root only.",
                       epilog="exit status: 0 asked (follow with `factory-agent status --wait`), 1 refused (not "
                              "root), 69 no daemon")
    p.add_argument("--bus", choices=["system", "session"], default="system", help=BUS_HELP)
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("check", help="preflight: each check ok, warning or error with a fix hint; changes nothing",
                       description="Check the configuration, secrets, identity, state directory, device key, clock, "
                                   "the vault (DNS, TCP, TLS, /v1/version, the api-key with one request-id, which "
                                   "registers nothing), the installed D-Bus policy and unit, and the kill switches. "
                                   "Writes nothing; every network step gives up after 5 s.",
                       epilog="exit status: 0 all ok, 1 any error, 2 warnings only")
    p.add_argument("--json", action="store_true",
                   help='one document {"schema": 1, "checks": [...], "summary": {...}} on stdout')
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="configuration file (repeatable, later wins; default the daemon's)")
    p.add_argument("--state-dir", metavar="DIR", help="the state directory checked (default /var/lib/factory-agent)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("registration-settings",
                       help="snapd mode: the settings the prepare-device hook hands to snapd, one `snapctl set` "
                            "argument per line (exit 0 printed, 1 refused, 3 --timeout passed, 69 no bus)",
                       description="snapd mode: print what the gadget's prepare-device hook hands to snapd "
                                   "(device-service.url and headers of the relay, the proposed serial, the identity "
                                   "body), waiting for the daemon and its identity. Root only.",
                       epilog="exit status: 0 printed, 1 refused (not root, standalone mode, identity blocked), "
                              "3 --timeout passed, 69 no bus or daemon")
    p.add_argument("--bus", choices=["system", "session"], default="system", help=BUS_HELP)
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="wait this long for the daemon and its identity (default 300)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of snapctl arguments")
    p.set_defaults(func=cmd_registration_settings)

    p = sub.add_parser("identity", help="gather and print the hardware identity with the source of each value",
                       description="Gather the hardware identity as the daemon does (udev, sysfs, the configured "
                                   "sources) and print each field with where it came from, what was rejected and "
                                   "why, and the serial the template would propose. Writes nothing.",
                       epilog="exit status: 0 printed, 1 required fields missing after identity.wait-seconds, "
                              "78 configuration error")
    p.add_argument("--json", action="store_true", help="one JSON document instead of text")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help=CONFIG_HELP)
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser(
        "support-bundle", help="write a tar.gz for support: status, check, identity, redacted config, versions, "
                               "state listing, journal; never a secret",
        description="Collect what support needs into one tar.gz (one top directory and a MANIFEST naming each "
                    "member, the command that made it and its exit status): status --json --long, check --json, "
                    "identity --json (each a child with a 30 s timeout), the configuration files agent.config "
                    "loads with secrets redacted, versions, the state directory listing (no symlink followed, "
                    "SHA-256 of public files, the device key by its id only) and the unit's journal since boot "
                    "(15 s timeout). What cannot be read is recorded, not fatal.",
        epilog="exit status: 0 written (path and size on stdout), 1 the output could not be written, "
               "2 usage, 78 a --config file does not exist",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-o", "--output", metavar="FILE",
                   help="where to write (mode 0600, atomically; - for stdout; default "
                        "./factory-agent-support-HOST-UTCTIME.tar.gz)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="configuration file (repeatable; default the daemon's: /etc/factory-agent/agent.toml "
                        "and agent.toml.d/*.toml)")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (default $STATE_DIRECTORY, else "
                                                      "/var/lib/factory-agent)")
    p.add_argument("--bus", choices=["system", "session"], default="system", help="where the daemon is")
    p.set_defaults(func=cmd_support_bundle)

    p = sub.add_parser("lab-vault", help="a local Serial Vault for labs, demos and tests (not for production)",
                       description="Serve the Serial Vault's device API (request-id, serial, version) on HOST:PORT, "
                                   "signing serials with a brand key it makes in DIR on first use, beside the "
                                   "model assertion, the brand's account-key and the api-key an agent needs. "
                                   "It prints its URL on stdout; its keys sit unencrypted in DIR. A factory "
                                   "rehearses its line with it: --fail 503 --times 3 (an outage), --refuse "
                                   "invalid-api-key (a refusal a person must fix), --delay 5 (a slow vault), "
                                   "--self-signed (HTTPS with a private CA, as production has).",
                       epilog="exit status: 0 stopped by SIGTERM/SIGINT, 2 usage, 78 DIR or a TLS file cannot be "
                              "used")
    p.add_argument("--dir", required=True, metavar="DIR", help="keys, trust chain and api-key live here (required)")
    p.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                   help="where to listen (default 127.0.0.1:0: a free port)")
    p.add_argument("--brand", default="acme", help="brand-id (default acme)")
    p.add_argument("--model", default="acme-gw", help="model name (default acme-gw)")
    p.add_argument("--api-key", metavar="KEY", help="default: a random key, kept in DIR/api-key")
    p.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="and this private key (PEM)")
    p.add_argument("--hardware-identity", action="store_true",
                   help="a lab Model Service: no api-key; a serial-request's body must carry a request-id "
                        "signature by a hardware identity whose hardware-identity assertion (signed by the brand "
                        "key, DIR/brand-key.pem) is in DIR/hardware-identities/")
    p.add_argument("--self-signed", action="store_true",
                   help="serve HTTPS with a private CA made in DIR on first use and kept: point the agent's "
                        "vault.ca-file at DIR/ca.pem")
    rehearse = p.add_argument_group(
        "rehearsal", "failures played on purpose, on device requests (request-id and serial) only: /v1/version "
                     "stays healthy, as a vault that is up but failing. Each rehearsed answer is logged on stderr.")
    play = rehearse.add_mutually_exclusive_group()
    play.add_argument("--fail", type=_http_error, metavar="STATUS",
                      help="answer this HTTP status (400-599, e.g. 503 or 429; or 202, accepted: poll later) "
                           "instead of the real answer")
    play.add_argument("--refuse", type=_vault_code, metavar="CODE",
                      help="answer this vault error code (HTTP 400 with the real vault's JSON body), e.g. "
                           "invalid-api-key, invalid-model, invalid-nonce")
    rehearse.add_argument("--times", type=_count, metavar="N",
                          help="rehearse on the first N device requests only, then answer normally "
                               "(default: on every one)")
    rehearse.add_argument("--retry-after", type=_whole_seconds, metavar="SECONDS",
                          help="with --fail: send Retry-After: SECONDS, as a loaded vault or proxy does")
    rehearse.add_argument("--delay", type=_delay, default=0.0, metavar="SECONDS",
                          help="answer every device request SECONDS late (default 0)")
    rehearse.add_argument("--endpoint", action="append", choices=["request-id", "serial"],
                          help="play only on this endpoint (repeatable; default both)")
    rehearse.add_argument("--rate", type=_rate, metavar="R",
                          help="a vault at capacity: at most R registrations a second (a token bucket holding R); "
                               "request-ids over it are answered 429 with Retry-After, and each busy second is "
                               "logged (admitted, refused, serial-requests)")
    p.set_defaults(func=cmd_lab_vault)

    _add_hardware_identity(sub)

    p = sub.add_parser("key", help="print the device key id (or public key); --generate creates the key if missing",
                       description="Print the device key's id (snapd's SHA3-384 of the public key), or with --public "
                                   "the public key as snapd encodes it. --generate makes the RSA-4096 key if there is "
                                   "none, under the state lock (never beside a running daemon's own).",
                       epilog="exit status: 0 printed, 1 no device key (or it cannot be stored), 78 a file in the "
                              "state directory is not the agent's own")
    p.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    p.add_argument("--generate", action="store_true", help="generate the device key if there is none")
    p.add_argument("--public", action="store_true", help="print the public key as snapd encodes it")
    p.add_argument("--bits", type=int, default=keys.DEVICE_KEY_BITS, help=argparse.SUPPRESS)  # tests only
    p.set_defaults(func=cmd_key)

    p = sub.add_parser("serial-request", help="print a serial-request signed by the device key",
                       description="Print a serial-request assertion signed by the device key, as snapd builds "
                                   "it, for a vault exchange made by hand.",
                       epilog="exit status: 0 printed, 1 no device key, 78 the body file cannot be read")
    p.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    p.add_argument("--brand", required=True, help="brand-id (required)")
    p.add_argument("--model", required=True, help="model name (required)")
    p.add_argument("--request-id", required=True, help="the vault's request-id (required)")
    p.add_argument("--serial", help="the proposed serial (default: none)")
    p.add_argument("--body-file", metavar="FILE", help="the request's body (default: none)")
    p.set_defaults(func=cmd_serial_request)

    p = sub.add_parser("verify", help="check the signatures of an assertion file or stream",
                       description="Verify each assertion of FILE: serial-requests with their own device-key, the "
                                   "others with the account-keys given. One line each.",
                       epilog="exit status: 0 all verified, 1 any not verified, 78 a file cannot be read")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--account-key", action="append", default=[], metavar="FILE",
                   help="account-key assertion(s) to trust; serial-requests verify with their own device-key")
    p.set_defaults(func=cmd_verify)
    return parser


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from a TaskGroup."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.timeout and not args.once:
        parser.error("run: --timeout needs --once (the daemon itself never gives up)")
    if args.command == "lab-vault" and (problem := _lab_vault_usage(args)):
        parser.error(problem)
    try:
        try:
            return int(args.func(args))
        except BaseExceptionGroup as group:
            raise _leaf(group) from group
    except (ConfigError, UntrustedFileError) as exc:  # a person must fix a file: restarting cannot
        print(f"factory-agent: {exc}", file=sys.stderr)
        return EX_CONFIG
    except AgentError as exc:
        print(f"factory-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, keep the traceback for those who ask
        if os.environ.get("FACTORY_AGENT_DEBUG") == "1":
            traceback.print_exc()
        print(f"factory-agent: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EX_SOFTWARE
