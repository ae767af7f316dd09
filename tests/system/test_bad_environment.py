"""Bad configuration and a bad environment: `run --once --bus none` as a real process.

Each case gives one clear stderr line naming the file, key or path and the cause, no traceback,
exit 78 when it is the configuration's fault (1 otherwise), and leaves the state directory that
was there (a registered one, or a partial one: key and state.json) byte for byte as it was.

The environment cases need root: the daemon runs as nobody (setpriv) where permissions matter,
since root ignores them; a read-only bind mount and a 64 KiB tmpfs live in a private mount
namespace (unshare -m), so nothing outside the test sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.labvault import LabVault
from tests.conftest import DATA
from tests.environment import need_private_mounts
from tests.fakes import launcher
from tests.fakes.agentconf import seed_key, write_agent_config
from tests.fakes.launcher import User, agent_argv, agent_env, as_user, run_args

NOBODY = 65534
SOC_SERIAL = "00000000bad0e201"
KEY_ID = (DATA / "device" / "device-key.id").read_text().strip()
EX_CONFIG = 78


def run_agent(config: Path, state: Path, *, prefix: list[str] | None = None, user: User | None = None,
              timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``run --once`` after ``prefix``, as root or (through the launcher, from a copy it can read) as ``user``."""
    args = run_args(config, state, once=True)
    if user is None:
        return launcher.run([*(prefix or []), *agent_argv(*args)], env=agent_env(**(env or {})), timeout=timeout)
    return launcher.run([*(prefix or []), *user.argv(*args)], env=user.env(**(env or {})), cwd="/", timeout=timeout)


Snapshot = dict[str, tuple[int, int, int, bytes]]


def snapshot(state: Path) -> Snapshot:
    """Every entry of the state directory (and the directory itself): mode, owner, group, bytes."""
    found: Snapshot = {}
    for path in [state, *sorted(state.iterdir())]:
        st = path.lstat()
        found["." if path == state else path.name] = (st.st_mode, st.st_uid, st.st_gid,
                                                      b"" if path.is_dir() else path.read_bytes())
    return found


def assert_one_line(done: subprocess.CompletedProcess[str], status: int, *parts: str) -> str:
    """Exit ``status`` and exactly one stderr line, "factory-agent: ...", holding every one of ``parts``."""
    lines = done.stderr.splitlines()
    assert done.returncode == status and len(lines) == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    line = lines[0]
    assert line.startswith("factory-agent: "), line
    for part in parts:
        assert part in line, (part, line)
    return line


# ---- the states to protect --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vault(lab_dir: Path) -> Iterator[LabVault]:
    lab = LabVault(lab_dir)
    lab.start()
    yield lab
    lab.stop()


def lab_config(directory: Path, lab: LabVault, **extra: str) -> Path:
    return write_agent_config(directory, lab.url, lab.directory, template="BAD-{soc_serial}", soc_serial=SOC_SERIAL,
                              **extra)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory, vault: LabVault) -> dict[str, Path]:
    """A registered state made by a real registration, and a partial one (key and state.json, key-ready)."""
    base = tmp_path_factory.mktemp("states")
    registered = base / "registered"
    seed_key(registered)
    done = run_agent(lab_config(base, vault), registered)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in registered.iterdir()) == ["device-key.pem", "serial.assertion", "state.json"]
    partial = base / "partial"
    seed_key(partial)
    (partial / "state.json").write_text(json.dumps({"schema": 1, "phase": "key-ready", "key-id": KEY_ID}, indent=2) + "\n")
    (partial / "state.json").chmod(0o600)
    return {"registered": registered, "partial": partial}


def copy_state(template: Path, where: Path) -> Path:
    shutil.copytree(template, where, copy_function=shutil.copy2)
    where.chmod(0o700)
    return where


@pytest.fixture(params=["registered", "partial"])
def state(request: pytest.FixtureRequest, templates: dict[str, Path], tmp_path: Path) -> Path:
    return copy_state(templates[str(request.param)], tmp_path / "state")


# ---- configuration: exit 78, one line naming the file and the key ---------------------------------

Edit = Callable[[Path, Path], tuple[Path, list[str]]]  # (config, tmp) -> (config to pass, expected parts)


