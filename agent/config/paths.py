"""Settings that name one file between them (or a file another writes beside its own): each
would corrupt the other. Checked on the expanded YAML, so reported beside any other problem."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.config.spool import Spool

_SPOOL_COMPANIONS = ("-wal", "-shm", "-journal", ".lock")  # SQLite's files beside the spool, and its lock
_SALVAGE_COPY = re.compile(r"\.(corrupt|salvage|reading)-")  # what `spool salvage` writes beside it
_ROTATION = re.compile(r"\.\d+")  # what a JSON Lines file rotates to (agent/sinks/file.py)


@dataclass(frozen=True)
class _Files:
    """The files one path setting writes: the file itself and what is named after it."""

    where: str  # its YAML path
    path: Path  # resolved: symlinks and .. followed
    kind: Literal["spool", "jsonl", "config"]

    def members(self) -> list[Path]:
        companions = _SPOOL_COMPANIONS if self.kind == "spool" else ()
        return [self.path, *(self.path.with_name(self.path.name + s) for s in companions)]

    def owns(self, other: Path) -> bool:
        # compared case-folded: on a case-insensitive file system (macOS) Spool.db is spool.db
        if _folded(other) in map(_folded, self.members()):
            return True
        name, mine = other.name.casefold(), self.path.name.casefold()
        if _folded(other.parent) != _folded(self.path.parent) or not name.startswith(mine) or name == mine:
            return False
        rest = name[len(mine):]
        return bool(_SALVAGE_COPY.match(rest) if self.kind == "spool"
                    else _ROTATION.fullmatch(rest) if self.kind == "jsonl" else False)

    def describe(self) -> str:
        if self.kind == "config":
            return str(self.path)
        return f"{self.path} and its " + ("-wal, -shm, -journal, .lock and salvage copies" if self.kind == "spool"
                                          else "rotations <path>.<n>")


def _folded(path: Path) -> str:
    return str(path).casefold()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return _folded(a) == _folded(b) or os.path.samefile(a, b)  # hard links too
    except OSError:  # one of them does not exist yet
        return False


def _not_a_file(raw: str, path: Path, given: Path) -> str | None:
    """Why ``path`` (``given`` resolved) cannot be written as a file (a directory, a device), or None."""
    if raw.endswith(("/", os.sep)) or path.is_dir():
        return f"{path} is a directory; expected the path of a file in it"
    if any(p.exists() and not p.is_file() for p in (path, given)):  # /dev/stdout resolves to pipe:[…]
        return f"{given} is not a regular file (a device, FIFO or socket); expected the path of a file"
    return None


def overlaps(raw: dict[str, Any], base_dir: Path, skip: set[str],
              config_file: Path | None = None) -> list[tuple[str, str]]:
    """Two settings naming one file (or one's -wal, rotation, …, or the config file itself): each
    would corrupt the other. Read from the expanded YAML, so these are reported beside any other problem."""
    def section(key: str) -> Any:
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    settings = [("spool.path", section("spool").get("path", Spool.model_fields["path"].default), "spool")]
    if section("backend").get("type") == "file":
        settings.append(("backend.path", section("backend").get("path"), "jsonl"))
    if "audit" in raw:
        settings.append(("audit.path", section("audit").get("path"), "jsonl"))
    problems = []
    files = [] if config_file is None else [_Files("the config file", Path(os.path.realpath(config_file)), "config")]
    for where, path, kind in settings:
        if isinstance(path, str) and path and where not in skip:
            resolved = Path(os.path.realpath(base_dir / path))
            if why := _not_a_file(path, resolved, base_dir / path):
                problems.append((where, why))
            else:
                files.append(_Files(where, resolved, kind))  # type: ignore[arg-type]
    for i, a in enumerate(files):
        for b in files[i + 1:]:
            if _same_file(a.path, b.path):
                problems.append((b.where, f"is the same file as {a.where} ({a.path}); give each its own file"))
                continue
            if mine := next((m for m in b.members() if a.owns(m)), None):
                problems.append((b.where, f"{mine} is among the files of {a.where} ({a.describe()}); "
                                          f"give each its own file"))
            elif theirs := next((m for m in a.members() if b.owns(m)), None):
                problems.append((b.where, f"{a.where}'s file {theirs} is among this setting's files "
                                          f"({b.describe()}); give each its own file"))
    return problems
