"""`factory-agent check`: a preflight, one line per check, that changes nothing.

Each check is a function returning a :class:`Result`; one that raises is
reported as an error of its own, never a crash of the others. Nothing is
written: no state directory is made, no key generated, no lock taken, and the
only vault call that is not a GET is one POST /v1/request-id, which the vault
answers with a nonce and registers nothing.

Bounds, stated: every network step (DNS, TCP, TLS, each HTTP call) is given
NET_TIMEOUT seconds or the configured vault timeouts, whichever is smaller;
free space under MIN_FREE_BYTES is a warning; a clock before NOT_BEFORE is an
error.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import absent, store
from .errors import AgentError, VaultError

if TYPE_CHECKING:
    from .vault import Certificate

NET_TIMEOUT = 5.0
# The state directory holds a few KiB (store.py's caps); 10 MiB leaves room for the journal's neighbours too.
MIN_FREE_BYTES = 10 * 1024 * 1024
# The package's build date, as a floor for the clock: the day this check was written (bumped at each
# release). A board whose RTC lost power boots in 1970 or 2000, far before it; a fixed date, not a file's
# mtime, because package managers and checkouts reset mtimes.
NOT_BEFORE = datetime(2026, 12, 1, tzinfo=UTC)
# Installed files, as packaging/debian/factory-agent.install puts them.
INSTALLED = (Path("/usr/share/dbus-1/system.d/io.factoryagent.Agent1.conf"),
             Path("/lib/systemd/system/factory-agent.service"))
_STATUS = ("ok", "warning", "error")


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    title: str
    status: str  # ok, warning, error
    detail: str
    hint: str = ""

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "title": self.title, "status": self.status, "detail": self.detail, "hint": self.hint}


@dataclass
class _Context:
    files: list[Path] | None
    state_dir: Path
    cfg: Any = None  # config.Config once loaded
    config_error: str = ""
    cert: Certificate | None = None  # the vault's certificate, when TLS showed one
    reachable: bool = False
    secure: bool = False  # TLS verified (or http:// allowed): the HTTP checks can run


def _skip(cid: str, title: str, why: str, status: str = "warning") -> Result:
    return Result(cid, title, status, f"skipped: {why}", "fix the check it depends on first")


Check = Callable[[_Context], Result]


def _needs_config(cid: str, title: str, status: str) -> Callable[[Check], Check]:
    """The check as written once the configuration loads; until then, skipped with ``status``."""
    def wrap(check: Check) -> Check:
        @functools.wraps(check)
        def checked(ctx: _Context) -> Result:
            if ctx.cfg is None:
                return _skip(cid, title, "the configuration does not load", status)
            return check(ctx)
        return checked
    return wrap


def check_config(ctx: _Context) -> Result:
    from . import config
    from .errors import ConfigError, UntrustedFileError

    try:
        ctx.cfg = config.load(ctx.files)
    except (ConfigError, UntrustedFileError) as exc:
        ctx.config_error = str(exc)
        return Result("config", "configuration", "error", ctx.config_error,
                      "fix the file and key named above (factory-agent run would exit 78)")
    return Result("config", "configuration", "ok", f"loaded {', '.join(map(str, ctx.cfg.files))}; brand "
                  f"{ctx.cfg.brand}, model {ctx.cfg.model}, mode {ctx.cfg.mode.value}")


@_needs_config("secrets", "api-key and account-keys", "error")
def check_secrets(ctx: _Context) -> Result:
    """config.load read the api-key file (0600, ours or root's) and the account-keys; here: that they are the brand's."""
    title = "api-key and account-keys"
    keys = ctx.cfg.vault.trusted_account_keys
    if not any(k.header("account-id") == ctx.cfg.brand for k in keys):
        others = sorted({k.header("account-id") for k in keys})
        return Result("secrets", title, "error", f"no trusted account-key is the brand {ctx.cfg.brand!r}'s (only "
                      f"{', '.join(others)}'s)", "set vault.trusted-account-keys to the brand's account-key file")
    if os.geteuid() == 0:
        for path in filter(None, [ctx.cfg.vault.api_key_file]):
            if os.stat(path).st_uid != 0:
                return Result("secrets", title, "error", f"{path} is not owned by root",
                              f"run: chown root:root {path}")
    how = "api-key readable by its owner only" if ctx.cfg.vault.api_key else "no api-key (hardware identity)"
    return Result("secrets", title, "ok", f"{how}; {len(keys)} account-key(s) of "
                  f"{ctx.cfg.brand}: {', '.join(k.header('public-key-sha3-384')[:12] for k in keys)}")


@_needs_config("hardware-key", "hardware identity key", "error")
def check_hardware_key(ctx: _Context) -> Result:
    """Secure onboarding: the key is there, of a type snapd verifies, and signs (a throw-away nonce, sent nowhere)."""
    from . import hwkey, onboarding
    from .errors import ConfigError, HardwareKeyError

    title, settings = "hardware identity key", ctx.cfg.onboarding
    if settings.method is not onboarding.Method.HARDWARE_IDENTITY:
        return Result("hardware-key", title, "ok", "not used (onboarding.method = api-key)")
    try:
        key = hwkey.open_key(settings.hardware_key, settings.pkcs11_module)
        key.sign(b"factory-agent check", settings.hash)
    except (HardwareKeyError, ConfigError) as exc:
        return Result("hardware-key", title, "error", str(exc), "make it with factory-agent hardware-identity init, "
                      "or fix its token, PIN file or module")
    digest = onboarding.spki_digest(key.public_der())
    return Result("hardware-key", title, "ok", f"{key.key_type} at {key.uri}, signs with {settings.hash}; "
                  f"hardware-id-key-sha3-384 {digest} (its hardware-identity assertion must be imported)")


@_needs_config("model-assertion", "model assertion", "warning")
def check_model(ctx: _Context) -> Result:
    model = ctx.cfg.model_assertion
    if model is None:
        return Result("model-assertion", "model assertion", "ok", "none configured (brand and model from the "
                      "configuration)")
    return Result("model-assertion", "model assertion", "ok", f"parses; brand {model.header('brand-id')}, model "
                  f"{model.header('model')}, as configured")


@_needs_config("identity", "identity and proposed serial", "error")
def check_identity(ctx: _Context) -> Result:
    from . import identity

    title = "identity and proposed serial"
    cfg = ctx.cfg.identity
    found = identity.read_identity(cfg)  # no waiting: what the board shows now
    missing = found.missing(cfg.required, cfg.allow_weak)
    if missing:
        return Result("identity", title, "error", f"required field(s) missing: "
                      f"{identity.explain_missing(found, missing, cfg.allow_weak)}",
                      "check the board, or identity.required and identity.allow-weak")
    try:
        serial = identity.proposed_serial(found, ctx.cfg.serial_template, cfg.allow_weak)
    except AgentError as exc:
        return Result("identity", title, "error", f"serial.template in {_where(ctx.cfg)}: {exc}",
                      "fix serial.template, or identity.allow-weak; run: factory-agent identity")
    weak = [v.name for v in found.values if v.weak]
    note = f"; weak field(s) {', '.join(weak)} {'allowed' if cfg.allow_weak else 'not used'}" if weak else ""
    return Result("identity", title, "ok", f"proposed serial {serial!r} from {ctx.cfg.serial_template!r}{note}")


def check_state_dir(ctx: _Context) -> Result:
    path, title = ctx.state_dir, "state directory"
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        parent = next((p for p in path.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK | os.X_OK):
            return Result("state-dir", title, "error", f"{path} does not exist and {parent} is not writable",
                          f"run as the agent's user, or: mkdir -m 0700 {path}")
        return Result("state-dir", title, "ok", f"{path} does not exist yet: it will be made (0700) in {parent}")
    except OSError as exc:
        return Result("state-dir", title, "error", f"cannot stat {path}: {exc.strerror}", "check the path")
    try:
        store.check_directory(path, st)
    except AgentError as exc:
        return Result("state-dir", title, "error", str(exc), f"run: chown {os.geteuid()} {path}; chmod 0700 {path}")
    if not os.access(path, os.W_OK | os.X_OK):
        return Result("state-dir", title, "error", f"{path} is not writable", "check that it is not read-only")
    free = shutil.disk_usage(path).free
    detail = f"{path}: mode {stat.S_IMODE(st.st_mode):04o}, uid {st.st_uid}, {free // (1024 * 1024)} MiB free"
    if free < MIN_FREE_BYTES:
        return Result("state-dir", title, "warning", f"{detail} (under {MIN_FREE_BYTES // (1024 * 1024)} MiB)",
                      "free some space on its file system")
    return Result("state-dir", title, "ok", detail)


def check_device_key(ctx: _Context) -> Result:
    try:
        key = store.load_device_key(ctx.state_dir)
    except AgentError as exc:
        return Result("device-key", "device key", "error", str(exc), "fix or remove the file named above")
    if key is None:
        return Result("device-key", "device key", "ok", f"none in {ctx.state_dir}: it will be generated")
    return Result("device-key", "device key", "ok", f"{key.public.bits}-bit RSA, id {key.key_id}")


@_needs_config("vault-dns", "vault name", "error")
def check_dns(ctx: _Context) -> Result:
    host, port = _host_port(ctx.cfg.vault.url)
    try:
        infos = _bounded(lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), NET_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        return Result("vault-dns", "vault name", "error", f"cannot resolve {host}: {exc}",
                      "check vault.url and the DNS configuration (/etc/resolv.conf)")
    return Result("vault-dns", "vault name", "ok", f"{host} is {', '.join(sorted({i[4][0] for i in infos}))}")


@_needs_config("vault-tcp", "vault connection", "error")
def check_tcp(ctx: _Context) -> Result:
    host, port = _host_port(ctx.cfg.vault.url)
    try:
        socket.create_connection((host, port), timeout=_timeout(ctx)).close()
    except OSError as exc:
        return Result("vault-tcp", "vault connection", "error", f"cannot connect to {host}:{port}: "
                      f"{exc.strerror or exc}", "check that the vault runs, the port in vault.url, the network and "
                      "firewalls")
    ctx.reachable = True
    return Result("vault-tcp", "vault connection", "ok", f"connected to {host}:{port}")


def check_tls(ctx: _Context) -> Result:
    title = "vault TLS"
    if ctx.cfg is None or not ctx.reachable:
        return _skip("vault-tls", title, "no connection to the vault", "error")
    if ctx.cfg.vault.url.startswith("http://"):
        ctx.secure = True
        return Result("vault-tls", title, "warning", "vault.url is http://: no TLS (vault.allow-insecure-http)",
                      "use an https:// vault outside a lab")
    from . import vault

    host, port = _host_port(ctx.cfg.vault.url)
    context = ssl.create_default_context(cafile=ctx.cfg.vault.ca_file or vault.system_ca_bundle())
    try:
        with socket.create_connection((host, port), timeout=_timeout(ctx)) as sock, \
                context.wrap_socket(sock, server_hostname=host) as tls:
            ctx.cert = vault.describe_certificate(tls.getpeercert(binary_form=True) or b"")
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        ctx.cert = vault.fetch_certificate(host, port, _timeout(ctx))
        shown = _shown(ctx.cert) if ctx.cert else "no certificate could be read"
        return Result("vault-tls", title, "error", f"{host}:{port} presented an untrusted certificate "
                      f"({exc.verify_message}): {shown}",
                      "set vault.ca-file to the CA that issued it (if it is the vault's, not a proxy's)")
    except (OSError, ssl.SSLError) as exc:
        return Result("vault-tls", title, "error", f"TLS with {host}:{port} failed: {exc}",
                      "check that vault.url's port serves HTTPS")
    ctx.secure = True
    return Result("vault-tls", title, "ok", f"{version} to {host}:{port}: {_shown(ctx.cert)}")


_MINUTE = "%Y-%m-%d %H:%M"


def _shown(cert: Certificate) -> str:
    return f"{cert.subject} issued by {cert.issuer}, sha256 {cert.sha256}, valid {cert.window(_MINUTE)} UTC"


def check_clock(ctx: _Context) -> Result:
    now = datetime.now(UTC)
    shown = f"{now:%Y-%m-%d %H:%M:%S} UTC"
    if now < NOT_BEFORE:
        return Result("clock", "clock", "error", f"device time {shown} is before this package's build date "
                      f"{NOT_BEFORE:%Y-%m-%d}", "set the clock (NTP, or: date -s) or the RTC")
    cert = ctx.cert
    if cert and cert.not_before and cert.not_after and not cert.not_before <= now <= cert.not_after:
        return Result("clock", "clock", "error", f"device time {shown} is outside the vault certificate's validity "
                      f"{cert.window(_MINUTE)} UTC",
                      "set the clock, or renew the vault's certificate")
    inside = " and within the vault certificate's validity" if ctx.cert else ""
    return Result("clock", "clock", "ok", f"{shown}, after the build date {NOT_BEFORE:%Y-%m-%d}{inside}")


def check_version(ctx: _Context) -> Result:
    title = "vault version"
    if ctx.cfg is None or not ctx.secure:
        return _skip("vault-version", title, "no trusted connection to the vault (see vault-tcp, vault-tls)", "error")
    client = _client(ctx)
    url = ctx.cfg.vault.url + "version"
    try:
        resp = client.session.get(url, timeout=_timeout(ctx), verify=client.verify, allow_redirects=False)
        data = resp.json() if resp.status_code == 200 else None
    except (OSError, ValueError) as exc:
        return Result("vault-version", title, "error", f"GET {url} failed: {type(exc).__name__}",
                      "check vault.url (it ends in /v1/) and vault.ca-file")
    finally:
        client.close()
    if not isinstance(data, dict) or not isinstance(data.get("version"), str):
        return Result("vault-version", title, "error", f"GET {url} answered HTTP {resp.status_code}, not a version",
                      "check that vault.url is the Serial Vault's and ends in /v1/")
    return Result("vault-version", title, "ok", f"{url}: version {data['version']}, revision "
                  f"{data.get('revision', '?')}")


def check_api_key(ctx: _Context) -> Result:
    title = "vault api-key"
    if ctx.cfg is None or not ctx.secure:
        return _skip("vault-api-key", title, "no trusted connection to the vault (see vault-tcp, vault-tls)", "error")
    client = _client(ctx)
    try:
        client.fetch_request_id()  # a nonce: the vault registers nothing for it
    except VaultError as exc:
        code = getattr(exc, "error_code", "") or type(exc).__name__
        hint = ("fix the api-key in vault.api-key-file (ask the vault's operator for this model's key)"
                if code == "invalid-api-key" else "see the message; check vault.url and the vault's state")
        said = str(exc) if ctx.cfg.vault.url in str(exc) else f"POST {ctx.cfg.vault.url}request-id: {exc}"
        return Result("vault-api-key", title, "error", said, hint)  # the vault's message names its URL once
    finally:
        client.close()
    sent = "accepted by" if ctx.cfg.vault.api_key else "no api-key sent (hardware identity), answered by"
    return Result("vault-api-key", title, "ok", f"{sent} {ctx.cfg.vault.url}request-id (a request-id was "
                  "issued; nothing registered)")


def check_installed(ctx: _Context) -> Result:
    missing = [str(p) for p in INSTALLED if not p.exists()]
    if missing:
        return Result("installed", "D-Bus policy and unit", "warning", f"not installed: {', '.join(missing)}",
                      "install the .deb (on a development machine, run the daemon with --bus session instead)")
    return Result("installed", "D-Bus policy and unit", "ok", ", ".join(map(str, INSTALLED)))


def check_kill_switch(ctx: _Context) -> Result:
    switch = absent.kill_switch()
    if switch:
        return Result("kill-switch", "kill switch", "error", f"the agent is turned off: {switch}",
                      "remove the kill switch to let it register")
    return Result("kill-switch", "kill switch", "ok", f"none ({absent.DISABLED_FILE} absent, no "
                  f"{absent.DISABLED_ARGUMENT} on the kernel command line)")


CHECKS: tuple[Check, ...] = (
    check_config, check_secrets, check_hardware_key, check_model, check_identity, check_state_dir, check_device_key,
    check_dns,
    check_tcp, check_tls, check_clock, check_version, check_api_key, check_installed, check_kill_switch)


def _where(cfg: Any) -> str:
    return ", ".join(map(str, cfg.files))


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _timeout(ctx: _Context) -> float:
    return float(min(NET_TIMEOUT, ctx.cfg.vault.connect_timeout, ctx.cfg.vault.timeout))


def _client(ctx: _Context) -> Any:
    import dataclasses

    from . import vault

    cfg = dataclasses.replace(ctx.cfg.vault, connect_timeout=_timeout(ctx), timeout=_timeout(ctx))
    return vault.Vault(cfg)


def _bounded(call: Callable[[], Any], seconds: float) -> Any:
    """``call`` in a daemon thread, given up on after ``seconds`` (getaddrinfo has no timeout of its own;
    a thread pool would be joined at exit, so a hung resolver would hold the command)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except OSError as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True, name="check-dns")
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def run_checks(files: Sequence[Path] | None, state_dir: Path) -> list[Result]:
    ctx = _Context(list(files) if files else None, state_dir)
    results = []
    for check in CHECKS:
        try:
            results.append(check(ctx))
        except Exception as exc:  # noqa: BLE001 - one broken check is reported, the others still run
            name = check.__name__.removeprefix("check_").replace("_", "-")
            results.append(Result(name, name, "error", f"the check failed: {type(exc).__name__}: {exc}",
                                  "report this as a bug with the line above"))
    return results


def exit_code(results: Sequence[Result]) -> int:
    statuses = {r.status for r in results}
    return 1 if "error" in statuses else 2 if "warning" in statuses else 0


def document(results: Sequence[Result]) -> dict[str, Any]:
    return {"schema": 1, "checks": [r.to_json() for r in results],
            "summary": {s: sum(r.status == s for r in results) for s in _STATUS}}


def lines(results: Sequence[Result]) -> list[str]:
    width = max(len(r.id) for r in results)
    out = []
    for r in results:
        out.append(f"{r.status:<8}{r.id:<{width + 2}}{r.detail}")
        if r.status != "ok" and r.hint:
            out.append(f"{'':<{width + 10}}hint: {r.hint}")
    summary = document(results)["summary"]
    out.append(f"{summary['ok']} ok, {summary['warning']} warning(s), {summary['error']} error(s)")
    return out


def main(files: Sequence[Path] | None, state_dir: Path, as_json: bool) -> int:
    started = time.monotonic()
    results = run_checks(files, state_dir)
    if as_json:
        print(json.dumps(document(results), indent=2))
    else:
        print("\n".join(lines(results)))
        print(f"(took {time.monotonic() - started:.1f} s)")
    return exit_code(results)
