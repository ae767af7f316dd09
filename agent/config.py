"""Configuration: TOML files merged in order (later wins) into one frozen Config.

Every error names the file and the key, and is a ConfigError (exit 78, so
systemd stops restarting a daemon that cannot work until a person fixes it).
Relative paths in a file are relative to that file's directory. The api-key
is read here, never logged, and hidden from repr().
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import stat
import string
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import assertions
from .errors import AssertionFormatError, ConfigError, SecretUnreadableError
from .onboarding import DEFAULT_HARDWARE_KEY, Hash, Method, SignatureEncoding
from .registration import Mode

DEFAULT_FILE = Path("/etc/factory-agent/agent.toml")
IDENTITY_SOURCES = ("soc-serial", "mmc-cid", "mac", "dmi", "machine-id")
# snapd mode: where the loopback relay listens. A fixed port, not an ephemeral one: snapd keeps
# re-posting to the device-service.url the hook set, so the relay must come back where it was.
DEFAULT_RELAY_LISTEN = "127.0.0.1:8622"
# Longest accepted timeout or wait: a day is far beyond any sane value, and keeps timers in range.
MAX_SECONDS = 86400.0
# Keys whose value is a secret: an error about them names the key and the type, never the value.
SECRET_KEYS = frozenset({"vault.api-key"})
# A serial template placeholder: a field name, or alternatives a|b (identity.proposed_serial).
TEMPLATE_FIELD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# What an api-key may hold: it travels as an HTTP header value, so visible ASCII and inner spaces.
_API_KEY = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


@dataclass(frozen=True, slots=True)
class VaultConfig:
    url: str
    api_key: str = field(repr=False)
    ca_file: str | None
    allow_insecure_http: bool
    trusted_account_keys: tuple[assertions.Assertion, ...] = field(repr=False)
    connect_timeout: float
    timeout: float
    api_key_file: str = ""  # where the api-key was read from (resolved), "" when it is inline


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    sources: tuple[str, ...] = ("soc-serial", "mmc-cid", "mac", "dmi")
    required: tuple[str, ...] = ()
    wait_seconds: float = 60.0
    static: Mapping[str, str] = field(default_factory=dict)
    allow_weak: bool = False


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """snapd mode's relay: a loopback address (port 0: any free port, for tests)."""

    host: str = "127.0.0.1"
    port: int = 8622


@dataclass(frozen=True, slots=True)
class OnboardingConfig:
    """Secure device onboarding: where the hardware identity key lives and how the request-id is signed."""

    method: Method = Method.API_KEY
    hardware_key: str = DEFAULT_HARDWARE_KEY  # a URI: file:PATH or pkcs11:... (RFC 7512)
    pkcs11_module: str = ""  # the PKCS#11 module (a .so) for a pkcs11: key without module-path
    hash: Hash = Hash.SHA256
    legacy_digest_field: bool = True  # also send hardware-id-key-sha384, which snapd 2.74-2.77 require
    signature_encoding: SignatureEncoding = SignatureEncoding.BASE64


@dataclass(frozen=True, slots=True)
class Config:
    brand: str
    model: str
    model_assertion: assertions.Assertion | None
    vault: VaultConfig
    serial_template: str
    identity: IdentityConfig
    files: tuple[Path, ...]
    mode: Mode = Mode.STANDALONE  # standalone: the agent owns key and serial; snapd: snapd does, through the relay
    relay: RelayConfig = field(default_factory=RelayConfig)
    onboarding: OnboardingConfig = field(default_factory=OnboardingConfig)


