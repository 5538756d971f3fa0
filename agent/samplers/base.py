"""What every sampler is: a declarative spec plus one function from an AWS client to samples,
and the one engine every AWS call of a target goes through (bounded in pages and time, and
an answer that cannot be used becomes an error naming the peer)."""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any, Literal

from agent.settings import Measurement
from agent.errors import SamplingError, excerpt

CLUSTER_REGION = "kubernetes"  # the region of a target that is a cluster, not an AWS region (SamplerSpec.place)
MAX_PAGES = 10_000  # per listing: 5M volumes at 500 a page; an endless NextToken stops here at the latest


@dataclass(frozen=True, slots=True)
class Sample:
    """One resource as seen at one instant: its metric values and the facts to bill by."""

    resource_id: str
    region: str
    account: str
    values: Mapping[str, Decimal]
    tags: Mapping[str, str] = field(default_factory=dict)
    facts: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A resource the sampler could not read sensibly; logged and counted, never fatal to a tick."""

    resource_id: str
    reason: str


def quantity(raw: Any) -> Decimal:
    """An AWS-reported amount as a Decimal; ValueError for missing, non-numeric or negative values."""
    if raw is None:
        raise ValueError("missing")
    if isinstance(raw, bool):
        raise ValueError(f"not a number: {raw!r}")
    try:
        value = Decimal(str(raw))
    except ArithmeticError:
        raise ValueError(f"not a number: {raw!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"absurd value: {raw!r}")
    return value


@lru_cache(maxsize=None)
def partition_of(region: str) -> str:
    """The ARN partition of a region (aws, aws-cn, aws-us-gov ...), from botocore's endpoint data."""
    from botocore.exceptions import UnknownRegionError

    from agent.botocore_data import data_session

    try:
        return data_session().get_partition_for_region(region)
    except UnknownRegionError:
        return "aws"  # botocore's own default for a region it does not know


@lru_cache(maxsize=None)
def _paging(service: str, operation: str) -> tuple[str | None, str | None, str | None]:
    """(input token, output token, limit key) of an operation, from botocore's paginator model;
    all None for one that answers in a single page (DescribeAddresses)."""
    from agent.botocore_data import data_session

    try:
        config = data_session().get_paginator_model(service).get_paginator(operation)
    except ValueError:
        return None, None, None
    return config["input_token"], config["output_token"], config.get("limit_key")


class CallError(SamplingError):
    """A target's AWS call was not made in time, got no answer, or got one it cannot be sampled from."""


class _PastDeadline(Exception):
    """Raised in botocore's before-send hook: a retry would start after the target's deadline."""


_ATTEMPTS: contextvars.ContextVar[tuple[Target, list[int]] | None] = contextvars.ContextVar("_ATTEMPTS", default=None)


def _before_send(**_: Any) -> None:
    # botocore retries inside one call (8 attempts of up to 40 s): none may start past the deadline
    current = _ATTEMPTS.get()
    if current is None:
        return
    target, attempts = current
    if attempts[0] and target.clock() >= target.deadline:
        raise _PastDeadline(attempts[0])
    attempts[0] += 1


@dataclass
class TargetMemory:
    """What a stateful sampler keeps of one target between ticks: ``state`` (plain JSON) is
    committed with each tick and given back after a restart; ``live`` holds what runs between
    ticks (a watch), closed with the collector; ``watch``: the daemon keeps watching."""

    state: dict[str, Any]
    watch: bool = False
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)  # the collector's clock
    live: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for thing in self.live.values():
            thing.close()
        self.live.clear()


