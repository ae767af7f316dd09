"""Read an ``strace -f -y`` log and check how files reach a directory: temp, write, fsync, rename/link, dir fsync.

The parser takes what ``strace -f`` writes: a pid before each line,
syscalls split into ``<unfinished ...>`` and ``<... NAME resumed>`` halves
when threads interleave, signal lines (``--- SIGCHLD ... ---``), exit lines
(``+++ exited with 0 +++``), ``-y`` decorations on every fd (``3</path>``) and
on results (``= 3</path>``). Each syscall becomes one :class:`Call` with the
line where it started and the line where it returned, so that "A finished
before B started" can be asked across threads.

File descriptors are mapped to paths two ways that must agree: by the ``-y``
decoration, and by replaying openat/dup/close/clone/execve per fd table
(threads created with CLONE_FILES share their parent's table, forked
processes get a copy, execve keeps only what was not O_CLOEXEC).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# What the durability test traces: the brief's list, plus what keeps the fd tables exact.
TRACED = ("openat", "open", "creat", "write", "pwrite64", "writev", "pwritev", "pwritev2", "fsync", "fdatasync",
          "rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat", "close", "mkdir", "mkdirat",
          "dup", "dup2", "dup3", "fcntl", "clone", "clone3", "fork", "vfork", "execve")
def strace_command(strace: str, log: str, argv: list[str]) -> list[str]:
    """``argv`` under strace: children and threads followed (-f), fds decorated with their paths (-y)."""
    return [strace, "-f", "-y", "-s", "32", "-o", log, "-e", "trace=" + ",".join(TRACED), *argv]


WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
SYNCS = {"fsync", "fdatasync"}
PUBLISH = {"rename", "renameat", "renameat2", "link", "linkat"}

_LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_UNFINISHED = " <unfinished ...>"
_EXIT = re.compile(r"^\+\+\+ (exited with (-?\d+)|killed by (\w+).*) \+\+\+$")
_FD = re.compile(r"^(-?\d+|AT_FDCWD)(?:<(.*)>)?$")
_RESULT = re.compile(r"^(-?\d+|\?)(?:<(.*?)>)?(?:\s+(E[A-Z0-9]+)\b)?.*$")


class TraceError(ValueError):
    """The log cannot be read as an strace -f -y log."""


@dataclass
class Call:
    pid: int
    name: str
    args: list[str]
    result: int | None  # None: "?" (the process died inside the call)
    result_path: str | None  # -y decoration of the result (openat, dup)
    errno: str | None
    start: int  # index of the line where the call started
    end: int  # index of the line where it returned

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result >= 0


@dataclass
class Exit:
    pid: int
    status: str
    line: int


def split_args(text: str) -> tuple[list[str], str]:
    """The top-level arguments of ``text`` (which starts just after the call's '('), and what follows the ')'."""
    args: list[str] = []
    current: list[str] = []
    i, quote = 0, False
    closers = {"(": ")", "[": "]", "{": "}"}
    stack: list[str] = []
    while i < len(text):
        char = text[i]
        if quote:
            current.append(char)
            if char == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 2
                continue
            if char == '"':
                quote = False
            i += 1
            continue
        if char == '"':
            quote = True
        elif char == "<" and re.fullmatch(r"-?\d+|AT_FDCWD", "".join(current).strip()):
            end = _decoration_end(text, i)  # an fd's -y path: may hold any of ,()[]{}
            current.append(text[i:end + 1])
            i = end + 1
            continue
        elif char in closers:
            stack.append(closers[char])
        elif stack and char == stack[-1]:
            stack.pop()
        elif char == ")" and not stack:
            last = "".join(current).strip()
            if last or args:
                args.append(last)
            return args, text[i + 1:]
        elif char == "," and not stack:
            args.append("".join(current).strip())
            current = []
            i += 1
            continue
        current.append(char)
        i += 1
    raise TraceError(f"no closing parenthesis in {text[:200]!r}")


def _decoration_end(text: str, start: int) -> int:
    """Index of the '>' that closes the decoration opened at ``start`` (paths are escaped by strace, '>' too)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "<":
            depth += 1
        elif text[i] == ">":
            depth -= 1
            if depth == 0:
                return i
    raise TraceError(f"unterminated -y decoration in {text[start:start + 200]!r}")


def unquote(arg: str) -> str:
    """A C string as strace prints it ("..." with escapes, maybe followed by ...) as text."""
    arg = arg.strip()
    if arg.endswith("..."):
        arg = arg[:-3]
    if not (arg.startswith('"') and arg.endswith('"')):
        raise TraceError(f"not a string argument: {arg!r}")
    return _c_unescape(arg[1:-1])


def _c_unescape(text: str) -> str:
    """strace's C escapes (\\n, \\", \\\\, \\ooo, \\xHH) undone; bytes read as UTF-8."""
    raw = text.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
    return raw.decode("utf-8", "replace")


def _unescape_path(path: str) -> str:
    if "\\" in path:
        path = _c_unescape(path)
    return path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path


def fd_arg(arg: str) -> tuple[int | None, str | None]:
    """(fd, -y path) of an fd argument; fd None for AT_FDCWD."""
    match = _FD.match(arg.strip())
    if not match:
        raise TraceError(f"not an fd argument: {arg!r}")
    fd = None if match.group(1) == "AT_FDCWD" else int(match.group(1))
    return fd, (_unescape_path(match.group(2)) if match.group(2) is not None else None)


def parse(text: str) -> tuple[list[Call], list[Exit], list[str]]:
    """Calls (in the order they returned), process exits, and lines that were not understood."""
    calls: list[Call] = []
    exits: list[Exit] = []
    skipped: list[str] = []
    pending: dict[int, tuple[str, int]] = {}  # pid -> (first half, line)
    for index, raw in enumerate(text.splitlines()):
        line = raw.rstrip("\n")
        match = _LINE.match(line)
        if not match:
            if line.strip():
                skipped.append(line)
            continue
        pid, rest = int(match.group(1)), match.group(2)
        if rest.startswith("---") or rest.startswith("strace:"):
            continue  # signals, attach messages
        exited = _EXIT.match(rest)
        if exited:
            exits.append(Exit(pid, exited.group(1), index))
            pending.pop(pid, None)
            continue
        start = index
        resumed = _RESUMED.match(rest)
        if resumed:
            if pid not in pending:
                skipped.append(line)  # the first half was before the trace started
                continue
            first, start = pending.pop(pid)
            if not first.startswith(resumed.group(1) + "("):
                raise TraceError(f"line {index + 1}: {resumed.group(1)} resumed, but pid {pid} was in {first[:40]!r}")
            rest = first + resumed.group(2)
        if rest.endswith(_UNFINISHED):
            pending[pid] = (rest[: -len(_UNFINISHED)], start)
            continue
        call = _call(pid, rest, start, index)
        if call is None:
            skipped.append(line)
        else:
            calls.append(call)
    return calls, exits, skipped


def _call(pid: int, text: str, start: int, end: int) -> Call | None:
    name, paren, after = text.partition("(")
    if not paren or not re.fullmatch(r"\w+", name):
        return None
    args, tail = split_args(after)
    result_text = tail.strip()
    if not result_text.startswith("="):
        return None
    match = _RESULT.match(result_text[1:].strip())
    if not match:
        return None
    result = None if match.group(1) == "?" else int(match.group(1))
    path = _unescape_path(match.group(2)) if match.group(2) is not None else None
    return Call(pid, name, args, result, path, match.group(3), start, end)


# --- replaying the fd tables ---------------------------------------------------------


@dataclass
class OpenFile:
    path: str
    flags: str
    cloexec: bool


@dataclass
class FileLife:
    """One path that was created (O_CREAT) and written during the trace."""

    path: str
    pid: int
    created: int  # line of the openat
    writes: list[int] = field(default_factory=list)  # end lines of the writes
    syncs: list[tuple[int, int]] = field(default_factory=list)  # (start, end) lines of fsync/fdatasync


@dataclass
class Publish:
    """A rename or link of ``source`` onto ``target``."""

    call: str
    source: str
    target: str
    pid: int
    start: int
    end: int


@dataclass
class DirSync:
    path: str
    pid: int
    start: int
    end: int


@dataclass
class Replay:
    files: dict[str, FileLife] = field(default_factory=dict)  # by path, the latest life of each
    lives: list[FileLife] = field(default_factory=list)
    publishes: list[Publish] = field(default_factory=list)
    dir_syncs: list[DirSync] = field(default_factory=list)
    unlinks: list[tuple[str, int]] = field(default_factory=list)
    mkdirs: list[tuple[str, int]] = field(default_factory=list)
    written_paths: set[str] = field(default_factory=set)  # every path a write() went to
    opened_for_writing: list[tuple[str, str, int]] = field(default_factory=list)  # (path, flags, line)
    mismatches: list[str] = field(default_factory=list)  # -y said one path, the replayed table another


def _resolve(base: str | None, path: str) -> str:
    if os.path.isabs(path) or base is None:
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(base, path))


