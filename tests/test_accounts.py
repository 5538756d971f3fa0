"""Many customer accounts through shared clients: each call signed with its own account's key,
one client per region whatever the number of accounts, AssumeRole limited per caller, targets
served account after account, and a throttled account backing off alone."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.metrics import Metrics
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import Aws, AwsProxy, aws_error, make_config, measurement, through
from tests.support import FakeClock
from tests.test_runtime import new_agent

AT = datetime(2026, 11, 21, 10, 7, tzinfo=timezone.utc)
REGIONS = ["us-east-1", "eu-west-1", "ap-south-1"]
ACCOUNTS = [f"{111111111111 * k:012d}" for k in range(2, 7)]  # 222222222222 ... 666666666666


_EC2 = '<?xml version="1.0" encoding="UTF-8"?><{0}Response xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">{1}</{0}Response>'
_REGIONS = _EC2.format("DescribeRegions", "<regionInfo>" + "".join(
    f"<item><regionName>{r}</regionName><optInStatus>opt-in-not-required</optInStatus></item>" for r in REGIONS
) + "</regionInfo>").encode()


def _size(account: str, region: str) -> int:
    return int(account[0]) * 10 + REGIONS.index(region) + 1  # distinct per account and region


def _volumes(account: str, region: str) -> bytes:
    """The one volume the account whose key signed the call has in the region."""
    return _EC2.format("DescribeVolumes", f"<volumeSet><item><volumeId>vol-{account}{REGIONS.index(region)}</volumeId>"
                       f"<size>{_size(account, region)}</size><availabilityZone>{region}a</availabilityZone>"
                       f"<status>available</status><volumeType>gp3</volumeType></item></volumeSet>").encode()


def _key(headers: dict[str, str]) -> str:
    found = re.search(r"Credential=([^/]+)/", headers.get("Authorization", ""))
    return found.group(1) if found else ""


class KeyedProxy(AwsProxy):
    """STS is moto's; EC2 is answered here, as the account of the signing key (moto's assumed
    roles name it) sees it: three regions, one volume of ``_size(account, region)`` GiB in each
    (moto is slow to build and reset an EC2 backend per account and region). Records which
    account's key signed each call, and answers an account's first ``throttled[account]``
    DescribeVolumes with RequestLimitExceeded."""

    def __init__(self, upstream: str):
        super().__init__(upstream)
        self.signed: list[tuple[str, str, str, str]] = []  # (action, region, account of the signing key, key)
        self.throttled: dict[str, int] = {}
        self.answered: dict[str, int] = {}  # account -> DescribeVolumes answered
        self.after_answer: Any = lambda answered: None  # called with ``answered`` after each DescribeVolumes

    def forward(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        from moto.sts.models import sts_backends

        key = _key(headers)
        # moto keeps an assumed role with the account of the role
        roles = {r.access_key_id: r for a in list(sts_backends.keys()) for r in sts_backends[a]["aws"].assumed_roles}
        account = roles[key].role_arn.split(":")[4] if key in roles else "base"
        named = re.search(r"Action=(\w+)", body.decode(errors="replace"))
        action = named.group(1) if named else ""
        scope = re.search(r"Credential=[^/]+/\d+/([^/]+)/", headers.get("Authorization", ""))
        with self._lock:
            self.signed.append((action, scope.group(1) if scope else "", account, key))
            throttle = action == "DescribeVolumes" and self.throttled.get(account, 0) > 0
            if throttle:
                self.throttled[account] -= 1
        if throttle:
            return 400, "text/xml", aws_error("RequestLimitExceeded", "Request limit exceeded.")[1]
        if action == "DescribeRegions":
            return 200, "text/xml", _REGIONS
        if action != "DescribeVolumes":
            return super().forward(path, body, headers)  # STS: moto's
        answer = 200, "text/xml", _volumes(account, scope.group(1) if scope else "")
        with self._lock:
            self.answered[account] = self.answered.get(account, 0) + 1
            answered = dict(self.answered)
        self.after_answer(answered)
        return answer


@pytest.fixture
def keyed(aws: Aws, monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyedProxy]:
    yield from through(KeyedProxy(aws.endpoint), monkeypatch)


def _accounts_config(paigo: PaigoContractServer, tmp_path: Path, accounts: list[str], workers: int = 8,
                     **overrides: Any) -> Any:
    raw = measurement(**({"regions": REGIONS} | overrides), accounts=[
        {"iam_role_arn": f"arn:aws:iam::{a}:role/usage-scraper", "external_id": f"ext-{a}",
         "customer": {"id": f"cust-{a}"}} for a in accounts])
    del raw["iam_role_arn"], raw["external_id"], raw["customer"]
    cfg = make_config(paigo, tmp_path, raw)
    return replace(cfg, sampling=replace(cfg.sampling, workers=workers))


def _metric(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.value(name, labels)


def test_every_call_is_signed_with_its_own_accounts_key_through_one_client_per_region(
        aws: Aws, keyed: KeyedProxy, paigo: PaigoContractServer, tmp_path: Path) -> None:
    accounts = ACCOUNTS[:3]
    cfg = _accounts_config(paigo, tmp_path, accounts)
    metrics = Metrics()
    built = _metric(metrics, "usage_agent_aws_clients_built_total", service="ec2")
    calls = _metric(metrics, "usage_agent_aws_api_calls_total", service="ec2", operation="DescribeVolumes")
    keyed.signed.clear()

    agent = new_agent(cfg, metrics=metrics)
    result = agent.collect(cfg.measurements[0], AT)
    agent.close()

    assert result.ok
    assert {r.customer_id: r.value for r in result.records} == {
        f"cust-{a}": Decimal(sum(_size(a, region) for region in REGIONS)) for a in accounts}
    # each account's three regions were listed with that account's key, and with no other
    listed = sorted((account, region) for action, region, account, _ in keyed.signed if action == "DescribeVolumes")
    assert listed == sorted((a, region) for a in accounts for region in REGIONS)
    assert _metric(metrics, "usage_agent_aws_clients_built_total", service="ec2") - built == len(REGIONS)  # not 3 x 3
    assert _metric(metrics, "usage_agent_aws_api_calls_total", service="ec2", operation="DescribeVolumes") - calls == 9


def test_assume_role_is_limited_per_caller_once_per_account_and_regions_listed_once(
        aws: Aws, keyed: KeyedProxy, paigo: PaigoContractServer, tmp_path: Path) -> None:
    accounts = [f"{100000000000 + i:012d}" for i in range(9)]
    keyed.rules.append(lambda action, region: time.sleep(0.05) if action == "AssumeRole" else None)  # STS's pace
    cfg = _accounts_config(paigo, tmp_path, accounts, regions="all")
    metrics, clock = Metrics(), SystemClock()
    refreshes = _metric(metrics, "usage_agent_token_refreshes_total", kind="aws_role")
    assumed = _metric(metrics, "usage_agent_aws_api_calls_total", service="sts", operation="AssumeRole")

    agent = new_agent(cfg, metrics=metrics, sessions=SessionFactory(metrics=metrics, clock=clock, assume_role_in_flight=3))
    first = agent.collect(cfg.measurements[0], AT)
    second = agent.collect(cfg.measurements[0], AT + timedelta(minutes=15))
    agent.close()

    assert first.ok and second.ok and first.failed_targets == []
    actions = [action for action, *_ in keyed.signed]
    assert actions.count("AssumeRole") == 9 and actions.count("DescribeRegions") == 9  # for both ticks
    assert keyed.max_in_flight["AssumeRole", "us-east-1"] == 3  # concurrent, within the caller's limit
    assert _metric(metrics, "usage_agent_token_refreshes_total", kind="aws_role") - refreshes == 9
    assert _metric(metrics, "usage_agent_aws_api_calls_total", service="sts", operation="AssumeRole") - assumed == 9


def test_targets_are_served_one_account_after_another(aws: Aws, keyed: KeyedProxy, paigo: PaigoContractServer,
                                                      tmp_path: Path) -> None:
    accounts = ACCOUNTS[:3]
    cfg = _accounts_config(paigo, tmp_path, accounts, workers=1)
    agent = new_agent(cfg)
    assert agent.collect(cfg.measurements[0], AT).ok
    agent.close()
    order = [account for action, _, account, _ in keyed.signed if action == "DescribeVolumes"]
    assert sorted(order) == sorted(accounts * len(REGIONS))
    # an account's targets follow each other only once no other account has any left
    assert all(set(order[i + 1:]) == {order[i]} for i in range(len(order) - 1) if order[i] == order[i + 1])
    assert len(set(order[:len(accounts)])) > 1


def test_a_throttled_account_backs_off_while_the_others_go_on(aws: Aws, keyed: KeyedProxy,
                                                              paigo: PaigoContractServer, tmp_path: Path) -> None:
    slow, *others = ACCOUNTS[:4]
    keyed.throttled[slow] = 3
    others_done = threading.Event()
    waited: list[bool] = []
    delays: list[float] = []

    class Backoff(SystemClock):
        def sleep(self, seconds: float) -> None:  # the slow account's backoff lasts until the others are done
            delays.append(seconds)
            waited.append(others_done.wait(timeout=20))

    keyed.after_answer = lambda answered: others_done.set() if all(answered.get(a) == 1 for a in others) else None
    cfg = _accounts_config(paigo, tmp_path, ACCOUNTS[:4], workers=4, regions=["us-east-1"])
    metrics = Metrics()
    agent = new_agent(cfg, metrics=metrics, sessions=SessionFactory(metrics=metrics, clock=Backoff()))
    result = agent.collect(cfg.measurements[0], AT)
    agent.close()

    assert result.ok  # the throttled listing was retried, not failed
    assert {r.customer_id: r.value for r in result.records} == {
        f"cust-{a}": Decimal(_size(a, "us-east-1")) for a in ACCOUNTS[:4]}
    assert len(delays) == 3 and waited == [True, True, True]  # the others finished during the backoff
    assert all(0 <= d <= 2.0 ** i for i, d in enumerate(delays))  # capped exponential, jittered
    errors = _metric(metrics, "usage_agent_aws_api_errors_total", service="ec2", operation="DescribeVolumes",
                     code="RequestLimitExceeded")
    assert errors >= 3


def test_renewed_credentials_sign_the_next_calls_of_their_own_account(aws: Aws, keyed: KeyedProxy) -> None:
    clock = FakeClock(datetime.now(timezone.utc).timestamp())
    factory = SessionFactory(metrics=Metrics(), clock=clock)
    roles = [f"arn:aws:iam::{a}:role/usage-scraper" for a in ACCOUNTS[:2]]
    for _ in range(2):
        clients = [factory.client("ec2", "us-east-1", role, "ext") for role in roles]
        assert clients[0].meta is clients[1].meta  # one client signs for both
        for client in clients:
            client.describe_volumes()
        clock.advance(timedelta(minutes=55).total_seconds())  # inside botocore's mandatory refresh window of both

    listed = [(account, key) for action, _, account, key in keyed.signed if action == "DescribeVolumes"]
    assert [action for action, *_ in keyed.signed].count("AssumeRole") == 4  # each role assumed, then renewed
    assert [account for account, _ in listed] == ACCOUNTS[:2] * 2
    assert len({key for _, key in listed}) == 4  # the second round carries the renewed keys
