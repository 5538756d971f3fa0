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

from botocore.exceptions import ClientError

from agent.samplers.base import ClientFor, MetricSpec, Sample, SamplerSpec, Skipped, Target, quantity

DEFAULT_METRIC = "size_bytes"
LOOKBACK_DAYS = 3
BATCH = 500  # GetMetricData's limit of queries per call
PAGE_SIZE = 1000  # buckets per ListBuckets page
ALL_STORAGE_TYPES = "AllStorageTypes"
_DAY = timedelta(days=1)
_CLOUDWATCH_NAMES = {"size_bytes": "BucketSizeBytes", "object_count": "NumberOfObjects"}
_ZERO = Decimal(0)

Series = tuple[str, str]  # (bucket, storage type)


def _code(exc: ClientError) -> str:
    return exc.response.get("Error", {}).get("Code", "")


def _location(target: Target, s3: Any, bucket: str) -> str | None:
    """The bucket's region, or None when it no longer exists."""
    try:
        constraint = target.call(s3, "get_bucket_location", Bucket=bucket).get("LocationConstraint")
    except ClientError as exc:
        if _code(exc) == "NoSuchBucket":
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


def _tags(target: Target, s3: Any, bucket: str) -> dict[str, str] | None:
    """The bucket's tags, or None when it no longer exists."""
    try:
        tag_set = target.call(s3, "get_bucket_tagging", Bucket=bucket)["TagSet"]
    except ClientError as exc:
        if _code(exc) == "NoSuchTagSet":
            return {}
        if _code(exc) == "NoSuchBucket":
            return None
        raise
    return {tag["Key"]: tag["Value"] for tag in tag_set}


def _size_series(target: Target, cloudwatch: Any, buckets: set[str], storage_types: list[str]) -> list[Series]:
    """The (bucket, storage type) series of BucketSizeBytes that exist: one ListMetrics scan per region."""
    pages = target.pages(cloudwatch, "list_metrics", "Metrics", Namespace="AWS/S3", MetricName="BucketSizeBytes")
    found: set[Series] = set()
    for page in pages:
        for metric in page:
            dims = {d["Name"]: d["Value"] for d in metric.get("Dimensions", [])}
            if dims.keys() != {"BucketName", "StorageType"} or dims["BucketName"] not in buckets:
                continue
            if not storage_types or dims["StorageType"] in storage_types:
                found.add((dims["BucketName"], dims["StorageType"]))
    return sorted(found)


def _daily_points(
    target: Target, cloudwatch: Any, metric_name: str, series: list[Series]
) -> tuple[dict[Series, dict[datetime, Any]], dict[Series, str]]:
    """Daily datapoints of complete days in the lookback, per series; and series CloudWatch failed on."""
    tick = target.tick
    end = tick.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    points: dict[Series, dict[datetime, Any]] = defaultdict(dict)
    failed: dict[Series, str] = {}
    for start in range(0, len(series), BATCH):
        batch = series[start : start + BATCH]
        queries = [
            {
                "Id": f"q{i}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "AWS/S3",
                        "MetricName": metric_name,
                        "Dimensions": [{"Name": "BucketName", "Value": bucket}, {"Name": "StorageType", "Value": storage}],
                    },
                    "Period": 86400,
                    "Stat": "Average",
                },
            }
            for i, (bucket, storage) in enumerate(batch)
        ]
        pages = target.pages(cloudwatch, "get_metric_data", "MetricDataResults", MetricDataQueries=queries,
                             StartTime=end - LOOKBACK_DAYS * _DAY, EndTime=end, ScanBy="TimestampDescending")
        for page in pages:
            for result in page:
                key = batch[int(result["Id"][1:])]
                if result.get("StatusCode") in ("InternalError", "Forbidden"):
                    failed[key] = result["StatusCode"]
                for stamp, value in zip(result.get("Timestamps", []), result.get("Values", [])):
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
    s3 = clients("s3")
    wanted: dict[str, dict[str, str]] = {}
    for bucket in _buckets_in(target, s3):
        tags = _tags(target, s3, bucket)
        if tags is not None and filters.matches_tags(tags):  # S3 cannot filter buckets on tags
            wanted[bucket] = tags
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
        errors = sorted({failed[key] for key in by_bucket[bucket] if key in failed})
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
