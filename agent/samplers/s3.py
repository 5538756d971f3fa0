"""S3 buckets: stored bytes and objects from the daily ``AWS/S3`` storage metrics in CloudWatch.

S3 publishes ``BucketSizeBytes`` (one series per storage type) and ``NumberOfObjects``
(storage type ``AllStorageTypes``) once a day; the datapoint stamped D covers [D, D + 1 day).
A bucket's value is the sum of its series on its latest complete day (D + 1 day <= tick)
within the last ``LOOKBACK_DAYS`` days. A bucket with no datapoint in that time is sampled
as 0: AWS publishes none for an empty bucket (nor for a new one before its first day ends).
Only the measured metric is queried, because GetMetricData is billed per metric requested.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity
from agent.samplers.engine import error_code, look_up_tags, metric_data, metric_series

DEFAULT_METRIC = "size_bytes"
LOOKBACK_DAYS = 3
PAGE_SIZE = 1000  # buckets per ListBuckets page
ALL_STORAGE_TYPES = "AllStorageTypes"
_DAY = timedelta(days=1)
_CLOUDWATCH_NAMES = {"size_bytes": "BucketSizeBytes", "object_count": "NumberOfObjects"}
_ZERO = Decimal(0)

Series = tuple[str, str]  # (bucket, storage type)


def _location(target: Target, s3: Any, bucket: str) -> str | None:
    """The bucket's region, or None when it no longer exists."""
    from botocore.exceptions import ClientError  # botocore is imported where sampling is, not with the registry

    try:
        constraint = target.call(s3, "get_bucket_location", Bucket=bucket).get("LocationConstraint")
    except ClientError as exc:
        if error_code(exc) == "NoSuchBucket":
            return None
        raise
    # GetBucketLocation answers null for us-east-1 and the legacy "EU" for eu-west-1
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(constraint, constraint)


def _buckets_in(target: Target, s3: Any) -> list[str]:
    """ListBuckets is global: ask for this region's buckets, and check where a server does not say."""
    region = target.region
    return [
        bucket["Name"]
        for page in target.pages(s3, "list_buckets", "Buckets", PAGE_SIZE, BucketRegion=region)
        for bucket in page
        if (bucket.get("BucketRegion") or _location(target, s3, bucket["Name"])) == region
    ]


def _size_series(target: Target, cloudwatch: Any, buckets: set[str], storage_types: list[str]) -> list[Series]:
    """The (bucket, storage type) series of BucketSizeBytes that exist: one ListMetrics scan per region."""
    found = metric_series(target, cloudwatch, ("BucketName", "StorageType"), Namespace="AWS/S3",
                          MetricName="BucketSizeBytes")
    return [(dims["BucketName"], dims["StorageType"]) for dims in found if dims["BucketName"] in buckets
            and (not storage_types or dims["StorageType"] in storage_types)]


def _daily_points(
    target: Target, cloudwatch: Any, metric_name: str, series: list[Series]
) -> tuple[dict[Series, dict[datetime, Any]], dict[Series, frozenset[str]]]:
    """Daily datapoints of complete days in the lookback, per series; and series CloudWatch failed on."""
    tick = target.tick
    end = tick.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    stats = [{"Metric": {"Namespace": "AWS/S3", "MetricName": metric_name,
                         "Dimensions": [{"Name": "BucketName", "Value": bucket}, {"Name": "StorageType", "Value": storage}]},
              "Period": 86400, "Stat": "Average"} for bucket, storage in series]
    answers = metric_data(target, cloudwatch, stats, end - LOOKBACK_DAYS * _DAY, end, "TimestampDescending")
    points: dict[Series, dict[datetime, Any]] = defaultdict(dict)
    failed: dict[Series, frozenset[str]] = {}
    for key, answer in zip(series, answers):
        if answer.failed:
            failed[key] = answer.failed
        for stamp, value in answer.points:
            day = stamp.astimezone(timezone.utc)
            if day + _DAY <= tick:  # complete days only, whatever the server returned
                points[key][day] = value
    return points, failed


def _bucket_value(keys: Iterable[Series], points: dict[Series, dict[datetime, Any]]) -> tuple[Decimal, str]:
    """The sum of the bucket's series on its latest complete day, and that day ('' when none)."""
    keys = list(keys)
    days = {day for key in keys for day in points.get(key, {})}
    if not days:
        return _ZERO, ""
    latest = max(days)
    total = sum((quantity(points[key][latest]) for key in keys if latest in points.get(key, {})), _ZERO)
    return total, latest.date().isoformat()


def sample_buckets(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    filters = target.measurement.filters
    metric = target.measurement.metric
    tags = look_up_tags(clients, target, "s3", _buckets_in(target, clients("s3")))  # a vanished bucket is left out
    wanted = {bucket: found for bucket, found in tags.items() if filters.matches_tags(found)}  # S3 cannot filter
    if not wanted:
        return
    cloudwatch = clients("cloudwatch")
    if metric == "size_bytes":
        series = _size_series(target, cloudwatch, set(wanted), filters.storage_types)
    else:
        series = [(bucket, ALL_STORAGE_TYPES) for bucket in sorted(wanted)]
    points, failed = _daily_points(target, cloudwatch, _CLOUDWATCH_NAMES[metric], series)
    by_bucket: dict[str, list[Series]] = defaultdict(list)
    for key in series:
        by_bucket[key[0]].append(key)
    for bucket, tags in sorted(wanted.items()):
        errors = sorted({code for key in by_bucket[bucket] for code in failed.get(key, ())})
        if errors:
            yield Skipped(bucket, f"CloudWatch answered {', '.join(errors)} for its storage metrics")
            continue
        try:
            value, day = _bucket_value(by_bucket[bucket], points)
        except ValueError as exc:
            yield Skipped(bucket, f"{_CLOUDWATCH_NAMES[metric]} {exc}")
            continue
        yield target.sample(
            resource_id=bucket,
            values={metric: value},
            tags=tags,
            facts={"metric_day": day},
        )


SPEC = SamplerSpec(
    resource_type="s3",
    metrics={
        "size_bytes": MetricSpec("bytes", "stored bytes, summed over storage types (daily BucketSizeBytes)"),
        "object_count": MetricSpec("objects", "stored objects (daily NumberOfObjects, AllStorageTypes)"),
    },
    default_metric=DEFAULT_METRIC,
    iam_actions=(
        "s3:ListAllMyBuckets",
        "s3:GetBucketLocation",
        "s3:GetBucketTagging",
        "cloudwatch:ListMetrics",
        "cloudwatch:GetMetricData",
    ),
    filters=("tags", "storage_types"),
    sample=sample_buckets,
    id_scope="partition",  # bucket names are unique across accounts and regions; a bucket is listed in its region only
    identity="arn:{partition}:s3:::{id}",
    description="S3 buckets in the region, from the latest complete day of the AWS/S3 storage metrics",
)
