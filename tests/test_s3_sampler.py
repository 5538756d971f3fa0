"""S3 sampler against moto server (buckets, tags, and AWS/S3 datapoints put into its CloudWatch);
batching, paging and AWS-only response fields with botocore's Stubber."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from botocore.stub import ANY, Stubber

from agent.config import parse_measurement
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.engine import METRIC_QUERIES as BATCH
from agent.samplers.s3 import LOOKBACK_DAYS, PAGE_SIZE, sample_buckets
from tests.conftest import ACCOUNT, TICK, Aws, measurement, offline_client

UTC = timezone.utc


def _target(metric: str = "size_bytes", region: str = "us-east-1", tick: datetime = TICK, **overrides: Any) -> Target:
    m = measurement(resource_type="s3", metric=metric, regions=[region], **overrides)
    return Target(parse_measurement(m), ACCOUNT, region, tick)


def _day(day: int, month: int = 2) -> datetime:
    return datetime(2026, month, day, tzinfo=UTC)


def _bucket(aws: Aws, name: str, region: str = "us-east-1", tags: dict[str, str] | None = None) -> None:
    s3 = aws.client("s3", region)
    config = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=name, **config)
    s3.put_object(Bucket=name, Key="object", Body=b"x" * 10)  # moto's own metrics are stamped today: outside the window
    if tags:
        s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in tags.items()]})


def _datapoint(aws: Aws, bucket: str, metric: str, storage: str, day: datetime, value: float) -> None:
    aws.client("cloudwatch").put_metric_data(
        Namespace="AWS/S3",
        MetricData=[{
            "MetricName": metric,
            "Dimensions": [{"Name": "BucketName", "Value": bucket}, {"Name": "StorageType", "Value": storage}],
            "Timestamp": day,
            "Value": value,
            "Unit": "Bytes" if metric == "BucketSizeBytes" else "Count",
        }],
    )


def _setup(aws: Aws) -> None:
    """TICK is 2026-03-01T12:00Z: the latest complete day is 02-28; the lookback starts 02-26."""
    _bucket(aws, "acme-data", tags={"customer-id": "acme", "env": "prod"})
    _bucket(aws, "globex-logs", tags={"customer-id": "globex"})
    _bucket(aws, "untagged-bucket")
    _bucket(aws, "stale-bucket", tags={"customer-id": "acme"})
    _bucket(aws, "acme-eu", "eu-west-1", tags={"customer-id": "acme"})  # another region: not listed here
    size = "BucketSizeBytes"
    _datapoint(aws, "acme-data", size, "StandardStorage", _day(26), 1000)
    _datapoint(aws, "acme-data", size, "StandardStorage", _day(27), 2000)
    _datapoint(aws, "acme-data", size, "StandardStorage", _day(28), 3_000_000_000_000)
    _datapoint(aws, "acme-data", size, "StandardStorage", _day(1, 3), 999)  # the day of the tick: incomplete
    _datapoint(aws, "acme-data", size, "StandardIAStorage", _day(28), 500_000)
    _datapoint(aws, "acme-data", size, "GlacierStorage", _day(27), 7777)  # not published for 02-28
    _datapoint(aws, "globex-logs", size, "StandardStorage", _day(27), 123)  # 02-28 not published yet
    _datapoint(aws, "stale-bucket", size, "StandardStorage", _day(25), 1_000_000)  # before the lookback
    _datapoint(aws, "acme-data", "NumberOfObjects", "AllStorageTypes", _day(28), 42)
    _datapoint(aws, "acme-data", "NumberOfObjects", "AllStorageTypes", _day(1, 3), 43)
    _datapoint(aws, "globex-logs", "NumberOfObjects", "AllStorageTypes", _day(27), 5)
    _datapoint(aws, "acme-eu", size, "StandardStorage", _day(28), 10**9)


def _by_bucket(aws: Aws, target: Target) -> dict[str, Sample]:
    items = list(sample_buckets(lambda service: aws.client(service, target.region), target))
    assert all(isinstance(s, Sample) for s in items)
    return {s.resource_id: s for s in items}


def test_size_is_the_latest_complete_day_summed_over_storage_types(aws: Aws) -> None:
    _setup(aws)

    samples = _by_bucket(aws, _target())

    assert set(samples) == {"acme-data", "globex-logs", "untagged-bucket", "stale-bucket"}
    assert samples["acme-data"].values == {"size_bytes": Decimal(3_000_000_500_000)}
    assert samples["acme-data"].facts == {"metric_day": "2026-02-28"}
    assert samples["acme-data"].tags == {"customer-id": "acme", "env": "prod"}
    assert (samples["acme-data"].region, samples["acme-data"].account) == ("us-east-1", ACCOUNT)
    assert samples["globex-logs"].values == {"size_bytes": Decimal(123)}
    assert samples["globex-logs"].facts == {"metric_day": "2026-02-27"}
    # no datapoint in the lookback: an existing bucket with nothing known stored
    assert samples["untagged-bucket"].values == {"size_bytes": Decimal(0)}
    assert samples["untagged-bucket"].tags == {}
    assert samples["stale-bucket"].values == {"size_bytes": Decimal(0)}
    assert samples["stale-bucket"].facts == {"metric_day": ""}


def test_object_count(aws: Aws) -> None:
    _setup(aws)

    samples = _by_bucket(aws, _target("object_count"))

    assert {name: s.values for name, s in samples.items()} == {
        "acme-data": {"object_count": Decimal(42)},
        "globex-logs": {"object_count": Decimal(5)},
        "untagged-bucket": {"object_count": Decimal(0)},
        "stale-bucket": {"object_count": Decimal(0)},
    }


def test_day_boundaries(aws: Aws) -> None:
    _setup(aws)

    at_midnight = _by_bucket(aws, _target(tick=_day(1, 3)))  # 02-28 has just ended: complete
    assert at_midnight["acme-data"].values == {"size_bytes": Decimal(3_000_000_500_000)}
    before = _by_bucket(aws, _target(tick=datetime(2026, 2, 28, 23, 59, tzinfo=UTC)))
    # 02-28 is not over: the latest complete day is 02-27, where Standard and Glacier add up
    assert before["acme-data"].values == {"size_bytes": Decimal(2000 + 7777)}
    assert before["acme-data"].facts == {"metric_day": "2026-02-27"}
    assert before["stale-bucket"].values == {"size_bytes": Decimal(1_000_000)}  # the lookback now reaches 02-25


def test_storage_type_and_tag_filters(aws: Aws) -> None:
    _setup(aws)

    cold = _by_bucket(aws, _target(filters={"storage_types": ["StandardIAStorage", "GlacierStorage"]}))
    assert cold["acme-data"].values == {"size_bytes": Decimal(500_000)}  # Glacier's latest day is older
    assert cold["globex-logs"].values == {"size_bytes": Decimal(0)}

    acme = _by_bucket(aws, _target(filters={"tags": {"customer-id": "acme"}}))
    assert {name: s.values["size_bytes"] for name, s in acme.items()} == {
        "acme-data": Decimal(3_000_000_500_000),
        "stale-bucket": Decimal(0),
    }


def _query(i: int, bucket: str, storage: str, metric: str) -> dict[str, Any]:
    return {
        "Id": f"q{i}",
        "MetricStat": {
            "Metric": {
                "Namespace": "AWS/S3",
                "MetricName": metric,
                "Dimensions": [{"Name": "BucketName", "Value": bucket}, {"Name": "StorageType", "Value": storage}],
            },
            "Period": 86400,
            "Stat": "Average",
        },
    }


def test_batches_of_500_queries_and_paged_answers() -> None:
    # moto neither pages ListBuckets nor reports BucketRegion, accepts any number of queries and
    # never answers PartialData or InternalError: responses shaped like AWS's cover all of that.
    s3, cloudwatch = offline_client("s3"), offline_client("cloudwatch")
    s3_stub, cw_stub = Stubber(s3), Stubber(cloudwatch)
    names = [f"bucket-{n:04d}" for n in range(502)]
    created = datetime(2025, 1, 1, tzinfo=UTC)
    listing = [{"Name": name, "CreationDate": created, "BucketRegion": "us-east-1"} for name in names[:501]]
    listing.append({"Name": names[501], "CreationDate": created, "BucketRegion": "us-west-2"})
    s3_stub.add_response(
        "list_buckets",
        {"Buckets": listing[:PAGE_SIZE // 2], "ContinuationToken": "page-2"},
        {"BucketRegion": "us-east-1", "MaxBuckets": PAGE_SIZE},
    )
    s3_stub.add_response(
        "list_buckets",
        {"Buckets": listing[PAGE_SIZE // 2 :]},
        {"BucketRegion": "us-east-1", "MaxBuckets": PAGE_SIZE, "ContinuationToken": "page-2"},
    )
    for name in names[:501]:
        s3_stub.add_response(
            "get_bucket_tagging", {"TagSet": [{"Key": "customer-id", "Value": f"c{int(name[-4:]) % 4}"}]}, {"Bucket": name}
        )

    start, end = _day(26), _day(1, 3)
    queries = [_query(i, name, "AllStorageTypes", "NumberOfObjects") for i, name in enumerate(names[:BATCH])]
    window = {"StartTime": start, "EndTime": end, "ScanBy": "TimestampDescending"}
    assert end - start == timedelta(days=LOOKBACK_DAYS)

    def result(i: int, days: list[datetime], values: list[float], status: str = "Complete") -> dict[str, Any]:
        return {"Id": f"q{i}", "Label": "NumberOfObjects", "Timestamps": days, "Values": values, "StatusCode": status}

    first_half = [result(i, [_day(28), _day(27)], [float(i * 1000), 1.0]) for i in range(250)]
    second_half = [result(i, [_day(28)], [float(i * 1000)]) for i in range(250, BATCH)]
    second_half[0] = result(250, [], [], "InternalError")
    # a server answering with the incomplete day as well: ignored
    second_half[1] = result(251, [_day(1, 3), _day(28)], [1e15, 251_000.0])
    cw_stub.add_response(
        "get_metric_data", {"MetricDataResults": first_half, "NextToken": "more"}, {"MetricDataQueries": queries, **window}
    )
    cw_stub.add_response(
        "get_metric_data", {"MetricDataResults": second_half}, {"MetricDataQueries": queries, "NextToken": "more", **window}
    )
    last = [_query(0, names[500], "AllStorageTypes", "NumberOfObjects")]
    cw_stub.add_response(
        "get_metric_data",
        {"MetricDataResults": [result(0, [_day(27)], [1.5e12])]},
        {"MetricDataQueries": last, **window},
    )
    clients = {"s3": s3, "cloudwatch": cloudwatch}

    with s3_stub, cw_stub:
        items = list(sample_buckets(clients.__getitem__, _target("object_count")))
    s3_stub.assert_no_pending_responses()
    cw_stub.assert_no_pending_responses()

    skipped = [s for s in items if isinstance(s, Skipped)]
    samples = {s.resource_id: s for s in items if isinstance(s, Sample)}
    assert skipped == [Skipped("bucket-0250", "CloudWatch answered InternalError for its storage metrics")]
    assert len(samples) == 500 and names[501] not in samples  # in us-west-2
    assert samples["bucket-0251"].values == {"object_count": Decimal(251_000)}
    assert samples["bucket-0500"].values == {"object_count": Decimal(1_500_000_000_000)}
    assert samples["bucket-0500"].facts == {"metric_day": "2026-02-27"}
    assert samples["bucket-0007"].tags == {"customer-id": "c3"}
    total = sum(s.values["object_count"] for s in samples.values())
    assert total == Decimal(sum(i * 1000 for i in range(BATCH) if i != 250) + 1_500_000_000_000)
    assert total == Decimal(1_500_124_500_000)


def test_servers_without_bucket_region_are_asked_for_each_location() -> None:
    # GetBucketLocation's legacy answers ("EU", null) cannot be produced by moto; AWS-shaped responses.
    s3, cloudwatch = offline_client("s3", "eu-west-1"), offline_client("cloudwatch", "eu-west-1")
    s3_stub, cw_stub = Stubber(s3), Stubber(cloudwatch)
    created = datetime(2025, 1, 1, tzinfo=UTC)
    s3_stub.add_response(
        "list_buckets",
        {"Buckets": [{"Name": n, "CreationDate": created} for n in ("old-eu", "old-us", "gone", "new-eu")]},
        {"BucketRegion": "eu-west-1", "MaxBuckets": PAGE_SIZE},
    )
    s3_stub.add_response("get_bucket_location", {"LocationConstraint": "EU"}, {"Bucket": "old-eu"})
    s3_stub.add_response("get_bucket_location", {}, {"Bucket": "old-us"})
    s3_stub.add_client_error("get_bucket_location", "NoSuchBucket", "gone", 404, expected_params={"Bucket": "gone"})
    s3_stub.add_response("get_bucket_location", {"LocationConstraint": "eu-west-1"}, {"Bucket": "new-eu"})
    s3_stub.add_client_error("get_bucket_tagging", "NoSuchTagSet", "no tags", 404, expected_params={"Bucket": "old-eu"})
    s3_stub.add_client_error("get_bucket_tagging", "NoSuchBucket", "deleted", 404, expected_params={"Bucket": "new-eu"})
    metric = {"Namespace": "AWS/S3", "MetricName": "BucketSizeBytes"}
    cw_stub.add_response(
        "list_metrics",
        {"Metrics": [
            {**metric, "Dimensions": [{"Name": "StorageType", "Value": "StandardStorage"}, {"Name": "BucketName", "Value": "old-eu"}]},
            {**metric, "Dimensions": [{"Name": "StorageType", "Value": "StandardStorage"}, {"Name": "BucketName", "Value": "elsewhere"}]},
        ]},
        metric,
    )
    cw_stub.add_response(
        "get_metric_data",
        {"MetricDataResults": [{"Id": "q0", "Timestamps": [_day(28)], "Values": [4096.0], "StatusCode": "Complete"}]},
        {"MetricDataQueries": [_query(0, "old-eu", "StandardStorage", "BucketSizeBytes")], "StartTime": ANY, "EndTime": ANY, "ScanBy": "TimestampDescending"},
    )
    clients = {"s3": s3, "cloudwatch": cloudwatch}

    with s3_stub, cw_stub:
        items = list(sample_buckets(clients.__getitem__, _target(region="eu-west-1")))
    s3_stub.assert_no_pending_responses()
    cw_stub.assert_no_pending_responses()

    assert items == [Sample("old-eu", "eu-west-1", ACCOUNT, {"size_bytes": Decimal(4096)}, {}, {"metric_day": "2026-02-28"})]