def _missing_file(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    gone = tmp / "nowhere.toml"
    return gone, [f"cannot read configuration {gone}", "no such file"]


def _bad_toml(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace("[vault]", '[vault\nurl = "unterminated'))
    return config, [f"cannot parse configuration {config}", "line"]


def _unknown_key(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace("[vault]\n", '[vault]\napi-kee = "x"\n'))
    return config, [str(config), "unknown key 'vault.api-kee'"]


def _wrong_type(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace("[vault]\n", '[vault]\ntimeout = "30"\n'))
    return config, [str(config), "'vault.timeout' must be", "'30'"]


def _http_without_allow(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace("allow-insecure-http = true\n", ""))
    return config, [str(config), "'vault.url' is http://", "allow-insecure-http"]


def _missing_api_key_file(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    text = config.read_text()
    start = text.index('api-key-file = "') + len('api-key-file = "')
    old = text[start:text.index('"', start)]
    config.write_text(text.replace(old, str(tmp / "no-api-key")))
    return config, [str(config), "'vault.api-key-file' cannot be read", str(tmp / "no-api-key"), "No such file or directory"]


def _api_key_file_is_a_directory(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "keydir").mkdir()
    text = config.read_text()
    start = text.index('api-key-file = "') + len('api-key-file = "')
    config.write_text(text.replace(text[start:text.index('"', start)], str(tmp / "keydir")))
    return config, [str(config), "'vault.api-key-file' cannot be read", "Is a directory"]


def _missing_trust(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    text = config.read_text()
    start = text.index("trusted-account-keys = [")
    config.write_text(text[:start] + f'trusted-account-keys = ["{tmp / "no.account-key"}"]' + text[text.index("]", start) + 1:])
    return config, [str(config), "'vault.trusted-account-keys' cannot be read", "No such file or directory"]


def _missing_ca_file(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace("[vault]\n", f'[vault]\nca-file = "{tmp / "no-ca.pem"}"\n'))
    return config, [str(config), "'vault.ca-file' cannot be used", str(tmp / "no-ca.pem"), "No such file or directory"]


def _ca_file_without_a_certificate(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "ca.pem").write_text("not a certificate\n")
    config.write_text(config.read_text().replace("[vault]\n", f'[vault]\nca-file = "{tmp / "ca.pem"}"\n'))
    return config, [str(config), "'vault.ca-file' cannot be used", "no PEM certificate"]


def _not_utf8(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_bytes(config.read_bytes().replace(b"[serial]", b"# caf\xe9 line 3\n[serial]"))
    return config, [f"cannot parse configuration {config}"]


def _template_indexing(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace('template = "BAD-{soc_serial}"', 'template = "BAD-{soc_serial[x]}"'))
    return config, [str(config), "'serial.template'"]


def _timeout_out_of_range(config: Path, tmp: Path) -> tuple[Path, list[str]]:
    config.write_text(config.read_text().replace("[vault]\n", "[vault]\ntimeout = 1e300\n"))
    return config, [str(config), "'vault.timeout'"]


CONFIG_CASES: dict[str, Edit] = {
    "missing-file": _missing_file,
    "bad-toml": _bad_toml,
    "unknown-key": _unknown_key,
    "wrong-type": _wrong_type,
    "http-without-allow-insecure-http": _http_without_allow,
    "missing-api-key-file": _missing_api_key_file,
    "api-key-file-is-a-directory": _api_key_file_is_a_directory,
    "missing-trusted-account-key": _missing_trust,
    "missing-ca-file": _missing_ca_file,  # requests raised a bare OSError at the first exchange: exit 70
    "ca-file-without-a-certificate": _ca_file_without_a_certificate,
    # found by tests/fuzz: these exited 70 ("internal error"), or with a traceback, before the fix
    "not-utf8": _not_utf8,
    "template-indexing": _template_indexing,
    "timeout-out-of-range": _timeout_out_of_range,
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_a_configuration_problem_is_one_line_exit_78_and_touches_nothing(case: str, state: Path, tmp_path: Path,
                                                                       vault: LabVault) -> None:
    config, parts = CONFIG_CASES[case](lab_config(tmp_path, vault), tmp_path)
    before = snapshot(state)
    done = run_agent(config, state)
    assert_one_line(done, EX_CONFIG, *parts)
    assert snapshot(state) == before


# ---- the environment: permissions (as nobody), a read-only mount, a full disk ---------------------


def need(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (to run as nobody, and to mount in a private namespace)")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (util-linux)")


@pytest.fixture
def open_dir(vault: LabVault) -> Iterator[Path]:
    """A directory anyone can read (pytest's tmp_path is root's 0700): the config, its files, the state."""
    directory = Path(tempfile.mkdtemp(prefix="fa-badenv-"))
    directory.chmod(0o755)
    for name in ("model.assert", "brand.account-key"):
        shutil.copy(vault.directory / name, directory / name)
        (directory / name).chmod(0o644)
    (directory / "api-key").write_text(vault.api_key + "\n")
    (directory / "api-key").chmod(0o600)  # nobody must get past the config to the state: the key is its own
    os.chown(directory / "api-key", NOBODY, NOBODY)
    config = write_agent_config(directory, vault.url, directory, template="BAD-{soc_serial}", soc_serial=SOC_SERIAL)
    config.chmod(0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def need_nobody() -> User:
    """How to run the daemon as nobody: the launcher copies what it imports where nobody can read it, so the
    checkout and this leg's interpreter may sit in a directory nobody cannot enter."""
    need("setpriv")
    return as_user(NOBODY)


def chown_tree(path: Path, uid: int) -> None:
    for entry in [path, *path.iterdir()]:
        os.chown(entry, uid, uid)


def test_an_unreadable_state_dir(open_dir: Path, templates: dict[str, Path]) -> None:
    """root's 0700 state directory, the daemon as nobody: one line naming the directory and the cause."""
    nobody = need_nobody()
    state = copy_state(templates["registered"], open_dir / "state")
    before = snapshot(state)
    done = run_agent(open_dir / "agent.toml", state, user=nobody, env={"HOME": str(open_dir)})
    assert_one_line(done, 1, str(state), "Permission denied")
    assert snapshot(state) == before


@pytest.mark.parametrize("what", ["agent.toml", "api-key"])
def test_an_unreadable_configuration_file(open_dir: Path, templates: dict[str, Path], what: str) -> None:
    """The configuration, or the api-key file it names, readable by root only: exit 78, one line."""
    nobody = need_nobody()
    state = copy_state(templates["registered"], open_dir / "state")
    chown_tree(state, NOBODY)
    (open_dir / what).chmod(0o600)
    os.chown(open_dir / what, 0, 0)  # readable by root only
    before = snapshot(state)
    done = run_agent(open_dir / "agent.toml", state, user=nobody, env={"HOME": str(open_dir)})
    expected = ([f"cannot read configuration {open_dir / what}"] if what == "agent.toml"
                else ["'vault.api-key-file' cannot be read", str(open_dir / what)])
    assert_one_line(done, EX_CONFIG, *expected, "Permission denied")
    assert snapshot(state) == before


def test_an_unreadable_state_file(open_dir: Path, templates: dict[str, Path]) -> None:
    """nobody's state directory holding a state.json only root may read."""
    nobody = need_nobody()
    state = copy_state(templates["partial"], open_dir / "state")
    chown_tree(state, NOBODY)
    os.chown(state / "state.json", 0, 0)
    before = snapshot(state)
    done = run_agent(open_dir / "agent.toml", state, user=nobody, env={"HOME": str(open_dir)})
    assert_one_line(done, 1, str(state / "state.json"), "Permission denied")
    assert snapshot(state) == before


def in_private_namespace(script: str, *args: str) -> list[str]:
    """argv that runs ``script`` (sh, with "$@" = the agent's argv) in a private mount namespace."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args]


READ_ONLY = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'


@pytest.mark.parametrize("kind", ["registered", "partial"])
def test_a_read_only_state_dir(kind: str, templates: dict[str, Path], tmp_path: Path, vault: LabVault) -> None:
    """A read-only bind mount of the state directory: the cause named is the read-only file system."""
    need_private_mounts()
    state = copy_state(templates[kind], tmp_path / "state")
    before = snapshot(state)
    done = run_agent(lab_config(tmp_path, vault), state, prefix=in_private_namespace(READ_ONLY, str(state)))
    assert_one_line(done, 1, str(state), "Read-only file system")
    assert snapshot(state) == before


def test_a_state_dir_to_create_on_a_read_only_file_system(tmp_path: Path, vault: LabVault) -> None:
    need_private_mounts()
    parent = tmp_path / "ro"
    parent.mkdir()
    done = run_agent(lab_config(tmp_path, vault), parent / "state", prefix=in_private_namespace(READ_ONLY, str(parent)))
    assert_one_line(done, 1, f"cannot create state directory {parent / 'state'}", "Read-only file system")
    assert list(parent.iterdir()) == []


# A 64 KiB tmpfs in a private namespace, the state copied onto it, the rest of it filled; the
# daemon runs there, then what the state directory holds is copied out for the comparison.
FULL_DISK = """
disk=$1 seed=$2 out=$3; shift 3
mount -t tmpfs -o size=64k,mode=0755 tmpfs "$disk" || exit 90
mkdir -m 0700 "$disk/state" && { [ -z "$seed" ] || cp -a "$seed/." "$disk/state/"; } || exit 91
dd if=/dev/zero of="$disk/filler" bs=1024 2>/dev/null
[ "$(df --output=avail "$disk" | tail -1 | tr -d ' ')" = 0 ] || exit 92
"$@"
rc=$?
cp -a "$disk/state/." "$out/" || exit 93
exit $rc
"""


def run_on_full_disk(tmp_path: Path, config: Path, seed: Path | None) -> tuple[subprocess.CompletedProcess[str], Path]:
    need_private_mounts()
    need("dd", "df")
    disk, out = tmp_path / "disk", tmp_path / "after"
    disk.mkdir()
    out.mkdir()
    argv = agent_argv(*run_args(config, disk / "state", once=True))
    done = launcher.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", FULL_DISK, "sh",
                         str(disk), str(seed or ""), str(out), *argv], timeout=180)
    if done.returncode in (90, 91, 92, 93):
        pytest.fail(f"cannot set up the full disk (step {done.returncode}): {done.stderr}")
    return done, out


def assert_store_error_line(done: subprocess.CompletedProcess[str], path: str) -> None:
    """Exit 1; the one line about the problem names the file and the cause; the rest are state lines."""
    lines = done.stderr.splitlines()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    assert all(line.startswith("factory-agent: ") for line in lines), done.stderr
    problem = [line for line in lines if "No space left on device" in line]
    assert len(problem) == 1 and path in problem[0] and problem[0] == lines[-1], done.stderr


@pytest.mark.parametrize("kind", ["registered", "partial"])
def test_a_full_disk_leaves_the_state_as_it_was(kind: str, templates: dict[str, Path], tmp_path: Path,
                                              vault: LabVault) -> None:
    """Registered: nothing to write, so it still starts (exit 0). Partial: the first write (state.json)
    fails with one line, exit 1; the key and the old state.json are intact and no temp file is left."""
    before = snapshot(templates[kind])
    done, after = run_on_full_disk(tmp_path, lab_config(tmp_path, vault), templates[kind])
    if kind == "registered":
        assert done.returncode == 0 and "state registered" in done.stderr, done.stderr
    else:
        assert_store_error_line(done, "state.json")
    now = snapshot(after)
    assert {k: v for k, v in now.items() if k != "."} == {k: v for k, v in before.items() if k != "."}


def test_a_full_disk_on_first_boot_stores_no_partial_key(tmp_path: Path, vault: LabVault) -> None:
    """A fresh state with an RSA-4096 key to make and store: one line, exit 1, nothing half-written."""
    done, after = run_on_full_disk(tmp_path, lab_config(tmp_path, vault), None)
    assert_store_error_line(done, str(tmp_path / "disk" / "state"))
    assert [p.name for p in after.iterdir()] == []


def test_the_snapshot_sees_what_matters(state: Path) -> None:
    """The comparison above would notice a changed byte, a changed mode and a new file."""
    before = snapshot(state)
    (state / "state.json").chmod(0o644)
    assert snapshot(state) != before
    (state / "state.json").chmod(0o600)
    (state / ".state.json.x.tmp").write_bytes(b"")
    assert snapshot(state) != before
    (state / ".state.json.x.tmp").unlink()
    assert snapshot(state) == before
    assert stat.S_IMODE(before["."][0]) == 0o700
