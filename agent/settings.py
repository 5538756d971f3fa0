"""The configuration every stage past config reads: plain frozen data, built by ``agent.config``.

No pydantic, no aliases, no raw dicts: collections are tuples and read-only mappings, secrets
are ``Secret`` (masked in repr), durations ``timedelta``. Build these with ``agent.config``
(``load_config``, ``parse_measurement``, ``parse_backend``); defaults live there, once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Literal

PER_SECONDS: Mapping[str, int] = MappingProxyType({"second": 1, "minute": 60, "hour": 3600, "day": 86400})
ALL_REGIONS = "all"
WILDCARD = "*"  # a CloudWatch dimension value discovered with ListMetrics

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, repr=False)
class Secret:
    """A credential: its value only through ``get_secret_value()``, never in repr or str."""

    _value: str

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


@dataclass(frozen=True)
class Customer:
    id: str | None
    tag: str | None
    untagged: str

    @property
    def fallback_id(self) -> str | None:
        """The customer for untagged resources, or None to skip them."""
        return None if self.untagged == "skip" else self.untagged


@dataclass(frozen=True)
class Filters:
    """Which resources a measurement counts; each sampler declares the keys it honours."""

    tags: Mapping[str, str | tuple[str, ...]] = field(default_factory=lambda: _EMPTY)
    volume_types: tuple[str, ...] = ()  # ebs: gp3, io2, ...
    instance_types: tuple[str, ...] = ()  # ec2: m5.large; rds: db.m5.large
    states: tuple[str, ...] = ()  # ec2 instance states (default: running)
    storage_types: tuple[str, ...] = ()  # s3 StorageType (default: all)
    load_balancer_types: tuple[str, ...] = ()  # elb: application, network, gateway (default: all)

    def matches_tags(self, tags: Mapping[str, str]) -> bool:
        """The tag condition, for APIs that cannot filter on tags server-side."""
        return all(
            tags.get(key) in ((value,) if isinstance(value, str) else value)
            for key, value in self.tags.items()
        )

    def tag_filters(self) -> list[dict[str, Any]]:
        """EC2-style ``Filters`` for the tag conditions."""
        return [
            {"Name": f"tag:{key}", "Values": [value] if isinstance(value, str) else list(value)}
            for key, value in sorted(self.tags.items())
        ]


@dataclass(frozen=True)
class Account:
    """One customer account a measurement samples, through a role in that account."""

    iam_role_arn: str
    external_id: str | None
    customer: Customer | None


@dataclass(frozen=True)
class Role:
    """How the agent reaches one account: the role to assume (None = its own identity)."""

    arn: str | None
    external_id: str | None
    customer: Customer | None


@dataclass(frozen=True)
class CloudWatchQuery:
    """One CloudWatch metric; a dimension whose value is ``*`` is discovered with ListMetrics."""

    namespace: str
    metric_name: str
    dimensions: Mapping[str, str]
    statistic: str
    period: timedelta | None  # None: the measurement's interval
    unit: str  # the unit the records carry
    delay: timedelta  # tick T is sampled at T + delay, once CloudWatch has the data

    @property
    def combines_by_sum(self) -> bool:
        return self.statistic in ("Sum", "SampleCount")


@dataclass(frozen=True)
class Kubernetes:
    """Which cluster and pods a kubernetes_pod measurement reads."""

    kubeconfig: str | None = None  # None: the in-cluster service account, else $KUBECONFIG, else ~/.kube/config
    context: str | None = None  # None: the kubeconfig's current context
    namespaces: tuple[str, ...] = ()  # (): every namespace
    label_selector: str | None = None  # applied by the API server
    eks_cluster: str | None = None  # an EKS cluster reached through the measurement's role and region
    gpu_resource: str = "nvidia.com/gpu"


@dataclass(frozen=True)
class Measurement:
    name: str
    dimension_id: str
    cloud_platform: Literal["aws"]
    resource_type: str
    metric: str  # the YAML's, or the resource type's default
    mode: Literal["gauge", "time_weighted"]
    per: Literal["second", "minute", "hour", "day"]
    interval: timedelta
    iam_role_arn: str | None
    external_id: str | None
    accounts: tuple[Account, ...] | None
    regions: tuple[str, ...]
    customer: Customer | None
    filters: Filters
    group_by: Literal["customer", "resource"]
    metadata: Mapping[str, str]
    event_type: str | None
    decimals: int
    cloudwatch: CloudWatchQuery | None = None  # only with resource_type: cloudwatch
    kubernetes: Kubernetes | None = None  # only with resource_type: kubernetes_pod

    @property
    def all_regions(self) -> bool:
        """``regions: all``: every region enabled in each account."""
        return self.regions == (ALL_REGIONS,)

    @property
    def delay(self) -> timedelta:
        """How long after tick T the tick is sampled (CloudWatch publishes late)."""
        return self.cloudwatch.delay if self.cloudwatch else timedelta(0)

    def roles(self) -> tuple[Role, ...]:
        """The accounts to sample and how to reach each: ``accounts``, or the single-role form."""
        if self.accounts:
            return tuple(Role(a.iam_role_arn, a.external_id, a.customer or self.customer) for a in self.accounts)
        return (Role(self.iam_role_arn, self.external_id, self.customer),)

    @property
    def customer_tags(self) -> tuple[str, ...]:
        """The tag (or label) keys any account's customer is read from, sorted; () for static ids."""
        return tuple(sorted({r.customer.tag for r in self.roles() if r.customer is not None and r.customer.tag}))

    @property
    def interval_seconds(self) -> int:
        return int(self.interval.total_seconds())


