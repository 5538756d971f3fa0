"""Problems as the user reads them: a YAML path and a message, in document order."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from agent.config.reading import key_path

_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def path_order(problem: tuple[str, str]) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[\[\].]+", problem[0]) if p]


def under(where: str, paths: set[str]) -> bool:
    """``where`` is one of ``paths`` or inside one of them, or a list holding one (``regions``
    is checked as a whole)."""
    return any(where == p or where.startswith((f"{p}.", f"{p}[")) or p.startswith(f"{where}[") for p in paths)


def pydantic_problems(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[tuple[str, str]]:
    """pydantic's errors at their YAML paths; ``prefix``: where the validated value sits in the document."""
    from agent.config.backends import BACKEND_TYPES  # here: the spool commands' config needs no backend schema

    problems = []
    for err in exc.errors(include_url=False):
        where = _format_loc((*prefix, *err["loc"]))
        if err["type"] == "union_tag_not_found":
            problems.append((f"{where}.type", f"required key is missing; expected one of: {', '.join(BACKEND_TYPES)}"))
        elif err["type"] == "union_tag_invalid":
            problems.append((f"{where}.type", f"unknown backend type; expected one of: {', '.join(BACKEND_TYPES)}"))
        else:
            problems.append((where, _MESSAGES.get(err["type"], err["msg"].removeprefix("Value error, "))))
    return problems


def _format_loc(loc: tuple[Any, ...]) -> str:
    from agent.config.backends import BACKEND_TYPES

    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (i == 1 and loc[0] == "backend" and part in BACKEND_TYPES
              or i == 2 and loc[0] == "measurements" and isinstance(loc[1], int)):
            continue  # the tag of the backend or measurement union is not a YAML key
        else:
            out = key_path(out, part)
    return out
