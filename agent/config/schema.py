"""The YAML schema: every section's shape and field checks. The per-resource-type parts of a
measurement (its metric names, the filters it supports, its own block) are generated from
the sampler registry: a measurement is a union discriminated by ``resource_type``."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
    model_validator,
)

from agent import settings
from agent.config.backends import Audit, Backend
from agent.config.kube import Kubernetes
from agent.config.fields import Duration, ExternalId, MetadataValue, Model, RoleArn, Text, check_role_arn, listed_once
from agent.samplers import REGISTRY, SamplerSpec
from agent.config.spool import Spool
from agent.settings import ALL_REGIONS

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d+$")
_PERCENTILE = re.compile(r"^p(\d{1,2}(\.\d{1,2})?|100)$")
STATISTICS = ("Sum", "SampleCount", "Maximum", "Minimum", "Average")
TYPE_KEYS = ("resource_type", "resourceType")  # the snake_case key and Paigo's camelCase


class Customer(Model):
    plain = settings.Customer

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


class Filters(Model):
    """Every filter some resource type honours; a type's own model refuses the others."""

    plain = settings.Filters

    tags: dict[str, str | list[str]] = Field(default_factory=dict)
    volume_types: list[str] = Field(default_factory=list)
    instance_types: list[str] = Field(default_factory=list)
    states: list[str] = Field(default_factory=list)
    storage_types: list[str] = Field(default_factory=list)
    load_balancer_types: list[Literal["application", "network", "gateway"]] = Field(default_factory=list)


def _as_region_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class Account(Model):
    plain = settings.Account

    iam_role_arn: RoleArn = Field(validation_alias=AliasChoices("iam_role_arn", "iamRoleArn"))
    external_id: ExternalId | None = Field(default=None, validation_alias=AliasChoices("external_id", "externalId"))
    customer: Customer | None = None


class CloudWatchQuery(Model):
    plain = settings.CloudWatchQuery
    essential: ClassVar[str] = "namespace, metric_name, dimensions, statistic"  # named when the block is missing

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


class _Measurement(Model):
    """What every measurement has; ``measurement_model`` adds what its resource type has."""

    plain = settings.Measurement

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=63)
    dimension_id: Text = Field(
        min_length=1, validation_alias=AliasChoices("dimension_id", "dimensionId")
    )
    cloud_platform: Literal["aws"] = Field(
        default="aws", validation_alias=AliasChoices("cloud_platform", "cloudPlatform")
    )
    resource_type: str = Field(validation_alias=AliasChoices(*TYPE_KEYS))
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
    group_by: Literal["customer", "resource"] = "customer"
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)
    event_type: Text | None = Field(default=None, min_length=1)
    decimals: int = Field(default=9, ge=0, le=18)

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
        return listed_once(regions, "regions")

    @field_validator("iam_role_arn")
    @classmethod
    def _role_arn(cls, arn: str | None) -> str | None:
        return None if arn is None else check_role_arn(arn)

    @field_validator("accounts")
    @classmethod
    def _accounts_once(cls, accounts: list[Account] | None) -> list[Account] | None:
        seen: set[str] = set()
        for account in accounts or ():
            account_id = account.iam_role_arn.split(":")[4]
            if account_id in seen:
                raise ValueError(f"account {account_id} is listed more than once")
            seen.add(account_id)
        return accounts

    @field_validator("interval")
    @classmethod
    def _whole_seconds(cls, interval: timedelta) -> timedelta:
        if interval.total_seconds() % 1:
            raise ValueError("interval must be a whole number of seconds")
        return interval


BLOCKS: dict[str, type[Model]] = {"cloudwatch": CloudWatchQuery, "kubernetes": Kubernetes}  # SamplerSpec.block -> its schema
_BLOCK_OWNERS = {spec.block: spec.resource_type for spec in REGISTRY.values() if spec.block}
assert _BLOCK_OWNERS.keys() <= BLOCKS.keys(), f"a resource type declares a block without a schema: {_BLOCK_OWNERS}"


def _fails(message: Callable[[Any], str]) -> AfterValidator:
    def refuse(value: Any) -> Any:
        raise ValueError(message(value))

    return AfterValidator(refuse)


def _refused(message: str) -> Any:
    """A key this resource type does not have, refused with why (not just "unknown key")."""
    return Annotated[Any, _fails(lambda _: message)], None


def _required_block(key: str) -> Any:
    def present(block: Any) -> Any:
        if block is None:
            raise ValueError(f"required key is missing: {BLOCKS[key].essential}")
        return block

    return Annotated[BLOCKS[key] | None, AfterValidator(present)], Field(default=None, validate_default=True)


