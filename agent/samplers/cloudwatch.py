"""Any CloudWatch metric: one statistic over the tick's window, one sample per series.

The window of tick T is the ``interval`` before T (CloudWatch periods start at
``T - interval``, ``T - interval + period``, ...). A dimension configured as ``*`` is
discovered with ListMetrics; every series found is one resource. Values are fetched with
GetMetricData, 500 queries per call. Periods combine by the statistic: Sum and SampleCount
add up, Maximum and Minimum take the extreme; other statistics need ``period == interval``.
A series without datapoints in the window is skipped (never a zero it did not report), and
so is one CloudWatch answered InternalError or Forbidden for (its values are incomplete).

Customer tags come from the resource the dimension names (``InstanceId``, ``BucketName``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from agent.settings import WILDCARD, CloudWatchQuery, Measurement
from agent.samplers import dynamodb, elb
from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity
from agent.samplers.engine import SERVICES, look_up_tags, metric_data, metric_series


def _named(value: str, target: Target) -> str:
    return value


def _arn_of(spec: SamplerSpec) -> Callable[[str, Target], str]:
    """For tag APIs that take an ARN: the ARN of the resource a dimension value names."""
    return lambda value, target: spec.resource(target.region, target.account, value)


# dimension name -> (the service whose tag table reads it, the key that table takes for a value)
TAGGABLE: dict[str, tuple[str, Callable[[str, Target], str]]] = {
    "InstanceId": ("ec2", _named),
    "VolumeId": ("ec2", _named),
    "BucketName": ("s3", _named),
    "DBInstanceIdentifier": ("rds", _named),
    "FileSystemId": ("efs", _named),
    "TableName": ("dynamodb", _arn_of(dynamodb.SPEC)),
    "LoadBalancer": ("elbv2", _arn_of(elb.SPEC)),  # app/name/id in AWS/ApplicationELB, net/... in AWS/NetworkELB
}


def resource_dimension(query: CloudWatchQuery) -> str | None:
    """The dimension that names a taggable resource, if the query has one."""
    return next((name for name in query.dimensions if name in TAGGABLE), None)


def needs_tags(m: Measurement) -> bool:
    return bool(m.filters.tags or m.customer_tags)


def _series(target: Target, cw: Any, query: CloudWatchQuery) -> list[dict[str, str]]:
    """The dimension sets to query: the fixed one, or every one ListMetrics knows."""
    if WILDCARD not in query.dimensions.values():
        return [dict(query.dimensions)]
    wanted = [{"Name": k} if v == WILDCARD else {"Name": k, "Value": v} for k, v in query.dimensions.items()]
    return metric_series(target, cw, query.dimensions, Namespace=query.namespace, MetricName=query.metric_name,
                         Dimensions=wanted)


def _combine(statistic: str, values: list[Decimal]) -> Decimal:
    if statistic in ("Sum", "SampleCount"):
        return sum(values, Decimal(0))
    if statistic == "Maximum":
        return max(values)
    if statistic == "Minimum":
        return min(values)
    (value,) = values  # one period per window: enforced by the config check
    return value


def sample_metric(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    m = target.measurement
    query = m.cloudwatch
    assert query is not None, "the config check requires a cloudwatch block"
    cw = clients("cloudwatch")
    period = int((query.period or m.interval).total_seconds())
    series = _series(target, cw, query)
    named = resource_dimension(query)
    tags: dict[str, dict[str, str]] = {}
    if named and needs_tags(m):
        service, key_of = TAGGABLE[named]
        keys = {key_of(value, target): value for value in sorted({dims[named] for dims in series})}
        tags = {keys[key]: found for key, found in look_up_tags(clients, target, service, list(keys)).items()}
    end = target.tick
    start = end - m.interval
    stats = [{"Metric": {"Namespace": query.namespace, "MetricName": query.metric_name,
                         "Dimensions": [{"Name": k, "Value": v} for k, v in sorted(dims.items())]},
              "Period": period, "Stat": query.statistic} for dims in series]
    for dims, answer in zip(series, metric_data(target, cw, stats, start, end, "TimestampAscending")):
        # a series is its whole dimension set: one resource can have several (TableName x Operation)
        resource_id = ",".join(f"{k}={v}" for k, v in sorted(dims.items()))
        resource_tags = tags.get(dims[named], {}) if named else {}
        if not m.filters.matches_tags(resource_tags):
            continue
        if answer.failed:
            yield Skipped(resource_id, f"CloudWatch answered {', '.join(sorted(answer.failed))} for this series")
            continue
        raw = [value for stamp, value in answer.points if start <= stamp < end]
        if not raw:
            yield Skipped(resource_id, "no datapoints in the window")
            continue
        try:
            value = _combine(query.statistic, [quantity(v) for v in raw])
        except ValueError as exc:
            yield Skipped(resource_id, f"metric value {exc}")
            continue
        yield target.sample(
            resource_id=resource_id,
            values={"value": value},
            tags=resource_tags,
            facts={"namespace": query.namespace, "metric_name": query.metric_name, "statistic": query.statistic,
                   **{f"dimension.{k}": v for k, v in dims.items()}},
        )


def _check(m: Measurement) -> list[tuple[str, str]]:
    """Checks across the fields of a measurement (the models check each field)."""
    query = m.cloudwatch
    assert query is not None, "the config requires a cloudwatch block"
    problems = []
    interval = m.interval
    period = query.period or interval
    if interval.total_seconds() % 60:
        problems.append(("interval", "CloudWatch measurements need a whole number of minutes"))
    if interval % period:
        problems.append(("cloudwatch.period", f"must divide the interval ({m.interval_seconds}s)"))
    if period != interval and query.statistic not in ("Sum", "SampleCount", "Maximum", "Minimum"):
        problems.append(("cloudwatch.period", f"{query.statistic} cannot be combined across periods; "
                                              "leave period unset (it defaults to the interval)"))
    customers = [m.customer, *(a.customer for a in m.accounts or ())]
    if any(c is not None and c.tag for c in customers) and not any(name in TAGGABLE for name in query.dimensions):
        problems.append(("cloudwatch.dimensions", "customer.tag needs a dimension that names a taggable resource: "
                                                  + ", ".join(TAGGABLE)))
    return problems


def _tag_actions(m: Measurement) -> tuple[str, ...]:
    named = resource_dimension(m.cloudwatch) if m.cloudwatch else None
    return SERVICES[TAGGABLE[named][0]].tag_actions if named and needs_tags(m) else ()


SPEC = SamplerSpec(
    resource_type="cloudwatch",
    metrics={"value": MetricSpec("cloudwatch.unit", "the statistic over the tick's window, per series")},
    default_metric="value",
    iam_actions=("cloudwatch:GetMetricData", "cloudwatch:ListMetrics"),
    filters=("tags",),
    sample=sample_metric,
    id_scope="account-region",  # a series lives in one account and region; dimension values are names (TableName)
    identity="{account}:{region}:{id}",  # series have no ARN
    description="any CloudWatch metric: namespace, metric name, dimensions (* = discovered), statistic, period",
    block="cloudwatch",
    check=_check,
    extra_actions=_tag_actions,
)
