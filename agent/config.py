"""The YAML configuration as pydantic models.

Loading goes: read file -> YAML -> ``${VAR}`` expansion -> pydantic (``extra="forbid"``)
-> cross-field checks against the sampler registry. Every problem found on the way is
collected with its YAML path (``measurements[1].interval``) into one ``ConfigError``.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.errors import ConfigError

_DURATION_PART = re.compile(r"(\d+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$(\{[^}]{0,40}\}?|[A-Za-z_][A-Za-z0-9_]*)")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$")

PER_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
ALL_REGIONS = "all"

MAX_DURATION = timedelta(days=366)
MAX_CONFIG_BYTES = 2**20  # read at most this much of a config file
MAX_DEPTH = 64  # nesting levels of YAML collections
MAX_ALIAS_NODES = 10_000  # nodes that YAML aliases may add, all aliases together
MAX_SECRET_BYTES = 64 * 2**10  # read at most this much of a secret file


def read_regular_file(path: Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a regular file: a FIFO would block and /dev/zero never ends."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise OSError(0, f"{kind} (expected a regular file)")
        return f.read(limit + 1)


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


def _stringify(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return value


MetadataValue = Annotated[str, BeforeValidator(_stringify)]


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


def _read_secret_file(value: str | None, info: ValidationInfo) -> SecretStr | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected the path of a file holding the secret")
    if info.context and info.context.get("no_env"):
        return SecretStr("unread")  # validate --no-env: the file need not exist
    path = Path(value)
    if not path.is_absolute() and info.context and info.context.get("base_dir"):
        path = Path(info.context["base_dir"]) / path
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
    return SecretStr(content)


SecretFile = Annotated[SecretStr | None, BeforeValidator(_read_secret_file)]
"""A ``*_file`` key: the path is read at load time and only the content is kept."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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


class PaigoBackend(_Model):
    type: Literal["paigo"]
    url: HttpUrl = "https://api.prod.paigo.tech"
    token_url: HttpUrl = "https://auth.paigo.tech/oauth/token"
    audience: Text = "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com"
    client_id: Text = Field(min_length=1)
    client_secret: Secret | None = None
    client_secret_file: SecretFile = None
    timeout: Duration = timedelta(seconds=10)
    max_in_flight: int = Field(default=8, ge=1, le=256)


    @model_validator(mode="after")
    def _one_secret(self) -> PaigoBackend:
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret or client_secret_file")
        if self.client_secret is None:
            object.__setattr__(self, "client_secret", self.client_secret_file)
        return self

    def secret(self) -> str:
        assert self.client_secret is not None
        return self.client_secret.get_secret_value()


def _at_most_one(model: BaseModel, name: str) -> SecretStr | None:
    """``name`` or ``name_file`` (already read into a secret); both set is an error."""
    value, from_file = getattr(model, name), getattr(model, f"{name}_file")
    if value is not None and from_file is not None:
        raise ValueError(f"set at most one of {name} or {name}_file")
    return value if value is not None else from_file