def _one_of_metrics(spec: SamplerSpec) -> AfterValidator:
    def known(metric: str) -> str:
        if metric not in spec.metrics:
            raise ValueError(f"{spec.resource_type} has no metric {metric!r}; expected one of: {', '.join(spec.metrics)}")
        return metric

    return AfterValidator(known)


def measurement_model(spec: SamplerSpec) -> type[_Measurement]:
    """A measurement of one resource type: its metric names, its filters, its own block."""
    assert set(spec.filters) <= Filters.model_fields.keys(), f"{spec.resource_type}: a filter no schema declares"
    supported = ", ".join(spec.filters) or "none"
    filters = create_model(  # type: ignore[call-overload]
        "Filters", __base__=Filters,
        **{key: _refused(f"{spec.resource_type} does not support this filter; it supports: {supported}")
           for key in Filters.model_fields if key not in spec.filters})
    blocks = {key: _required_block(key) if key == spec.block
              else _refused(f"only applies with resource_type: {_BLOCK_OWNERS.get(key)}") for key in BLOCKS}
    regions = {} if spec.regional else {"regions": (  # a cluster's measurement has none (its check says when)
        Annotated[list[str], BeforeValidator(_as_region_list)],
        Field(default_factory=list, validation_alias=AliasChoices("regions", "region")))}
    canonical = AfterValidator(lambda _: spec.resource_type)  # an alias (Paigo's k8spod) becomes the type's name
    return create_model(  # type: ignore[call-overload, no-any-return]
        "Measurement", __base__=_Measurement, **regions,
        resource_type=(Annotated[Literal[(spec.resource_type, *spec.aliases)], canonical],  # type: ignore[valid-type]
                       Field(validation_alias=AliasChoices(*TYPE_KEYS))),
        metric=(Annotated[str, _one_of_metrics(spec)], spec.default_metric),
        filters=(filters, Field(default_factory=filters)),
        **blocks)


_KNOWN = ", ".join(sorted(REGISTRY))
_ALIASES = {alias: spec.resource_type for spec in REGISTRY.values() for alias in spec.aliases}
_UnknownType = create_model(  # a measurement of no known type: refused, its other keys still checked
    "Measurement", __base__=_Measurement,
    resource_type=(Annotated[str, _fails(lambda t: f"unknown resource type {t!r}; expected one of: {_KNOWN}")],
                   Field(validation_alias=AliasChoices(*TYPE_KEYS))),
    metric=(str | None, None),
    filters=(Filters, Field(default_factory=Filters)),
    **{key: (block | None, None) for key, block in BLOCKS.items()})
UNKNOWN = "?"  # the union tag of _UnknownType


def _type_of(raw: Any) -> str:
    value = next((raw[key] for key in TYPE_KEYS if key in raw), None) if isinstance(raw, dict) else None
    if isinstance(value, str) and value in _ALIASES:
        return _ALIASES[value]
    return value if isinstance(value, str) and value in REGISTRY else UNKNOWN


Measurement = Annotated[
    Union[tuple(Annotated[model, Tag(tag)] for tag, model in  # noqa: UP007 - a union built from the registry
                [(UNKNOWN, _UnknownType), *((t, measurement_model(spec)) for t, spec in REGISTRY.items())])],
    Discriminator(_type_of),
]


class Sampling(Model):
    plain = settings.Sampling

    workers: int = Field(default=8, ge=1, le=128)  # targets (measurement x account x region) sampled at once
    per_account_region: int = Field(default=2, ge=1, le=32)  # stays inside EC2's Describe throttling bucket


class Server(Model):
    plain = settings.Server

    listen: str = "0.0.0.0:9464"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, _, port = listen.rpartition(":")
        if not re.fullmatch(r"[^\s:\[\]]*", host) or not re.fullmatch(r"\d{1,5}", port) or int(port) > 65535:
            raise ValueError(f"expected host:port with an IPv4 address or name and a port from 0 to 65535, "
                             f"such as 0.0.0.0:9464, got {listen!r:.80}")
        return listen


class PaigoSync(Model):
    plain = settings.PaigoSync

    refresh: Duration = timedelta(minutes=5)
    customer: Customer
    group_by: Literal["customer", "resource"] = "customer"

    @field_validator("refresh")
    @classmethod
    def _at_least_a_minute(cls, refresh: timedelta) -> timedelta:
        if refresh < timedelta(minutes=1):
            raise ValueError("paigo_sync.refresh must be at least 1m (each refresh is a request to Paigo)")
        return refresh


class AgentConfig(Model):
    plain = settings.AgentConfig

    backend: Backend
    spool: Spool = Field(default_factory=Spool)
    server: Server = Field(default_factory=Server)
    sampling: Sampling = Field(default_factory=Sampling)
    audit: Audit | None = None
    measurements: list[Measurement] = Field(default_factory=list)  # at least one without paigo_sync (checks.py)
    paigo_sync: PaigoSync | None = None
