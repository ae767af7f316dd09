"""Configuration: merged TOML files; every error names the file and the key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from tests.conftest import DATA

ACCOUNT_KEY = str(DATA / "brand" / "brand.account-key")


def write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def base(tmp: Path, extra: str = "", vault: str = "") -> Path:
    (tmp / "api-key").write_text("s3cret-key\n")
    (tmp / "api-key").chmod(0o600)  # the agent refuses an api-key file others may read
    return write(tmp, "agent.toml", f"""
brand = "acme"
model = "acme-gw"
{extra}
[vault]
url = "https://vault.example.com/v1"
api-key-file = "api-key"
trusted-account-keys = ["{ACCOUNT_KEY}"]
{vault}
""")


def test_a_minimal_file(tmp_path: Path) -> None:
    cfg = config.load([base(tmp_path)])
    assert (cfg.brand, cfg.model) == ("acme", "acme-gw")
    assert cfg.vault.url == "https://vault.example.com/v1/"  # a / appended, as snapd does
    assert cfg.vault.api_key == "s3cret-key"  # read relative to the file, stripped
    assert cfg.vault.trusted_account_keys[0].type == "account-key"
    assert cfg.serial_template == "{soc_serial}"
    assert cfg.identity.sources == ("soc-serial", "mmc-cid", "mac", "dmi") and cfg.identity.wait_seconds == 60.0
    assert "s3cret" not in repr(cfg)


def test_later_files_win_and_tables_merge(tmp_path: Path) -> None:
    drop_in = write(tmp_path, "10-line.toml", '[serial]\ntemplate = "L1-{mac}"\n[identity.static]\nmac = "b8:27:eb:00:00:01"\n'
                    '[vault]\ntimeout = 5\n')
    cfg = config.load([base(tmp_path, vault="connect-timeout = 2"), drop_in])
    assert cfg.serial_template == "L1-{mac}" and cfg.identity.static == {"mac": "b8:27:eb:00:00:01"}
    assert (cfg.vault.timeout, cfg.vault.connect_timeout) == (5.0, 2.0)
    assert cfg.vault.url == "https://vault.example.com/v1/"


def test_model_assertion_gives_brand_and_model(tmp_path: Path) -> None:
    cfg = config.load([base(tmp_path, extra=f'model-assertion = "{DATA / "brand" / "model-acme-gw.assert"}"')])
    assert cfg.model_assertion is not None and cfg.model_assertion.type == "model"


@pytest.mark.parametrize(
    ("extra", "vault", "message"),
    [
        ("colour = 1", "", "unknown key 'colour'"),
        ("", "urll = 1", "unknown key 'vault.urll'"),
        ('brand = 7', "", "'brand' must be a string"),
        ("", "timeout = -1", "'vault.timeout' must be a non-negative number"),
        ("", "allow-insecure-http = \"yes\"", "'vault.allow-insecure-http' must be true or false"),
        ("", 'api-key = "inline"', "are both set"),
        ("", 'ca-file = 5', "'vault.ca-file' must be a path string"),
        ("[identity]\nsources = [\"soc-serial\", \"tpm\"]", "", "unknown source"),
        ("[serial]\ntemplate = \"{soc_serial\"", "", "'serial.template' is not a valid template"),
        ('model = "Acme GW"', "", "'model' must be a lowercase model name"),
        (f'model-assertion = "{DATA / "serial.assert"}"', "", "is a 'serial' assertion, not a model"),
        ('model-assertion = "nope.assert"', "", "'model-assertion' cannot be read"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path: Path, extra: str, vault: str, message: str) -> None:
    path = base(tmp_path, extra="" if extra.startswith(("brand", "model =")) else extra, vault=vault)
    if extra.startswith(("brand", "model =")):  # replace the key instead of repeating it
        key = extra.split(" ")[0]
        path.write_text("\n".join(extra if line.startswith(key + " ") else line for line in path.read_text().splitlines()))
    if extra.startswith("[") and "\n" in extra:  # a table must come after the top-level keys
        path.write_text(path.read_text().replace(extra, "") + "\n" + extra + "\n")
    with pytest.raises(ConfigError) as info:
        config.load([path])
    assert message in str(info.value) and str(path) in str(info.value)


def test_model_assertion_mismatch(tmp_path: Path) -> None:
    path = base(tmp_path, extra=f'model-assertion = "{DATA / "brand" / "model-acme-gw.assert"}"')
    path.write_text(path.read_text().replace('model = "acme-gw"', 'model = "other-gw"'))
    with pytest.raises(ConfigError, match="model assertion says 'acme-gw'"):
        config.load([path])


def test_http_needs_allow_insecure_http(tmp_path: Path) -> None:
    path = base(tmp_path)
    path.write_text(path.read_text().replace("https://vault", "http://vault"))
    with pytest.raises(ConfigError, match="allow-insecure-http"):
        config.load([path])
    path.write_text(path.read_text() + "allow-insecure-http = true\n")
    assert config.load([path]).vault.url.startswith("http://")


def test_api_key_problems(tmp_path: Path) -> None:
    path = base(tmp_path)
    (tmp_path / "api-key").unlink()
    with pytest.raises(ConfigError, match=r"'vault.api-key-file' cannot be read .*api-key: No such file"):
        config.load([path])
    (tmp_path / "api-key").write_text("\n")
    (tmp_path / "api-key").chmod(0o600)
    with pytest.raises(ConfigError, match="is empty"):
        config.load([path])
    (tmp_path / "api-key").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load([path])


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o444])
def test_an_api_key_file_others_may_read_is_refused_with_the_chmod_to_run(tmp_path: Path, mode: int) -> None:
    path = base(tmp_path)
    (tmp_path / "api-key").chmod(mode)
    with pytest.raises(ConfigError) as info:
        config.load([path])
    assert f"'vault.api-key-file' cannot be used: {tmp_path / 'api-key'} holds the api-key and others may read it " \
           f"(mode {mode:04o}): run: chmod 0600 {tmp_path / 'api-key'}" in str(info.value)
    assert "s3cret-key" not in str(info.value)


def test_an_api_key_file_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    path = base(tmp_path)
    (tmp_path / "api-key").unlink()
    os.mkfifo(tmp_path / "api-key", 0o600)  # opened without O_NONBLOCK, this would wait for a writer forever
    with pytest.raises(ConfigError, match="is not a regular file"):
        config.load([path])


def test_an_inline_api_key_in_a_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "agent.toml", f"""
brand = "acme"
model = "acme-gw"
[vault]
url = "https://vault.example.com/v1"
api-key = "inline-s3cret"
trusted-account-keys = ["{ACCOUNT_KEY}"]
""")
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        config.load([path])
    assert f"'vault.api-key' is set in {path}, which others may read (mode 0644): run: chmod 0600 {path}" in str(info.value)
    assert "inline-s3cret" not in str(info.value)
    path.chmod(0o600)
    assert config.load([path]).vault.api_key == "inline-s3cret"


@pytest.mark.parametrize("mode", [0o666, 0o664, 0o646])
def test_a_configuration_file_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = base(tmp_path)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=rf"cannot use configuration {path}: it is writable by others "
                                          rf"\(mode {mode:04o}\): run: chmod go-w {path}"):
        config.load([path])


def test_a_configuration_or_api_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    path = base(tmp_path)
    os.chown(tmp_path / "api-key", 65534, 65534)
    with pytest.raises(ConfigError, match=r"api-key is owned by uid 65534; only root .* run: chown root: "):
        config.load([path])
    os.chown(tmp_path / "api-key", 0, 0)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match=rf"cannot use configuration {path}: it is owned by uid 65534"):
        config.load([path])


@pytest.mark.parametrize("key", ["vault.trusted-account-keys", "model-assertion", "vault.ca-file"])
def test_a_trusted_file_others_may_write_is_refused(tmp_path: Path, key: str) -> None:
    """Whoever may change the account-key, the model or the CA decides what the agent trusts."""
    source = {"vault.trusted-account-keys": DATA / "brand" / "brand.account-key",
              "model-assertion": DATA / "brand" / "model-acme-gw.assert", "vault.ca-file": None}[key]
    planted = tmp_path / "trusted"
    if source is None:
        import trustme

        trustme.CA().cert_pem.write_to_path(str(planted))
    else:
        planted.write_bytes(source.read_bytes())
    planted.chmod(0o666)
    line = {"vault.trusted-account-keys": f'trusted-account-keys = ["{planted}"]',
            "model-assertion": f'model-assertion = "{planted}"', "vault.ca-file": f'ca-file = "{planted}"'}[key]
    path = base(tmp_path, extra=line if key == "model-assertion" else "", vault=line if key != "model-assertion" else "")
    if key == "vault.trusted-account-keys":
        path.write_text(path.read_text().replace(f'trusted-account-keys = ["{ACCOUNT_KEY}"]\n', ""))
    with pytest.raises(ConfigError, match=rf"'{key}' cannot be used: {planted} is writable by others \(mode 0666\): "
                                          rf"run: chmod go-w {planted}"):
        config.load([path])
    planted.chmod(0o644)
    config.load([path])


def test_trust_is_required_and_checked(tmp_path: Path) -> None:
    path = base(tmp_path)
    path.write_text(path.read_text().replace(f'["{ACCOUNT_KEY}"]', "[]"))
    with pytest.raises(ConfigError, match="trusted-account-keys' is required"):
        config.load([path])
    path.write_text(path.read_text().replace("[]", f'["{DATA / "serial.assert"}"]'))
    with pytest.raises(ConfigError, match="without an account-key"):
        config.load([path])
    (tmp_path / "junk").write_text("junk")
    path.write_text(path.read_text().replace(str(DATA / "serial.assert"), str(tmp_path / "junk")))
    with pytest.raises(ConfigError, match="invalid assertion"):
        config.load([path])


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        config.load([tmp_path / "absent.toml"])
    bad = write(tmp_path, "bad.toml", "brand = \n")
    with pytest.raises(ConfigError, match=f"cannot parse configuration {bad}"):
        config.load([bad])


def test_the_api_key_files_path_is_kept_resolved_and_inline_keys_have_none(tmp_path: Path) -> None:
    assert config.load([base(tmp_path)]).vault.api_key_file == str(tmp_path / "api-key")
    inline = write(tmp_path, "inline.toml", base(tmp_path).read_text().replace('api-key-file = "api-key"',
                                                                              'api-key = "s3cret-key"'))
    inline.chmod(0o600)
    assert config.load([inline]).vault.api_key_file == ""


def test_onboarding_defaults_and_values(tmp_path: Path) -> None:
    assert config.load([base(tmp_path)]).onboarding == config.OnboardingConfig()
    assert config.OnboardingConfig().hardware_key == "file:/var/lib/factory-agent-identity/hardware-key.pem"
    cfg = config.load([base(tmp_path, extra='[onboarding]\nhardware-key = "file:/srv/id/k.pem"\nhash = "sha3-384"\n'
                                            'legacy-digest-field = false\nsignature-encoding = "hex"\n')])
    assert (cfg.onboarding.hardware_key, cfg.onboarding.hash, cfg.onboarding.legacy_digest_field,
            cfg.onboarding.signature_encoding) == ("file:/srv/id/k.pem", "sha3-384", False, "hex")


@pytest.mark.parametrize("table, message", [
    ('hash = "sha1"', "'onboarding.hash' must be one of 'sha256', 'sha384', 'sha512', 'sha3-384', not 'sha1'"),
    ('signature-encoding = "base32"', "'onboarding.signature-encoding' must be one of"),
    ('hardware-key = "tpm2:handle=1"', "'onboarding.hardware-key' must be a file:/PATH or pkcs11: URI"),
    ("legacy-digest-field = 1", "'onboarding.legacy-digest-field' must be true or false"),
    ('method = "tpm"', "'onboarding.method' must be one of"),
])
def test_onboarding_errors_name_the_file_and_the_key(tmp_path: Path, table: str, message: str) -> None:
    path = base(tmp_path, extra=f"[onboarding]\n{table}\n")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        config.load([path])
    assert str(path) in str(caught.value)


def test_load_onboarding_reads_that_table_alone(tmp_path: Path) -> None:
    """The factory's tooling runs before the vault is configured: a file with [onboarding] only is enough."""
    path = write(tmp_path, "id.toml", '[onboarding]\nhash = "sha384"\n')
    assert config.load_onboarding([path]).hash == "sha384"
    with pytest.raises(ConfigError, match="'brand' is required"):
        config.load([path])


def test_hardware_identity_onboarding_needs_no_api_key_and_refuses_one(tmp_path: Path) -> None:
    text = base(tmp_path, extra='[onboarding]\nmethod = "hardware-identity"\n').read_text()
    without = write(tmp_path, "hwid.toml", text.replace('api-key-file = "api-key"\n', ""))
    cfg = config.load([without])
    assert cfg.onboarding.method == "hardware-identity" and cfg.vault.api_key == "" and cfg.vault.api_key_file == ""
    with pytest.raises(ConfigError, match=re.escape("'vault.api-key-file' is not used with onboarding.method = "
                                                    "'hardware-identity'")) as caught:
        config.load([write(tmp_path, "both.toml", text)])
    assert str(tmp_path / "both.toml") in str(caught.value)
    with pytest.raises(ConfigError, match=re.escape("'onboarding.method' must be one of 'api-key', 'hardware-identity'")):
        config.load([write(tmp_path, "typo.toml", text.replace("hardware-identity", "hardware-id"))])
