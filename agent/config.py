"""The YAML configuration as pydantic models.

Loading goes: read file -> YAML -> ``${VAR}`` expansion -> pydantic (``extra="forbid"``)
-> cross-field checks against the sampler registry. Every problem found on the way is
collected with its YAML path (``measurements[1].interval``) into one ``ConfigError``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
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
_ENV_REF = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]+$")
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$")

PER_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
ALL_REGIONS = "all"


def parse_duration(value: Any) -> timedelta:
    """``30s``, ``5m``, ``1h``, ``1d``, ``1h30m`` or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and value and _DURATION_PART.sub("", value) == "":
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(value))
    else:
        raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be longer than 0s")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


def _stringify(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return str(value)
    return value


MetadataValue = Annotated[str, BeforeValidator(_stringify)]


def _read_secret_file(value: str | None, info: ValidationInfo) -> SecretStr | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected the path of a file holding the secret")
    path = Path(value)
    if not path.is_absolute() and info.context and info.context.get("base_dir"):
        path = Path(info.context["base_dir"]) / path
    try:
        content = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read secret file {str(path)!r}: {exc.strerror}") from None
    if not content:
        raise ValueError(f"secret file {str(path)!r} is empty")
    return SecretStr(content)


SecretFile = Annotated[SecretStr | None, BeforeValidator(_read_secret_file)]
"""A ``*_file`` key: the path is read at load time and only the content is kept."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url)]


class PaigoBackend(_Model):
    type: Literal["paigo"]
    url: HttpUrl = "https://api.prod.paigo.tech"
    token_url: HttpUrl = "https://auth.paigo.tech/oauth/token"
    audience: str = "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com"
    client_id: str = Field(min_length=1)
    client_secret: SecretStr | None = None
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
    token: SecretStr | None = None
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
        object.__setattr__(self, "token", _at_most_one(self, "token"))
        return self


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# set by the sink itself: the body's type and length, and the signature
RESERVED_HEADERS = ("content-type", "content-length", "host", "transfer-encoding",
                    "x-usage-timestamp", "x-usage-signature")


def _header_value(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name}: a value must not contain line breaks")
    return value


class HttpBackend(_Model):
    type: Literal["http"]
    url: HttpUrl
    headers: dict[str, Annotated[SecretStr, BeforeValidator(_stringify)]] = Field(default_factory=dict)
    header_files: dict[str, SecretStr] = Field(default_factory=dict)  # header name -> file holding the value
    hmac_secret: SecretStr | None = None
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
    max_bytes: ByteSize = Field(default=ByteSize(100 * 2**20), ge=1024)  # rotate before a file would pass this
    keep: int = Field(default=10, ge=1)  # rotated files kept; older ones are deleted


class FileBackend(JsonlFile):
    type: Literal["file"]


class Audit(JsonlFile):
    """A local JSON Lines copy of every record the backend accepted."""


Backend = Annotated[PaigoBackend | OpenMeterBackend | HttpBackend | FileBackend, Field(discriminator="type")]
BACKEND_TYPES = ("paigo", "openmeter", "http", "file")


class Customer(_Model):
    id: str | None = Field(default=None, min_length=1)
    tag: str | None = Field(default=None, min_length=1)
    untagged: str = Field(default="skip", min_length=1)

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
ExternalId = Annotated[str, Field(min_length=2, max_length=1224)]


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
    unit: str = Field(default="None", min_length=1)  # the unit the records carry
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
    dimension_id: str = Field(
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
    event_type: str | None = Field(default=None, min_length=1)
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
    max_records: int = Field(default=1_000_000, ge=1)
    retention: Duration = timedelta(days=7)  # delivered records are kept this long, then deleted
    alert_after: Duration = timedelta(hours=1)  # an error is logged while a record waits longer


class Server(_Model):
    listen: str = Field(default="0.0.0.0:9464", pattern=r"^[^\s:]*:\d{1,5}$")


class AgentConfig(_Model):
    backend: Backend
    spool: Spool = Field(default_factory=Spool)
    server: Server = Field(default_factory=Server)
    sampling: Sampling = Field(default_factory=Sampling)
    audit: Audit | None = None
    measurements: list[Measurement] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct_files(self) -> AgentConfig:
        if self.audit and isinstance(self.backend, FileBackend) and self.audit.path == self.backend.path:
            raise ValueError("audit.path is the file backend's path; give the audit copy its own file")
        return self


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and loc[i - 1] == "backend" and part in BACKEND_TYPES:
            continue  # the union tag pydantic inserts is not a YAML key
        else:
            out += f".{part}" if out else str(part)
    return out


def expand_env(node: Any, env: dict[str, str], path: str, problems: list[tuple[str, str]]) -> Any:
    """Replace ``${VAR}`` in string scalars with the environment; ``$$`` is a literal ``$``."""
    if isinstance(node, dict):
        return {
            key: expand_env(value, env, f"{path}.{key}" if path else str(key), problems)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [expand_env(value, env, f"{path}[{i}]", problems) for i, value in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        if name not in env:
            problems.append((path, f"environment variable {name} is not set"))
            return ""
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


def parse_config(
    raw: Any, source: str, env: dict[str, str], base_dir: Path | None = None
) -> AgentConfig:
    """Validate an already-loaded YAML document; raises ConfigError with every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", "expected a mapping with backend, spool, server and measurements")])
    problems: list[tuple[str, str]] = []
    expanded = expand_env(raw, env, "", problems)
    cfg: AgentConfig | None = None
    try:
        cfg = AgentConfig.model_validate(
            expanded, context={"base_dir": str(base_dir) if base_dir else None}
        )
    except ValidationError as exc:
        unset = {where for where, _ in problems}  # a missing ${VAR} is reported once, not twice
        for err in exc.errors(include_url=False):
            where = _format_loc(err["loc"])
            if where in unset:
                continue
            if err["type"] == "union_tag_not_found":
                problems.append((f"{where}.type", f"required key is missing; expected one of: {', '.join(BACKEND_TYPES)}"))
                continue
            if err["type"] == "union_tag_invalid":
                problems.append((f"{where}.type", f"unknown backend type; expected one of: {', '.join(BACKEND_TYPES)}"))
                continue
            message = _MESSAGES.get(err["type"], err["msg"].removeprefix("Value error, "))
            problems.append((where, message))
    problems += _registry_problems(expanded.get("measurements"))
    if problems:
        raise ConfigError(source, sorted(problems, key=_path_order))
    assert cfg is not None
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: a second ``measurements:`` must not win silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, env: dict[str, str]) -> AgentConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [("", f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [("", f"file is not valid UTF-8 (byte {exc.start})")]) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [("", f"invalid YAML{where}: {problem}")]) from None
    cfg = parse_config(raw, str(path), env, base_dir=path.parent)

    def resolved(section: Any) -> Any:  # relative file paths are relative to the config file
        return section.model_copy(update={"path": str(path.parent / section.path)})

    update: dict[str, Any] = {"spool": resolved(cfg.spool)}
    if isinstance(cfg.backend, FileBackend):
        update["backend"] = resolved(cfg.backend)
    if cfg.audit is not None:
        update["audit"] = resolved(cfg.audit)
    return cfg.model_copy(update=update)
