"""Targets: many accounts (each its own role, external id and customer), regions: all,
concurrent sampling within per-account-region limits, and failures confined to one target."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent

from agent.daemon import Daemon
from agent.spool import Spool
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, Aws, AwsProxy, aws_error, make_config, measurement
from tests.test_runtime import new_agent

AT = datetime(2026, 11, 21, 10, 7, tzinfo=timezone.utc)
OTHER = "222222222222"
ACME_ROLE = f"arn:aws:iam::{ACCOUNT}:role/usage-scraper"
GLOBEX_ROLE = f"arn:aws:iam::{OTHER}:role/usage-scraper"


def _policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def _customer_role(iam: Any, trusted: str, external_id: str) -> None:
    iam.create_role(RoleName="usage-scraper", AssumeRolePolicyDocument=_policy({
        "Effect": "Allow", "Principal": {"AWS": trusted}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": external_id}}}))
    iam.put_role_policy(RoleName="usage-scraper", PolicyName="read-volumes", PolicyDocument=_policy(
        {"Effect": "Allow", "Action": "ec2:DescribeVolumes", "Resource": "*"}))


@pytest.fixture
def two_accounts(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Account 123456789012 (acme) and 222222222222 (globex), each with a role that trusts the
    agent's user only with its own external id; moto enforces IAM while the test runs."""
    kw = {"region_name": "us-east-1", "endpoint_url": aws.endpoint}
    iam = boto3.client("iam", **kw)
    user = iam.create_user(UserName="usage-agent")["User"]["Arn"]
    iam.put_user_policy(UserName="usage-agent", PolicyName="assume",
                        PolicyDocument=_policy({"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}))
    key = iam.create_access_key(UserName="usage-agent")["AccessKey"]
    _customer_role(iam, user, "ext-acme")
    aws.volume("us-east-1", 64, tags={"customer-id": "someone"})  # tags are irrelevant: the account is the customer

    admin = boto3.client("sts", **kw).assume_role(RoleArn=f"arn:aws:iam::{OTHER}:role/admin",
                                                  RoleSessionName="setup")["Credentials"]
    as_other = {"aws_access_key_id": admin["AccessKeyId"], "aws_secret_access_key": admin["SecretAccessKey"],
                "aws_session_token": admin["SessionToken"], "endpoint_url": aws.endpoint}
    _customer_role(boto3.client("iam", region_name="us-east-1", **as_other), user, "ext-globex")
    for region, size in (("us-east-1", 100), ("eu-west-1", 20)):
        boto3.client("ec2", region_name=region, **as_other).create_volume(Size=size, AvailabilityZone=f"{region}a")

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    httpx.post(f"{aws.endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
    try:
        yield
    finally:
        httpx.post(f"{aws.endpoint}/moto-api/reset-auth", content=b"inf").raise_for_status()


def accounts_measurement(acme_external_id: str, **overrides: Any) -> dict[str, Any]:
    raw = measurement(regions=["us-east-1", "eu-west-1"], accounts=[
        {"iam_role_arn": ACME_ROLE, "external_id": acme_external_id, "customer": {"id": "acme"}},
        {"iamRoleArn": GLOBEX_ROLE, "externalId": "ext-globex", "customer": {"id": "globex"}},
    ], **overrides)
    del raw["iam_role_arn"], raw["external_id"], raw["customer"]
    return raw


def test_each_account_is_its_own_customer(two_accounts: None, paigo: PaigoContractServer, tmp_path: Path) -> None:
    cfg = make_config(paigo, tmp_path, accounts_measurement("ext-acme"))
    agent = new_agent(cfg)
    result = agent.collect(cfg.measurements[0], AT)
    agent.close()
    assert result.ok
    assert {r.customer_id: (r.value, r.metadata["accounts"], r.metadata["regions"]) for r in result.records} == {
        "acme": (Decimal(64), ACCOUNT, "us-east-1"),
        "globex": (Decimal(120), OTHER, "eu-west-1,us-east-1"),
    }


def test_a_denied_account_fails_alone(two_accounts: None, paigo: PaigoContractServer, tmp_path: Path) -> None:
    cfg = make_config(paigo, tmp_path, accounts_measurement("not-acme's-id"))
    spool = Spool(cfg.spool.path)
    agent = new_agent(cfg, spool)
    labels = {"measurement": "ebs-storage", "account": ACCOUNT, "region": "*", "reason": "assume_role"}
    before = agent.metrics.value("usage_agent_targets_failed_total", labels)

    (result,) = agent.sample_all(AT)
    agent.close()

    assert not result.ok and result.error is None  # the tick ran; one account did not
    assert [(f.account, f.region, f.reason) for f in result.failed_targets] == [(ACCOUNT, "*", "assume_role")]
    assert all("AccessDenied" in f.error for f in result.failed_targets)
    assert [(r.customer_id, r.value) for r in result.records] == [("globex", Decimal(120))]  # no zero for acme
    assert spool.counts()["pending"] == 1 and spool.last_tick("ebs-storage") == "2026-11-21T10:00:00Z"
    assert agent.metrics.value("usage_agent_targets_failed_total", labels) == before + 1
    spool.close()


def test_a_single_role_and_accounts_are_exclusive(paigo: PaigoContractServer, tmp_path: Path) -> None:
    from agent.config import parse_config
    from agent.errors import ConfigError
    from tests.conftest import config_dict

    raw = accounts_measurement("ext-acme")
    raw["iam_role_arn"] = ACME_ROLE
    raw["accounts"][1]["iam_role_arn"] = ACME_ROLE
    del raw["accounts"][1]["iamRoleArn"], raw["accounts"][0]["customer"]
    with pytest.raises(ConfigError) as caught:
        parse_config(config_dict(paigo, tmp_path, raw), "<test>", {})
    assert caught.value.problems == [
        ("measurements[0].accounts", f"account {ACCOUNT} is listed more than once"),
        ("measurements[0].accounts[0].customer", "required key is missing (or set customer on the measurement)"),
        ("measurements[0].iam_role_arn", "use either accounts or iam_role_arn/external_id, not both"),
    ]


def test_regions_all_is_every_enabled_region(aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer,
                                             tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    aws.volume("ap-southeast-2", 5, tags={"customer-id": "acme"})
    cfg = make_config(paigo, tmp_path, measurement(regions="all"))
    agent = new_agent(cfg)
    (record,) = agent.collect(cfg.measurements[0], AT).records
    agent.collect(cfg.measurements[0], AT)  # the region list is cached
    agent.close()
    assert (record.value, record.metadata["regions"]) == (Decimal(15), "ap-southeast-2,us-east-1")
    described = {region for action, region in aws_proxy.calls if action == "DescribeVolumes"}
    assert "us-west-2" in described and "ap-east-1" not in described  # moto lists ap-east-1 as not opted in
    assert [a for a, _ in aws_proxy.calls].count("DescribeRegions") == 1


def _deny_in(region: str) -> Any:
    def rule(action: str, where: str) -> tuple[int, bytes] | None:
        return aws_error("UnauthorizedOperation", "not here") if where == region else None
    return rule


@pytest.mark.parametrize(("group_by", "customer", "kept"), [
    ("customer", {"tag": "customer-id"}, []),  # any customer may have resources in the failed region
    ("customer", {"id": "acme"}, []),  # acme's total would be partial
    ("resource", {"tag": "customer-id"}, [("acme", Decimal(10)), ("globex", Decimal(7))]),
])
def test_a_failed_region_never_yields_a_partial_total(aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer,
                                                     tmp_path: Path, group_by: str, customer: dict[str, str],
                                                     kept: list[tuple[str, Decimal]]) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    aws.volume("us-east-1", 7, tags={"customer-id": "globex"})
    aws.volume("eu-west-1", 1000, tags={"customer-id": "acme"})
    aws_proxy.rules.append(_deny_in("eu-west-1"))
    cfg = make_config(paigo, tmp_path, measurement(regions=["us-east-1", "eu-west-1"], group_by=group_by,
                                                   customer=customer))
    agent = new_agent(cfg)
    result = agent.collect(cfg.measurements[0], AT)
    agent.close()
    assert [(f.region, f.reason) for f in result.failed_targets] == [("eu-west-1", "aws")]
    assert sorted((r.customer_id, r.value) for r in result.records) == kept
    assert result.withheld == (2 if customer.get("tag") and group_by == "customer" else 1 if group_by == "customer" else 0)


def test_static_customers_in_healthy_accounts_are_kept(aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer,
                                                       tmp_path: Path) -> None:
    aws.volume("us-east-1", 10)
    aws_proxy.rules.append(lambda action, region: aws_error("AuthFailure", "no") if action == "DescribeVolumes"
                           and region == "eu-west-1" else None)
    raw = measurement(regions=["us-east-1", "eu-west-1"], accounts=[
        {"iam_role_arn": ACME_ROLE, "customer": {"id": "acme"}},
        {"iam_role_arn": GLOBEX_ROLE, "customer": {"id": "globex"}},
    ])
    del raw["iam_role_arn"], raw["external_id"], raw["customer"]
    cfg = make_config(paigo, tmp_path, raw)
    agent = new_agent(cfg)
    result = agent.collect(cfg.measurements[0], AT)
    agent.close()
    # both accounts lost eu-west-1: both totals would be partial
    assert result.records == [] and result.withheld == 1  # globex has no volumes, so only acme had a total
    assert {(f.account, f.region) for f in result.failed_targets} == {(ACCOUNT, "eu-west-1"), (OTHER, "eu-west-1")}


def test_targets_run_concurrently_within_the_per_region_limit(aws: Aws, aws_proxy: AwsProxy,
                                                              paigo: PaigoContractServer, tmp_path: Path) -> None:
    regions = ["us-east-1", "us-east-2", "us-west-1", "us-west-2", "eu-west-1", "eu-central-1"]
    for region in regions:
        aws.volume(region, 1, tags={"customer-id": "acme"})
    aws_proxy.delay = 0.2
    names = [f"m{i}" for i in range(4)]  # four measurements over the same account and regions
    cfg = make_config(paigo, tmp_path, *(measurement(name=n, regions=regions, dimension_id=n) for n in names))
    agent = new_agent(replace(cfg, sampling=replace(cfg.sampling, workers=12)))
    threads = [threading.Thread(target=agent.collect, args=(m, AT)) for m in cfg.measurements]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    agent.close()
    assert {aws_proxy.max_in_flight["DescribeVolumes", r] for r in regions} == {2}  # sampling.per_account_region
    assert len([a for a, _ in aws_proxy.calls if a == "DescribeVolumes"]) == 24
    assert [a for a, _ in aws_proxy.calls].count("AssumeRole") == 1  # one session, however many threads ask


def test_an_overrunning_tick_is_skipped_and_counted(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    from agent.forwarder import Forwarder
    from agent.sinks import build_backend

    cfg = make_config(paigo, tmp_path, measurement(name="slow", interval="1m"))
    spool = Spool(cfg.spool.path)
    agent = new_agent(cfg, spool)
    sink = build_backend(cfg.backend, agent.metrics, agent.clock)
    daemon = Daemon(agent, Forwarder(spool, sink.sink, sink.client, metrics=agent.metrics, clock=agent.clock), sink,
                    metrics=agent.metrics, clock=agent.clock)
    before = agent.metrics.value("usage_agent_ticks_skipped_total", {"measurement": "slow", "reason": "overran"})
    # what APScheduler dispatches when max_instances=1 refuses a run
    daemon.scheduler._dispatch_event(JobSubmissionEvent(EVENT_JOB_MAX_INSTANCES, "sample:slow", None, [AT]))
    assert agent.metrics.value("usage_agent_ticks_skipped_total", {"measurement": "slow", "reason": "overran"}) == before + 1
    assert daemon.scheduler.get_job("sample:slow").max_instances == 1
    agent.close()
    sink.close()
    spool.close()


def test_a_garbled_aws_answer_fails_its_target_only(aws: Aws, aws_proxy: AwsProxy, paigo: PaigoContractServer,
                                                    tmp_path: Path) -> None:
    aws.volume("us-east-1", 10, tags={"customer-id": "acme"})
    aws.volume("eu-west-1", 20, tags={"customer-id": "acme"})
    aws_proxy.rules.append(lambda action, region: (200, b"<DescribeVolumesResponse><volumeSet><item>")
                           if action == "DescribeVolumes" and region == "eu-west-1" else None)
    cfg = make_config(paigo, tmp_path, measurement(regions=["us-east-1", "eu-west-1"], group_by="resource"))
    agent = new_agent(cfg)
    result = agent.collect(cfg.measurements[0], AT)
    agent.close()
    assert [(f.region, f.reason) for f in result.failed_targets] == [("eu-west-1", "aws")]
    assert "ResponseParserError" in result.failed_targets[0].error
    assert [r.value for r in result.records] == [10]
