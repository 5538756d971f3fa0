"""`usage-agent iam-policy`: the generated policies are enough, and nothing more, under moto's IAM enforcement."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml

from agent.config import parse_config
from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.iam import plan, principal_of, render_terraform
from agent.metrics import Metrics
from agent.spool import Spool
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import ACCOUNT, EXTERNAL_ID, ROLE_ARN, Aws, make_config, measurement, write_config
from tests.support import cli
from tests.test_runtime import new_agent

AT = datetime(2026, 11, 21, 10, 7, tzinfo=timezone.utc)
ROOT = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # moto's unrestricted identity


def iam_policy(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("iam-policy", "-c", str(config), *args)  # in-process: output and exit code only


@dataclass
class Enforced:
    aws: Aws
    user_arn: str
    policies: dict[str, Any]  # the json output

    def iam(self) -> Any:
        return boto3.client("iam", region_name="us-east-1", endpoint_url=self.aws.endpoint, **ROOT)

    def enforce(self, on: bool) -> None:
        httpx.post(f"{self.aws.endpoint}/moto-api/reset-auth", content=b"0" if on else b"inf").raise_for_status()


@pytest.fixture
def enforced(aws: Aws, paigo: PaigoContractServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Enforced]:
    """The customer role created from the generated CloudFormation template, the agent a user whose only
    policy is the generated agent policy; then IAM enforcement on."""
    iam = boto3.client("iam", region_name="us-east-1", endpoint_url=aws.endpoint, **ROOT)
    user_arn = iam.create_user(UserName="usage-agent")["User"]["Arn"]
    key = iam.create_access_key(UserName="usage-agent")["AccessKey"]
    config = write_config(paigo, tmp_path)

    template = iam_policy(config, "--format", "cloudformation", "--principal", user_arn)
    assert template.returncode == 0, template.stderr
    cloudformation = boto3.client("cloudformation", region_name="us-east-1", endpoint_url=aws.endpoint, **ROOT)
    cloudformation.create_stack(StackName="usage-agent", TemplateBody=template.stdout,
                                Capabilities=["CAPABILITY_NAMED_IAM"])
    (stack,) = cloudformation.describe_stacks(StackName="usage-agent")["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    assert stack["Outputs"] == [{"OutputKey": "RoleUsageScraperArn", "OutputValue": ROLE_ARN}]
    # moto's access control cannot read inline policies a stack created: put the template's own again
    (inline,) = json.loads(template.stdout)["Resources"]["RoleUsageScraper"]["Properties"]["Policies"]
    iam.put_role_policy(RoleName="usage-scraper", PolicyName=inline["PolicyName"],
                        PolicyDocument=json.dumps(inline["PolicyDocument"]))

    done = iam_policy(config, "--principal", user_arn)
    assert done.returncode == 0, done.stderr
    policies = json.loads(done.stdout)
    iam.put_user_policy(UserName="usage-agent", PolicyName="usage-agent",
                        PolicyDocument=json.dumps(policies["agent_policy"]))
    aws.volume("us-east-1", 64, tags={"customer-id": "acme"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    state = Enforced(aws, user_arn, policies)
    state.enforce(True)
    try:
        yield state
    finally:
        state.enforce(False)


def sample(paigo: PaigoContractServer, tmp_path: Path, metrics: Metrics, calls: set[str] | None = None):
    cfg = make_config(paigo, tmp_path)
    sessions = SessionFactory(metrics=metrics, clock=SystemClock())
    if calls is not None:  # the sampler's own client, which the agent then reuses from the cache
        m = cfg.measurements[0]
        client = sessions.client("ec2", "us-east-1", m.iam_role_arn, m.external_id)  # ebs samples through ec2
        client.meta.events.register(
            "before-call", lambda model, **_: calls.add(f"{model.service_model.signing_name}:{model.name}"))
    spool = Spool(tmp_path / "spool.db")
    try:
        (result,) = new_agent(cfg, spool, metrics=metrics, sessions=sessions).sample_all(AT)
    finally:
        spool.close()
    return result


def test_the_generated_policies_are_exactly_what_sampling_needs(
    enforced: Enforced, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    (role,) = enforced.policies["roles"]
    assert role["role_arn"] == ROLE_ARN and role["external_ids"] == [EXTERNAL_ID]
    assert role["trust_policy"] == {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": {"AWS": enforced.user_arn}, "Action": "sts:AssumeRole",
        "Condition": {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}}]}
    assert enforced.policies["agent_policy"]["Statement"] == [
        {"Sid": "AssumeCustomerRoles", "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": [ROLE_ARN]}]
    (granted,) = role["permission_policy"]["Statement"]

    calls: set[str] = set()
    result = sample(paigo, tmp_path, Metrics(), calls)
    assert result.ok, result.error
    assert [r.value for r in result.records] == [64]
    assert sorted(calls) == granted["Action"] == ["ec2:DescribeVolumes"]  # what the sampler called, nothing else

    denied = {"service": "ec2", "operation": "DescribeVolumes", "code": "AccessDenied"}
    for action in granted["Action"]:  # and each action is needed: without it, the tick fails
        enforced.enforce(False)
        fewer = {**role["permission_policy"], "Statement": [{**granted, "Action": [a for a in granted["Action"] if a != action] or ["ec2:DescribeTags"]}]}
        enforced.iam().put_role_policy(RoleName="usage-scraper", PolicyName="usage-agent-read",
                                       PolicyDocument=json.dumps(fewer))
        enforced.enforce(True)
        metrics = Metrics()
        before = metrics.value("usage_agent_aws_api_errors_total", denied)
        failed = sample(paigo, tmp_path, metrics)
        assert not failed.ok and f"not authorized to perform: {action}" in (failed.error or "")
        assert metrics.value("usage_agent_aws_api_errors_total", denied) == before + 1


def test_the_agent_may_assume_only_the_configured_roles(
    enforced: Enforced, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    enforced.enforce(False)
    enforced.iam().create_role(RoleName="someone-else", AssumeRolePolicyDocument=json.dumps(
        enforced.policies["roles"][0]["trust_policy"]))  # trusts the agent just the same
    enforced.enforce(True)
    other = f"arn:aws:iam::{ACCOUNT}:role/someone-else"
    labels = {"role_arn": other}
    metrics = Metrics()
    before = metrics.value("usage_agent_assume_role_failures_total", labels)
    cfg = make_config(paigo, tmp_path, measurement(iam_role_arn=other))
    result = new_agent(cfg, metrics=metrics).collect(cfg.measurements[0], AT)
    assert not result.ok and "not authorized to perform: sts:AssumeRole" in (result.error or "")
    assert metrics.value("usage_agent_assume_role_failures_total", labels) == before + 1

    wrong_external_id = make_config(paigo, tmp_path, measurement(external_id="not-the-one"))
    refused = new_agent(wrong_external_id).collect(wrong_external_id.measurements[0], AT)
    assert not refused.ok and "AccessDenied" in (refused.error or "")


def test_own_identity_measurements_put_their_actions_in_the_agent_policy(tmp_path: Path) -> None:
    cfg = parse_config({"backend": {"type": "paigo", "client_id": "c", "client_secret": "s"}, "measurements": [
        measurement(name="own", iam_role_arn=None, external_id=None),
        measurement(name="theirs"),
        measurement(name="theirs-too", metric="iops"),
    ]}, "<test>", {})
    p = plan(cfg, principal="arn:aws:iam::111122223333:role/usage-agent")
    assert [(r.arn, [m.name for m in r.measurements]) for r in p.roles] == [(ROLE_ARN, ["theirs", "theirs-too"])]
    assert p.agent_policy()["Statement"] == [
        {"Sid": "AssumeCustomerRoles", "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": [ROLE_ARN]},
        {"Sid": "UsageAgentRead", "Effect": "Allow", "Action": ["ec2:DescribeVolumes"], "Resource": "*"},
    ]


def test_one_trust_policy_per_role_naming_each_external_id(tmp_path: Path) -> None:
    second = "arn:aws:iam::444455556666:role/metering/usage-reader"
    cfg = parse_config({"backend": {"type": "paigo", "client_id": "c", "client_secret": "s"}, "measurements": [
        measurement(name="a"), measurement(name="b", external_id="ext-other"),
        measurement(name="c", iam_role_arn=second, external_id="ext-c"),
    ]}, "<test>", {})
    p = plan(cfg, principal="arn:aws:iam::111122223333:role/usage-agent")
    assert [(r.arn, r.external_ids) for r in p.roles] == [(ROLE_ARN, [EXTERNAL_ID, "ext-other"]),
                                                          (second, ["ext-c"])]
    only_second = plan(cfg, principal="x", account="444455556666")
    assert [r.arn for r in only_second.roles] == [second] and only_second.agent_policy()["Statement"][0]["Resource"] == [second]

    terraform = render_terraform(p)
    role = terraform["resource"]["aws_iam_role"]["usage_reader"]
    assert (role["name"], role["path"]) == ("usage-reader", "/metering/")
    trust = json.loads(role["assume_role_policy"].replace("${var.usage_agent_principal}", p.principal))
    assert trust["Statement"][0]["Condition"] == {"StringEquals": {"sts:ExternalId": "ext-c"}}
    shared = json.loads(terraform["resource"]["aws_iam_role"]["usage_scraper"]["assume_role_policy"]
                        .replace("${var.usage_agent_principal}", p.principal))
    assert shared["Statement"][0]["Condition"] == {"StringEquals": {"sts:ExternalId": [EXTERNAL_ID, "ext-other"]}}
    policy = terraform["resource"]["aws_iam_role_policy"]["usage_reader"]
    assert policy["role"] == "${aws_iam_role.usage_reader.id}"
    assert json.loads(policy["policy"])["Statement"][0]["Action"] == ["ec2:DescribeVolumes"]
    assert terraform["variable"]["usage_agent_principal"]["default"] == p.principal
    assert terraform["output"]["usage_reader_arn"] == {"value": "${aws_iam_role.usage_reader.arn}"}


def test_terraform_keeps_template_sequences_literal(tmp_path: Path) -> None:
    cfg = parse_config({"backend": {"type": "paigo", "client_id": "c", "client_secret": "s"},
                        "measurements": [measurement(external_id="a$${b}%{c}")]}, "<test>", {})
    trust = render_terraform(plan(cfg, principal="p"))["resource"]["aws_iam_role"]["usage_scraper"]["assume_role_policy"]
    assert '"a$${b}%%{c}"' in trust and trust.count("${") == 2  # the escaped one and the principal variable


@pytest.mark.parametrize("caller, principal", [
    ("arn:aws:sts::111122223333:assumed-role/usage-agent/botocore-session-1", "arn:aws:iam::111122223333:role/usage-agent"),
    ("arn:aws-us-gov:sts::111122223333:assumed-role/r/s", "arn:aws-us-gov:iam::111122223333:role/r"),
    ("arn:aws:iam::111122223333:user/ops", "arn:aws:iam::111122223333:user/ops"),
])
def test_a_session_is_trusted_through_its_role(caller: str, principal: str) -> None:
    assert principal_of(caller) == principal


def test_cli_formats_and_errors(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    elsewhere = "arn:aws:iam::444455556666:role/usage-reader"
    config = write_config(paigo, tmp_path, measurement(name="a"), measurement(name="b", iam_role_arn=elsewhere))

    two_accounts = iam_policy(config, "--format", "terraform", "--principal", ROLE_ARN)
    assert two_accounts.returncode == 2
    assert ("the roles are in 2 accounts (123456789012, 444455556666): pass --account ID, one template per account"
            in two_accounts.stderr)
    one = iam_policy(config, "--format", "terraform", "--principal", ROLE_ARN, "--account", "444455556666")
    assert one.returncode == 0, one.stderr
    assert list(json.loads(one.stdout)["resource"]["aws_iam_role"]) == ["usage_reader"]

    default = iam_policy(config)  # no --principal: the identity of the current credentials (moto's)
    assert default.returncode == 0, default.stderr
    caller = boto3.client("sts", region_name="us-east-1").get_caller_identity()["Arn"]
    assert json.loads(default.stdout)["principal"] == caller
    assert f"trusting {caller}, the identity of the current AWS credentials" in default.stderr

    bad = iam_policy(config, "--principal", "usage-agent")
    assert bad.returncode == 2 and "expected an IAM ARN such as arn:aws:iam::123456789012:role/usage-agent" in bad.stderr

    own = tmp_path / "own.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["measurements"] = [{k: v for k, v in raw["measurements"][0].items() if k not in ("iam_role_arn", "external_id")}]
    own.write_text(yaml.safe_dump(raw))
    nothing = iam_policy(own, "--format", "cloudformation")
    assert nothing.returncode == 2
    assert "no measurement assumes a role; `--format json` shows what the agent's own identity needs" in nothing.stderr
    as_json = json.loads(iam_policy(own).stdout)
    assert as_json["roles"] == [] and as_json["agent_policy"]["Statement"][0]["Action"] == ["ec2:DescribeVolumes"]
