"""Many customer accounts: ``usage-agent once`` over N assumed-role accounts × 17 regions
(``accounts:`` with external ids, ``regions: all``, file backend) against a bare botocore floor
making the same calls in the same run, both against ``bench.ec2_server``'s AWS of N accounts
on 127.0.0.1, each in a fresh process whose peak RSS is taken; and a daemon's RSS over 100 ticks.

The floor: one botocore session (the EC2 service model is loaded once), per account one
AssumeRole with its external id and one DescribeRegions, then per region a client built
with the account's explicit credentials and a DescribeVolumes paginator; sequential.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench.common import ROOT, Timing, helper_process
from bench.ec2_server import account_id, expected_gib, external_id, role_arn
from bench.sampling import _peak_rss_mb, aws_environment

if TYPE_CHECKING:
    from agent.metrics import Metrics

AT = "2026-01-01T10:30:00Z"
VOLUMES = 10  # per account and region
DAEMON_TICKS = 100


def config(tmp: Path, accounts: int) -> dict[str, Any]:
    """What a vendor with one AWS account per customer runs: every account, every enabled region."""
    return {
        "backend": {"type": "file", "path": str(tmp / "usage.jsonl")},
        "spool": {"path": str(tmp / "spool.db")},
        "server": {"listen": "127.0.0.1:0"},
        "measurements": [{
            "name": "ebs-storage",
            "dimension_id": "ebs-storage-gib",
            "resource_type": "ebs",
            "metric": "size_gib",
            "interval": "1h",
            "regions": "all",
            "accounts": [{"iam_role_arn": role_arn(account_id(i)), "external_id": external_id(account_id(i)),
                          "customer": {"id": f"cust-{account_id(i)}"}} for i in range(accounts)],
        }],
    }


def expected(accounts: int) -> dict[str, int]:
    return {f"cust-{account_id(i)}": expected_gib(account_id(i), VOLUMES) for i in range(accounts)}


@contextmanager
def aws_accounts(accounts: int, latency: float = 0.0) -> Iterator[tuple[dict[str, str], dict[str, Any]]]:
    """The AWS of ``accounts`` customer accounts in its own process; our environment points at it."""
    args = ["--accounts", str(accounts), "--volumes", str(VOLUMES), "--latency", str(latency)]
    with helper_process("bench.ec2_server", *args) as (server, served), aws_environment(server["url"]) as env:
        yield env, served  # the agent's own key is aws_environment's: bench.ec2_server.BASE_KEY


def _child(*args: str) -> tuple[Timing, dict[str, Any]]:
    """``python -m bench.accounts ARGS`` in a fresh process: its wall and CPU, and its last JSON line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.accounts", *args], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.accounts {' '.join(args)} exited {proc.returncode}: {proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Timing(wall, cpu), json.loads(proc.stdout.strip().splitlines()[-1])


