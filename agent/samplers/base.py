"""What every sampler is: a declarative spec plus one function from an AWS client to samples."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
class Target:
    """One (measurement, account, region) to sample."""

    measurement: Measurement
    account: str
    region: str


@dataclass(frozen=True)
class MetricSpec:
    unit: str
    description: str


SampleFn = Callable[[Any, Target], Iterable[Sample]]


@dataclass(frozen=True)
class SamplerSpec:
    resource_type: str
    service: str  # boto3 client name the sample function receives
    metrics: Mapping[str, MetricSpec]
    default_metric: str
    iam_actions: tuple[str, ...]
    filters: tuple[str, ...]  # keys of config Filters this sampler honours
    sample: SampleFn
    description: str = ""

    def __post_init__(self) -> None:
        if self.default_metric not in self.metrics:
            raise ValueError(f"{self.resource_type}: default metric {self.default_metric!r} is not declared")


def tags_of(resource: Mapping[str, Any]) -> dict[str, str]:
    """AWS ``Tags: [{Key, Value}]`` as a plain mapping."""
    return {tag["Key"]: tag.get("Value", "") for tag in resource.get("Tags") or ()}
