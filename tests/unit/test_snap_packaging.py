"""packaging/snap: the YAML parses, and every name it uses exists in the project.

The snap cannot be built or booted here (snapcraft, LXD, a store, an Ubuntu Core
device); what can be checked is that it says what the project is: the console
script and its subcommands and options, the D-Bus name, the interfaces the
issue asks for, sources that exist, config keys the agent knows, the hook
and the environment variables it reads.
"""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent import __version__, cli, config, dbus_service
from tests.conftest import REPO

yaml = pytest.importorskip("yaml", reason="PyYAML (Debian python3-yaml; make deps) parses the snap's YAML")

SNAP = REPO / "packaging" / "snap"
PROJECT = REPO / "packaging"  # snapcraft's project directory: it finds snap/snapcraft.yaml there
GADGET = SNAP / "gadget-example"
HOOK = REPO / "hooks" / "prepare-device"
REQUIRED_PLUGS = {"hardware-observe", "network", "network-bind", "network-observe", "daemon-notify"}  # observe: /proc/net/tcp
# Secure onboarding's: the TPM (the system's slot) and a PKCS#11 token (a provider snap's slot); both deny
# auto-connection, so the gadget connects them.
SYSTEM_PLUGS = REQUIRED_PLUGS | {"tpm", "pkcs11"}
THIRD_PARTY_SLOTS = {"PKCS11-PROVIDER-SNAP-ID": {"pkcs11"}}  # the snap serving the token's p11-kit socket


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def snap() -> Any:
    return load(SNAP / "snapcraft.yaml")


@pytest.fixture(scope="module")
def gadget() -> Any:
    return load(GADGET / "snapcraft.yaml")


def console_script() -> str:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    name, _, target = setup["options.entry_points"]["console_scripts"].strip().partition("=")
    assert target.strip() == "agent.cli:main"
    return name.strip()


def parse_command(command: str) -> Any:
    """The app's command line as the CLI parses it ($SNAP... expanded to example paths)."""
    words = shlex.split(re.sub(r"\$(SNAP\w*)", lambda m: f"/snap-env/{m.group(1)}", command))
    assert words[0] == f"bin/{console_script()}", words[0]  # where the python plugin puts console scripts
    return cli.build_parser().parse_args(words[1:])


def is_agent_bus(interface: dict[str, Any]) -> bool:
    return interface == {"interface": "dbus", "bus": "system", "name": dbus_service.BUS_NAME}


def test_the_snap_is_this_project(snap: Any) -> None:
    assert snap["name"] == "factory-agent" and snap["version"] == __version__
    assert snap["confinement"] == "strict" and snap["base"].startswith("core")


# The python3 each base ships, which `plugin: python` builds and runs the snap with.
BASE_PYTHON = {"core20": (3, 8), "core22": (3, 10), "core24": (3, 12)}


def python_requires() -> tuple[int, int]:
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    found = re.fullmatch(r">=\s*(\d+)\.(\d+)", setup["options"]["python_requires"].strip())
    assert found, setup["options"]["python_requires"]
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize("path", [SNAP / "snapcraft.yaml", GADGET / "snapcraft.yaml"], ids=["agent", "gadget"])
def test_the_base_ships_a_python_the_project_runs_on(path: Path) -> None:
    base = load(path)["base"]
    assert base in BASE_PYTHON, f"{base}: add its Python version to BASE_PYTHON"
    assert BASE_PYTHON[base] >= python_requires(), f"{base} has Python {BASE_PYTHON[base]}, setup.cfg needs {python_requires()}"


def test_the_daemon_runs_the_agent_in_a_notify_service_with_its_interfaces(snap: Any) -> None:
    app = snap["apps"]["factory-agent"]
    args = parse_command(app["command"])
    assert (args.command, args.bus, args.once) == ("run", "system", False)
    assert args.config == ["/snap-env/SNAP/factory/agent.toml"] and args.state_dir == "/snap-env/SNAP_DATA"
    assert app["daemon"] == "notify"  # the agent sends READY=1 (systemd/factory-agent.service is Type=notify)
    assert "Type=notify" in (REPO / "systemd" / "factory-agent.service").read_text()
    assert set(app["plugs"]) >= REQUIRED_PLUGS
    (slot,) = app["slots"]
    assert is_agent_bus(snap["slots"][slot])
    assert set(app["activates-on"]) <= set(app["slots"])


