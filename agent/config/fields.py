"""The value types of the YAML schema (durations, ids, secrets, URLs) and its base model,
which turns a validated model into its plain ``agent.settings`` object."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
)

from agent.config.reading import read_secret_file
from agent.settings import Secret as PlainSecret

_DURATION_PART = re.compile(r"(\d+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")

MAX_DURATION = timedelta(days=366)


def parse_duration(value: Any) -> timedelta:
    """``30s``, ``5m``, ``1h``, ``1d``, ``1h30m`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value) == "":
        parts = _DURATION_PART.findall(value)
        if any(len(n) > 12 for n, _ in parts):  # past any bound, and int() refuses thousands of digits
            raise ValueError(f"a duration must be at most {MAX_DURATION.days}d")
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r:.60}")
    if seconds <= 0:
        raise ValueError("a duration must be longer than 0s")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(f"a duration must be at most {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def stringify(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return value


MetadataValue = Annotated[str, BeforeValidator(stringify)]


def _printable(value: str) -> str:
    if not value.isprintable() or value != value.strip():
        raise ValueError(f"expected printable text without line breaks or surrounding spaces, got {value[:80]!r}")
    return value


Text = Annotated[str, AfterValidator(_printable)]
"""A value that goes into requests as an id: no control characters, no surrounding spaces."""


def _non_empty(secret: SecretStr) -> SecretStr:
    if not secret.get_secret_value().strip():
        raise ValueError("a secret must not be empty (is its variable set to an empty value?)")
    return secret


Secret = Annotated[SecretStr, AfterValidator(_non_empty)]


def secret_from_file(value: Any, info: ValidationInfo) -> SecretStr | None:
    """A ``*_file`` value: the file it names (relative to the config file) read into a secret."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected the path of a file holding the secret")
    if info.context and info.context.get("no_env"):
        return SecretStr("unread")  # validate --no-env: the file need not exist
    path = Path(value)
    if not path.is_absolute() and info.context and info.context.get("base_dir"):
        path = Path(info.context["base_dir"]) / path
    return SecretStr(read_secret_file(path))


SecretFile = Annotated[SecretStr | None, BeforeValidator(secret_from_file)]
"""A ``*_file`` key: the path is read at load time and only the content is kept."""


def _http_url(value: str) -> str:
    expected = f"expected an http:// or https:// URL such as https://billing.example.com/usage, got {value!r:.100}"
    if not value.isprintable() or " " in value:  # httpx would refuse it, or quietly send %20, at the first request
        raise ValueError(f"{expected}: it holds spaces or control characters")
    try:
        url = urlsplit(value)
        port = url.port  # ValueError past 65535
    except ValueError as exc:
        raise ValueError(f"{expected}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(expected)
    if port == 0:
        raise ValueError(f"{expected}: port 0")
    if url.username is not None or url.password is not None:
        raise ValueError("credentials in the URL are refused (a URL is logged); use headers, a token or a secret file")
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]


def check_role_arn(arn: str) -> str:
    if not _ROLE_ARN.match(arn):
        raise ValueError(f"expected arn:aws:iam::<12-digit account>:role/<name>, got {arn!r}")
    return arn


def listed_once(values: list[str], what: str) -> list[str]:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} are listed more than once")
    return values


RoleArn = Annotated[str, AfterValidator(check_role_arn)]
ExternalId = Annotated[Text, Field(min_length=2, max_length=1224)]


def _plain(value: Any) -> Any:
    """A validated value as settings hold it: no pydantic types, lists or dicts."""
    if isinstance(value, Model):
        return value.to_settings()
    if isinstance(value, SecretStr):
        return PlainSecret(value.get_secret_value())
    if isinstance(value, ByteSize):
        return int(value)
    if isinstance(value, list):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return MappingProxyType({k: _plain(v) for k, v in value.items()})
    return value


class Model(BaseModel):
    # validators are built on first use: a command builds the one schema it validates with, once
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, defer_build=True)

    plain: ClassVar[type | None] = None  # the agent.settings class this section becomes

    def to_settings(self) -> Any:
        """This section as its ``agent.settings`` object: the fields that class declares, by name."""
        assert self.plain is not None, f"{type(self).__name__} has no settings class"
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self.plain) if f.name in type(self).model_fields}
        # a key this resource type refuses is None here: the settings default (no filter, no block) stands
        return self.plain(**{name: _plain(value) for name, value in values.items()
                             if value is not None or not _has_default(self.plain, name)})


def _has_default(plain: type, name: str) -> bool:
    field = plain.__dataclass_fields__[name]
    return field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