# key -> (type, default); a nested dict is a table. "path" is a str relative to its file.
_SCHEMA: dict[str, Any] = {
    "mode": ("str", "standalone"),
    "brand": ("str", ""),
    "model": ("str", ""),
    "model-assertion": ("path", ""),
    "vault": {
        "url": ("str", ""),
        "api-key-file": ("path", ""),
        "api-key": ("str", ""),
        "ca-file": ("path", ""),
        "allow-insecure-http": ("bool", False),
        "trusted-account-keys": ("paths", []),
        "connect-timeout": ("seconds", 10.0),
        "timeout": ("seconds", 30.0),
    },
    "serial": {"template": ("str", "{soc_serial}")},
    "identity": {
        "sources": ("strs", ["soc-serial", "mmc-cid", "mac", "dmi"]),
        "required": ("strs", []),
        "wait-seconds": ("seconds", 60.0),
        "allow-weak": ("bool", False),
        "static": "table-of-str",
    },
    "relay": {"listen": ("str", DEFAULT_RELAY_LISTEN)},
    "onboarding": {
        "method": ("str", Method.API_KEY.value),
        "hardware-key": ("str", DEFAULT_HARDWARE_KEY),
        "pkcs11-module": ("path", ""),
        "hash": ("str", Hash.SHA256.value),
        "legacy-digest-field": ("bool", True),
        "signature-encoding": ("str", SignatureEncoding.BASE64.value),
    },
}


def default_files() -> list[Path]:
    """The default file, then agent.toml.d/*.toml in name order."""
    drop_ins = sorted(DEFAULT_FILE.with_name("agent.toml.d").glob("*.toml"))
    return [DEFAULT_FILE, *drop_ins]


def load(files: Sequence[Path] | None = None, *, without_api_key: bool = False) -> Config:
    """Read, check and merge ``files`` (default: :func:`default_files`) into a Config.

    ``without_api_key``: everything but the api-key file, which is not opened (its key is ""): what the daemon
    runs on, blocked, after SecretUnreadableError, until Retry() loads the whole again."""
    paths = list(files) if files else default_files()
    merged, origin = _read_all(paths)
    return _build(merged, origin, tuple(paths), without_api_key)


def load_onboarding(files: Sequence[Path]) -> OnboardingConfig:
    """The [onboarding] table of ``files`` alone (each file still checked whole), for the factory's
    hardware-identity tooling, which runs before the rest of the configuration is in place."""
    merged, origin = _read_all(files)
    return _build_onboarding(merged, _failing(origin, tuple(files)))


def _read_all(paths: Sequence[Path]) -> tuple[dict[str, Any], dict[str, Path]]:
    merged: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    for path in paths:
        _merge(merged, origin, _check_table(_read_toml(path), _SCHEMA, path, ""), path, "")
    return merged, origin


def _failing(origin: Mapping[str, Path], files: tuple[Path, ...]) -> Any:
    def fail(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{_where(origin, key, files)}: {key!r} {msg}")
    return fail


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            _check_owner(path, os.fstat(f.fileno()), "configuration")
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"cannot read configuration {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse configuration {path}: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes the bytes itself, outside its own error
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"cannot parse configuration {path}: not UTF-8 text (line {line})") from None
    except RecursionError:
        raise ConfigError(f"cannot parse configuration {path}: arrays or tables nested too deeply") from None


# An api-key file holds one line; anything much longer is not one (and is not read whole).
MAX_API_KEY_BYTES = 4096


def _owner_problem(path: Path | str, st: os.stat_result) -> str | None:
    """Why a file the agent trusts may not be used: nobody but root (or the agent's user) may be able to change it."""
    if st.st_uid not in (0, os.geteuid()):
        return (f"is owned by uid {st.st_uid}; only root (or the agent's own user) may own what the agent "
                f"trusts: run: chown root: {path}")
    if st.st_mode & 0o022:
        return f"is writable by others (mode {st.st_mode & 0o7777:04o}): run: chmod go-w {path}"
    return None


def _check_owner(path: Path | str, st: os.stat_result, what: str) -> None:
    problem = _owner_problem(path, st)
    if problem:
        raise ConfigError(f"cannot use {what} {path}: it {problem}")


# Assertion files named by the configuration (a model, account-keys): a few KiB each.
MAX_TRUSTED_BYTES = 1024 * 1024


