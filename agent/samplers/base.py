"""What every sampler is: a declarative spec plus one function from an AWS client to samples."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from agent.config import Measurement


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


@dataclass(frozen=True, slots=True)
class Target:
    """One (measurement, account, region) to sample for the tick ending at ``tick``."""

    measurement: Measurement
    account: str
    region: str
    tick: datetime

    def sample(self, resource_id: str, values: Mapping[str, Decimal], tags: Mapping[str, str],
               facts: Mapping[str, str]) -> Sample:
        """A resource of this target, as seen now."""
        return Sample(resource_id, self.region, self.account, values, tags, facts)


@dataclass(frozen=True)
class MetricSpec:
    unit: str
    description: str


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
    description: str = ""
    # checks of the raw YAML measurement this type needs beyond the models: [(path below it, message)]
    check: Callable[[dict[str, Any]], list[tuple[str, str]]] | None = None
    # IAM actions that depend on the measurement's settings (e.g. the resource a metric names)
    extra_actions: Callable[[Measurement], tuple[str, ...]] | None = None

    def actions_for(self, measurement: Measurement) -> tuple[str, ...]:
        extra = self.extra_actions(measurement) if self.extra_actions else ()
        return tuple(sorted(set(self.iam_actions) | set(extra)))

    def __post_init__(self) -> None:
        if self.default_metric not in self.metrics:
            raise ValueError(f"{self.resource_type}: default metric {self.default_metric!r} is not declared")


def tags_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """AWS ``Tags: [{Key, Value}]`` as a plain mapping."""
    return {tag["Key"]: tag.get("Value", "") for tag in resource.get("Tags") or ()}
