"""The AWS query engine: a target's listing is bounded in pages and time, and an answer that cannot
be used fails its target with an error naming the peer (botocore's Stubber for the engine itself,
a loopback proxy in front of moto for whole ticks)."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from agent.config import parse_measurement
from agent.credentials import CLIENT_CONFIG, Backoff
from agent.errors import EXCERPT as MAX_DETAIL
from agent.samplers.base import CallError, Target
from agent.samplers.ebs import VOLUMES
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, TICK, Aws, AwsProxy, aws_error, make_config, measurement, offline_client, only
from tests.support import Monotonic
from tests.test_runtime import new_agent

PAGE_SIZE, sample_volumes = VOLUMES.page_size, VOLUMES.sample

AT = datetime(2026, 11, 21, 10, 0, 30, tzinfo=timezone.utc)


class Ticking:
    """A monotonic clock that moves on by ``step`` seconds each time it is read."""

    def __init__(self, step: float = 1.0):
        self.now = 0.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _volume(n: int) -> dict[str, Any]:
    return {"VolumeId": f"vol-{n:017x}", "Size": 1, "VolumeType": "gp3", "State": "available",
            "Tags": [{"Key": "customer-id", "Value": "acme"}]}


def _endless(stubber: Stubber, pages: int, token: Any = lambda n: f"token-{n}") -> None:
    """``pages`` answers, each with a NextToken, as an EC2 endpoint that never stops paging."""
    for n in range(pages):
        expected: dict[str, Any] = {"Filters": [], "MaxResults": PAGE_SIZE}
        if n:
            expected["NextToken"] = token(n - 1)
        stubber.add_response("describe_volumes", {"Volumes": [_volume(n)], "NextToken": token(n)}, expected)


def _target(clock: Any = None, deadline: float = float("inf"), **overrides: Any) -> Target:
    m = parse_measurement(measurement(**overrides))
    return Target(m, ACCOUNT, "us-east-1", TICK, deadline, clock or Ticking())


def test_endless_paging_fails_its_target_at_the_end_of_the_interval() -> None:
    ec2, clock = offline_client("ec2"), Ticking()  # each AWS call takes a second
    stubber = Stubber(ec2)
    _endless(stubber, 200)
    target = _target(clock, deadline=60.0, interval="1m")
    read = []
    with stubber, pytest.raises(CallError) as failed:
        for item in sample_volumes(only(ec2), target):
            read.append(item)
    assert str(failed.value) == ("ebs: ec2 DescribeVolumes in 123456789012/us-east-1: stopped after 59 pages: the "
                                 "target did not finish inside the measurement's interval (60s)")
    assert clock.now <= 150  # what an operator may wait for a 1m interval
    assert len(read) == 59  # a page a second until the deadline, then no more calls


def test_a_listing_stops_at_its_page_cap() -> None:
    ec2 = offline_client("ec2")
    stubber = Stubber(ec2)
    _endless(stubber, 3)
    target = _target()
    with stubber, pytest.raises(CallError) as failed:
        for _ in target.pages(ec2, "describe_volumes", "Volumes", PAGE_SIZE, max_pages=3, Filters=[]):
            pass
    stubber.assert_no_pending_responses()  # three pages read, and the third still said there was more
    assert str(failed.value) == ("ebs: ec2 DescribeVolumes in 123456789012/us-east-1: more than 3 pages; "
                                 "the listing is cut off rather than run forever")


@pytest.mark.parametrize("tokens", [["a", "a"], ["a", "b", "a"]], ids=["twice in a row", "a cycle"])
def test_a_repeated_token_is_an_error_at_once(tokens: list[str]) -> None:
    ec2 = offline_client("ec2")
    stubber = Stubber(ec2)
    _endless(stubber, len(tokens), token=lambda n: tokens[n])
    with stubber, pytest.raises(CallError) as failed:
        list(sample_volumes(only(ec2), _target()))
    stubber.assert_no_pending_responses()
    assert str(failed.value) == (f"ebs: ec2 DescribeVolumes in 123456789012/us-east-1: page {len(tokens)} repeats "
                                 "the NextToken of an earlier page (a); the listing would never end")


def test_a_finite_listing_reads_every_page_and_passes_the_tokens_on() -> None:
    ec2 = offline_client("ec2")
    stubber = Stubber(ec2)
    _endless(stubber, 2)
    stubber.add_response("describe_volumes", {"Volumes": [_volume(2)]},
                         {"Filters": [], "MaxResults": PAGE_SIZE, "NextToken": "token-1"})
    with stubber:
        samples = list(sample_volumes(only(ec2), _target()))
    stubber.assert_no_pending_responses()
    assert [s.values["size_gib"] for s in samples] == [Decimal(1)] * 3


# -- whole ticks: one target's peer misbehaves, the others go on ------------------------------------

XMLNS = 'xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"'


def _volumes_page(size: str, token: str | None) -> bytes:
    more = f"<nextToken>{token}</nextToken>" if token else ""
    return (f"<DescribeVolumesResponse {XMLNS}><requestId>r-1</requestId><volumeSet><item>"
            f"<volumeId>vol-0123456789abcdef0</volumeId><size>{size}</size><status>available</status>"
            "<volumeType>gp3</volumeType><availabilityZone>eu-west-1a</availabilityZone><tagSet><item>"
            f"<key>customer-id</key><value>acme</value></item></tagSet></item></volumeSet>{more}"
            "</DescribeVolumesResponse>").encode()


def _in_eu(answer: Any) -> Any:
    def rule(action: str, region: str) -> tuple[int, bytes] | None:
        return (200, answer()) if action == "DescribeVolumes" and region == "eu-west-1" else None
    return rule


def _tick(paigo: PaigoContractServer, tmp_path: Path, clock: Any = None, **fields: Any) -> Any:
    cfg = make_config(paigo, tmp_path, measurement(regions=["us-east-1", "eu-west-1"], group_by="resource", **fields))
    agent = new_agent(cfg, clock=Monotonic(clock or Ticking(0.0)))
    try:
        return agent.collect(cfg.measurements[0], AT)
    finally:
        agent.close()


@pytest.mark.parametrize(("answer", "error"), [
    (lambda: b"<html><body><h1>502 Bad Gateway</h1></body></html>",
     "ebs: ec2 DescribeVolumes in 123456789012/eu-west-1: page 1 has no Volumes list (keys: none)"),
    (lambda: _volumes_page("NaN", None),
     "ebs: ec2 DescribeVolumes in 123456789012/eu-west-1: unusable answer: "
     "ValueError: invalid literal for int() with base 10: 'NaN'"),
], ids=["html with status 200", "NaN size"])
def test_an_unusable_answer_fails_its_target_by_name_and_the_others_go_on(
        aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer, tmp_path: Path, answer: Any, error: str) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    aws_proxy.rules.append(_in_eu(answer))
    result = _tick(paigo, tmp_path)
    assert [(f.region, f.reason, f.error) for f in result.failed_targets] == [("eu-west-1", "aws", error)]
    assert [(r.metadata["region"], r.value) for r in result.records] == [("us-east-1", Decimal(10))]


def test_an_unparseable_body_is_not_carried_whole_into_the_error(
        aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer, tmp_path: Path) -> None:
    body = b"<" + b"x" * 1_000_000
    aws_proxy.rules.append(_in_eu(lambda: body))
    result = _tick(paigo, tmp_path)
    (failure,) = result.failed_targets
    assert failure.error.startswith("ebs: ec2 DescribeVolumes in 123456789012/eu-west-1: unusable answer: "
                                    "ResponseParserError: Unable to parse response")
    assert len(failure.error) < MAX_DETAIL + 200
    assert failure.error.endswith("more characters)")


def test_an_endless_listing_fails_its_target_and_the_tick_completes(
        aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer, tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    tokens = itertools.count()
    aws_proxy.rules.append(_in_eu(lambda: _volumes_page("5", f"token-{next(tokens)}")))
    clock = Ticking(1.0)  # every reading is a second later: a call takes about a second
    result = _tick(paigo, tmp_path, clock, interval="1m")
    (failure,) = result.failed_targets
    assert failure.region == "eu-west-1" and "did not finish inside the measurement's interval (60s)" in failure.error
    assert clock.now <= 150
    assert 20 <= next(tokens) <= 60  # it paged, and stopped
    assert [(r.metadata["region"], r.value) for r in result.records] == [("us-east-1", Decimal(10))]


def test_an_answer_missing_a_field_fails_its_target_not_the_tick(
        aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer, tmp_path: Path) -> None:
    for region in ("us-east-1", "eu-west-1"):
        aws.client("dynamodb", region).create_table(
            TableName="orders", BillingMode="PAY_PER_REQUEST", KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
            Tags=[{"Key": "customer-id", "Value": "acme"}])
    aws_proxy.rules.append(lambda action, region: (200, b'{"Table": {"TableName": "orders"}}')
                           if action == "DescribeTable" and region == "eu-west-1" else None)
    result = _tick(paigo, tmp_path, resource_type="dynamodb", metric="count")
    assert [(f.region, f.error) for f in result.failed_targets] == [
        ("eu-west-1", "dynamodb in 123456789012/eu-west-1: KeyError: 'TableArn'")]
    assert [(r.metadata["region"], r.resource) for r in result.records] == [
        ("us-east-1", "arn:aws:dynamodb:us-east-1:123456789012:table/orders")]


def test_retries_of_one_call_stop_at_the_deadline(aws_proxy: AwsProxy) -> None:
    # a peer that keeps failing: botocore would retry 8 times (minutes with real timeouts);
    # no attempt starts once the target's interval is over
    aws_proxy.rules.append(lambda name, region: aws_error("ServiceUnavailable", "down", 503) if name == "DescribeVolumes" else None)
    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=aws_proxy.url, config=CLIENT_CONFIG)
    ec2.meta.events.register("needs-retry", Backoff(sleep=lambda _: None))  # the agent's retries, as SessionFactory sets them
    target = _target(lambda: float(len(aws_proxy.calls)), deadline=1.0)  # the first attempt ends the interval

    with pytest.raises(CallError, match=r"ec2 DescribeVolumes in 123456789012/us-east-1: .*not retried after 1 attempt.*"
                                        r"did not finish inside the measurement's interval"):
        list(sample_volumes(only(ec2), target))

    assert aws_proxy.calls == [("DescribeVolumes", "us-east-1")]