@dataclass(frozen=True, slots=True)
class Target:
    """One (measurement, account, region) to sample for the tick ending at ``tick``, before
    ``deadline`` (on ``clock``, seconds): every AWS call goes through ``call`` or ``pages``."""

    measurement: Measurement
    account: str
    region: str
    tick: datetime
    deadline: float = math.inf
    clock: Callable[[], float] = time.monotonic
    memory: TargetMemory | None = None  # a stateful sampler's memory of this target across ticks

    def sample(self, resource_id: str, values: Mapping[str, Decimal], tags: Mapping[str, str],
               facts: Mapping[str, str]) -> Sample:
        """A resource of this target, as seen now."""
        return Sample(resource_id, self.region, self.account, values, tags, facts)

    def _peer(self, client: Any, operation: str) -> str:
        api = client.meta.method_to_api_mapping.get(operation, operation)
        return f"{client.meta.service_model.service_name} {api} in {self.account}/{self.region}"

    def _in_time(self, client: Any, operation: str, what: str) -> None:
        if self.clock() >= self.deadline:
            raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: {what}: the target "
                              f"did not finish inside the measurement's interval ({self.measurement.interval_seconds}s)")

    def call(self, client: Any, operation: str, **params: Any) -> dict[str, Any]:
        """One AWS call: refused past the deadline; an answer botocore cannot parse is an CallError.
        ClientError passes through: the samplers tell a vanished resource from a failure."""
        self._in_time(client, operation, "not called")
        return self._send(client, operation, params)

    def _send(self, client: Any, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError  # here: the registry (and config) imports this module
        from botocore.parsers import ResponseParserError

        client.meta.events.register("before-send", _before_send, unique_id="usage-agent-deadline")
        token = _ATTEMPTS.set((self, [0]))
        try:
            answer = getattr(client, operation)(**params)
        except _PastDeadline as exc:
            raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: not retried after "
                            f"{exc.args[0]} attempt(s): the target did not finish inside the measurement's "
                            f"interval ({self.measurement.interval_seconds}s)") from exc
        except BotoCoreError as exc:  # no answer: a connection, timeout or credentials problem
            raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: "
                              f"{excerpt(f'{type(exc).__name__}: {exc}')}") from exc
        except (ResponseParserError, ValueError, TypeError, KeyError) as exc:  # botocore parses 'NaN' with int()
            raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: unusable answer: "
                              f"{excerpt(f'{type(exc).__name__}: {exc}')}") from exc
        finally:
            _ATTEMPTS.reset(token)
        if not isinstance(answer, dict):
            raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: "
                              f"unusable answer: {excerpt(repr(answer))}")
        return answer

    def pages(self, client: Any, operation: str, key: str, page_size: int | None = None,
              max_pages: int = MAX_PAGES, **params: Any) -> Iterator[list[Any]]:
        """The ``key`` list of every page of a listing. An answer without it (an HTML page,
        say), a token seen before, more than ``max_pages`` pages or the deadline end the
        listing with an CallError: a listing that never ends must not hold up the tick."""
        input_token, output_token, limit_key = _paging(client.meta.service_model.service_name,
                                                       client.meta.method_to_api_mapping[operation])
        if page_size is not None and limit_key:
            params[limit_key] = page_size
        seen: set[Any] = set()
        for page in range(1, max_pages + 1):
            self._in_time(client, operation, f"stopped after {page - 1} pages" if page > 1 else "not called")
            answer = self._send(client, operation, params)
            items = answer.get(key)
            if not isinstance(items, list):
                present = ", ".join(sorted(k for k in answer if k != "ResponseMetadata")) or "none"
                raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: "
                                  f"page {page} has no {key} list (keys: {excerpt(present)})")
            yield items
            token = answer.get(output_token) if output_token else None
            if not token or input_token is None:
                return
            if token in seen:
                raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: page {page} "
                                  f"repeats the {output_token} of an earlier page ({excerpt(str(token))}); "
                                  "the listing would never end")
            seen.add(token)
            params[input_token] = token
        raise CallError(f"{self.measurement.resource_type}: {self._peer(client, operation)}: more than "
                          f"{max_pages} pages; the listing is cut off rather than run forever")


@dataclass(frozen=True)
class MetricSpec:
    unit: str
    description: str


IdScope = Literal["account-region", "region", "partition"]
ID_SCOPES: Mapping[str, str] = {
    "account-region": "unique within one account and region: the same id elsewhere is another resource",
    "region": "unique within a region across accounts",
    "partition": "unique across accounts and regions (of one partition)",
}

ClientFor = Callable[[str], Any]
"""``clients("ec2")``: a boto3 client for the target's account (assumed role) and region."""
SampleFn = Callable[[ClientFor, Target], Iterable[Sample | Skipped]]


@dataclass(frozen=True)
class SamplerSpec:
    resource_type: str
    metrics: Mapping[str, MetricSpec]
    default_metric: str
    iam_actions: tuple[str, ...]
    filters: tuple[str, ...]  # keys of config Filters this sampler honours
    sample: SampleFn
    id_scope: IdScope  # where a resource id of this type is unique (ID_SCOPES)
    # the resource's identity: its ARN, or account:region:id for a type without ARNs; fields
    # {partition} {region} {account} {id}, exactly those of id_scope (checked by the registry test)
    identity: str
    description: str = ""
    # the key of this type's own block (its schema is in agent.config.schema.BLOCKS): required
    # with this type, refused with any other
    block: str | None = None
    # checks across the fields of a validated measurement: [(YAML path below it, message)]
    check: Callable[[Measurement], list[tuple[str, str]]] | None = None
    # IAM actions that depend on the measurement's settings (e.g. the resource a metric names)
    extra_actions: Callable[[Measurement], tuple[str, ...]] | None = None
    aliases: tuple[str, ...] = ()  # other names of resource_type config accepts (Paigo's)
    regional: bool = True  # False: regions are optional (a Kubernetes cluster has none)
    # the target of a measurement not reached through an AWS role: (account, region) it is
    # labelled by, or None to go through the role as every AWS type does
    place: Callable[[Measurement], tuple[str, str] | None] | None = None
    # time_weighted values are already value x seconds held in the window (a pod's running
    # seconds), not a value at T for the converter to multiply by the interval
    weighs_time: bool = False
    stateful: bool = False  # its targets get a TargetMemory (Target.memory)

    def actions_for(self, measurement: Measurement) -> tuple[str, ...]:
        extra = self.extra_actions(measurement) if self.extra_actions else ()
        return tuple(sorted(set(self.iam_actions) | set(extra)))

    def resource(self, region: str, account: str, resource_id: str) -> str:
        """The identity of a resource: what its record is keyed, identified and labelled by."""
        return self.identity.format(partition=partition_of(region), region=region, account=account, id=resource_id)

    def __post_init__(self) -> None:
        if self.default_metric not in self.metrics:
            raise ValueError(f"{self.resource_type}: default metric {self.default_metric!r} is not declared")