def replay(calls: list[Call]) -> Replay:
    """Follow every fd: which files were created, written, synced, renamed or linked, and which dirs synced."""
    out = Replay()
    tables: dict[int, dict[int, OpenFile]] = {}  # pid -> its fd table (shared object among CLONE_FILES threads)
    cwd: dict[int, str] = {}

    def table(pid: int) -> dict[int, OpenFile]:
        return tables.setdefault(pid, {})

    def path_of(call: Call, arg: str) -> str | None:
        fd, decorated = fd_arg(arg)
        if fd is None:
            if decorated:
                cwd[call.pid] = decorated
            return decorated or cwd.get(call.pid)
        known = table(call.pid).get(fd)
        if decorated is not None and known is not None and known.path != decorated and decorated.startswith("/"):
            out.mismatches.append(f"line {call.end + 1}: pid {call.pid} fd {fd} is {decorated} by -y, {known.path} by replay")
        return decorated if decorated is not None else (known.path if known else None)

    # Effects in the order the kernel made them: a call's result when it returned, except close, which
    # frees the fd on entry (another thread's openat can get that number before the close returns).
    for call in sorted(calls, key=lambda c: c.start if c.name == "close" else c.end):
        name = call.name
        if name in ("clone", "clone3", "fork", "vfork") and call.ok and call.result:
            flags = " ".join(call.args)
            child = call.result
            if "CLONE_FILES" in flags:
                tables[child] = table(call.pid)
            else:
                tables[child] = dict(table(call.pid))
            if call.pid in cwd:
                cwd[child] = cwd[call.pid]
        elif name == "execve" and call.ok:
            tables[call.pid] = {fd: f for fd, f in table(call.pid).items() if not f.cloexec}
        elif name in ("openat", "open", "creat") and call.ok:
            if name == "openat":
                base = path_of(call, call.args[0])
                path_arg, flags = call.args[1], call.args[2]
            else:
                base, path_arg = cwd.get(call.pid), call.args[0]
                flags = call.args[1] if name == "open" else "O_CREAT|O_WRONLY|O_TRUNC"
            path = call.result_path or _resolve(base, unquote(path_arg))
            assert call.result is not None
            table(call.pid)[call.result] = OpenFile(path, flags, "O_CLOEXEC" in flags)
            if re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC|O_APPEND", flags):
                out.opened_for_writing.append((path, flags, call.end))
            if "O_CREAT" in flags:
                life = FileLife(path, call.pid, call.end)
                out.files[path] = life
                out.lives.append(life)
        elif name in ("dup", "dup2", "dup3") or (name == "fcntl" and len(call.args) > 1 and "F_DUPFD" in call.args[1]):
            old_fd = fd_arg(call.args[0])[0]
            source = table(call.pid).get(old_fd) if old_fd is not None else None
            if call.ok and source is not None:
                assert call.result is not None
                cloexec = "O_CLOEXEC" in " ".join(call.args) or "F_DUPFD_CLOEXEC" in " ".join(call.args)
                table(call.pid)[call.result] = OpenFile(source.path, source.flags, cloexec)
        elif name == "close":
            fd, _ = fd_arg(call.args[0])
            path_of(call, call.args[0])
            if fd is not None:
                table(call.pid).pop(fd, None)
        elif name in WRITES and call.ok:
            path = path_of(call, call.args[0])
            if path is not None:
                out.written_paths.add(path)
                if path in out.files:
                    out.files[path].writes.append(call.end)
        elif name in SYNCS and call.ok:
            fd, _ = fd_arg(call.args[0])
            path = path_of(call, call.args[0])
            entry = table(call.pid).get(fd) if fd is not None else None
            if path is None:
                continue
            if entry is not None and "O_DIRECTORY" in entry.flags:
                out.dir_syncs.append(DirSync(path, call.pid, call.start, call.end))
            elif path in out.files:
                out.files[path].syncs.append((call.start, call.end))
        elif name in PUBLISH and call.ok:
            if name in ("rename", "link"):
                source = _resolve(cwd.get(call.pid), unquote(call.args[0]))
                target = _resolve(cwd.get(call.pid), unquote(call.args[1]))
            else:
                source = _resolve(path_of(call, call.args[0]), unquote(call.args[1]))
                target = _resolve(path_of(call, call.args[2]), unquote(call.args[3]))
            out.publishes.append(Publish(name, source, target, call.pid, call.start, call.end))
        elif name in ("unlink", "unlinkat") and call.ok:
            path = (_resolve(cwd.get(call.pid), unquote(call.args[0])) if name == "unlink"
                    else _resolve(path_of(call, call.args[0]), unquote(call.args[1])))
            out.unlinks.append((path, call.end))
        elif name in ("mkdir", "mkdirat") and call.ok:
            path = (_resolve(cwd.get(call.pid), unquote(call.args[0])) if name == "mkdir"
                    else _resolve(path_of(call, call.args[0]), unquote(call.args[1])))
            out.mkdirs.append((path, call.end))
    return out


