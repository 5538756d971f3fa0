"""Sampling: one full tick (sample -> convert -> spool commit) against a bare boto3 paginator
loop, both reading the same pre-rendered DescribeVolumes pages; and the tick's peak memory."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bench.common import ROOT, helper_process, interleave, timed

BASE_TICK = datetime(2026, 1, 1, tzinfo=timezone.utc)


@contextmanager
def aws_environment(endpoint: str) -> Iterator[dict[str, str]]:
    """Point botocore at the endpoint the way the agent is pointed at AWS: AWS_ENDPOINT_URL."""
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {name: os.environ.get(name) for name in (*env, "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")  # one per size; the server holds each size in its own region


def measurement(region: str) -> dict[str, Any]:
    """The README's EBS example on the agent's own identity: GiB per customer, from a tag."""
    return {
        "name": f"ebs-{region}",
        "dimension_id": "8a7b5f91-3b85-4cf4-8585-dcdf17f49004",
        "resource_type": "ebs",
        "metric": "size_gib",
        "mode": "gauge",
        "interval": "1h",
        "regions": [region],
        "customer": {"tag": "customer-id"},
        "group_by": "customer",
        "metadata": {"environment": "prod"},
    }


def build_agent(spool_path: Path, regions: tuple[str, ...]) -> Any:
    """The agent as the CLI wires it, with one measurement per region."""
    from agent.clock import SystemClock
    from agent.config import parse_config
    from agent.credentials import SessionFactory
    from agent.metrics import Metrics
    from agent.spool import Spool
    from agent.ticks import Agent

    cfg = parse_config(
        {
            "backend": {"type": "paigo", "url": "http://127.0.0.1:9", "client_id": "bench", "client_secret": "bench"},
            "spool": {"path": str(spool_path)},
            "measurements": [measurement(region) for region in regions],
        },
        "<bench>",
        {},
    )
    metrics, clock = Metrics(), SystemClock()
    return Agent(cfg, SessionFactory(metrics=metrics, clock=clock), Spool(spool_path, max_records=10_000_000),
                 metrics=metrics, clock=clock)


def floor_count(ec2: Any) -> int:
    """The floor: list every volume through the paginator, count them, nothing else."""
    count = 0
    for page in ec2.get_paginator("describe_volumes").paginate(PaginationConfig={"PageSize": 500}):
        count += len(page["Volumes"])
    return count


def tick_runner(agent: Any, m: Any, volumes: int) -> Any:
    ticks = itertools.count(1)

    def tick() -> None:
        # a new tick each run: its records are new rows, as in the daemon
        result = agent.sample_tick(m, BASE_TICK + timedelta(hours=next(ticks)))
        if not result.ok or result.sampled != volumes or result.inserted != len(result.records):
            raise RuntimeError(f"tick went wrong: {result}")

    return tick


def run(sizes: tuple[int, ...], repeats: dict[int, int]) -> dict[int, dict[str, Any]]:
    import boto3

    regions = dict(zip(sizes, REGIONS))
    out: dict[int, dict[str, Any]] = {}
    datasets = [f"{region}={size}" for size, region in regions.items()]
    with tempfile.TemporaryDirectory(prefix="bench-sampling-") as tmp, \
            helper_process("bench.ec2_server", *datasets) as (server, served), \
            aws_environment(server["url"]):
        agent = build_agent(Path(tmp) / "spool.db", tuple(regions.values()))
        for size, region in regions.items():
            m = next(m for m in agent.cfg.measurements if m.regions == (region,))
            ec2 = boto3.client("ec2", region_name=region)
            tick = tick_runner(agent, m, size)

            def floor(ec2: Any = ec2, size: int = size) -> None:
                if floor_count(ec2) != size:
                    raise RuntimeError("the floor did not see every volume")

            if size == min(sizes):  # warm-up: service model loaded, account looked up
                floor()
                tick()
            else:  # the clients alone (a full 100k warm-up would only add minutes)
                ec2.get_paginator("describe_volumes")
                agent.sessions.client("ec2", region, None, None)
            series = interleave(repeats[size], {"floor": lambda: timed(floor)[0], "agent": lambda: timed(tick)[0]})
            out[size] = {"floor": series["floor"], "agent": series["agent"],
                         "memory": peak_rss(Path(tmp) / f"memory-{size}.db", region, size)}
        agent.close()
        agent.spool.close()
    for size, region in regions.items():
        out[size]["pages_served"] = served.get(region)
    return out


def peak_rss(spool_path: Path, region: str, volumes: int) -> dict[str, float]:
    """Peak RSS of a fresh process that runs one tick (the endpoint comes from our environment)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sampling", "--one-tick", str(spool_path), region, str(volumes)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's RSS high-water mark. ru_maxrss is not used: a child started with vfork
    inherits its parent's high-water mark at exec, VmHWM belongs to our own address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one_tick(spool_path: Path, region: str, volumes: int) -> None:
    """Child process: import, build, one tick; report the peak RSS before and after it."""
    from agent.telemetry import configure_logging

    configure_logging(level="warning")
    agent = build_agent(spool_path, (region,))
    before = _peak_rss_mb()
    tick_runner(agent, agent.cfg.measurements[0], volumes)()
    print(json.dumps({"before_tick_mb": round(before, 1), "peak_mb": round(_peak_rss_mb(), 1)}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one-tick":
        one_tick(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit("usage: python -m bench.sampling --one-tick SPOOL_PATH REGION VOLUMES")