@dataclass(frozen=True)
class RemoteBackend:
    """What every backend reached over HTTP has."""

    type: str
    url: str
    timeout: timedelta  # what each request may take in total


@dataclass(frozen=True)
class ApiKeyBackend(RemoteBackend):
    api_key: Secret  # from api_key or api_key_file


@dataclass(frozen=True)
class PaigoBackend(RemoteBackend):
    type: Literal["paigo"]
    token_url: str
    audience: str
    client_id: str
    client_secret: Secret  # from client_secret or client_secret_file
    max_in_flight: int

    def secret(self) -> str:
        return self.client_secret.get_secret_value()


@dataclass(frozen=True)
class OpenMeterBackend(RemoteBackend):
    type: Literal["openmeter"]
    token: Secret | None  # from token or token_file
    source: str
    batch_size: int


@dataclass(frozen=True)
class HttpBackend(RemoteBackend):
    type: Literal["http"]
    headers: Mapping[str, Secret]
    header_files: Mapping[str, Secret]  # header name -> the content of its file
    hmac_secret: Secret | None  # from hmac_secret or hmac_secret_file
    batch_size: int

    def header_values(self) -> dict[str, str]:
        return {name: value.get_secret_value() for name, value in {**self.headers, **self.header_files}.items()}


@dataclass(frozen=True)
class StripeBackend(ApiKeyBackend):
    type: Literal["stripe"]
    customer_key: str  # the meter's customer_mapping.event_payload_key
    value_key: str  # the meter's value_settings.event_payload_key
    max_in_flight: int


@dataclass(frozen=True)
class MetronomeBackend(ApiKeyBackend):
    type: Literal["metronome"]


@dataclass(frozen=True)
class TogaiBackend(RemoteBackend):
    type: Literal["togai"]
    token: Secret  # from token or token_file
    attribute: str  # the name of the attribute each event carries the value in
    batch_size: int


@dataclass(frozen=True)
class LagoBackend(ApiKeyBackend):
    type: Literal["lago"]
    customer_field: Literal["external_subscription_id"]
    value_property: str  # the event property the billable metric aggregates
    batch_size: int


@dataclass(frozen=True)
class OrbBackend(ApiKeyBackend):
    type: Literal["orb"]
    customer_field: Literal["external_customer_id", "customer_id"]
    batch_size: int


@dataclass(frozen=True)
class JsonlFile:
    path: str  # absolute once loaded by load_config
    max_bytes: int  # rotate before a file would pass this
    keep: int  # rotated files kept; older ones are deleted


@dataclass(frozen=True)
class FileBackend(JsonlFile):
    type: Literal["file"]


@dataclass(frozen=True)
class Audit(JsonlFile):
    """A local JSON Lines copy of every record the backend accepted."""


Backend = (PaigoBackend | OpenMeterBackend | HttpBackend | FileBackend
           | StripeBackend
           | MetronomeBackend
           | TogaiBackend
           | LagoBackend
           | OrbBackend)


@dataclass(frozen=True)
class Sampling:
    workers: int  # targets (measurement x account x region) sampled at once
    per_account_region: int  # stays inside EC2's Describe throttling bucket


@dataclass(frozen=True)
class Spool:
    path: str
    max_records: int
    retention: timedelta  # delivered records are kept this long, then deleted
    alert_after: timedelta  # an error is logged while a record waits longer


@dataclass(frozen=True)
class Server:
    listen: str


@dataclass(frozen=True)
class PaigoSync:
    """Measurements read from the dimensions defined in Paigo (``paigo_sync``)."""

    refresh: timedelta  # how often the dimensions are read again
    customer: Customer  # the attribution of every measurement read from Paigo
    group_by: Literal["customer", "resource"]


@dataclass(frozen=True)
class AgentConfig:
    backend: Backend
    spool: Spool
    server: Server
    sampling: Sampling
    audit: Audit | None
    measurements: tuple[Measurement, ...]
    paigo_sync: PaigoSync | None = None
