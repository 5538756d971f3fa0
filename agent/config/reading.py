"""Reading a config file: bounded in size, depth and alias expansion; ``${VAR}`` expansion;
secret files. Nothing here knows the shape of the document."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from agent.errors import ConfigError

_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$(\{[^}]{0,40}\}?|[A-Za-z_][A-Za-z0-9_]*)")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")

MAX_CONFIG_BYTES = 2**20  # read at most this much of a config file
MAX_DEPTH = 64  # nesting levels of YAML collections
MAX_ALIAS_NODES = 10_000  # nodes that YAML aliases may add, all aliases together
MAX_SECRET_BYTES = 64 * 2**10  # read at most this much of a secret file
UNSET_PLACEHOLDER = "https://unset.invalid"  # `--no-env`: a value most string fields accept, so the checks of its section still run


def read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a regular file: a FIFO would block and /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(0, f"{kind} (expected a regular file)")
        return f.read(limit + 1)


def read_secret_file(path: Path) -> str:
    """The stripped content of a secret file; ValueError saying why it cannot be used."""
    try:
        data = read_regular_file(path, MAX_SECRET_BYTES)
    except OSError as exc:
        raise ValueError(f"cannot read secret file {str(path)!r}: {exc.strerror}") from None
    if len(data) > MAX_SECRET_BYTES:
        raise ValueError(f"secret file {str(path)!r} is larger than {MAX_SECRET_BYTES // 2**10} KiB")
    try:
        content = data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"secret file {str(path)!r} is not valid UTF-8 (byte {exc.start})") from None
    if not content:
        raise ValueError(f"secret file {str(path)!r} is empty")
    return content


def key_path(path: str, key: Any) -> str:
    """``path.key``; a key that is not plain is quoted with escapes, so a control character, an
    invisible or look-alike letter shows in the message instead of acting on the terminal."""
    text = str(key)
    if not _PLAIN_KEY.match(text):
        text = json.dumps(text)
        return f"{path}[{text}]" if path else f"[{text}]"
    return f"{path}.{text}" if path else text


def expand_env(node: Any, env: dict[str, str], path: str, problems: list[tuple[str, str]],
               unset: list[tuple[str, str]] | None = None, placeholder: str = "") -> Any:
    """Replace ``${VAR}`` in string scalars with the environment; ``$$`` is a literal ``$``.
    An unset variable becomes ``placeholder`` and is listed in ``unset`` (given) or ``problems``."""
    if isinstance(node, dict):
        return {key: expand_env(value, env, key_path(path, key), problems, unset, placeholder)
                for key, value in node.items()}
    if isinstance(node, list):
        return [expand_env(value, env, f"{path}[{i}]", problems, unset, placeholder) for i, value in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group(2) is not None:  # a typo must not go to the backend as a literal id or secret
            problems.append((path, f"{match.group(0)!r} is not expanded: write ${{NAME}} (no defaults), "
                                   f"or $$ for a literal $"))
            return placeholder
        name = match.group(1)
        if name not in env:
            (problems if unset is None else unset).append((path, f"environment variable {name} is not set"))
            return placeholder
        return env[name]

    return _ENV_REF.sub(substitute, node)


# ``${NAME}`` is written unquoted in flow mappings (``{token: ${TOKEN}}``), where YAML reads its
# braces as a mapping: it is parsed as a marker of the same length (error columns stay true)
# made of private-use characters, and turned back into ``${NAME}`` for ``expand_env``
_REF_IN_TEXT = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MARK = re.compile("\ue000\ue001([A-Za-z_][A-Za-z0-9_]*)\ue002")


def _marked(text: str) -> str:
    if any(c in text for c in "\ue000\ue001\ue002"):  # cannot be told apart from a marker: parse as written
        return text
    return _REF_IN_TEXT.sub(lambda m: m[0] if m[1] is None else f"\ue000\ue001{m[1]}\ue002", text)


def _unmarked(node: Any) -> Any:
    if isinstance(node, str):
        return _MARK.sub(lambda m: f"${{{m[1]}}}", node) if "\ue000" in node else node
    if isinstance(node, dict):
        return {_unmarked(key): _unmarked(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unmarked(value) for value in node]
    return node


_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when installed


class _StrictLoader(_SafeLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that refuses duplicate keys: a second ``measurements:`` must not win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_shape(text: str) -> None:
    """Refuse, from the event stream alone, nesting past MAX_DEPTH and aliases that expand past
    MAX_ALIAS_NODES (a "billion laughs" document is small on disk and huge once loaded)."""
    sizes: dict[str, int] = {}  # anchor -> nodes in its subtree, once it is complete
    stack: list[list[Any]] = [[0, None]]  # open collections: [nodes so far, anchor]
    via_aliases = 0
    for event in yaml.parse(text, Loader=_StrictLoader):
        if isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor)
            if size is None:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to an anchor that is undefined or contains the alias",
                    event.start_mark)
            via_aliases += size
            if via_aliases > MAX_ALIAS_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f"aliases expand to more than {MAX_ALIAS_NODES} nodes", event.start_mark)
            stack[-1][0] += size
        elif isinstance(event, yaml.ScalarEvent):
            stack[-1][0] += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            if len(stack) > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
            stack.append([1, event.anchor])
        elif isinstance(event, yaml.CollectionEndEvent):
            count, anchor = stack.pop()
            if anchor is not None:
                sizes[anchor] = count
            stack[-1][0] += count


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``, bounded in size, depth and alias expansion."""
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES)
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read file: {exc.strerror or exc}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [("", f"file is larger than {MAX_CONFIG_BYTES // 2**20} MiB")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        utf16 = " (it is UTF-16: save it as UTF-8)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError(str(path), [("", f"file is not valid UTF-8 (byte {exc.start}){utf16}")]) from None
    try:
        marked = _marked(text)
        _check_shape(marked)
        return _unmarked(yaml.load(marked, Loader=_StrictLoader))  # noqa: S506 - a SafeLoader subclass
    except yaml.reader.ReaderError as exc:  # its str() spans lines and names "<unicode string>"
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ConfigError(str(path), [("", f"invalid YAML at line {line}, column {column}: character "
                                           f"{chr(exc.character)!r}: {exc.reason}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if mark and text[mark.index:mark.index + 1] == "\t":
            problem += " (a tab: YAML indents with spaces)"
        raise ConfigError(str(path), [("", f"invalid YAML{where}: {problem}")]) from None
    except ValueError as exc:  # a scalar YAML types but Python cannot build: 2026-13-45, 5000 digits
        raise ConfigError(str(path), [("", f"invalid YAML value: {str(exc).split(';')[0]}")]) from None
