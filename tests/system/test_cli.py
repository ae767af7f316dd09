"""The command line, run as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__, assertions
from tests.conftest import DATA
from tests.fakes import launcher
from tests.fakes.launcher import agent_argv, agent_env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return launcher.run(agent_argv(*args), env=agent_env(**(env or {})), timeout=120)


def test_version() -> None:
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"factory-agent {__version__}"


def test_console_script_when_installed() -> None:
    script = Path(sys.executable).parent / "factory-agent"
    if not script.exists():
        pytest.skip("factory-agent is not installed next to this interpreter (the venv leg installs it)")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and __version__ in done.stdout


def test_key_generate_sign_and_verify(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert run("key", "--state-dir", str(state)).returncode == 1
    done = run("key", "--state-dir", str(state), "--generate")
    assert done.returncode == 0, done.stderr
    key_id = done.stdout.strip()
    assert len(key_id) == 64 and (state / "device-key.pem").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert run("key", "--state-dir", str(state), "--generate").stdout.strip() == key_id  # never a second key
    assert run("key", env={"STATE_DIRECTORY": str(state)}).stdout.strip() == key_id

    body = tmp_path / "body.yaml"
    body.write_text("serial: S-1\n")
    done = run("serial-request", "--state-dir", str(state), "--brand", "acme", "--model", "acme-gw",
               "--request-id", "R1", "--serial", "S-1", "--body-file", str(body))
    assert done.returncode == 0, done.stderr
    request = assertions.decode(done.stdout.encode())
    assert request.header("sign-key-sha3-384") == key_id and request.body == b"serial: S-1\n"
    path = tmp_path / "request.assert"
    path.write_text(done.stdout)
    done = run("verify", str(path))
    assert done.returncode == 0 and "verified" in done.stdout


def test_verify_serial_with_and_without_the_brand_key(tmp_path: Path) -> None:
    serial = str(DATA / "serial.assert")
    done = run("verify", serial, "--account-key", str(DATA / "brand" / "brand-chain.assert"))
    assert done.returncode == 0 and "serial acme/acme-gw/ACME-0001: verified" in done.stdout
    done = run("verify", serial)
    assert done.returncode == 1 and "no trusted account-key" in done.stdout
    broken = tmp_path / "broken.assert"
    broken.write_bytes((DATA / "serial.assert").read_bytes().replace(b"ACME-0001", b"ACME-0002"))
    done = run("verify", str(broken), "--account-key", str(DATA / "brand" / "brand.account-key"))
    assert done.returncode == 1 and "NOT verified" in done.stdout


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    done = run("verify", str(tmp_path / "missing.assert"))
    assert done.returncode == 78
    assert done.stderr.startswith("factory-agent: cannot read assertion file") and "Traceback" not in done.stderr
    (tmp_path / "junk").write_bytes(b"\xff\xfe not an assertion")
    done = run("verify", str(tmp_path / "junk"))
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr


def test_an_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run("key", "--state-dir", str(blocker / "sub"), "--generate", "--bits", "2048")
    assert done.returncode == 1 and "Not a directory" in done.stderr
    assert str(blocker / "sub") in done.stderr and len(done.stderr.splitlines()) == 1


def test_every_subcommand_help_runs_as_a_process() -> None:
    for name in sorted(_subcommands()):
        done = launcher.run(agent_argv(*name.split(), "--help"), timeout=30)
        assert done.returncode == 0 and "exit status:" in done.stdout and not done.stderr, (name, done.stderr)


def _subcommands() -> list[str]:
    from tests.unit.test_cli_help import subparsers

    return sorted(subparsers())