def run(sizes: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    """Per size, against one server: the floor, then the agent's ``once``; one run each (the
    floor alone takes minutes at 200 accounts)."""
    out: dict[int, dict[str, Any]] = {}
    for accounts in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-accounts-") as tmp, aws_accounts(accounts) as (_, served):
            path = Path(tmp) / "agent.yaml"
            path.write_text(yaml.safe_dump(config(Path(tmp), accounts)))
            want = expected(accounts)
            floor, floor_got = _child("--floor", str(accounts))
            agent, agent_got = _child("--once", str(path))
            for name, got in (("floor", floor_got), ("agent", agent_got)):
                if got["sums"] != want:
                    wrong = sorted(c for c in want if got["sums"].get(c) != want[c])
                    raise RuntimeError(f"{name} at {accounts} accounts: wrong sums for {len(wrong)} customers, "
                                       f"e.g. {wrong[:3]}")
            out[accounts] = {"agent": agent, "floor": floor, "agent_peak_mb": agent_got["peak_mb"],
                             "floor_peak_mb": floor_got["peak_mb"], "aws_calls": agent_got["aws_calls"]}
        out[accounts]["served"] = dict(served)
    return out


def run_latency(accounts: int, latency: float) -> dict[str, Any]:
    """The same, with every request answered ``latency`` seconds late: AWS as seen from afar."""
    with tempfile.TemporaryDirectory(prefix="bench-accounts-") as tmp, aws_accounts(accounts, latency):
        path = Path(tmp) / "agent.yaml"
        path.write_text(yaml.safe_dump(config(Path(tmp), accounts)))
        floor, floor_got = _child("--floor", str(accounts))
        agent, agent_got = _child("--once", str(path))
        if floor_got["sums"] != expected(accounts) or agent_got["sums"] != expected(accounts):
            raise RuntimeError("wrong sums with latency")
        return {"agent": agent, "floor": floor, "agent_peak_mb": agent_got["peak_mb"],
                "floor_peak_mb": floor_got["peak_mb"]}


def run_daemon(accounts: int, ticks: int) -> dict[str, Any]:
    """RSS of one agent process after each of ``ticks`` ticks (sample, spool, forward)."""
    with tempfile.TemporaryDirectory(prefix="bench-accounts-") as tmp, aws_accounts(accounts):
        path = Path(tmp) / "agent.yaml"
        path.write_text(yaml.safe_dump(config(Path(tmp), accounts)))
        timing, got = _child("--daemon", str(path), str(ticks))
        return {"wall_s": round(timing.wall, 1), **got}


# -- the children ---------------------------------------------------------------------------

def _sums(path: Path) -> dict[str, int]:
    sums: dict[str, int] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        sums[record["customer_id"]] = sums.get(record["customer_id"], 0) + int(record["value"])
    return sums


def _aws_calls(metrics: Metrics) -> dict[str, float]:
    return {f"{s.labels['service']}:{s.labels['operation']}": s.value for metric in metrics.registry.collect()
            if metric.name == "usage_agent_aws_api_calls" for s in metric.samples if s.name.endswith("_total")}


def child_once(config_path: Path) -> None:
    """``usage-agent once`` as the console script runs it, then this process's peak RSS."""
    from agent.cli import Process, main
    from agent.clock import SystemClock
    from agent.metrics import Metrics

    metrics = Metrics()
    code = main(["once", "-c", str(config_path), "--at", AT], Process(metrics, SystemClock()))
    if code != 0:
        raise SystemExit(f"usage-agent once exited {code}")
    document = yaml.safe_load(config_path.read_text())
    print(json.dumps({"peak_mb": round(_peak_rss_mb(), 1), "sums": _sums(Path(document["backend"]["path"])),
                      "aws_calls": _aws_calls(metrics)}))


def child_floor(accounts: int) -> None:
    """The sequential floor over the same accounts (see the module's docstring)."""
    import botocore.session

    session = botocore.session.get_session()
    sts = session.create_client("sts", region_name="us-east-1")
    sums: dict[str, int] = {}
    for i in range(accounts):
        account = account_id(i)
        creds = sts.assume_role(RoleArn=role_arn(account), RoleSessionName="floor",
                                ExternalId=external_id(account))["Credentials"]
        keys = {"aws_access_key_id": creds["AccessKeyId"], "aws_secret_access_key": creds["SecretAccessKey"],
                "aws_session_token": creds["SessionToken"]}
        regions = session.create_client("ec2", region_name="us-east-1", **keys).describe_regions()["Regions"]
        total = 0
        for region in sorted(r["RegionName"] for r in regions):
            ec2 = session.create_client("ec2", region_name=region, **keys)
            for page in ec2.get_paginator("describe_volumes").paginate(PaginationConfig={"PageSize": 500}):
                total += sum(v["Size"] for v in page["Volumes"])
        sums[f"cust-{account}"] = total
    print(json.dumps({"peak_mb": round(_peak_rss_mb(), 1), "sums": sums}))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child_daemon(config_path: Path, ticks: int) -> None:
    """What ``usage-agent run`` does each tick, ``ticks`` times in a row: sample every target,
    spool, forward; the RSS after each tick. The clock moves an hour a tick (the region
    lists are listed again every tick); the credentials keep the real clock."""
    from agent.clock import SystemClock
    from agent.config import load_config
    from agent.credentials import SessionFactory
    from agent.forwarder import Forwarder
    from agent.metrics import Metrics
    from agent.sinks import build_backend
    from agent.spool import Spool
    from agent.telemetry import configure_logging
    from agent.ticks import Agent

    class Hourly(SystemClock):
        def now(self) -> datetime:
            return now[0]

    configure_logging(level="warning")
    cfg = load_config(str(config_path), dict(os.environ))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    now = [start]
    spool = Spool(cfg.spool.path, cfg.spool.max_records)
    spool.claim()
    metrics = Metrics()
    backend = build_backend(cfg.backend, metrics, SystemClock())
    agent = Agent(cfg, SessionFactory(metrics=metrics, clock=SystemClock()), spool, metrics=metrics, clock=Hourly())
    forwarder = Forwarder(spool, backend.sink, backend.client, metrics=metrics, clock=SystemClock())
    rss = []
    for tick in range(ticks):
        now[0] = start + timedelta(hours=tick, minutes=30)
        (result,) = agent.sample_all()
        if not result.ok or len(result.records) != len(cfg.measurements[0].roles()):
            raise SystemExit(f"tick {tick} went wrong: {result.error or result.failed_targets[:3]}")
        forwarder.drain()
        rss.append(round(_rss_mb(), 1))
    agent.close()
    print(json.dumps({"rss_mb": rss, "peak_mb": round(_peak_rss_mb(), 1), "aws_calls": _aws_calls(metrics)}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--once":
        child_once(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "--floor":
        child_floor(int(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--daemon":
        child_daemon(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("usage: python -m bench.accounts --once CONFIG | --floor ACCOUNTS | --daemon CONFIG TICKS")