# --- the durability rules ------------------------------------------------------------


@dataclass
class FileReport:
    """How one final file in the directory was written, once per rename/link onto it."""

    target: str
    call: str
    temp: str
    temp_writes: int
    fsynced_before_publish: bool
    dir_fsynced_after: bool
    problems: list[str]


def check_directory(rep: Replay, directory: str, exits: list[Exit]) -> tuple[list[FileReport], list[str]]:
    """Every rename/link onto a name in ``directory``: from a temp that was written, fsynced after its last
    write and before the rename started; and a fsync of ``directory`` that started after the rename returned
    and returned before the next rename/link into ``directory`` started (and before the writer exited).
    Also: nothing is written to a final name in place, and no temp is left behind."""
    directory = os.path.normpath(directory)
    reports: list[FileReport] = []
    problems: list[str] = []
    inside = [p for p in rep.publishes if os.path.dirname(p.target) == directory]
    if not inside:
        problems.append(f"no rename or link into {directory} in the trace")
    for n, pub in enumerate(inside):
        issues = []
        lives = [l for l in rep.lives if l.path == pub.source and l.created < pub.start]
        life = lives[-1] if lives else None
        temp_name = os.path.basename(pub.source)
        if os.path.dirname(pub.source) != directory:
            issues.append(f"its source {pub.source} is not in {directory}")
        if not (temp_name.startswith(".") and temp_name.endswith(".tmp")):
            issues.append(f"its source {temp_name} is not a temp name (.NAME.*.tmp)")
        synced = False
        if life is None:
            issues.append(f"its source {pub.source} was not created (O_CREAT) in the trace")
        else:
            writes = [w for w in life.writes if w < pub.start]
            if not writes:
                issues.append(f"nothing was written to {temp_name} before the {pub.call}")
            last_write = max(writes, default=life.created)
            syncs = [s for s in life.syncs if s[0] > last_write and s[1] < pub.start]
            synced = bool(syncs)
            if not synced:
                issues.append(f"{temp_name} was not fsynced after its last write and before the {pub.call}")
        following = [p.start for p in inside[n + 1:]]
        limit = min(following) if following else None
        exit_line = next((e.line for e in exits if e.pid == pub.pid and e.line > pub.end), None)  # the writer thread's
        bounds = [b for b in (limit, exit_line) if b is not None]
        horizon = min(bounds) if bounds else None
        dir_synced = any(d.path == directory and d.start > pub.end and (horizon is None or d.end < horizon)
                         for d in rep.dir_syncs)
        if not dir_synced:
            what = "the next rename/link into it" if limit is not None and horizon == limit else "the end"
            issues.append(f"{directory} was not fsynced after the {pub.call} onto {os.path.basename(pub.target)} "
                          f"and before {what}")
        reports.append(FileReport(os.path.basename(pub.target), pub.call, temp_name,
                                  len(life.writes) if life else 0, synced, dir_synced, issues))
        problems += [f"{pub.call} {temp_name} -> {os.path.basename(pub.target)} (line {pub.start + 1}): {i}" for i in issues]
    finals = {p.target for p in inside}
    for path, flags, line in rep.opened_for_writing:
        if path in finals:
            problems.append(f"line {line + 1}: {os.path.basename(path)} opened for writing in place ({flags})")
    created = {l.path for l in rep.lives if os.path.dirname(l.path) == directory}
    gone = {p.source for p in inside if p.call.startswith("rename")} | {u[0] for u in rep.unlinks}
    for path in sorted(created - gone - finals):
        problems.append(f"{os.path.basename(path)} was created and never renamed or removed: left behind")
    return reports, problems

