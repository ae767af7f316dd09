"""`factory-agent support-bundle` from the real CLI: from a registered daemon on a private bus, with no daemon,
and into a directory it cannot write.

The registered bundle is opened member by member (every JSON member parses, the state listing has the files
with modes and hashes), then every byte of it (the decompressed tar stream and each member) is searched for
the api-key and for the device key's PEM body, its base64 lines and its DER bytes.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

from tests.dbus.conftest import Daemon, seed_key, state_of, wait_for, write_config
from tests.fakes import launcher
from tests.fakes.agentconf import DATA
from tests.fakes.faultyvault import FaultyVault
from tests.fakes.launcher import agent_argv, agent_env

DEVICE_PEM = DATA / "device" / "device-key.pem"
MEMBERS = ("MANIFEST", "status.json", "status.json.stderr", "check.json", "check.json.stderr", "identity.json",
           "versions.json", "state-dir.json", "config/summary.json", "journal.txt", "systemctl-status.txt")


def _bundle(address: str, backend: str, *args: str,
            user: launcher.User | None = None) -> subprocess.CompletedProcess[str]:
    argv = ("support-bundle", "--bus", "session", *args)
    env = agent_env(bus_address=address, backend=backend)
    return launcher.run(user.argv(*argv) if user else agent_argv(*argv),
                        env=user.env(bus_address=address, backend=backend) if user else env)


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path, "r:gz") as tar:
        infos = tar.getmembers()
        tops = {i.name.split("/", 1)[0] for i in infos}
        assert len(tops) == 1 and next(iter(tops)).startswith("factory-agent-support-"), tops
        return {i.name.split("/", 1)[1]: tar.extractfile(i).read() for i in infos if i.isfile()}  # type: ignore[union-attr]


def _key_needles() -> list[tuple[str, bytes]]:
    from cryptography.hazmat.primitives import serialization

    pem = DEVICE_PEM.read_bytes()
    body_lines = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    file_der = base64.b64decode(b"".join(body_lines))  # the file's own DER, and the PKCS#8 DER of the same key
    assert len(file_der) > 1000 and len(der) > 1000
    needles = [("PEM body", b"".join(body_lines)), ("file DER", file_der), ("PKCS#8 DER", der),
               ("PKCS#8 DER base64", base64.b64encode(der))]
    needles += [(f"PEM line {i}", line) for i, line in enumerate(body_lines[:-1])]  # the last one may be short
    needles.append(("private key header", b"PRIVATE KEY-----"))
    return needles


def test_a_bundle_from_a_registered_daemon_has_every_member_and_no_secret(
        tmp_path: Path, lab: FaultyVault, bus_address: str, backend: str) -> None:
    config, state = write_config(tmp_path, lab), tmp_path / "state"
    seed_key(state)
    daemon = Daemon(bus_address, backend, config, state)
    out = tmp_path / "out" / "bundle.tar.gz"
    out.parent.mkdir()
    try:
        wait_for(lambda: state_of(bus_address) == 's "registered"')
        done = _bundle(bus_address, backend, "-o", str(out), "--config", str(config), "--state-dir", str(state))
    finally:
        daemon.stop()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{out} {out.stat().st_size} bytes" and "Traceback" not in done.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in out.parent.iterdir()] == ["bundle.tar.gz"]  # no temp left beside it
    members = _members(out)
    assert set(MEMBERS) <= set(members), sorted(members)

    manifest = json.loads(members["MANIFEST"])
    rows = {r["name"]: r for r in manifest["members"]}
    assert set(rows) == set(members) - {"MANIFEST"}
    assert rows["status.json"]["exit-status"] == 0 and "status --json" in rows["status.json"]["command"]
    assert rows["check.json"]["exit-status"] is not None  # whatever check gives (absent here: argparse's 2)
    assert manifest["child-timeout-seconds"] > 0

    status = json.loads(members["status.json"])
    assert (status["state"], status["serial"]) == ("registered", "DBUS-0000000000dbus01")
    assert json.loads(members["identity.json"])
    versions = json.loads(members["versions.json"])
    assert {"agent", "python", "kernel", "os-release", "requests", "cryptography", "pyudev", "systemd-python"} <= set(versions)
    summary = json.loads(members["config/summary.json"])
    assert summary["files"] == [str(config)] and summary["load"] == "ok"
    assert summary["api-key-file"]["path"] == str(lab.directory / "api-key") and "mode" in summary["api-key-file"]
    assert any(n.startswith("config/00-") for n in members)

    listing = {e["name"]: e for e in json.loads(members["state-dir.json"])["entries"]}
    for name in ("serial.assertion", "state.json"):
        assert listing[name]["sha256"] == hashlib.sha256((state / name).read_bytes()).hexdigest()
        assert re.fullmatch(r"0[0-7]{3}", listing[name]["mode"]) and listing[name]["size"] > 0
    key = listing["device-key.pem"]
    assert key["mode"] == "0600" and "sha256" not in key
    assert key["key-id"] == (DATA / "device" / "device-key.id").read_text().strip()

    raw = gzip.decompress(out.read_bytes())
    needles = [("api-key", lab.api_key.encode()), *_key_needles()]
    for where, data in [("tar stream", raw), *members.items()]:
        for what, needle in needles:
            assert needle not in data, f"{what} found in {where}"


def test_a_bundle_with_no_daemon_records_status_absent_and_is_still_written(
        tmp_path: Path, lab_dir: Path, bus_address: str, backend: str) -> None:
    from tests.fakes.agentconf import write_agent_config

    config = write_agent_config(tmp_path, "http://127.0.0.1:9/v1/", lab_dir, template="A-{soc_serial}", soc_serial="01")
    out = tmp_path / "b.tar.gz"
    done = _bundle(bus_address, backend, "-o", str(out), "--config", str(config), "--state-dir", str(tmp_path / "none"))
    assert done.returncode == 0, done.stderr
    members = _members(out)
    rows = {r["name"]: r for r in json.loads(members["MANIFEST"])["members"]}
    assert rows["status.json"]["exit-status"] == 69
    assert json.loads(members["status.json"])["daemon"] == "absent"
    assert "cannot list" in json.loads(members["state-dir.json"])["error"]


def test_a_planted_symlink_in_the_state_directory_is_listed_not_followed(
        tmp_path: Path, lab_dir: Path, bus_address: str, backend: str) -> None:
    secret = tmp_path / "elsewhere.pem"
    secret.write_bytes(DEVICE_PEM.read_bytes())
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "state.json").symlink_to(secret)
    (state / "serial.assertion").symlink_to(DEVICE_PEM)
    out = tmp_path / "b.tar.gz"
    done = _bundle(bus_address, backend, "-o", str(out), "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    members = _members(out)
    listing = {e["name"]: e for e in json.loads(members["state-dir.json"])["entries"]}
    assert {listing[n]["type"] for n in ("state.json", "serial.assertion")} == {"symlink"}
    assert "sha256" not in listing["state.json"] and "sha256" not in listing["serial.assertion"]
    for where, data in [("tar stream", gzip.decompress(out.read_bytes())), *members.items()]:
        for what, needle in _key_needles():
            assert needle not in data, f"{what} found in {where}"
        assert hashlib.sha256(secret.read_bytes()).hexdigest().encode() not in data, where


def test_a_bundle_to_stdout_is_a_tar_gz(tmp_path: Path, lab_dir: Path, bus_address: str, backend: str) -> None:
    from tests.fakes.agentconf import write_agent_config

    config = write_agent_config(tmp_path, "http://127.0.0.1:9/v1/", lab_dir, template="A-{soc_serial}", soc_serial="01")
    done = launcher.run(agent_argv("support-bundle", "--bus", "session", "-o", "-", "--config", str(config),
                                   "--state-dir", str(tmp_path)),
                        env=agent_env(bus_address=bus_address, backend=backend), text=False)
    assert done.returncode == 0, done.stderr
    with tarfile.open(fileobj=io.BytesIO(done.stdout), mode="r:gz") as tar:
        assert any(n.endswith("/MANIFEST") for n in tar.getnames())


def test_an_unwritable_output_directory_exits_1_with_a_clear_message(
        tmp_path: Path, bus_address: str, backend: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="bundle-"))  # world-traversable, unlike pytest's 0700 tmp_path
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o555)
        user = launcher.as_user() if os.geteuid() == 0 else None  # root writes anywhere: be nobody
        target = locked / "b.tar.gz"
        done = _bundle(bus_address, backend, "-o", str(target), "--state-dir", str(base / "none"), user=user)
        assert done.returncode == 1, (done.stdout, done.stderr)
        assert f"factory-agent: cannot write the support bundle {target}: Permission denied" in done.stderr
        assert "Traceback" not in done.stderr and list(locked.iterdir()) == []
    finally:
        shutil.rmtree(base)
    missing = tmp_path / "no-such-dir" / "b.tar.gz"
    done = _bundle(bus_address, backend, "-o", str(missing), "--state-dir", str(tmp_path))
    assert done.returncode == 1 and "No such file or directory" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_config_file_is_a_config_error(tmp_path: Path, bus_address: str, backend: str) -> None:
    done = _bundle(bus_address, backend, "-o", str(tmp_path / "b.tar.gz"), "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 78 and str(tmp_path / "nope.toml") in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b.tar.gz").exists()


def test_inline_secrets_in_the_configuration_are_redacted(tmp_path: Path, lab_dir: Path, bus_address: str,
                                                          backend: str) -> None:
    from tests.fakes.agentconf import write_agent_config

    inline, password = "inline-api-key-5f0e9c2b7d14a3", "hunter2-password-8c1d"
    config = write_agent_config(tmp_path, "http://127.0.0.1:9/v1/", lab_dir, template="A-{soc_serial}", soc_serial="01")
    text = re.sub(r"(?m)^api-key-file = .*$", f'api-key = "{inline}"', config.read_text())
    config.write_text(text + f'\n[extra]\ndb-password = "{password}"\n')
    config.chmod(0o600)
    out = tmp_path / "b.tar.gz"
    done = _bundle(bus_address, backend, "-o", str(out), "--config", str(config), "--state-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    members = _members(out)
    copied = next(v for k, v in members.items() if k.startswith("config/00-")).decode()
    assert 'api-key = "<redacted>"' in copied and 'db-password = "<redacted>"' in copied
    assert 'url = "http://127.0.0.1:9/v1/"' in copied  # what is not a secret stays readable
    for where, data in [("tar stream", gzip.decompress(out.read_bytes())), *members.items()]:
        assert inline.encode() not in data and password.encode() not in data, where


def test_a_hanging_child_is_recorded_as_a_timeout() -> None:
    import sys
    import time

    from agent import bundle

    started = time.monotonic()
    status, out, _ = bundle.run_child([sys.executable, "-c", "print('x', flush=True); import time; time.sleep(30)"],
                                      1.0)
    assert status == "timeout after 1 s" and out.startswith(b"x") and time.monotonic() - started < 10
    assert bundle.run_child(["/nonexistent/journalctl"], 1.0)[0] == "absent"