def _read_trusted(path: str, key: str, fail: Any) -> bytes:
    """The bytes of a file the agent trusts (``key`` names it): root's or ours, writable by nobody else, capped."""
    try:
        with open(path, "rb") as f:
            problem = _owner_problem(path, os.fstat(f.fileno()))
            if problem:
                raise fail(key, f"cannot be used: {path} {problem}")
            data = f.read(MAX_TRUSTED_BYTES + 1)
    except OSError as exc:
        raise fail(key, f"cannot be read ({path}: {exc.strerror})") from None
    if len(data) > MAX_TRUSTED_BYTES:
        raise fail(key, f"names a file over {MAX_TRUSTED_BYTES} bytes ({path})")
    return data


def _read_api_key_file(path: str, fail: Any) -> str:
    """The api-key file's text: a regular file, root's or ours, 0600 (O_NONBLOCK: a FIFO is refused, not waited on)."""
    where = "vault.api-key-file"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:  # absent, or not ours to read: fixed in the environment, not in this file's text
        raise SecretUnreadableError(str(fail(where, f"cannot be read ({path}: {exc.strerror})"))) from None
    try:
        st = os.fstat(fd)
        problem = _owner_problem(path, st)
        if problem is None and stat.S_ISDIR(st.st_mode):
            raise fail(where, f"cannot be read ({path}: Is a directory)")
        if problem is None and not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        if problem is None and st.st_mode & 0o077:
            problem = f"holds the api-key and others may read it (mode {st.st_mode & 0o7777:04o}): run: chmod 0600 {path}"
        if problem:
            raise fail(where, f"cannot be used: {path} {problem}")
        raw = os.read(fd, MAX_API_KEY_BYTES + 1)
    except OSError as exc:
        raise fail(where, f"cannot be read ({path}: {exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_API_KEY_BYTES:
        raise fail(where, f"is over {MAX_API_KEY_BYTES} bytes: not an api-key ({path})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise fail(where, f"cannot be read ({path}: not UTF-8 text)") from None


def _check_inline_key_file(path: Path) -> str | None:
    """Why the configuration file ``path``, which holds the api-key inline, may not: others may read it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot be checked ({exc.strerror})"
    if st.st_mode & 0o077:
        return (f"is set in {path}, which others may read (mode {st.st_mode & 0o7777:04o}): run: chmod 0600 {path}, "
                "or keep the key in vault.api-key-file (0600)")
    return None


def _check_table(table: Mapping[str, Any], schema: Mapping[str, Any], path: Path, prefix: str) -> dict[str, Any]:
    checked: dict[str, Any] = {}
    for key, value in table.items():
        name = prefix + key
        if key not in schema:
            raise ConfigError(f"{path}: unknown key {name!r}")
        spec = schema[key]
        if isinstance(spec, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {name!r} must be a table")
            checked[key] = _check_table(value, spec, path, name + ".")
        elif spec == "table-of-str":
            if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                raise ConfigError(f"{path}: {name!r} must be a table of strings")
            checked[key] = dict(value)
        else:
            checked[key] = _check_value(spec[0], value, path, name)
    return checked


def _check_value(kind: str, value: Any, path: Path, name: str) -> Any:
    ok = {
        "str": isinstance(value, str),
        "path": isinstance(value, str) and "\0" not in value,
        "bool": isinstance(value, bool),
        "seconds": isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_SECONDS,
        "strs": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "paths": isinstance(value, list) and all(isinstance(v, str) and "\0" not in v for v in value),
    }[kind]
    if not ok:
        expected = {"str": "a string", "path": "a path string (without NUL)", "bool": "true or false",
                    "seconds": f"a non-negative number of seconds (at most {MAX_SECONDS:g})", "strs": "a list of strings",
                    "paths": "a list of path strings (without NUL)"}[kind]
        raise ConfigError(f"{path}: {name!r} must be {expected}, not {_shown(name, value)}")
    if kind == "path" and value:
        return str(path.parent / value)
    if kind == "paths":
        return [str(path.parent / v) for v in value]
    return float(value) if kind == "seconds" else value


def _shown(name: str, value: Any) -> str:
    """How an error quotes a bad value: never a secret's, and never at length."""
    if name in SECRET_KEYS:
        return f"a {type(value).__name__} (the value is not shown)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _merge(into: dict[str, Any], origin: dict[str, Path], table: Mapping[str, Any], path: Path, prefix: str) -> None:
    for key, value in table.items():
        if isinstance(value, dict) and key != "static":
            _merge(into.setdefault(key, {}), origin, value, path, prefix + key + ".")
        elif key == "static":
            into.setdefault(key, {}).update(value)
            origin.update({f"{prefix}{key}.{k}": path for k in value})
        else:
            into[key] = value
            origin[prefix + key] = path


def _get(merged: Mapping[str, Any], dotted: str) -> Any:
    node: Any = merged
    schema: Any = _SCHEMA
    for part in dotted.split("."):
        schema = schema[part]
        node = node.get(part, {} if isinstance(schema, dict) or schema == "table-of-str" else schema[1])
    return node


def _where(origin: Mapping[str, Path], key: str, files: Iterable[Path]) -> str:
    return str(origin.get(key) or ", ".join(map(str, files)))


def _build(merged: Mapping[str, Any], origin: Mapping[str, Path], files: tuple[Path, ...],
           without_api_key: bool = False) -> Config:
    fail = _failing(origin, files)
    model_assertion = _load_model(_get(merged, "model-assertion"), fail)
    brand, model = _get(merged, "brand"), _get(merged, "model")
    if model_assertion is not None:
        for key, value in (("brand", brand), ("model", model)):
            declared = model_assertion.header("brand-id" if key == "brand" else "model")
            if value and value != declared:
                raise fail(key, f"is {value!r} but the model assertion says {declared!r}")
        brand, model = model_assertion.header("brand-id"), model_assertion.header("model")
    if not brand:
        raise fail("brand", "is required (or a model-assertion)")
    if not model or not assertions.is_model_name(model):
        raise fail("model", f"must be a lowercase model name, not {model!r}")
    return Config(
        brand=brand,
        model=model,
        model_assertion=model_assertion,
        vault=_build_vault(merged, origin, fail, without_api_key),
        serial_template=_check_template(_get(merged, "serial.template"), fail, _get(merged, "identity.static")),
        identity=_build_identity(merged, fail),
        files=files,
        mode=_check_mode(_get(merged, "mode"), fail),
        relay=_build_relay(_get(merged, "relay.listen"), fail),
        onboarding=_build_onboarding(merged, fail),
    )


def _build_onboarding(merged: Mapping[str, Any], fail: Any) -> OnboardingConfig:
    vocabularies = {"onboarding.method": Method, "onboarding.hash": Hash,
                    "onboarding.signature-encoding": SignatureEncoding}
    for key, kind in vocabularies.items():
        if _get(merged, key) not in set(kind):
            raise fail(key, f"must be one of {', '.join(repr(v.value) for v in kind)}, not {_get(merged, key)!r}")
    uri = _get(merged, "onboarding.hardware-key")
    if not uri.startswith(("file:", "pkcs11:")):
        raise fail("onboarding.hardware-key", f"must be a file:/PATH or pkcs11: URI, not {uri!r}")
    return OnboardingConfig(method=Method(_get(merged, "onboarding.method")), hardware_key=uri,
                            pkcs11_module=_get(merged, "onboarding.pkcs11-module"),
                            hash=Hash(_get(merged, "onboarding.hash")),
                            legacy_digest_field=_get(merged, "onboarding.legacy-digest-field"),
                            signature_encoding=SignatureEncoding(_get(merged, "onboarding.signature-encoding")))


def _check_mode(mode: str, fail: Any) -> Mode:
    if mode not in set(Mode):
        raise fail("mode", f"must be one of {', '.join(repr(m.value) for m in Mode)}, not {mode!r}")
    return Mode(mode)


def _build_relay(listen: str, fail: Any) -> RelayConfig:
    """A loopback HOST:PORT ([::1]:PORT for IPv6): the relay adds the api-key, so it never listens beyond the device."""
    host, sep, port = listen.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not sep or not loopback or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise fail("relay.listen", f"must be a loopback HOST:PORT such as {DEFAULT_RELAY_LISTEN!r}, not {listen!r}")
    return RelayConfig(host, int(port))


def _load_model(path: str, fail: Any) -> assertions.Assertion | None:
    if not path:
        return None
    try:
        model = assertions.decode(_read_trusted(path, "model-assertion", fail))
    except AssertionFormatError as exc:
        raise fail("model-assertion", f"is not a model assertion ({path}: {exc})") from None
    if model.type != "model":
        raise fail("model-assertion", f"is a {model.type!r} assertion, not a model ({path})")
    return model


def _build_vault(merged: Mapping[str, Any], origin: Mapping[str, Path], fail: Any,
                 without_api_key: bool = False) -> VaultConfig:
    url = _get(merged, "vault.url")
    if not url:
        raise fail("vault.url", "is required")
    if not url.startswith(("https://", "http://")):
        raise fail("vault.url", f"must be an https:// URL, not {url!r}")
    if url.startswith("http://") and not _get(merged, "vault.allow-insecure-http"):
        raise fail("vault.url", "is http://: set vault.allow-insecure-http = true for a lab vault")
    if not url.endswith("/"):
        url += "/"  # as snapd does, so that request-id and serial resolve below it
    timeout, connect = _get(merged, "vault.timeout"), _get(merged, "vault.connect-timeout")
    if timeout <= 0 or connect <= 0:
        raise fail("vault.timeout", "and vault.connect-timeout must be positive")
    ca_file = _get(merged, "vault.ca-file") or None
    if ca_file is not None:
        _check_ca_file(ca_file, fail)
    return VaultConfig(
        url=url,
        api_key=_api_key(merged, origin.get("vault.api-key"), fail, without_api_key,
                         _get(merged, "onboarding.method") == Method.HARDWARE_IDENTITY),
        ca_file=ca_file,
        allow_insecure_http=_get(merged, "vault.allow-insecure-http"),
        trusted_account_keys=_account_keys(_get(merged, "vault.trusted-account-keys"), fail),
        connect_timeout=connect,
        timeout=timeout,
        api_key_file=_get(merged, "vault.api-key-file"),
    )


def _api_key(merged: Mapping[str, Any], inline_file: Path | None, fail: Any, without_api_key: bool = False,
             hardware_identity: bool = False) -> str:
    """The api-key, checked here because it is sent as an HTTP header: a value http.client cannot
    encode, or requests refuses (and quotes in its error), would fail every exchange, or show the key.
    A device that onboards with its hardware identity has none: "" (and one configured is an error)."""
    inline, path = _get(merged, "vault.api-key"), _get(merged, "vault.api-key-file")
    if hardware_identity:
        if inline or path:
            raise fail("vault.api-key-file" if path else "vault.api-key", "is not used with onboarding.method = "
                       "'hardware-identity' (the device proves itself with its hardware identity key): remove it")
        return ""
    if inline and path:
        raise fail("vault.api-key", "and vault.api-key-file are both set: keep one")
    key, where = inline.strip(), "vault.api-key"
    if key and inline_file is not None and (problem := _check_inline_key_file(inline_file)):
        raise fail(where, problem)
    if path and without_api_key:
        return ""
    if path:
        where = "vault.api-key-file"
        key = _read_api_key_file(path, fail).strip()
        if not key:
            raise fail(where, f"is empty ({path})")
    if not key:
        raise fail("vault.api-key-file", "(or vault.api-key) is required")
    if not _API_KEY.fullmatch(key):
        detail = f" ({path})" if path else ""
        raise fail(where, f"must hold one line of printable ASCII: the api-key is sent as an HTTP header{detail}")
    return str(key)


def _check_ca_file(path: str, fail: Any) -> None:
    """A CA file the TLS layer can load (a directory is a c_rehash'ed one, used as is): else every
    exchange would fail later, and requests reports a missing one as a bare OSError."""
    try:
        problem = _owner_problem(path, os.stat(path))
    except OSError as exc:
        raise fail("vault.ca-file", f"cannot be used ({path}: {exc.strerror})") from None
    if problem:
        raise fail("vault.ca-file", f"cannot be used: {path} {problem}")
    if os.path.isdir(path):
        return
    try:
        ssl.create_default_context(cafile=path)
    except OSError as exc:  # ssl.SSLError is an OSError without strerror
        cause = exc.strerror if exc.strerror and not isinstance(exc, ssl.SSLError) else "no PEM certificate in it"
        raise fail("vault.ca-file", f"cannot be used ({path}: {cause})") from None


def _account_keys(paths: Sequence[str], fail: Any) -> tuple[assertions.Assertion, ...]:
    found = []
    for path in paths:
        try:
            stream = assertions.decode_stream(_read_trusted(path, "vault.trusted-account-keys", fail))
        except AssertionFormatError as exc:
            raise fail("vault.trusted-account-keys", f"holds an invalid assertion ({path}: {exc})") from None
        keys = [a for a in stream if a.type == "account-key"]
        if not keys:
            raise fail("vault.trusted-account-keys", f"names a file without an account-key ({path})")
        found += keys
    if not found:
        raise fail("vault.trusted-account-keys", "is required: the serial cannot be verified without the brand's account-key")
    return tuple(found)


# The fields the identity sources give (agent/identity.py's docstring); mac_<ifname> per NIC; static keys add more.
SOURCE_FIELDS = frozenset({"soc_serial", "mmc_cid", "mmc_serial", "mac", "dmi_product_serial", "dmi_product_uuid",
                           "dmi_board_serial", "machine_id"})


def _known_field(name: str, static: Mapping[str, Any]) -> bool:
    return name in SOURCE_FIELDS or name in static or (name.startswith("mac_") and len(name) > len("mac_"))


def _check_template(template: str, fail: Any, static: Mapping[str, Any] | None = None) -> str:
    """The rules identity.proposed_serial applies, so that a bad template stops here, not at registration; a
    field no source gives (a typo: {soc_serail}) too."""
    if not template:
        raise fail("serial.template", "must not be empty")
    try:
        fields = [(name, spec) for _, name, spec, _ in string.Formatter().parse(template) if name is not None]
        for name, spec in fields:
            if not all(TEMPLATE_FIELD.fullmatch(choice) for choice in name.split("|")):
                raise ValueError(f"{{{name}}} is not a field name (or an a|b list of them)")
            if "{" in (spec or ""):
                raise ValueError(f"{{{name}:{spec}}} nests a field in its format")
            unknown = [choice for choice in name.split("|") if not _known_field(choice, static or {})]
            if unknown:
                raise ValueError(f"no identity source gives the field {unknown[0]!r} (known: "
                                 f"{', '.join(sorted(SOURCE_FIELDS))}, mac_<ifname>, and [identity.static] keys)")
        template.format_map(_AnyFields())
    except (ValueError, LookupError, TypeError, AttributeError) as exc:
        raise fail("serial.template", f"is not a valid template ({exc})") from None
    return template


class _AnyFields(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "x"


def _build_identity(merged: Mapping[str, Any], fail: Any) -> IdentityConfig:
    sources = tuple(_get(merged, "identity.sources"))
    unknown = [s for s in sources if s not in IDENTITY_SOURCES]
    if unknown:
        raise fail("identity.sources", f"has unknown source(s) {unknown}; known: {list(IDENTITY_SOURCES)}")
    return IdentityConfig(
        sources=sources,
        required=tuple(_get(merged, "identity.required")),
        wait_seconds=_get(merged, "identity.wait-seconds"),
        static=dict(_get(merged, "identity.static")),
        allow_weak=_get(merged, "identity.allow-weak"),
    )
