"""Assumed-role sessions against moto server: external id, caching, refresh, denial."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import boto3
import httpx
import pytest

from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.errors import AssumeRoleError
from agent.metrics import Metrics
from agent.spool import Spool
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, EXTERNAL_ID, ROLE_ARN, Aws, make_config, measurement
from tests.support import FakeClock
from tests.test_runtime import new_agent


def test_assume_role_passes_external_id_and_a_meaningful_session_name(aws: Aws) -> None:
    aws.volume("us-east-1", 8)
    factory = SessionFactory(metrics=Metrics(), clock=SystemClock())

    ec2 = factory.client("ec2", "us-east-1", ROLE_ARN, EXTERNAL_ID)
    assert len(ec2.describe_volumes()["Volumes"]) == 1

    (assumed,) = aws.assumed_roles()
    assert assumed.role_arn == ROLE_ARN
    assert assumed.external_id == EXTERNAL_ID
    assert assumed.session_name.startswith("usage-agent-")
    assert len(assumed.session_name) <= 64
    assert factory.account_id(ROLE_ARN, EXTERNAL_ID) == ACCOUNT


def test_one_assumed_role_per_role_and_external_id_and_one_client_per_region(aws: Aws) -> None:
    factory = SessionFactory(metrics=Metrics(), clock=SystemClock())
    for region in ("us-east-1", "eu-west-1", "ap-south-1"):
        factory.client("ec2", region, ROLE_ARN, EXTERNAL_ID).describe_volumes()
    assert len(aws.assumed_roles()) == 1

    other = factory.client("ec2", "us-east-1", ROLE_ARN, "another-external-id")
    other.describe_volumes()
    assert [r.external_id for r in aws.assumed_roles()] == [EXTERNAL_ID, "another-external-id"]
    # both identities are served by the one us-east-1 EC2 client: its events, its connections
    assert other.meta is factory.client("ec2", "us-east-1", ROLE_ARN, EXTERNAL_ID).meta
    assert other.meta is not factory.client("ec2", "eu-west-1", ROLE_ARN, EXTERNAL_ID).meta


def test_credentials_are_refreshed_when_they_near_expiry(aws: Aws) -> None:
    clock = FakeClock(datetime.now(timezone.utc).timestamp())
    factory = SessionFactory(metrics=Metrics(), clock=clock, duration_seconds=3600)
    credentials = factory.credentials(ROLE_ARN, EXTERNAL_ID)
    first = credentials.get_frozen_credentials()
    expiry = aws.assumed_roles()[0].expiration.replace(tzinfo=timezone.utc)

    clock.advance_to((expiry - timedelta(minutes=20)).timestamp())  # still comfortably valid: no refresh
    assert credentials.get_frozen_credentials().access_key == first.access_key
    assert len(aws.assumed_roles()) == 1

    clock.advance_to((expiry - timedelta(minutes=5)).timestamp())  # inside botocore's mandatory refresh window
    second = credentials.get_frozen_credentials()
    assert second.access_key != first.access_key
    assert len(aws.assumed_roles()) == 2
    assert [r.external_id for r in aws.assumed_roles()] == [EXTERNAL_ID, EXTERNAL_ID]


@pytest.fixture
def iam_enforced(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    """moto with IAM enforcement on: the role trusts our user only with the right external id."""
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=aws.endpoint)
    user = iam.create_user(UserName="usage-agent")["User"]
    iam.put_user_policy(
        UserName="usage-agent",
        PolicyName="assume",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]}),
    )
    key = iam.create_access_key(UserName="usage-agent")["AccessKey"]
    iam.create_role(
        RoleName="usage-scraper",
        AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [{
            "Effect": "Allow",
            "Principal": {"AWS": user["Arn"]},
            "Action": "sts:AssumeRole",
            "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}},
        }]}),
    )
    iam.put_role_policy(
        RoleName="usage-scraper",
        PolicyName="read-volumes",
        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "ec2:DescribeVolumes", "Resource": "*"}]}),
    )
    aws.volume("us-east-1", 64, tags={"customer-id": "acme"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    httpx.post(f"{aws.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield aws
    finally:
        httpx.post(f"{aws.endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()


def test_wrong_external_id_is_denied_and_raises(iam_enforced: Aws) -> None:
    with pytest.raises(AssumeRoleError, match="AccessDenied"):
        SessionFactory(metrics=Metrics(), clock=SystemClock()).credentials(ROLE_ARN, "not-the-external-id")


def test_a_role_that_cannot_be_assumed_fails_only_its_measurement(
    iam_enforced: Aws, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    cfg = make_config(
        paigo,
        tmp_path,
        measurement(name="good"),
        measurement(name="denied", external_id="wrong-external-id"),
    )
    spool = Spool(cfg.spool.path)
    agent = new_agent(cfg, spool)
    failures = {"measurement": "denied", "reason": "assume_role"}
    before = agent.metrics.value("usage_agent_ticks_failed_total", failures)

    good, denied = agent.sample_all(datetime(2026, 11, 21, 10, 7, tzinfo=timezone.utc))

    assert good.ok and [r.value for r in good.records] == [64]
    assert not denied.ok and "AccessDenied" in (denied.error or "")
    assert denied.records == []  # never a zero-usage record for a target we could not see
    assert spool.counts()["pending"] == 1
    assert spool.last_tick("good") == "2026-11-21T10:00:00Z"
    assert spool.last_tick("denied") is None
    assert agent.metrics.value("usage_agent_ticks_failed_total", failures) == before + 1
    spool.close()