def test_the_status_app_reads_the_agent_over_its_plug(snap: Any) -> None:
    app = snap["apps"]["status"]
    assert parse_command(app["command"]).command == "status"
    (plug,) = app["plugs"]
    assert is_agent_bus(snap["plugs"][plug])


def test_every_interface_an_app_names_is_declared_or_a_system_one(snap: Any, gadget: Any) -> None:
    for spec in (snap, gadget):
        declared = set(spec.get("plugs", {})) | set(spec.get("slots", {}))
        users = list(spec.get("apps", {}).values()) + list(spec.get("hooks", {}).values())
        for user in users:
            for name in user.get("plugs", []) + user.get("slots", []):
                assert name in declared or name in SYSTEM_PLUGS, name


def test_part_sources_exist_and_the_factory_config_is_valid(snap: Any) -> None:
    for part in snap["parts"].values():
        assert (PROJECT / part["source"]).is_dir(), part["source"]
    assert (PROJECT / snap["parts"]["factory-agent"]["source"] / "setup.cfg").is_file()
    factory = PROJECT / snap["parts"]["factory"]["source"] / "agent.toml"
    settings = tomllib.loads(factory.read_text())
    assert settings["mode"] == "snapd"
    _assert_known_keys(settings, config._SCHEMA, "")


def _assert_known_keys(table: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
    for key, value in table.items():
        assert key in schema, f"{prefix}{key} is not a config key"
        if isinstance(schema[key], dict):
            _assert_known_keys(value, schema[key], f"{prefix}{key}.")


def test_the_gadget_ships_the_hook_and_the_command_it_runs(gadget: Any) -> None:
    assert gadget["type"] == "gadget"
    hook = gadget["hooks"]["prepare-device"]
    (plug,) = hook["plugs"]
    assert is_agent_bus(gadget["plugs"][plug])
    part = gadget["parts"]["prepare-device-hook"]
    source = GADGET / part["source"]
    (staged_from,) = part["organize"]
    assert (source / staged_from).resolve() == HOOK.resolve()
    assert part["organize"][staged_from] == "snap/hooks/prepare-device" and part["stage"] == ["snap/hooks/prepare-device"]
    assert (GADGET / gadget["parts"]["factory-agent-cli"]["source"] / "setup.cfg").is_file()
    hook_text = HOOK.read_text()
    for name in hook["environment"]:  # each variable it sets is one the hook reads
        assert re.search(rf"\${{{name}[-:}}]", hook_text), name
    assert "registration-settings" in hook_text
    cli.build_parser().parse_args(["registration-settings", "--bus", "system", "--timeout", "300"])


def test_the_gadget_ships_the_secure_onboarding_hook_by_its_exact_name(gadget: Any) -> None:
    """snapd ignores a hook of any other name (prepare-serial, as some docs call it, never runs)."""
    hook = gadget["hooks"]["prepare-serial-request"]
    (plug,) = hook["plugs"]
    assert is_agent_bus(gadget["plugs"][plug])
    part = gadget["parts"]["prepare-serial-request-hook"]
    (staged_from,) = part["organize"]
    assert (GADGET / part["source"] / staged_from).resolve() == (REPO / "hooks" / "prepare-serial-request").resolve()
    assert part["organize"][staged_from] == part["stage"][0] == "snap/hooks/prepare-serial-request"
    text = (REPO / "hooks" / "prepare-serial-request").read_text()
    for name in hook["environment"]:
        assert re.search(rf"\${{{name}[-:}}]", text), name
    assert "sign-request-id --bus" in text
    cli.build_parser().parse_args(["hardware-identity", "sign-request-id", "--bus", "system", "--", "REQ"])


def test_gadget_connections_join_declared_plugs_and_slots(snap: Any, gadget: Any) -> None:
    ids = {"GADGET-SNAP-ID": gadget, "FACTORY-AGENT-SNAP-ID": snap}
    connections = load(GADGET / "gadget.yaml")["connections"]
    for connection in connections:
        owner, _, plug = connection["plug"].partition(":")
        spec = ids[owner]
        assert plug in spec.get("plugs", {}) or plug in SYSTEM_PLUGS, connection
        if "slot" in connection:
            owner, _, slot = connection["slot"].partition(":")
            assert slot in (ids[owner]["slots"] if owner in ids else THIRD_PARTY_SLOTS[owner]), connection
    plugs = {c["plug"] for c in connections}
    assert "GADGET-SNAP-ID:factory-agent" in plugs and "FACTORY-AGENT-SNAP-ID:agent-dbus-client" in plugs
