"""CloudWatch sampler: metric data put into moto server; Stubber for >500 series (batching)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import ANY, Stubber

from agent.config import Measurement
from agent.errors import ConfigError
from agent.samplers.base import Sample, Skipped, Target
from agent.samplers.cloudwatch import MAX_QUERIES, sample_metric
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, Aws, config_dict, make_config, measurement, only
from tests.test_runtime import new_agent

UTC = timezone.utc
T = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def egress(**overrides: Any) -> dict[str, Any]:
    query = {"namespace": "AWS/EC2", "metric_name": "NetworkOut", "dimensions": {"InstanceId": "*"},
             "statistic": "Sum", "period": "5m", "unit": "Bytes"}
    return measurement(**({"name": "ec2-egress", "resource_type": "cloudwatch", "metric": "value",
                            "interval": "1h", "cloudwatch": query} | overrides))


def put(aws: Aws, instance_id: str, *points: tuple[datetime, float], metric: str = "NetworkOut",
        extra: dict[str, str] | None = None) -> None:
    dims = [{"Name": "InstanceId", "Value": instance_id}] + [{"Name": k, "Value": v} for k, v in (extra or {}).items()]
    cw = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=aws.endpoint)
    cw.put_metric_data(Namespace="AWS/EC2", MetricData=[
        {"MetricName": metric, "Dimensions": dims, "Timestamp": at, "Value": value, "Unit": "Bytes"}
        for at, value in points])


def instance(aws: Aws, customer: str) -> str:
    reservation = aws.ec2().run_instances(
        ImageId="ami-12c6146b", InstanceType="t3.micro", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "customer-id", "Value": customer}]}])
    return reservation["Instances"][0]["InstanceId"]


def test_egress_bytes_per_customer_for_the_window(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    acme, globex = instance(aws, "acme"), instance(aws, "globex")
    minute = timedelta(minutes=1)
    put(aws, acme,
        (T - 60 * minute, 1000.0),  # first second of the window: in
        (T - 31 * minute, 2500.5),
        (T - 1 * minute, 0.25),
        (T, 99999.0),  # the next window
        (T - 61 * minute, 77777.0))  # the previous window
    put(aws, globex, (T - 20 * minute, 4096.0))
    put(aws, globex, (T - 20 * minute, 5.0), extra={"Interface": "eth1"})  # another series shape: not this query
    cfg = make_config(paigo, tmp_path, egress())
    agent = new_agent(cfg)
    result = agent.collect(cfg.measurements[0], T + timedelta(minutes=7))
    agent.close()

    assert result.ok and result.sampled == 2
    assert {r.customer_id: (r.value, r.unit) for r in result.records} == {
        "acme": (Decimal("3500.75"), "Bytes"), "globex": (Decimal(4096), "Bytes")}
    assert all(r.timestamp == T for r in result.records)


def _target(**overrides: Any) -> Target:
    return Target(Measurement.model_validate(egress(**overrides)), ACCOUNT, "us-east-1", T)


def test_statistics_combine_across_periods_and_empty_series_are_skipped(aws: Aws) -> None:
    busy, idle = instance(aws, "acme"), instance(aws, "acme")
    put(aws, busy, (T - timedelta(minutes=50), 10.0), (T - timedelta(minutes=20), 70.0), (T - timedelta(minutes=5), 30.0))
    put(aws, idle, (T - timedelta(hours=3), 1.0))  # known to ListMetrics, silent in this window
    cw = boto3.client("cloudwatch", region_name="us-east-1", endpoint_url=aws.endpoint)

    def values(statistic: str, period: str | None = "5m") -> dict[str, Any]:
        query = {"namespace": "AWS/EC2", "metric_name": "NetworkOut", "dimensions": {"InstanceId": "*"},
                 "statistic": statistic, **({"period": period} if period else {})}
        out = sample_metric(only(cw), _target(cloudwatch=query, customer={"id": "acme"}))
        # a series is named by its whole dimension set
        return {s.resource_id.removeprefix("InstanceId="): s.reason if isinstance(s, Skipped) else s.values["value"]
                for s in out}

    assert values("Maximum") == {busy: 70, idle: "no datapoints in the window"}
    assert values("Minimum") == {busy: 10, idle: "no datapoints in the window"}
    assert values("SampleCount")[busy] == 3
    assert values("Average", period=None)[busy] == Decimal("36.666666666666664")  # CloudWatch's double, exactly
    fixed = {"namespace": "AWS/EC2", "metric_name": "NetworkOut", "dimensions": {"InstanceId": busy}}
    (only_busy,) = sample_metric(only(cw), _target(cloudwatch=fixed, customer={"id": "acme"}))
    assert isinstance(only_busy, Sample) and only_busy.values["value"] == 110


def test_more_than_500_series_are_fetched_in_batches() -> None:
    # moto does not page ListMetrics the way AWS does; Stubber answers in AWS's shapes
    cw = boto3.client("cloudwatch", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    ids = [f"i-{n:04d}" for n in range(MAX_QUERIES + 1)]
    metrics = [{"Namespace": "AWS/EC2", "MetricName": "NetworkOut", "Dimensions": [{"Name": "InstanceId", "Value": i}]}
               for i in ids]
    stubber = Stubber(cw)
    stubber.add_response("list_metrics", {"Metrics": metrics[:300], "NextToken": "more"})
    stubber.add_response("list_metrics", {"Metrics": metrics[300:]})
    at = T - timedelta(minutes=30)
    for first, size in ((0, MAX_QUERIES), (MAX_QUERIES, 1)):
        results = [{"Id": f"q{n}", "Label": "NetworkOut", "Timestamps": [at], "Values": [float(first + n)],
                    "StatusCode": "Complete"} for n in range(size)]
        expected = {"MetricDataQueries": ANY, "StartTime": T - timedelta(hours=1), "EndTime": T,
                    "ScanBy": "TimestampAscending"}
        stubber.add_response("get_metric_data", {"MetricDataResults": results}, expected)
    with stubber:
        samples = list(sample_metric(only(cw), _target(customer={"id": "acme"})))
    stubber.assert_no_pending_responses()
    assert [(s.resource_id, s.values["value"]) for s in samples] == [(f"InstanceId={i}", n) for n, i in enumerate(ids)]


@pytest.mark.parametrize(("overrides", "path", "fragment"), [
    ({"cloudwatch": None}, "measurements[0].cloudwatch", "required key is missing"),
    ({"cloudwatch": {"namespace": "AWS/EC2", "metric_name": "NetworkOut", "dimensions": {"AutoScalingGroupName": "*"}}},
     "measurements[0].cloudwatch.dimensions", "customer.tag needs a dimension that names a taggable resource"),
    ({"cloudwatch": {"namespace": "AWS/EC2", "metric_name": "CPUUtilization", "dimensions": {"InstanceId": "*"},
                     "statistic": "Average", "period": "5m"}},
     "measurements[0].cloudwatch.period", "Average cannot be combined across periods"),
    ({"cloudwatch": {"namespace": "AWS/EC2", "metric_name": "NetworkOut", "period": "7m"}},
     "measurements[0].cloudwatch.period", "must divide the interval (3600s)"),
    ({"cloudwatch": {"namespace": "AWS/EC2", "metric_name": "NetworkOut", "statistic": "Median"}},
     "measurements[0].cloudwatch.statistic", "expected one of Sum"),
    ({"interval": "90s"}, "measurements[0].interval", "whole number of minutes"),
])
def test_cloudwatch_config_errors(paigo: PaigoContractServer, tmp_path: Path, overrides: dict[str, Any], path: str,
                                  fragment: str) -> None:
    raw = egress(**overrides)
    if raw["cloudwatch"] is None:
        del raw["cloudwatch"]
    with pytest.raises(ConfigError) as caught:
        from agent.config import parse_config

        parse_config(config_dict(paigo, tmp_path, raw), "<test>", {})
    assert any(p == path and fragment in m for p, m in caught.value.problems), caught.value.problems


def test_a_cloudwatch_block_only_belongs_to_cloudwatch(paigo: PaigoContractServer, tmp_path: Path) -> None:
    from agent.config import parse_config

    raw = measurement(cloudwatch={"namespace": "AWS/EBS", "metric_name": "VolumeReadBytes"})
    with pytest.raises(ConfigError) as caught:
        parse_config(config_dict(paigo, tmp_path, raw), "<test>", {})
    assert ("measurements[0].cloudwatch", "only applies with resource_type: cloudwatch") in caught.value.problems

