"""`factory-agent check` against the real lab vault over HTTPS with a private CA, run as the real CLI.

The CA and the vault's certificate (for IP 127.0.0.1) are made here with `cryptography`. Each set-up
breaks one thing on purpose and the right check must say so with its hint; in every case the state
directory is byte for byte unchanged and the vault signed nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import check
from agent.config import load
from agent.errors import ConfigError
from tests.fakes import launcher
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import agent_argv
from tests.fakes.pki import Pki, make_pki

INSTALLED = all(p.exists() for p in check.INSTALLED)  # a development machine has neither: a warning there


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), ca_name="Check Test CA", leaf_name="lab-vault.test")


@pytest.fixture
def vault(lab_dir: Path, pki: Pki) -> Iterator[FaultyVault]:
    lab = FaultyVault(lab_dir)
    lab.start(ssl_context=pki.server_context())
    yield lab
    lab.stop()


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
            for p in sorted(directory.rglob("*"))} | {".": (directory.stat().st_mode, b"")}


def _check(tmp: Path, url: str, lab_dir: Path, *args: str, template: str = "A-{soc_serial}", vault_extra: str = "",
           api_key_file: Path | None = None) -> tuple[subprocess.CompletedProcess[str], dict[str, tuple[int, bytes]]]:
    """Run `check` on a state directory with a seeded key; the state directory must be unchanged after it."""
    state = tmp / "state"
    seed_key(state)
    before = _snapshot(state)
    config = write_agent_config(tmp, url, lab_dir, template=template, soc_serial="01", api_key_file=api_key_file,
                                vault_extra=vault_extra)
    done = launcher.run(agent_argv("check", "--config", str(config), "--state-dir", str(state), *args), timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert _snapshot(state) == before, "check changed the state directory"
    return done, before


def _by_id(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    document = json.loads(done.stdout)  # nothing else on stdout
    assert document["schema"] == 1
    counts = {s: sum(c["status"] == s for c in document["checks"]) for s in ("ok", "warning", "error")}
    assert document["summary"] == counts
    return {c["id"]: c for c in document["checks"]}


def test_healthy_set_up_all_ok(tmp_path: Path, lab_dir: Path, vault: FaultyVault, pki: Pki) -> None:
    done, _ = _check(tmp_path, vault.url, lab_dir, "--json", vault_extra=f'ca-file = "{pki.ca_file}"')
    checks = _by_id(done)
    assert done.returncode == (0 if INSTALLED else 2), done.stdout
    assert {k: c["status"] for k, c in checks.items() if k != "installed"} == dict.fromkeys(
        [k for k in checks if k != "installed"], "ok")
    assert checks["installed"]["status"] == ("ok" if INSTALLED else "warning")
    assert "proposed serial 'A-01'" in checks["identity"]["detail"]
    tls = checks["vault-tls"]["detail"]
    assert "CN=lab-vault.test issued by CN=Check Test CA" in tls and pki.fingerprint in tls
    assert "id " in checks["device-key"]["detail"]
    assert "version" in checks["vault-version"]["detail"]
    assert vault.requests[("POST", "/v1/request-id")] == 1 and vault.signed == []
    assert vault.requests[("POST", "/v1/serial")] == 0
    (tmp_path / "plain").mkdir()
    human = _check(tmp_path / "plain", vault.url, lab_dir, vault_extra=f'ca-file = "{pki.ca_file}"')[0]
    assert human.returncode == done.returncode and human.stdout.startswith("ok      config ")
    assert any(line.startswith("ok      vault-tls ") and "TLS" in line for line in human.stdout.splitlines())
    assert vault.api_key not in done.stdout + done.stderr + human.stdout + human.stderr


def test_wrong_api_key_is_an_error_with_its_hint(tmp_path: Path, lab_dir: Path, vault: FaultyVault,
                                                 pki: Pki) -> None:
    wrong = tmp_path / "wrong-api-key"
    wrong.write_text("not-the-key\n")
    wrong.chmod(0o600)
    done, _ = _check(tmp_path, vault.url, lab_dir, "--json", api_key_file=wrong,
                     vault_extra=f'ca-file = "{pki.ca_file}"')
    assert done.returncode == 1
    api = _by_id(done)["vault-api-key"]
    assert api["status"] == "error" and "invalid-api-key" in api["detail"] and api["detail"].count(vault.url) == 1
    assert "api-key-file" in api["hint"]
    assert "not-the-key" not in done.stdout + done.stderr
    assert vault.signed == []


def test_template_typo_is_an_error_naming_the_key(tmp_path: Path, lab_dir: Path, vault: FaultyVault,
                                                  pki: Pki) -> None:
    done, _ = _check(tmp_path, vault.url, lab_dir, "--json", template="A-{soc_serail}",
                     vault_extra=f'ca-file = "{pki.ca_file}"')
    assert done.returncode == 1
    failed = [c for c in _by_id(done).values() if c["status"] == "error"]
    assert failed and all("serial.template" in c["detail"] and "soc_serail" in c["detail"] for c in failed[:1])
    assert failed[0]["id"] in ("config", "identity") and failed[0]["hint"]


def test_untrusted_certificate_shows_what_was_presented(tmp_path: Path, lab_dir: Path, vault: FaultyVault,
                                                        pki: Pki) -> None:
    done, _ = _check(tmp_path, vault.url, lab_dir, "--json")  # no vault.ca-file: the system store does not know it
    assert done.returncode == 1
    checks = _by_id(done)
    tls = checks["vault-tls"]
    assert tls["status"] == "error" and "untrusted" in tls["detail"]
    assert "CN=lab-vault.test" in tls["detail"] and pki.fingerprint in tls["detail"]
    assert "vault.ca-file" in tls["hint"]
    assert checks["vault-tcp"]["status"] == "ok"
    assert checks["vault-api-key"]["detail"].startswith("skipped: ")
    assert vault.requests[("POST", "/v1/request-id")] == 0 and vault.signed == []


def test_unreachable_vault_fails_tcp_within_a_bound(tmp_path: Path, lab_dir: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, then closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done, _ = _check(tmp_path, f"https://127.0.0.1:{port}/v1/", lab_dir)
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    tcp = next(i for i, line in enumerate(lines) if line.startswith("error   vault-tcp"))
    assert f"127.0.0.1:{port}" in lines[tcp] and "hint: check that the vault runs" in lines[tcp + 1]
    assert any(line.startswith("error   vault-api-key") and "skipped" in line for line in lines)
    assert elapsed < 20, f"check took {elapsed:.1f} s"


def test_a_check_that_raises_is_reported_and_the_others_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(ctx: object) -> check.Result:
        raise RuntimeError("boom")

    monkeypatch.setattr(check, "CHECKS", (broken, check.check_kill_switch))
    results = check.run_checks([tmp_path / "none.toml"], tmp_path / "state")
    assert (results[0].id, results[0].status) == ("broken", "error") and "boom" in results[0].detail
    assert results[1].id == "kill-switch" and check.exit_code(results) == 1
    assert not (tmp_path / "state").exists()


def test_template_typo_is_rejected_at_load(tmp_path: Path, lab_dir: Path) -> None:
    """A field no identity source gives stops the load (`run` exits 78, naming the key, the field and the file)
    before anything goes online; a static field of that name makes it valid."""
    config = write_agent_config(tmp_path, "http://127.0.0.1:9/v1/", lab_dir, template="A-{soc_serail}",
                                soc_serial="01")
    with pytest.raises(ConfigError, match=r"serial\.template.*'soc_serail'"):
        load([config])
    from tests.fakes.launcher import agent_argv, run

    done = run(agent_argv("run", "--config", str(config), "--state-dir", str(tmp_path / "state"), "--bus", "none",
                          "--once"), timeout=60)
    assert done.returncode == 78 and "serial.template" in done.stderr and "soc_serail" in done.stderr, done.stderr
    assert str(config) in done.stderr and "Traceback" not in done.stderr and not (tmp_path / "state").exists()
    fine = write_agent_config(tmp_path, "http://127.0.0.1:9/v1/", lab_dir, template="A-{mac_eth0}-{board}",
                              soc_serial="01")
    fine.write_text(fine.read_text() + 'board = "B7"\n')  # one more [identity.static] key
    assert load([fine]).serial_template == "A-{mac_eth0}-{board}"
