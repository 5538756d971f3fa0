"""paigo_sync: measurements read from the dimensions defined in Paigo, against the Paigo
contract server and moto, through an assumed role with an external id."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from structlog.testing import capture_logs

from agent.clock import SystemClock
from agent.config import parse_config
from agent.credentials import SessionFactory
from agent.daemon import Daemon
from agent.errors import ConfigError
from agent.forwarder import Forwarder
from agent.metrics import Metrics
from agent.paigo_dimensions import DimensionsUnavailable, derive, measurement_name
from agent.paigo_sync import PaigoMeasurements, reader_for
from agent.settings import AgentConfig, Customer, PaigoSync
from agent.sinks import Backend, build_backend
from agent.spool import Spool
from agent.testing.paigo_server import Fault, PaigoContractServer, example_dimension
from agent.testing.server import Answer
from agent.ticks import Agent
from tests.conftest import (CLIENT_ID, CLIENT_SECRET, EXTERNAL_ID, ROLE_ARN, Aws, measurement,
                            write_yaml)
from tests.support import FakeClock, cli, drain_on

EAST, WEST = "11111111-1111-4111-8111-111111111111", "22222222-2222-4222-8222-222222222222"
AGENT_BASED, AZURE = "33333333-3333-4333-8333-333333333333", "44444444-4444-4444-8444-444444444444"
LATER = "55555555-5555-4555-8555-555555555555"
AT, NEXT = "2026-11-21T10:07:30Z", "2026-11-21T11:07:30Z"  # inside the hourly ticks 10:00 and 11:00
TEN = 1_795_255_200.0  # 2026-11-21T10:00:00Z
SYNC = {"refresh": "5m", "customer": {"tag": "customer-id", "untagged": "skip"}, "group_by": "customer"}


def ebs(dimension_id: str, region: str, **extra: Any) -> dict[str, Any]:
    return example_dimension(dimension_id, "ebs", region, role=ROLE_ARN, external_id=EXTERNAL_ID, **extra)


def publish(paigo: PaigoContractServer) -> None:
    """Two EBS dimensions through the role, an agentBased one and an Azure one."""
    paigo.add_dimension(ebs(EAST, "us-east-1", name="EBS east"))
    paigo.add_dimension(ebs(WEST, "eu-west-1", name="EBS west"))
    paigo.add_dimension(example_dimension(AGENT_BASED, mode="agentBased", name="Pods"))
    paigo.add_dimension(example_dimension(AZURE, "ebs", "eastus", cloud="azure", name="Azure disks"))


def seed(aws: Aws) -> None:
    aws.volume("us-east-1", 100, "gp3", {"customer-id": "acme"})
    aws.volume("us-east-1", 7, "gp2", {"customer-id": "acme"})
    aws.volume("eu-west-1", 500, "gp3", {"customer-id": "globex"})
    aws.volume("eu-west-1", 20, "gp3", {"customer-id": "acme"})
    aws.volume("eu-west-1", 30, "gp2")  # untagged: skipped


def document(paigo: PaigoContractServer, tmp_path: Path, *measurements: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"backend": {"type": "paigo", "url": paigo.url, "token_url": paigo.token_url,
                        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            "spool": {"path": str(tmp_path / "spool.db")}, "server": {"listen": "127.0.0.1:0"},
            "paigo_sync": SYNC, **({"measurements": list(measurements)} if measurements else {}), **top}


def usage_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args)  # in-process: these commands need no process of their own


def delivered(paigo: PaigoContractServer) -> dict[tuple[str, str, str], str]:
    return {(b["dimensionId"], b["customerId"], b["timestamp"]): b["recordValue"] for b in paigo.accepted}


# -- the whole path, as a user runs it --------------------------------------------------------


def test_validate_and_once_meter_the_dimensions_and_a_dimension_added_at_the_next_once(
        aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed(aws)
    aws.volume("us-west-2", 12, "gp3", {"customer-id": "initech"})
    publish(paigo)
    config = write_yaml(tmp_path / "agent.yaml", document(paigo, tmp_path))

    checked = usage_agent("validate", "-c", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "0 measurement(s), and those of the Paigo dimensions, read every 300s" in checked.stdout

    done = usage_agent("once", "-c", str(config), "--at", AT)
    assert done.returncode == 0, done.stderr
    assert delivered(paigo) == {
        (EAST, "acme", "2026-11-21T10:00:00Z"): "107",
        (WEST, "globex", "2026-11-21T10:00:00Z"): "500",
        (WEST, "acme", "2026-11-21T10:00:00Z"): "20",
    }
    assert {(r.role_arn, r.external_id) for r in aws.assumed_roles()} == {(ROLE_ARN, EXTERNAL_ID)}
    skipped = [json.loads(line) for line in done.stderr.splitlines() if "Paigo dimension not metered" in line]
    assert {s["dimension"]: s["reason"] for s in skipped} == {
        AGENT_BASED: "measurementMode agentBased: the agent meters infrastructureBased ones only",
        AZURE: "cloudPlatform azure: the agent meters aws only",
    }

    paigo.add_dimension(ebs(LATER, "us-west-2", name="EBS Oregon"))
    again = usage_agent("once", "-c", str(config), "--at", NEXT)
    assert again.returncode == 0, again.stderr
    assert {k: v for k, v in delivered(paigo).items() if k[2] == "2026-11-21T11:00:00Z"} == {
        (EAST, "acme", "2026-11-21T11:00:00Z"): "107",
        (WEST, "globex", "2026-11-21T11:00:00Z"): "500",
        (WEST, "acme", "2026-11-21T11:00:00Z"): "20",
        (LATER, "initech", "2026-11-21T11:00:00Z"): "12",
    }


def test_once_meters_the_kept_set_when_paigo_is_down_and_fails_without_one(
        aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed(aws)
    publish(paigo)
    config = write_yaml(tmp_path / "agent.yaml", document(paigo, tmp_path))
    assert usage_agent("once", "-c", str(config), "--at", AT).returncode == 0
    paigo.script("/dimensions", Fault(status=503), Fault(status=503))
    down = usage_agent("once", "-c", str(config), "--at", NEXT)
    assert down.returncode == 0, down.stderr
    assert "metering the dimensions kept in the spool" in down.stderr
    assert {k: v for k, v in delivered(paigo).items() if k[2] == "2026-11-21T11:00:00Z"} == {
        (EAST, "acme", "2026-11-21T11:00:00Z"): "107", (WEST, "globex", "2026-11-21T11:00:00Z"): "500",
        (WEST, "acme", "2026-11-21T11:00:00Z"): "20"}
    fresh = write_yaml(tmp_path / "fresh.yaml", document(paigo, tmp_path) | {"spool": {"path": str(tmp_path / "new.db")}})
    never = usage_agent("once", "-c", str(fresh), "--at", NEXT)
    assert never.returncode == 1 and "no dimensions were ever read from Paigo" in never.stderr


def test_paigo_sync_prints_measurements_that_validate_when_pasted_and_the_skipped_ones(
        paigo: PaigoContractServer, tmp_path: Path) -> None:
    publish(paigo)
    paigo.add_dimension(example_dimension("pods", "k8spod", role=ROLE_ARN, interval="day"))
    config = write_yaml(tmp_path / "agent.yaml", document(paigo, tmp_path))
    done = usage_agent("paigo-sync", "-c", str(config))
    assert done.returncode == 0, done.stderr

    printed = yaml.safe_load(done.stdout)["measurements"]
    assert [(m["name"], m["dimension_id"], m["regions"], m["interval"]) for m in printed] == [
        (f"paigo-{EAST}", EAST, ["us-east-1"], "1h"), (f"paigo-{WEST}", WEST, ["eu-west-1"], "1h")]
    assert printed[0]["iam_role_arn"] == ROLE_ARN and printed[0]["external_id"] == EXTERNAL_ID
    pasted = document(paigo, tmp_path, *printed)
    del pasted["paigo_sync"]
    cfg = parse_config(pasted, "<pasted>", {})
    assert [m.name for m in cfg.measurements] == [f"paigo-{EAST}", f"paigo-{WEST}"]
    assert f"# skipped {AGENT_BASED} (Pods): measurementMode agentBased" in done.stdout
    assert f"# skipped {AZURE} (Azure disks): cloudPlatform azure" in done.stdout
    assert "# skipped pods (EBS Usage): resourceType k8spod: a Kubernetes pod measurement needs a kubeconfig" in done.stdout


def test_paigo_sync_exits_1_when_paigo_cannot_be_read_and_2_without_paigo_sync(
        paigo: PaigoContractServer, tmp_path: Path) -> None:
    paigo.script("/dimensions", Fault(status=503))
    config = write_yaml(tmp_path / "agent.yaml", document(paigo, tmp_path))
    down = usage_agent("paigo-sync", "-c", str(config))
    assert down.returncode == 1
    assert f"Paigo's dimensions could not be read: {paigo.url}/dimensions answered 503" in down.stderr
    plain = document(paigo, tmp_path, measurement())
    del plain["paigo_sync"]
    unsynced = usage_agent("paigo-sync", "-c", str(write_yaml(tmp_path / "plain.yaml", plain)))
    assert unsynced.returncode == 2 and "no paigo_sync section" in unsynced.stderr


def test_iam_policy_from_paigo_covers_the_roles_and_resource_types_of_the_dimensions(
        paigo: PaigoContractServer, tmp_path: Path) -> None:
    other = "arn:aws:iam::210987654321:role/paigo-scraper"
    paigo.add_dimension(ebs(EAST, "us-east-1"))
    paigo.add_dimension(example_dimension(LATER, "ebssnapshot", "us-east-1", role=other, external_id="ext-other"))
    config = write_yaml(tmp_path / "agent.yaml", document(paigo, tmp_path))
    without = usage_agent("iam-policy", "-c", str(config), "--principal", "arn:aws:iam::111111111111:role/agent")
    assert without.returncode == 0 and json.loads(without.stdout)["roles"] == []
    done = usage_agent("iam-policy", "-c", str(config), "--from-paigo", "--principal", "arn:aws:iam::111111111111:role/agent")
    assert done.returncode == 0, done.stderr
    roles = {r["role_arn"]: r for r in json.loads(done.stdout)["roles"]}
    assert set(roles) == {ROLE_ARN, other}
    assert roles[ROLE_ARN]["external_ids"] == [EXTERNAL_ID] and roles[other]["external_ids"] == ["ext-other"]
    assert "ec2:DescribeVolumes" in json.dumps(roles[ROLE_ARN]["permission_policy"])
    assert "ec2:DescribeSnapshots" in json.dumps(roles[other]["permission_policy"])


# -- the daemon's refreshes, on injected time -----------------------------------------------


@dataclass
class Parts:
    cfg: AgentConfig
    spool: Spool
    backend: Backend
    sync: PaigoMeasurements
    agent: Agent
    metrics: Metrics
    clock: FakeClock


@pytest.fixture
def build(paigo: PaigoContractServer, tmp_path: Path) -> Iterator[Any]:
    made: list[Parts] = []

    def make(*measurements: dict[str, Any], clock: FakeClock | None = None) -> Parts:
        cfg = parse_config(document(paigo, tmp_path, *measurements), "<test>", {})
        metrics, fake = Metrics(), clock or FakeClock()
        spool = Spool(cfg.spool.path, clock=fake, metrics=metrics)
        spool.claim()
        backend = build_backend(cfg.backend, metrics, fake)
        sync = PaigoMeasurements(cfg, reader_for(cfg, backend, metrics), spool, metrics=metrics, clock=fake)
        sync.refresh()
        # AWS credentials expire on real time: the agent's own clock stays the system's
        agent = Agent(sync.config(cfg), SessionFactory(metrics=metrics, clock=SystemClock()), spool,
                      metrics=metrics, clock=SystemClock())
        made.append(Parts(cfg, spool, backend, sync, agent, metrics, fake))
        return made[-1]

    yield make
    for p in made:
        p.agent.close()
        p.backend.close()
        p.spool.close()


def names(measurements: Any) -> set[str]:
    return {m.name for m in measurements}


def test_the_daemon_samples_a_dimension_added_and_stops_one_removed_from_the_next_tick(
        aws: Aws, paigo: PaigoContractServer, build: Any) -> None:
    seed(aws)
    aws.volume("us-west-2", 12, "gp3", {"customer-id": "initech"})
    publish(paigo)
    p = build(clock=FakeClock(TEN))
    forwarder = Forwarder(p.spool, p.backend.sink, p.backend.client, metrics=p.metrics, clock=p.clock)
    daemon = Daemon(p.agent, forwarder, p.backend, metrics=p.metrics, clock=p.clock, sync=p.sync)
    jobs = {job.id for job in daemon.scheduler.get_jobs()}
    assert {f"sample:paigo-{EAST}", f"sample:paigo-{WEST}", "paigo-sync"} <= jobs
    assert daemon.scheduler.get_job("paigo-sync").trigger.interval == timedelta(minutes=5)
    daemon._sample_job(daemon._by_job[f"sample:paigo-{EAST}"])

    paigo.remove_dimension(EAST)
    paigo.add_dimension(ebs(LATER, "us-west-2"))
    p.clock.advance(300)
    daemon.refresh_measurements()
    sampled = {job.id for job in daemon.scheduler.get_jobs() if job.id.startswith("sample:")}
    assert sampled == {f"sample:paigo-{WEST}", f"sample:paigo-{LATER}"}
    assert names(p.agent.measurements) == {f"paigo-{WEST}", f"paigo-{LATER}"}
    p.clock.advance(3600)
    daemon._sample_job(daemon._by_job[f"sample:paigo-{LATER}"])
    daemon.refresh_measurements()  # nothing changed: the jobs stay as they are
    assert {job.id for job in daemon.scheduler.get_jobs() if job.id.startswith("sample:")} == sampled
    ready = {c.name: c for c in daemon.health.readiness()}
    assert ready["paigo_sync"].ok and f"tick:paigo-{LATER}" in ready and f"tick:paigo-{EAST}" not in ready

    drain_on(forwarder, p.spool, p.clock, rounds=10)
    assert delivered(paigo) == {
        (EAST, "acme", "2026-11-21T10:00:00Z"): "107",  # spooled before the removal: still delivered
        (LATER, "initech", "2026-11-21T11:00:00Z"): "12",
    }


def test_paigo_unreachable_keeps_the_last_set_and_readiness_fails_after_three_refreshes(
        aws: Aws, paigo: PaigoContractServer, build: Any) -> None:
    publish(paigo)
    p = build()
    before = p.sync.measurements
    paigo.script("/dimensions", *[Fault(status=503)] * 4)
    for _ in range(3):
        p.clock.advance(300)
        assert p.sync.refresh() == before
        check = p.sync.check()
        assert check.ok, check.detail
    assert p.metrics.value("usage_agent_paigo_sync_failures_total") == 3
    p.clock.advance(1)
    check = p.sync.check()
    assert not check.ok
    assert "2 measurement(s)" in check.detail and "the limit is three refreshes (900s)" in check.detail
    assert f"the last read failed: {paigo.url}/dimensions answered 503" in check.detail
    p.clock.advance(299)
    p.sync.refresh()  # the fourth failure
    assert not p.sync.check().ok
    p.sync.refresh()  # Paigo back
    assert p.sync.check().ok and p.sync.failure is None


def test_a_restart_during_a_paigo_outage_meters_the_set_kept_in_the_spool(
        aws: Aws, paigo: PaigoContractServer, build: Any) -> None:
    seed(aws)
    publish(paigo)
    first = build()
    first.spool.close()  # the process ends
    first.backend.close()
    paigo.script("/dimensions", Fault(status=502), Fault(drop=True))
    with capture_logs() as logs:
        restarted = build(clock=FakeClock(first.clock.time() + 60))
    assert names(restarted.agent.measurements) == {f"paigo-{EAST}", f"paigo-{WEST}"}
    assert any(e["event"] == "metering the dimensions kept in the spool" for e in logs)
    assert restarted.sync.check().ok  # read a minute ago, by the process before
    result = restarted.agent.sample_tick(restarted.agent.measurements[0], restarted.clock.now())
    assert result.ok and {r.customer_id: r.value for r in result.records} == {"acme": 107}
    restarted.sync.refresh()  # the outage goes on: the kept set stays
    assert names(restarted.sync.measurements) == {f"paigo-{EAST}", f"paigo-{WEST}"}


def test_a_yaml_measurement_of_the_same_dimension_wins_logged_once(paigo: PaigoContractServer, build: Any) -> None:
    publish(paigo)
    with capture_logs() as logs:
        p = build(measurement(name="ebs-yaml", dimension_id=EAST, interval="15m"))
        p.sync.refresh()
    assert names(p.sync.measurements) == {"ebs-yaml", f"paigo-{WEST}"}
    wins = [e for e in logs if e["event"] == "Paigo dimension metered by the YAML's measurement, which wins"]
    assert [(e["dimension"], e["measurement"]) for e in wins] == [(EAST, "ebs-yaml")]
    skipped = [e for e in logs if e["event"] == "Paigo dimension not metered"]
    assert len(skipped) == 4  # agentBased and Azure, at each of the two refreshes
    assert p.metrics.value("usage_agent_paigo_dimensions_skipped_total", {"reason": "mode"}) == 2
    assert p.metrics.value("usage_agent_paigo_dimensions_skipped_total", {"reason": "cloud"}) == 2


def test_record_ids_do_not_change_between_refreshes_or_when_a_dimension_is_renamed(
        aws: Aws, paigo: PaigoContractServer, build: Any) -> None:
    seed(aws)
    publish(paigo)
    p = build()
    (east,) = [m for m in p.agent.measurements if m.dimension_id == EAST]
    ids = {r.record_id for r in p.agent.collect(east, p.clock.now()).records}
    paigo.add_dimension(ebs(EAST, "us-east-1", name="EBS east, renamed"))
    p.sync.refresh()
    (again,) = [m for m in p.sync.measurements if m.dimension_id == EAST]
    assert again == east and again.name == measurement_name(EAST) == f"paigo-{EAST}"
    assert {r.record_id for r in p.agent.collect(again, p.clock.now()).records} == ids and len(ids) == 1


# -- derivation, config and the contract ----------------------------------------------------


SYNCED = PaigoSync(timedelta(minutes=5), Customer(None, "customer-id", "skip"), "customer")


@pytest.mark.parametrize(("dimension", "expected"), [
    (example_dimension("d", "ebs", interval="day", role=ROLE_ARN), ("ebs", "size_gib", 86400)),
    (example_dimension("d", "ebssnapshot", interval="month", role=ROLE_ARN), ("ebs_snapshot", "size_gib", 86400)),
    (example_dimension("d", "ec2", interval="none", role=ROLE_ARN), ("ec2", "count", 3600)),
    ({k: v for k, v in example_dimension("d", role=ROLE_ARN).items() if k != "aggregationInterval"},
     ("ebs", "size_gib", 3600)),  # the reference's default: hour
])
def test_a_dimension_becomes_a_gauge_of_its_type_s_default_metric(dimension: dict[str, Any], expected: Any) -> None:
    (m,) = derive([dimension], SYNCED).measurements
    assert (m.resource_type, m.metric, m.interval_seconds) == expected
    assert m.mode == "gauge" and m.regions == ("us-east-1",) and m.iam_role_arn == ROLE_ARN
    assert m.customer == SYNCED.customer and m.external_id == "123456789"


@pytest.mark.parametrize(("dimension", "kind", "reason"), [
    (example_dimension("d", "ec2egress", role=ROLE_ARN), "resource_type", "resourceType ec2egress: the agent has no"),
    (example_dimension("d", "rds", role=ROLE_ARN), "resource_type", "resourceType rds is not one the agent meters"),
    (example_dimension("d", role=None), "role", "no iamRoleArn"),
    (example_dimension("d", "ebs", "mars-1", role=ROLE_ARN), "invalid", "region: 'mars-1' is not an AWS region"),
    (example_dimension("d", role=ROLE_ARN, external_id="x"), "invalid", "externalId: Value should have at least 2"),
    (example_dimension("d", role=ROLE_ARN, interval="week"), "invalid", "aggregationInterval week is not one of"),
    ({"dimensionId": "d", "dimensionName": "API calls"}, "no_measurement", "no measurement is attached"),
])
def test_a_dimension_the_agent_cannot_meter_is_skipped_with_its_reason(dimension: dict[str, Any], kind: str,
                                                                       reason: str) -> None:
    derived = derive([dimension], SYNCED)
    assert derived.measurements == ()
    (skip,) = derived.skipped
    assert (skip.dimension, skip.kind) == ("d", kind) and skip.reason.startswith(reason), skip.reason


def test_names_are_stable_distinct_and_valid_for_any_dimension_id() -> None:
    ids = ["8a7b5f91-3b85-4cf4-8585-dcdf17f49004", "Dim_A", "dim-a", "dim_a", "x" * 200, "///"]
    found = {i: measurement_name(i) for i in ids}
    assert len(set(found.values())) == len(ids)
    assert all(len(n) <= 63 and n.startswith("paigo-") and "--" not in n for n in found.values())
    assert found[ids[0]] == f"paigo-{ids[0]}" and measurement_name("Dim_A") == found["Dim_A"]


def test_config_paigo_sync_needs_the_paigo_backend_and_makes_measurements_optional(
        paigo: PaigoContractServer, tmp_path: Path) -> None:
    cfg = parse_config(document(paigo, tmp_path), "<t>", {})
    assert cfg.measurements == () and cfg.paigo_sync == PaigoSync(timedelta(minutes=5), SYNCED.customer, "customer")
    assert parse_config(document(paigo, tmp_path, measurements=[]), "<t>", {}).measurements == ()
    other = document(paigo, tmp_path) | {"backend": {"type": "file", "path": str(tmp_path / "out.jsonl")}}
    with pytest.raises(ConfigError) as refused:
        parse_config(other, "agent.yaml", {})
    assert refused.value.problems == [("paigo_sync", "needs backend.type: paigo (the dimensions are read from "
                                                     "Paigo with its token), got backend.type: file")]
    fast = document(paigo, tmp_path) | {"paigo_sync": SYNC | {"refresh": "30s"}}
    with pytest.raises(ConfigError, match="paigo_sync.refresh: .*at least 1m"):
        parse_config(fast, "agent.yaml", {})
    unsynced = document(paigo, tmp_path)
    del unsynced["paigo_sync"]
    with pytest.raises(ConfigError, match="measurements: at least 1 item is needed"):
        parse_config(unsynced, "agent.yaml", {})
    with pytest.raises(ConfigError, match=r"paigo_sync.customer: .*required"):
        parse_config(document(paigo, tmp_path) | {"paigo_sync": {"refresh": "5m"}}, "agent.yaml", {})


def test_the_contract_server_lists_dimensions_and_measurements_behind_the_token(paigo: PaigoContractServer) -> None:
    publish(paigo)
    assert httpx.get(f"{paigo.url}/dimensions").status_code == 401
    token = httpx.post(paigo.token_url, json={"audience": paigo.audience, "grant_type": "client_credentials",
                                              "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}).json()
    auth = {"Authorization": f"Bearer {token['access_token']}"}
    listed = httpx.get(f"{paigo.url}/dimensions", headers=auth).json()
    assert [d["dimensionId"] for d in listed["data"]] == [EAST, WEST, AGENT_BASED, AZURE]
    assert set(listed) == {"message", "data"}
    measurements = httpx.get(f"{paigo.url}/measurements", headers=auth).json()["data"]
    assert measurements[0]["measurementConfiguration"]["resourceType"] == "ebs" and len(measurements) == 4
    paigo.remove_dimension(AZURE)
    assert len(httpx.get(f"{paigo.url}/dimensions", headers=auth).json()["data"]) == 3


@pytest.mark.parametrize(("fault", "reason"), [
    (Fault(padding=9 * 2**20), "answered more than 8388608 bytes"),
    (Fault(answer=Answer(200, raw=b"<html>maintenance</html>", content_type="text/html")),
     'not a JSON object with a "data" array'),
    (Fault(answer=Answer(302, headers={"Location": "https://elsewhere.example/dimensions"})), "redirects are not followed"),
    (Fault(status=429), "answered 429"),
])
def test_an_answer_that_is_not_a_dimension_list_is_a_failed_read(paigo: PaigoContractServer, tmp_path: Path,
                                                                  fault: Fault, reason: str) -> None:
    cfg = parse_config(document(paigo, tmp_path), "<t>", {})
    metrics = Metrics()
    backend = build_backend(cfg.backend, metrics, FakeClock())
    paigo.script("/dimensions", fault)
    try:
        with pytest.raises(DimensionsUnavailable, match=reason):
            reader_for(cfg, backend, metrics).read()
    finally:
        backend.close()


def test_a_revoked_token_is_replaced_once_through_the_sink_s_token(paigo: PaigoContractServer, build: Any) -> None:
    publish(paigo)
    p = build()
    assert paigo.token_requests == 1
    paigo.revoke_tokens()
    paigo.add_dimension(ebs(LATER, "us-west-2"))
    p.sync.refresh()
    assert p.sync.failure is None and f"paigo-{LATER}" in names(p.sync.measurements)
    assert paigo.token_requests == 2 and p.backend.sink.token.fetches == 2  # the sink's cache, not a second one


def test_a_kept_set_that_cannot_be_read_leaves_the_yaml_measurements(paigo: PaigoContractServer, build: Any,
                                                                      tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    spool.keep("paigo_sync.dimensions", '{"read_at": "2026-11-21T10:00:00Z", "dimensions": {"not": "a list"}}')
    spool.close()
    paigo.script("/dimensions", Fault(status=503))
    with capture_logs() as logs:
        p = build(measurement(name="ebs-yaml"))
    assert names(p.agent.measurements) == {"ebs-yaml"} and p.sync.read_at is None
    assert any(e["event"] == "the dimensions kept in the spool cannot be read" for e in logs)
