"""The published vocabularies and documents agree with the code they describe.

- The D-Bus contract (systemd/io.factoryagent.Agent1.xml, the one copy, installed by the .deb)
  lists exactly the values of ``agent.registration.State``; ``status --json`` has a key for each
  of its properties; the STATUS= line starts with the state, whatever the state.
- The man page documents every subcommand and option of ``agent.cli.build_parser()`` and
  nothing else, and the State values; README and docs/ list the same State values.

What the daemon exports over D-Bus is compared with the XML in tests/dbus/test_contract.py.
"""

from __future__ import annotations

import argparse
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent import cli, status, systemd
from agent.registration import State
from tests.conftest import DATA, REPO
from tests.unit.test_cli_help import subparsers

CONTRACT = REPO / "systemd" / "io.factoryagent.Agent1.xml"
INTERFACE = "io.factoryagent.Agent1"
MAN_PAGE = REPO / "packaging" / "factory-agent.1"
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
STATES = [str(s) for s in State]
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


# ---- the D-Bus contract ---------------------------------------------------------------------------


def _interface(xml: str) -> ET.Element:
    root = ET.fromstring(xml, parser=ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    found = [i for i in root.findall("interface") if i.get("name") == INTERFACE]
    assert len(found) == 1
    return found[0]


def contract_states(xml: str) -> list[str]:
    """The values listed in the comment just before the State property: one indented ``value  meaning`` a line."""
    children = list(_interface(xml))
    at = next(i for i, e in enumerate(children) if e.tag == "property" and e.get("name") == "State")
    comment = children[at - 1] if at else None
    assert comment is not None and not isinstance(comment.tag, str), "no comment before the State property"
    return re.findall(r"^\s+([a-z][a-z-]*)\s{2,}\S", str(comment.text), re.MULTILINE)


def contract_properties(xml: str) -> dict[str, str]:
    return {str(p.get("name")): str(p.get("type")) for p in _interface(xml).findall("property")}


def test_the_contract_lists_every_state_of_the_enum() -> None:
    assert contract_states(CONTRACT.read_text()) == STATES


def test_a_state_missing_from_the_contract_is_seen() -> None:
    xml = CONTRACT.read_text()
    assert re.search(r"^\s+waiting-snapd\s.*\n", xml, re.MULTILINE)
    dropped = re.sub(r"^\s+waiting-snapd\s.*\n", "", xml, flags=re.MULTILINE)
    assert contract_states(dropped) == [s for s in STATES if s != "waiting-snapd"] != STATES


def test_there_is_one_copy_of_the_contract_and_the_deb_installs_it() -> None:
    tops = [top for top in REPO.iterdir() if top.is_dir() and top.name not in (".git", ".venv", "build", "dist")]
    copies = {path.resolve() for top in tops for path in top.rglob("*.xml")
              if f'<interface name="{INTERFACE}"' in path.read_text(errors="replace")}
    golden = DATA / "dbus" / "io.factoryagent.Agent1.xml"  # what tests/dbus/test_service.py reads
    if (REPO / ".git").exists():  # a checkout: tests/data points at the contract
        assert copies == {CONTRACT.resolve()} and golden.resolve() == CONTRACT.resolve()
    else:  # a copy of the tree that followed the link (make deb's build directory): the same bytes
        assert copies <= {CONTRACT.resolve(), golden.resolve()} and golden.read_bytes() == CONTRACT.read_bytes()
    install = (REPO / "packaging" / "debian" / "factory-agent.install").read_text().splitlines()
    assert "systemd/io.factoryagent.Agent1.xml usr/share/dbus-1/interfaces/" in install


def test_status_json_has_a_key_for_every_property_of_the_contract() -> None:
    properties = contract_properties(CONTRACT.read_text())
    assert set(status.JSON_KEYS) == set(properties)
    keys = list(status.JSON_KEYS.values())
    assert len(set(keys)) == len(keys) and all(re.fullmatch(r"[a-z]+(-[a-z]+)*", k) for k in keys)
    document = status.to_json(dict.fromkeys(properties, ""))
    assert set(document) == {"schema", *keys}
    for doc in (README, MAN_PAGE):  # where the document is spelled out
        assert [k for k in keys if f'"{k}"' not in doc.read_text()] == [], doc


def test_the_status_line_starts_with_the_state_whatever_the_state() -> None:
    for last_error, action in (("", ""), ("vault-transient", ""), ("invalid-api-key", "check the api-key file")):
        lines = {state: systemd.status_line(state, "ACME-1", last_error, action) for state in STATES}
        for state, line in lines.items():
            assert re.split(r"[ :]", line, maxsplit=1)[0] == state, line
        assert len(set(lines.values())) == len(STATES)


# ---- the man page and argparse --------------------------------------------------------------------


def roff_text(line: str) -> str:
    """A roff line as a reader sees its words: font macros and changes dropped, escaped minus signs as '-'."""
    line = re.sub(r"^\.(?:[BI]|[BIR][BIR]) ", "", line)
    line = re.sub(r"\\f(\[[^]]*\]|\(..|.)", "", line)
    return line.replace("\\-", "-").replace("\\(em", "-").replace("\\e", "\\").replace("\\&", "")


def man_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith(".SH "):
            current = sections.setdefault(line[4:].strip().strip('"'), [])
        else:
            current.append(line)
    return sections


def tagged(lines: list[str]) -> list[str]:
    """The tag of each .TP paragraph (the line after .TP), as text."""
    return [roff_text(lines[i + 1]).strip() for i, line in enumerate(lines[:-1]) if line.strip() == ".TP"]


def man_commands(text: str) -> dict[str, list[str]]:
    """COMMANDS: each .SS subsection's name -> the tags of its .TP paragraphs."""
    commands: dict[str, list[str]] = {}
    current: list[str] = []
    for line in man_sections(text).get("COMMANDS", []):
        if line.startswith(".SS "):
            current = commands.setdefault(line[4:].strip().strip('"'), [])
        else:
            current.append(line)
    return {name: tagged(lines) for name, lines in commands.items()}


def man_synopsis(text: str) -> dict[str, str]:
    """SYNOPSIS: command ("" for the bare program) -> its usage text (``.B factory-agent CMD`` up to ``.br``)."""
    usage: dict[str, list[str]] = {}
    current: list[str] = []
    for line in man_sections(text)["SYNOPSIS"]:
        if line.startswith(".B factory-agent"):
            current = usage.setdefault(line[len(".B factory-agent"):].strip(), [])
        elif line.strip() != ".br":
            current.append(roff_text(line))
    return {name: " ".join(lines) for name, lines in usage.items()}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    assert len([a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]) == 1
    return subparsers(parser)


def options(parser: argparse.ArgumentParser, *, with_help: bool) -> dict[str, argparse.Action]:
    """Every documented option string (long and short); hidden ones (help=SUPPRESS) are not for users."""
    return {flag: action for action in parser._actions if action.help != argparse.SUPPRESS
            and (with_help or not isinstance(action, argparse._HelpAction)) for flag in action.option_strings}


def positionals(parser: argparse.ArgumentParser) -> list[str]:
    return [str(a.metavar or a.dest).upper() for a in parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def man_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """Every way the man page and the parser disagree, one line each."""
    problems = []
    commands, synopsis = man_commands(text), man_synopsis(text)
    real = subcommands(parser)
    for where, names in (("COMMANDS", set(commands)), ("SYNOPSIS", set(synopsis) - {""})):
        problems += [f"{where}: no subcommand {name}" for name in sorted(names - set(real))]
        problems += [f"{where}: {name} is missing" for name in sorted(set(real) - names)]
    top = {o for tag in tagged(man_sections(text).get("OPTIONS", [])) for o in OPTION.findall(tag)}
    problems += _compare("OPTIONS", top, set(options(parser, with_help=True)))
    problems += _compare("SYNOPSIS", set(OPTION.findall(synopsis.get("", ""))), set(options(parser, with_help=True)))
    for name in sorted(set(real) & set(commands)):
        problems += _command_problems(name, real[name], commands[name], synopsis.get(name, ""))
    return problems


def _command_problems(name: str, parser: argparse.ArgumentParser, tags: list[str], usage: str) -> list[str]:
    real = options(parser, with_help=False)
    problems = _compare(f"{name}", {o for tag in tags for o in OPTION.findall(tag)}, set(real))
    problems += _compare(f"SYNOPSIS {name}", set(OPTION.findall(usage)), set(real))
    for flag, action in real.items():
        tag = next((t for t in tags if flag in OPTION.findall(t)), "")
        problems += [f"{name} {flag}: choice {c} not shown" for c in action.choices or () if str(c) not in tag]
    problems += [f"{name}: argument {arg} not described" for arg in positionals(parser) if arg not in tags]
    return problems


def _compare(where: str, documented: set[str], real: set[str]) -> list[str]:
    return ([f"{where}: {o} does not exist" for o in sorted(documented - real)]
            + [f"{where}: {o} is not documented" for o in sorted(real - documented)])


def test_the_man_page_documents_every_subcommand_and_option_and_no_other() -> None:
    assert man_problems(MAN_PAGE.read_text(), cli.build_parser()) == []


def test_a_man_page_that_misses_or_invents_is_seen() -> None:
    text = MAN_PAGE.read_text()
    assert "\n.SS serial-request\n" in text and "\\fB\\-\\-body\\-file\\fR \\fIFILE\\fR\n" in text
    broken = (text.replace("\n.SS serial-request\n", "\n.SS serial-requests\n")
              .replace(".TP\n\\fB\\-\\-body\\-file\\fR \\fIFILE\\fR\n", ".TP\n\\fB\\-\\-body\\fR \\fIFILE\\fR\n")
              .replace("\\fB\\-\\-bus\\fR \\fBsystem\\fR|\\fBsession\\fR|\\fBnone\\fR\nwhere",
                       "\\fB\\-\\-bus\\fR \\fBsystem\\fR|\\fBsession\\fR\nwhere"))
    problems = man_problems(broken, cli.build_parser())
    assert "COMMANDS: no subcommand serial-requests" in problems
    assert "COMMANDS: serial-request is missing" in problems
    assert "run --bus: choice none not shown" in problems
    parser = cli.build_parser()
    subcommands(parser)["verify"].add_argument("--strict", action="store_true")
    assert "verify: --strict is not documented" in man_problems(text, parser)


def test_the_man_page_exit_codes_are_the_code_s() -> None:
    exits = " ".join(roff_text(line) for line in man_sections(MAN_PAGE.read_text())["EXIT STATUS"])
    expected = {
        "status": (status.EXIT_REGISTERED, status.EXIT_BLOCKED, status.EXIT_PENDING, status.EXIT_TIMEOUT,
                   status.EXIT_UNREACHABLE),
        "Every command": (cli.EX_CONFIG, cli.EX_SOFTWARE),
    }
    for command, codes in expected.items():
        found = re.search(rf"{command}:? ([^.(]*)", exits)
        assert found, command
        assert [int(n) for n in re.findall(r"\b\d+\b", found.group(1))] == list(codes), found.group(1)


# ---- State in the documents -----------------------------------------------------------------------


def test_the_man_page_lists_every_state() -> None:
    assert tagged(man_sections(MAN_PAGE.read_text())["STATES"]) == STATES


def markdown_state_tables(text: str) -> list[list[str]]:
    """The first column of each table whose header's first cell is `State`."""
    tables: list[list[str]] = []
    rows: list[str] | None = None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells is None:
            rows = None
        elif rows is None and cells[0] == "`State`":
            rows = []
            tables.append(rows)
        elif rows is not None and not set(cells[0]) <= set("-: "):
            rows.append(cells[0].strip("`"))
    return tables


def test_readme_lists_every_state() -> None:
    assert markdown_state_tables(README.read_text()) == [STATES]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_a_state_named_in_the_docs_exists(doc: Path) -> None:
    """Wherever prose says `State` `value`, the value is one of the enum's; a State table lists them all."""
    text = doc.read_text()
    named = re.findall(r"`State`\s+(?:\w+\s+)?`([a-z][a-z-]*)`", text)
    assert set(named) <= set(STATES), doc
    assert all(table == STATES for table in markdown_state_tables(text)), doc


def test_a_wrong_state_in_a_doc_is_seen() -> None:
    text = README.read_text().replace("| `waiting-clock` |", "| `waiting-time` |")
    assert markdown_state_tables(text) != [STATES]
    assert not set(re.findall(r"`State`\s+(?:\w+\s+)?`([a-z][a-z-]*)`", "`State` stays `done`")) <= set(STATES)
