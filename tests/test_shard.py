"""Sharding: i/n parsing, a stable hash, no target sampled twice or never, sums kept whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import parse_config
from agent.records import format_decimal
from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.metrics import Metrics
from agent.settings import AgentConfig
from agent.shard import Shard
from agent.spool import Spool
from agent.testing.paigo_server import PaigoContractServer
from tests.conftest import Aws, measurement, write_config
from tests.support import cli
from tests.test_runtime import new_agent

REGIONS = ["us-east-1", "eu-west-1", "ap-northeast-1"]
AT = datetime(2026, 11, 21, 10, 7, tzinfo=timezone.utc)


def config(*measurements: dict) -> AgentConfig:
    return parse_config({"backend": {"type": "paigo", "client_id": "c", "client_secret": "s"},
                         "measurements": list(measurements)}, "<test>", {})


def owner(shards: int, cfg: AgentConfig, region: str, which: int = 0) -> list[int]:
    m = cfg.measurements[which]
    return [i for i in range(shards) if Shard(i, shards).owns(m, m.iam_role_arn, region)]


@pytest.mark.parametrize("text, expected", [("0/1", Shard(0, 1)), ("2/3", Shard(2, 3)), (" 0/12 ", Shard(0, 12))])
def test_parse(text: str, expected: Shard) -> None:
    assert Shard.parse(text) == expected
    assert str(expected) == text.strip()


@pytest.mark.parametrize("text, message", [
    ("3/3", "shard 3/3: expected i/n with n >= 1 and 0 <= i < n, e.g. 0/3"),
    ("0/0", "shard 0/0: expected i/n with n >= 1 and 0 <= i < n, e.g. 0/3"),
    ("-1/2", "expected i/n such as 0/3 (this replica's index from 0, then the replica count), got '-1/2'"),
    ("$(POD_INDEX)/3", "expected i/n such as 0/3 (this replica's index from 0, then the replica count), "
                       "got '$(POD_INDEX)/3'"),
    ("1", "expected i/n such as 0/3 (this replica's index from 0, then the replica count), got '1'"),
])
def test_bad_shards_say_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        Shard.parse(text)
    assert str(raised.value) == message


def test_the_hash_is_pinned() -> None:
    """Replicas of different versions must agree during a rolling upgrade: the assignment never changes."""
    cfg = config(measurement(regions=REGIONS, group_by="resource"), measurement(name="per-customer", regions=REGIONS))
    assert [owner(3, cfg, r)[0] for r in REGIONS] == [2, 0, 1]
    assert [owner(2, cfg, r)[0] for r in REGIONS] == [0, 0, 0]
    assert {owner(3, cfg, r, which=1)[0] for r in REGIONS} == {2}  # per-customer sums: the whole measurement


def test_the_assignment_does_not_depend_on_the_process() -> None:
    script = (
        "import json; from agent.shard import Shard; from agent.config import parse_config; "
        f"cfg = parse_config({{'backend': {{'type': 'paigo', 'client_id': 'c', 'client_secret': 's'}}, "
        f"'measurements': [{measurement(regions=REGIONS, group_by='resource')!r}]}}, 't', {{}}); m = cfg.measurements[0]; "
        f"print(json.dumps([[i for i in range(5) if Shard(i, 5).owns(m, m.iam_role_arn, r)] for r in {REGIONS!r}]))"
    )
    cfg = config(measurement(regions=REGIONS, group_by="resource"))
    here = [owner(5, cfg, r) for r in REGIONS]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(out.stdout) == here


@given(
    count=st.integers(min_value=1, max_value=16),
    names=st.lists(st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True), min_size=1, max_size=4, unique=True),
    group_by=st.sampled_from(["customer", "resource"]),
    account=st.from_regex(r"\d{12}", fullmatch=True),
)
def test_every_target_has_exactly_one_owner(count: int, names: list[str], group_by: str, account: str) -> None:
    cfg = config(*[measurement(name=name, regions=REGIONS, group_by=group_by,
                               iam_role_arn=f"arn:aws:iam::{account}:role/usage") for name in names])
    for which in range(len(names)):
        owners = [owner(count, cfg, region, which) for region in REGIONS]
        assert all(len(o) == 1 for o in owners)
        if group_by == "customer":  # a customer's sum over regions is never split
            assert len({o[0] for o in owners}) == 1


def seed_regions(aws: Aws) -> None:
    for i, region in enumerate(REGIONS):
        aws.volume(region, 10 + i, tags={"customer-id": "acme"})
        aws.volume(region, 100 + i, tags={"customer-id": "globex"})


def spooled(cfg: AgentConfig, sessions: SessionFactory, tmp_path: Path, shard: Shard,
            name: str) -> dict[str, tuple[str, str, str]]:
    spool = Spool(tmp_path / f"{name}.db")
    results = new_agent(cfg, spool, sessions=sessions, shard=shard).sample_all(AT)
    spool.close()
    assert all(r.ok for r in results)
    return {r.record_id: (r.customer_id, r.resource, format_decimal(r.value)) for result in results for r in result.records}


@pytest.mark.parametrize("group_by", ["resource", "customer"])
def test_shards_together_sample_exactly_what_one_agent_samples(aws: Aws, tmp_path: Path, group_by: str) -> None:
    seed_regions(aws)
    cfg = config(measurement(regions=REGIONS, group_by=group_by))
    sessions = SessionFactory(metrics=Metrics(), clock=SystemClock())  # one set of clients for the four agents: the test is about the split
    whole = spooled(cfg, sessions, tmp_path, Shard(0, 1), "whole")
    parts = [spooled(cfg, sessions, tmp_path, Shard(i, 3), f"part{i}") for i in range(3)]

    assert sum(len(p) for p in parts) == len(whole)  # no record twice
    assert {k: v for p in parts for k, v in p.items()} == whole  # none missing, same values
    if group_by == "resource":
        assert [len(p) for p in parts] == [2, 2, 2]  # one region each, as pinned above
    else:
        assert [len(p) for p in parts] == [0, 0, 2]  # one replica sums each customer over every region
        assert sorted(v[2] for v in whole.values()) == ["303", "33"]


def test_the_cli_takes_a_shard_and_rejects_a_bad_one(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed_regions(aws)
    config_path = write_config(paigo, tmp_path, measurement(regions=REGIONS, group_by="resource"))
    lines: list[str] = []
    for i in range(3):
        done = cli("once", "-c", str(config_path), "--dry-run", "--at", "2026-11-21T10:07:00Z", "--shard", f"{i}/3")
        assert done.returncode == 0, done.stderr
        lines.append(done.stdout)
    regions = [sorted(json.loads(line)["metadata"]["region"] for line in out.splitlines()) for out in lines]
    assert regions == [["eu-west-1"] * 2, ["ap-northeast-1"] * 2, ["us-east-1"] * 2]

    bad = cli("run", "-c", str(config_path), "--shard", "2/2")
    assert bad.returncode == 2
    assert "argument --shard: shard 2/2: expected i/n with n >= 1 and 0 <= i < n, e.g. 0/3" in bad.stderr


def test_same_named_resources_in_each_region_are_split_and_never_merged(aws: Aws, tmp_path: Path) -> None:
    """A per-resource unit is a target, which holds the resource's account and region: prod-db in
    three regions is three records, each sampled by exactly one replica."""
    for i, region in enumerate(REGIONS):
        aws.client("rds", region).create_db_instance(
            DBInstanceIdentifier="prod-db", DBInstanceClass="db.m5.large", Engine="postgres", AllocatedStorage=20 + i,
            MasterUsername="admin", MasterUserPassword="password123", Tags=[{"Key": "customer-id", "Value": "acme"}])
    cfg = config(measurement(resource_type="rds", metric="allocated_storage_gib", regions=REGIONS, group_by="resource"))
    sessions = SessionFactory(metrics=Metrics(), clock=SystemClock())
    whole = spooled(cfg, sessions, tmp_path, Shard(0, 1), "whole")
    parts = [spooled(cfg, sessions, tmp_path, Shard(i, 3), f"part{i}") for i in range(3)]

    assert sorted(whole.values()) == sorted(("acme", f"arn:aws:rds:{region}:123456789012:db:prod-db", str(20 + i))
                                            for i, region in enumerate(REGIONS))
    assert [len(p) for p in parts] == [1, 1, 1]
    assert {k: v for p in parts for k, v in p.items()} == whole