# A safe subset of RFC 3986 URI references (CloudEvents ``source`` must be one, or OpenMeter
# refuses every event): scheme:[//host[:port]]/path, scheme:path, or a relative path without ':'.
SOURCE_PATTERN = (r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:(?://[A-Za-z0-9\-._~]*(?::[0-9]*)?(?:/[A-Za-z0-9\-._~/:@]*)?"
                  r"|(?!//)[A-Za-z0-9\-._~/:@]*)|[A-Za-z0-9\-._~/]+)$")
_URI_REFERENCE = re.compile(SOURCE_PATTERN)


class OpenMeterBackend(_Model):
    type: Literal["openmeter"]
    url: HttpUrl = "https://openmeter.cloud"
    token: Secret | None = None
    token_file: SecretFile = None
    source: str = Field(default="usage-agent", max_length=255)
    batch_size: int = Field(default=100, ge=1, le=1000)
    timeout: Duration = timedelta(seconds=10)


    @field_validator("source")
    @classmethod
    def _uri_reference(cls, source: str) -> str:
        if not _URI_REFERENCE.match(source):
            raise ValueError(f"expected a URI reference such as usage-agent, urn:acme:agent or https://agent.example.com, got {source!r}")
        return source

    @model_validator(mode="after")
    def _one_token(self) -> OpenMeterBackend:
        token = _at_most_one(self, "token")
        if token is not None and not _HEADER_VALUE.match(token.get_secret_value()):
            # sent as the Authorization header: refused by httpx at every request, retried forever
            raise ValueError("the token must be printable ASCII, without line breaks or control characters")
        object.__setattr__(self, "token", token)
        return self


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# set by the sink itself: the body's type and length, and the signature
RESERVED_HEADERS = ("content-type", "content-length", "host", "transfer-encoding",
                    "x-usage-timestamp", "x-usage-signature")


_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")  # what httpx can encode and h11 will send


def _header_value(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name}: a value must not contain line breaks")
    if not _HEADER_VALUE.match(value):
        raise ValueError(f"header {name}: a value must be printable ASCII, without control characters")
    return value


class HttpBackend(_Model):
    type: Literal["http"]
    url: HttpUrl
    headers: dict[str, Annotated[Secret, BeforeValidator(_stringify)]] = Field(default_factory=dict)
    header_files: dict[str, SecretStr] = Field(default_factory=dict)  # header name -> file holding the value
    hmac_secret: Secret | None = None
    hmac_secret_file: SecretFile = None
    batch_size: int = Field(default=100, ge=1, le=1000)
    timeout: Duration = timedelta(seconds=10)


    @field_validator("header_files", mode="before")
    @classmethod
    def _read_header_files(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for name, path in value.items():
            try:
                out[name] = _read_secret_file(path, info)
            except ValueError as exc:
                raise ValueError(f"header {name}: {exc}") from None
        return out

    @model_validator(mode="after")
    def _checks(self) -> HttpBackend:
        names = [*self.headers, *self.header_files]
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name} is set by the agent and cannot be configured")
        lowered = [n.lower() for n in names]
        if len(set(lowered)) != len(lowered):
            raise ValueError("a header is configured more than once (headers and header_files together)")
        for name, value in self.header_values().items():
            _header_value(name, value)
        object.__setattr__(self, "hmac_secret", _at_most_one(self, "hmac_secret"))
        return self

    def header_values(self) -> dict[str, str]:
        return {name: value.get_secret_value() for name, value in {**self.headers, **self.header_files}.items()}


class JsonlFile(_Model):
    path: str = Field(min_length=1)  # relative paths: relative to the config file
    max_bytes: ByteSize = Field(default=ByteSize(100 * 2**20), ge=1024, le=2**50)  # rotate before a file would pass this
    keep: int = Field(default=10, ge=1, le=100_000)  # rotated files kept; older ones are deleted


class FileBackend(JsonlFile):
    type: Literal["file"]


class Audit(JsonlFile):
    """A local JSON Lines copy of every record the backend accepted."""


Backend = Annotated[PaigoBackend | OpenMeterBackend | HttpBackend | FileBackend, Field(discriminator="type")]
BACKEND_TYPES = ("paigo", "openmeter", "http", "file")


class Customer(_Model):
    id: Text | None = Field(default=None, min_length=1)
    tag: Text | None = Field(default=None, min_length=1)
    untagged: Text = Field(default="skip", min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> Customer:
        if (self.id is None) == (self.tag is None):
            raise ValueError("set exactly one of customer.id or customer.tag")
        if self.id is not None and "untagged" in self.model_fields_set:
            raise ValueError("customer.untagged only applies with customer.tag")
        return self

    @property
    def fallback_id(self) -> str | None:
        """The customer for untagged resources, or None to skip them."""
        return None if self.untagged == "skip" else self.untagged


class Filters(_Model):
    """Which resources a measurement counts; each sampler declares the keys it honours."""

    tags: dict[str, str | list[str]] = Field(default_factory=dict)
    volume_types: list[str] = Field(default_factory=list)  # ebs: gp3, io2, ...
    instance_types: list[str] = Field(default_factory=list)  # ec2: m5.large; rds: db.m5.large
    states: list[str] = Field(default_factory=list)  # ec2 instance states (default: running)
    storage_types: list[str] = Field(default_factory=list)  # s3 StorageType (default: all)
    load_balancer_types: list[Literal["application", "network", "gateway"]] = Field(default_factory=list)  # elb

    def matches_tags(self, tags: Mapping[str, str]) -> bool:
        """The tag condition, for APIs that cannot filter on tags server-side."""
        return all(
            tags.get(key) in ([value] if isinstance(value, str) else value)
            for key, value in self.tags.items()
        )

    def tag_filters(self) -> list[dict[str, Any]]:
        """EC2-style ``Filters`` for the tag conditions."""
        return [
            {"Name": f"tag:{key}", "Values": [value] if isinstance(value, str) else list(value)}
            for key, value in sorted(self.tags.items())
        ]


def _as_region_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


RoleArn = Annotated[str, AfterValidator(lambda arn: _check_role_arn(arn))]
ExternalId = Annotated[Text, Field(min_length=2, max_length=1224)]


def _check_role_arn(arn: str) -> str:
    if not _ROLE_ARN.match(arn):
        raise ValueError(f"expected arn:aws:iam::<12-digit account>:role/<name>, got {arn!r}")
    return arn


class Account(_Model):
    """One customer account a measurement samples, through a role in that account."""

    iam_role_arn: RoleArn = Field(validation_alias=AliasChoices("iam_role_arn", "iamRoleArn"))
    external_id: ExternalId | None = Field(default=None, validation_alias=AliasChoices("external_id", "externalId"))
    customer: Customer | None = None

    @property
    def account_id(self) -> str:
        return self.iam_role_arn.split(":")[4]


@dataclass(frozen=True)
class Role:
    """How the agent reaches one account: the role to assume (None = its own identity)."""

    arn: str | None
    external_id: str | None
    customer: Customer | None


STATISTICS = ("Sum", "SampleCount", "Maximum", "Minimum", "Average")
_PERCENTILE = re.compile(r"^p(\d{1,2}(\.\d{1,2})?|100)$")
WILDCARD = "*"


class CloudWatchQuery(_Model):
    """One CloudWatch metric; a dimension whose value is ``*`` is discovered with ListMetrics."""

    namespace: str = Field(min_length=1, max_length=255)
    metric_name: str = Field(min_length=1, max_length=255)
    dimensions: dict[str, str] = Field(default_factory=dict, max_length=30)
    statistic: str = "Sum"
    period: Duration | None = None  # default: the measurement's interval
    unit: Text = Field(default="None", min_length=1)  # the unit the records carry
    delay: Duration = timedelta(minutes=5)  # tick T is sampled at T + delay, once CloudWatch has the data

    @field_validator("statistic")
    @classmethod
    def _known_statistic(cls, value: str) -> str:
        if value not in STATISTICS and not _PERCENTILE.match(value):
            raise ValueError(f"expected one of {', '.join(STATISTICS)} or a percentile such as p99, got {value!r}")
        return value

    @field_validator("period")
    @classmethod
    def _whole_minutes(cls, period: timedelta | None) -> timedelta | None:
        if period is not None and period.total_seconds() % 60:
            raise ValueError("period must be a whole number of minutes")
        return period

    @property
    def combines_by_sum(self) -> bool:
        return self.statistic in ("Sum", "SampleCount")


class Measurement(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=63)
    dimension_id: Text = Field(
        min_length=1, validation_alias=AliasChoices("dimension_id", "dimensionId")
    )
    cloud_platform: Literal["aws"] = Field(
        default="aws", validation_alias=AliasChoices("cloud_platform", "cloudPlatform")
    )
    resource_type: str = Field(validation_alias=AliasChoices("resource_type", "resourceType"))
    metric: str | None = None
    mode: Literal["gauge", "time_weighted"] = "gauge"
    per: Literal["second", "minute", "hour", "day"] = "hour"
    interval: Duration = timedelta(hours=1)
    iam_role_arn: str | None = Field(default=None, validation_alias=AliasChoices("iam_role_arn", "iamRoleArn"))
    external_id: ExternalId | None = Field(default=None, validation_alias=AliasChoices("external_id", "externalId"))
    accounts: list[Account] | None = Field(default=None, min_length=1)
    regions: Annotated[list[str], BeforeValidator(_as_region_list)] = Field(
        min_length=1, validation_alias=AliasChoices("regions", "region")
    )
    customer: Customer | None = None
    filters: Filters = Field(default_factory=Filters)
    group_by: Literal["customer", "resource"] = "customer"
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    event_type: Text | None = Field(default=None, min_length=1)
    decimals: int = Field(default=9, ge=0, le=18)
    cloudwatch: CloudWatchQuery | None = None

    @field_validator("regions")
    @classmethod
    def _regions_look_like_regions(cls, regions: list[str]) -> list[str]:
        if regions == [ALL_REGIONS]:
            return regions
        for region in regions:
            if region == ALL_REGIONS:
                raise ValueError("'all' stands alone: write regions: all")
            if not _REGION.match(region):
                raise ValueError(f"{region!r} is not an AWS region name such as us-east-1 (or: all)")
        if len(set(regions)) != len(regions):
            raise ValueError("regions are listed more than once")
        return regions

    @field_validator("iam_role_arn")
    @classmethod
    def _role_arn(cls, arn: str | None) -> str | None:
        return None if arn is None else _check_role_arn(arn)

    @field_validator("accounts")
    @classmethod
    def _accounts_once(cls, accounts: list[Account] | None) -> list[Account] | None:
        seen: set[str] = set()
        for account in accounts or ():
            if account.account_id in seen:
                raise ValueError(f"account {account.account_id} is listed more than once")
            seen.add(account.account_id)
        return accounts

    @property
    def all_regions(self) -> bool:
        """``regions: all``: every region enabled in each account."""
        return self.regions == [ALL_REGIONS]

    @property
    def delay(self) -> timedelta:
        """How long after tick T the tick is sampled (CloudWatch publishes late)."""
        return self.cloudwatch.delay if self.cloudwatch else timedelta(0)

    def roles(self) -> list[Role]:
        """The accounts to sample and how to reach each: ``accounts``, or the single-role form."""
        if self.accounts:
            return [Role(a.iam_role_arn, a.external_id, a.customer or self.customer) for a in self.accounts]
        return [Role(self.iam_role_arn, self.external_id, self.customer)]

    @field_validator("interval")
    @classmethod
    def _whole_seconds(cls, interval: timedelta) -> timedelta:
        if interval.total_seconds() % 1:
            raise ValueError("interval must be a whole number of seconds")
        return interval

    @property
    def interval_seconds(self) -> int:
        return int(self.interval.total_seconds())


class Sampling(_Model):
    workers: int = Field(default=8, ge=1, le=128)  # targets (measurement x account x region) sampled at once
    per_account_region: int = Field(default=2, ge=1, le=32)  # stays inside EC2's Describe throttling bucket


class Spool(_Model):
    path: str = "/var/lib/usage-agent/spool.db"
    max_records: int = Field(default=1_000_000, ge=1, le=10**12)
    retention: Duration = timedelta(days=7)  # delivered records are kept this long, then deleted
    alert_after: Duration = timedelta(hours=1)  # an error is logged while a record waits longer


class Server(_Model):
    listen: str = "0.0.0.0:9464"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        if not re.fullmatch(r"[^\s:\[\]]*", host) or not re.fullmatch(r"\d{1,5}", port) or int(port) > 65535:
            raise ValueError(f"expected host:port with an IPv4 address or name and a port from 0 to 65535, "
                             f"such as 0.0.0.0:9464, got {listen!r:.80}")
        return listen


class AgentConfig(_Model):
    backend: Backend
    spool: Spool = Field(default_factory=Spool)
    server: Server = Field(default_factory=Server)
    sampling: Sampling = Field(default_factory=Sampling)
    audit: Audit | None = None
    measurements: list[Measurement] = Field(min_length=1)


class SpoolSection(_Model):
    """Only what the ``spool`` commands read: the rest of the file is not looked at."""

    spool: Spool = Field(default_factory=Spool)


def _key(path: str, key: Any) -> str:
    """``path.key``; a key that is not plain is quoted with escapes, so a control character, an
    invisible or look-alike letter shows in the message instead of acting on the terminal."""
    text = str(key)
    if not _PLAIN_KEY.match(text):
        text = json.dumps(text)
        return f"{path}[{text}]" if path else f"[{text}]"
    return f"{path}.{text}" if path else text


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and loc[i - 1] == "backend" and part in BACKEND_TYPES:
            continue  # the union tag pydantic inserts is not a YAML key
        else:
            out = _key(out, part)
    return out


UNSET_PLACEHOLDER = "https://unset.invalid"  # `--no-env`: a value most string fields accept, so the checks of its section still run


def expand_env(node: Any, env: dict[str, str], path: str, problems: list[tuple[str, str]],
               unset: list[tuple[str, str]] | None = None, placeholder: str = "") -> Any:
    """Replace ``${VAR}`` in string scalars with the environment; ``$$`` is a literal ``$``.
    An unset variable becomes ``placeholder`` and is listed in ``unset`` (given) or ``problems``."""
    if isinstance(node, dict):
        return {key: expand_env(value, env, _key(path, key), problems, unset, placeholder)
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


def _raw_key(raw: dict[str, Any], *names: str) -> str | None:
    """Which spelling of a field (snake_case or Paigo's camelCase) the YAML used."""
    return next((n for n in names if n in raw), None)


def _registry_problems(measurements: Any) -> list[tuple[str, str]]:
    """Checks against the sampler registry, on the raw YAML so they add to pydantic's errors."""
    from agent.samplers import REGISTRY

    if not isinstance(measurements, list):
        return []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(measurements):
        if not isinstance(raw, dict):
            continue
        where = f"measurements[{i}]"
        name = raw.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append((f"{where}.name", f"{name!r} is already used by measurements[{seen[name]}]"))
            seen.setdefault(name, i)
        type_key = _raw_key(raw, "resource_type", "resourceType")
        resource_type = raw.get(type_key) if type_key else None
        if not isinstance(resource_type, str):
            continue
        spec = REGISTRY.get(resource_type)
        if spec is None:
            known = ", ".join(sorted(REGISTRY))
            problems.append((f"{where}.{type_key}", f"unknown resource type {resource_type!r}; expected one of: {known}"))
            continue
        metric = raw.get("metric")
        if isinstance(metric, str) and metric not in spec.metrics:
            known = ", ".join(spec.metrics)
            problems.append((f"{where}.metric", f"{resource_type} has no metric {metric!r}; expected one of: {known}"))
        filters = raw.get("filters")
        for key in filters if isinstance(filters, dict) else ():
            if key in Filters.model_fields and key not in spec.filters:
                supported = ", ".join(spec.filters) or "none"
                problems.append((f"{where}.filters.{key}", f"{resource_type} does not support this filter; it supports: {supported}"))
        problems += _account_problems(raw, where)
        if "cloudwatch" in raw and resource_type != "cloudwatch":
            problems.append((f"{where}.cloudwatch", "only applies with resource_type: cloudwatch"))
        if spec.check is not None:
            problems += [(f"{where}.{path}", message) for path, message in spec.check(raw)]
    return problems


def _account_problems(raw: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """The single-role form and ``accounts:`` exclude each other; every account needs a customer."""
    problems: list[tuple[str, str]] = []
    role_key = _raw_key(raw, "iam_role_arn", "iamRoleArn")
    external_key = _raw_key(raw, "external_id", "externalId")
    accounts = raw.get("accounts")
    if accounts is not None:
        for key in (role_key, external_key):
            if key:
                problems.append((f"{where}.{key}", "use either accounts or iam_role_arn/external_id, not both"))
        if "customer" not in raw and isinstance(accounts, list):
            for j, account in enumerate(accounts):
                if isinstance(account, dict) and "customer" not in account:
                    problems.append((f"{where}.accounts[{j}].customer",
                                     "required key is missing (or set customer on the measurement)"))
        return problems
    if external_key and role_key is None:
        problems.append((f"{where}.{external_key}", "an external id needs iam_role_arn"))
    if "customer" not in raw:
        problems.append((f"{where}.customer", "required key is missing"))
    return problems


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
}


def _path_order(problem: tuple[str, str]) -> list[Any]:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[\[\].]+", problem[0]) if p]


def _under(where: str, paths: set[str]) -> bool:
    """``where`` is one of ``paths`` or inside one of them, or a list holding one (``regions``
    is checked as a whole)."""
    return any(where == p or where.startswith((f"{p}.", f"{p}[")) or p.startswith(f"{where}[") for p in paths)


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors(include_url=False):
        where = _format_loc(err["loc"])
        if err["type"] == "union_tag_not_found":
            problems.append((f"{where}.type", f"required key is missing; expected one of: {', '.join(BACKEND_TYPES)}"))
        elif err["type"] == "union_tag_invalid":
            problems.append((f"{where}.type", f"unknown backend type; expected one of: {', '.join(BACKEND_TYPES)}"))
        else:
            problems.append((where, _MESSAGES.get(err["type"], err["msg"].removeprefix("Value error, "))))
    return problems


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


def _overlaps(raw: dict[str, Any], base_dir: Path, skip: set[str],
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


def _expanded(raw: Any, env: dict[str, str], no_env: bool) -> tuple[Any, list[tuple[str, str]], set[str]]:
    """``raw`` with ``${VAR}`` expanded; the problems; the YAML paths built from an unset variable,
    whose other errors are not reported (once is enough; with ``no_env``, not at all)."""
    problems: list[tuple[str, str]] = []
    unset: list[tuple[str, str]] = []
    expanded = expand_env(raw, env, "", problems, unset, UNSET_PLACEHOLDER if no_env else "")
    return expanded, problems if no_env else problems + unset, {where for where, _ in problems + unset}


def parse_config(raw: Any, source: str, env: dict[str, str], base_dir: Path | None = None,
                 config_file: Path | None = None) -> AgentConfig:
    """Validate an already-loaded YAML document; raises ConfigError with every problem."""
    cfg, _ = _validate(raw, source, env, base_dir, no_env=False, config_file=config_file)
    assert cfg is not None  # without no_env, every value was checked
    return cfg


def _validate(
    raw: Any, source: str, env: dict[str, str], base_dir: Path | None, no_env: bool,
    config_file: Path | None = None,
) -> tuple[AgentConfig | None, Any]:
    """The config and the expanded document; ConfigError with every problem. ``no_env``: an
    unset ``${VAR}`` and what is built from it are not checked, ``*_file`` secrets are not read,
    and the config is None when a value from an unset variable kept it from being built."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", "expected a mapping with backend, spool, server and measurements")])
    expanded, problems, skip = _expanded(raw, env, no_env)
    cfg: AgentConfig | None = None
    try:
        cfg = AgentConfig.model_validate(
            expanded, context={"base_dir": str(base_dir) if base_dir else None, "no_env": no_env}
        )
    except ValidationError as exc:
        problems += [p for p in _pydantic_problems(exc) if not _under(p[0], skip)]
    problems += [p for p in _registry_problems(expanded.get("measurements")) if not _under(p[0], skip)]
    problems += _overlaps(expanded, base_dir or Path.cwd(), skip, config_file)
    if problems:
        raise ConfigError(source, sorted(problems, key=_path_order))
    return cfg, expanded


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
        _check_shape(text)
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
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


def _resolved(section: Any, base_dir: Path) -> Any:
    """Relative file paths are relative to the config file."""
    return section.model_copy(update={"path": str(base_dir / section.path)})


def load_config(path: str | Path, env: dict[str, str]) -> AgentConfig:
    path = Path(path)
    cfg = parse_config(read_yaml(path), str(path), env, base_dir=path.parent, config_file=path)
    update: dict[str, Any] = {"spool": _resolved(cfg.spool, path.parent)}
    if isinstance(cfg.backend, FileBackend):
        update["backend"] = _resolved(cfg.backend, path.parent)
    if cfg.audit is not None:
        update["audit"] = _resolved(cfg.audit, path.parent)
    return cfg.model_copy(update=update)


def check_structure(path: str | Path, env: dict[str, str]) -> dict[str, Any]:
    """``validate --no-env``: every check but those that need the deployment's environment
    (unset ``${VAR}``s, ``*_file`` secrets); returns the document, ``${VAR}``s expanded."""
    path = Path(path)
    _, expanded = _validate(read_yaml(path), str(path), env, path.parent, no_env=True, config_file=path)
    return expanded


def load_spool_config(path: str | Path, env: dict[str, str]) -> Spool:
    """Only the ``spool`` section: the backend's variables and secret files are not needed."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [("", "expected a mapping with backend, spool, server and measurements")])
    expanded, problems, skip = _expanded({k: v for k, v in raw.items() if k == "spool"}, env, no_env=False)
    try:
        section = SpoolSection.model_validate(expanded)
    except ValidationError as exc:
        problems += [p for p in _pydantic_problems(exc) if not _under(p[0], skip)]
    problems += _overlaps(expanded, path.parent, skip, path)  # `spool salvage` would replace the config
    if problems:
        raise ConfigError(str(path), sorted(problems, key=_path_order))
    return _resolved(section.spool, path.parent)
