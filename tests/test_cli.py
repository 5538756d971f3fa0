"""The CLI as a user runs it: its commands in-process (tests.support.cli), the daemon a real `usage-agent`
process; moto server, Paigo-contract server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import jsonschema

from agent.spool import Spool
from agent.testing.paigo_server import Fault, PaigoContractServer, usage_record_schema
from tests.conftest import DIMENSION, Aws, agent_command, measurement, write_config
from tests.support import cli, wait_for

AT = "2026-11-21T10:07:30Z"  # inside the 15-minute tick 10:00-10:15, so T = 10:00


def seed(aws: Aws) -> None:
    aws.volume("us-east-1", 100, "gp3", {"customer-id": "acme"})
    aws.volume("us-east-1", 7, "gp2", {"customer-id": "acme"})
    aws.volume("eu-west-1", 500, "gp3", {"customer-id": "globex"})
    aws.volume("eu-west-1", 30, "gp2")  # untagged: skipped


def test_once_delivers_hand_computed_records(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed(aws)
    config = write_config(
        paigo, tmp_path,
        measurement(name="ebs-storage", regions=["us-east-1", "eu-west-1"]),
        measurement(name="ebs-gib-hours", mode="time_weighted", per="hour", dimension_id="dim-hours",
                    regions=["us-east-1", "eu-west-1"]),
    )
    done = cli("once", "-c", str(config), "--at", AT)
    assert done.returncode == 0, done.stderr

    got = {(b["dimensionId"], b["customerId"]): b for b in paigo.accepted}
    assert {k: (b["recordValue"], b["timestamp"]) for k, b in got.items()} == {
        (DIMENSION, "acme"): ("107", "2026-11-21T10:00:00Z"),
        (DIMENSION, "globex"): ("500", "2026-11-21T10:00:00Z"),
        ("dim-hours", "acme"): ("26.75", "2026-11-21T10:00:00Z"),  # 107 GiB x 15 min
        ("dim-hours", "globex"): ("125", "2026-11-21T10:00:00Z"),
    }
    acme = got[(DIMENSION, "acme")]["metadata"]
    assert acme["regions"] == "us-east-1" and acme["resource_count"] == "2" and len(acme["recordId"]) == 32
    assert "untagged" not in done.stdout and "resource has no customer tag" in done.stderr
    assert "s3cr3t" not in done.stderr  # the client secret is never logged


def test_rerunning_the_same_tick_sends_nothing_new(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed(aws)
    config = write_config(paigo, tmp_path, measurement(regions=["us-east-1", "eu-west-1"]))
    assert cli("once", "-c", str(config), "--at", AT).returncode == 0
    first = paigo.usage_requests
    again = cli("once", "-c", str(config), "--at", "2026-11-21T10:14:59Z")
    assert again.returncode == 0, again.stderr
    assert paigo.usage_requests == first == 2
    spool = Spool(tmp_path / "spool.db")
    assert spool.counts()["delivered"] == 2
    spool.close()


def test_dry_run_prints_valid_bodies_and_writes_and_sends_nothing(
    aws: Aws, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    seed(aws)
    config = write_config(paigo, tmp_path, measurement(regions=["us-east-1", "eu-west-1"], group_by="resource"))
    done = cli("once", "-c", str(config), "--at", AT, "--dry-run")
    assert done.returncode == 0, done.stderr

    bodies = [json.loads(line) for line in done.stdout.splitlines()]
    validator = jsonschema.Draft7Validator(usage_record_schema())
    for body in bodies:
        validator.validate(body)
    assert sorted(b["recordValue"] for b in bodies) == ["100", "500", "7"]
    assert paigo.usage_requests == 0 and paigo.token_requests == 0
    assert not (tmp_path / "spool.db").exists()


def test_once_exits_1_when_a_record_is_rejected(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed(aws)
    paigo.reject = lambda body: body["customerId"] == "globex"
    config = write_config(paigo, tmp_path, measurement(regions=["us-east-1", "eu-west-1"]))
    done = cli("once", "-c", str(config), "--at", AT)
    assert done.returncode == 1
    assert {b["customerId"] for b in paigo.accepted} == {"acme"}
    assert "record dead-lettered" in done.stderr


def test_once_exits_1_when_the_backend_stays_down(aws: Aws, paigo: PaigoContractServer, tmp_path: Path) -> None:
    seed(aws)
    paigo.script("/usage", *[Fault(status=503, retry_after="0") for _ in range(10_000)])  # outlasts --timeout
    config = write_config(paigo, tmp_path, measurement(regions=["us-east-1"]))
    done = cli("once", "-c", str(config), "--at", AT, "--timeout", "1s")
    assert done.returncode == 1
    spool = Spool(tmp_path / "spool.db")
    assert spool.counts()["pending"] == 1  # kept for the next run, not dropped
    spool.close()


def test_invalid_config_exits_2_for_every_command(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("backend: {type: paigo}\nmeasurements: []\n")
    for command in (["validate"], ["once"], ["once", "--dry-run"], ["run"], ["iam-policy"]):
        done = cli(*command, "-c", str(config))
        assert done.returncode == 2, command
        assert "backend.client_id: required key is missing" in done.stderr


def test_daemon_samples_on_aligned_ticks_and_stops_cleanly_on_sigterm(
    aws: Aws, paigo: PaigoContractServer, tmp_path: Path
) -> None:
    aws.volume("us-east-1", 12, tags={"customer-id": "acme"})
    config = write_config(paigo, tmp_path, measurement(interval="1s", mode="time_weighted", per="second"))
    daemon = subprocess.Popen([*agent_command(), "run", "-c", str(config)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        wait_for(lambda: len(paigo.accepted) >= 2, timeout=20.0)
        # the next send hangs for a while: SIGTERM must wait for it, not abandon it
        paigo.script("/usage", Fault(delay=1.0))
        wait_for(lambda: paigo.in_flight > 0, timeout=20.0)
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    finally:
        daemon.kill()
    assert daemon.returncode == 0, stderr
    assert "agent stopped" in stderr
    assert all(b["recordValue"] == "12" for b in paigo.accepted)  # 12 GiB x 1 s, in GiB-seconds
    assert all(b["timestamp"].endswith("Z") for b in paigo.accepted)

    spool = Spool(tmp_path / "spool.db")
    counts = spool.counts()
    spool.close()
    assert counts["leased"] == 0
    assert counts["delivered"] == len(paigo.accepted_ids())  # the in-flight send was finished and acked
