"""Any CloudWatch metric: one statistic over the tick's window, one sample per series.

The window of tick T is the ``interval`` before T (CloudWatch periods start at
``T - interval``, ``T - interval + period``, ...). A dimension configured as ``*`` is
discovered with ListMetrics; every series found is one resource. Values are fetched with
GetMetricData, 500 queries per call. Periods combine by the statistic: Sum and SampleCount
add up, Maximum and Minimum take the extreme; other statistics need ``period == interval``.
A series without datapoints in the window is skipped (never a zero it did not report).

Customer tags come from the resource the dimension names (``InstanceId``, ``BucketName``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

from botocore.exceptions import ClientError

from agent.settings import WILDCARD, CloudWatchQuery, Measurement
from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity, tags_of

MAX_QUERIES = 500  # GetMetricData's limit per call
_EC2_TAG_BATCH = 200

TagLookup = Callable[[ClientFor, Target, list[str]], dict[str, dict[str, str]]]


def _ec2_tags(clients: ClientFor, target: Target, ids: list[str]) -> dict[str, dict[str, str]]:
    tags: dict[str, dict[str, str]] = {}
    ec2 = clients("ec2")
    for start in range(0, len(ids), _EC2_TAG_BATCH):
        chunk = ids[start : start + _EC2_TAG_BATCH]
        for page in target.pages(ec2, "describe_tags", "Tags", Filters=[{"Name": "resource-id", "Values": chunk}]):
            for tag in page:
                tags.setdefault(tag["ResourceId"], {})[tag["Key"]] = tag.get("Value", "")
    return tags


def _each(lookup: Callable[[Target, Any, str], dict[str, str]], service: str, missing: tuple[str, ...]) -> TagLookup:
    """A per-resource tag lookup; a resource that is gone (``missing`` codes) has no tags."""

    def tags(clients: ClientFor, target: Target, ids: list[str]) -> dict[str, dict[str, str]]:
        client = clients(service)
        found = {}
        for resource_id in ids:
            try:
                found[resource_id] = lookup(target, client, resource_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in missing:
                    raise
        return found

    return tags


def _bucket_tags(target: Target, s3: Any, bucket: str) -> dict[str, str]:
    try:
        return {t["Key"]: t["Value"] for t in target.call(s3, "get_bucket_tagging", Bucket=bucket)["TagSet"]}
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchTagSet":
            return {}
        raise


def _db_tags(target: Target, rds: Any, identifier: str) -> dict[str, str]:
    (db,) = target.call(rds, "describe_db_instances", DBInstanceIdentifier=identifier)["DBInstances"]
    return {t["Key"]: t["Value"] for t in db.get("TagList", ())}


def _file_system_tags(target: Target, efs: Any, file_system: str) -> dict[str, str]:
    (fs,) = target.call(efs, "describe_file_systems", FileSystemId=file_system)["FileSystems"]
    return tags_of(fs)


def _table_tags(target: Target, dynamodb: Any, table: str) -> dict[str, str]:
    arn = target.call(dynamodb, "describe_table", TableName=table)["Table"]["TableArn"]
    pages = target.pages(dynamodb, "list_tags_of_resource", "Tags", ResourceArn=arn)
    return {t["Key"]: t["Value"] for page in pages for t in page}


# dimension name -> (IAM actions, lookup): the resources whose tags can attribute a series
TAGGABLE: dict[str, tuple[tuple[str, ...], TagLookup]] = {
    "InstanceId": (("ec2:DescribeTags",), _ec2_tags),
    "VolumeId": (("ec2:DescribeTags",), _ec2_tags),
    "BucketName": (("s3:GetBucketTagging",), _each(_bucket_tags, "s3", ("NoSuchBucket",))),
    "DBInstanceIdentifier": (("rds:DescribeDBInstances",),
                             _each(_db_tags, "rds", ("DBInstanceNotFound", "DBInstanceNotFoundFault"))),
    "FileSystemId": (("elasticfilesystem:DescribeFileSystems",),
                     _each(_file_system_tags, "efs", ("FileSystemNotFound",))),
    "TableName": (("dynamodb:DescribeTable", "dynamodb:ListTagsOfResource"),
                  _each(_table_tags, "dynamodb", ("ResourceNotFoundException",))),
}


def resource_dimension(query: CloudWatchQuery) -> str | None:
    """The dimension that names a taggable resource, if the query has one."""
    return next((name for name in query.dimensions if name in TAGGABLE), None)


def needs_tags(m: Measurement) -> bool:
    return bool(m.filters.tags) or any(r.customer is not None and r.customer.tag for r in m.roles())


def _series(target: Target, cw: Any, query: CloudWatchQuery) -> list[dict[str, str]]:
    """The dimension sets to query: the fixed one, or every one ListMetrics knows."""
    if WILDCARD not in query.dimensions.values():
        return [dict(query.dimensions)]
    wanted = [{"Name": k} if v == WILDCARD else {"Name": k, "Value": v} for k, v in query.dimensions.items()]
    pages = target.pages(cw, "list_metrics", "Metrics", Namespace=query.namespace, MetricName=query.metric_name,
                         Dimensions=wanted)
    found: dict[tuple[tuple[str, str], ...], dict[str, str]] = {}
    for page in pages:
        for metric in page:
            dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", ())}
            if dims.keys() == query.dimensions.keys():  # not series that carry extra dimensions
                found[tuple(sorted(dims.items()))] = dims
    return [found[key] for key in sorted(found)]


def _combine(statistic: str, values: list[Decimal]) -> Decimal:
    if statistic in ("Sum", "SampleCount"):
        return sum(values, Decimal(0))
    if statistic == "Maximum":
        return max(values)
    if statistic == "Minimum":
        return min(values)
    (value,) = values  # one period per window: enforced by the config check
    return value


def _values(cw: Any, query: CloudWatchQuery, series: list[dict[str, str]], target: Target,
            period: int) -> Iterator[tuple[dict[str, str], list[Any]]]:
    end = target.tick
    start = end - target.measurement.interval
    for first in range(0, len(series), MAX_QUERIES):
        batch = series[first : first + MAX_QUERIES]
        queries = [
            {
                "Id": f"q{i}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": query.namespace,
                        "MetricName": query.metric_name,
                        "Dimensions": [{"Name": k, "Value": v} for k, v in sorted(dims.items())],
                    },
                    "Period": period,
                    "Stat": query.statistic,
                },
                "ReturnData": True,
            }
            for i, dims in enumerate(batch)
        ]
        collected: dict[str, list[Any]] = {}
        for page in target.pages(cw, "get_metric_data", "MetricDataResults", MetricDataQueries=queries,
                                 StartTime=start, EndTime=end, ScanBy="TimestampAscending"):
            for result in page:
                in_window = [v for t, v in zip(result["Timestamps"], result["Values"])
                             if start <= t < end]
                collected.setdefault(result["Id"], []).extend(in_window)
        for i, dims in enumerate(batch):
            yield dims, collected.get(f"q{i}", [])


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
        tags = TAGGABLE[named][1](clients, target, sorted({dims[named] for dims in series}))
    for dims, raw in _values(cw, query, series, target, period):
        # a series is its whole dimension set: one resource can have several (TableName x Operation)
        resource_id = ",".join(f"{k}={v}" for k, v in sorted(dims.items()))
        resource_tags = tags.get(dims[named], {}) if named else {}
        if not m.filters.matches_tags(resource_tags):
            continue
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
    return TAGGABLE[named][0] if named and needs_tags(m) else ()


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
