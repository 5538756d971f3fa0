"""Kubernetes: one kubernetes_pod tick (list -> effective requests -> spans -> records ->
spool commit) against a bare lightkube loop listing the same pages; and the tick's peak RSS."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, helper_process, interleave, timed

BASE_TICK = datetime(2026, 1, 1, tzinfo=timezone.utc)
TOKEN = "bench-token"


def kubeconfig(url: str, path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "bench",
        "clusters": [{"name": "bench", "cluster": {"server": url}}],
        "users": [{"name": "agent", "user": {"token": TOKEN}}],
        "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "agent"}}]}))
    return path


def build_agent(spool_path: Path, config_path: Path) -> Any:
    from agent.clock import SystemClock
    from agent.config import parse_config
    from agent.credentials import SessionFactory
    from agent.metrics import Metrics
    from agent.spool import Spool
    from agent.ticks import Agent

    cfg = parse_config({
        "backend": {"type": "file", "path": str(spool_path.with_suffix(".jsonl"))},
        "spool": {"path": str(spool_path)},
        "measurements": [{"name": "pod-vcpu-hours", "dimension_id": "dim-vcpu", "resource_type": "kubernetes_pod",
                          "metric": "cpu_request_cores", "mode": "time_weighted", "per": "hour", "interval": "1h",
                          "kubernetes": {"kubeconfig": str(config_path)}, "customer": {"tag": "customer-id"}}],
    }, "<bench>", {})
    metrics, clock = Metrics(), SystemClock()
    return Agent(cfg, SessionFactory(metrics=metrics, clock=clock), Spool(spool_path, max_records=10_000_000),
                 metrics=metrics, clock=clock)


def floor_count(config_path: Path) -> int:
    """The floor: lightkube lists every pod in pages of 500 and counts them, nothing else."""
    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import Pod

    client = Client(KubeConfig.from_file(config_path), trust_env=False)
    try:
        return sum(1 for _ in client.list(Pod, namespace="*", chunk_size=500))
    finally:
        client.close()


def tick_runner(agent: Any, pods: int) -> Any:
    ticks = itertools.count(1)
    m = agent.cfg.measurements[0]

    def tick() -> None:
        result = agent.sample_tick(m, BASE_TICK + timedelta(hours=next(ticks)))
        if not result.ok or result.sampled != pods or result.inserted != len(result.records):
            raise RuntimeError(f"tick went wrong: {result}")

    return tick


def run(pods: int, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-kube-") as tmp, \
            helper_process("bench.kube_server", str(pods)) as (server, served):
        config_path = kubeconfig(server["url"], Path(tmp) / "kubeconfig")
        agent = build_agent(Path(tmp) / "spool.db", config_path)
        tick = tick_runner(agent, pods)

        def floor() -> None:
            if floor_count(config_path) != pods:
                raise RuntimeError("the floor did not see every pod")

        floor()  # warm-up: imports, models
        tick()
        series = interleave(repeats, {"floor": lambda: timed(floor)[0], "agent": lambda: timed(tick)[0]})
        memory = peak_rss(Path(tmp) / "memory.db", config_path, pods)
        agent.close()
        agent.spool.close()
    return {"floor": series["floor"], "agent": series["agent"], "memory": memory, "pages_served": served.get("pages")}


def peak_rss(spool_path: Path, config_path: Path, pods: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-m", "bench.kube", "--one-tick", str(spool_path), str(config_path),
                           str(pods)], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_tick(spool_path: Path, config_path: Path, pods: int) -> None:
    from agent.telemetry import configure_logging
    from bench.sampling import _peak_rss_mb

    configure_logging(level="warning")
    agent = build_agent(spool_path, config_path)
    before = _peak_rss_mb()
    tick_runner(agent, pods)()
    print(json.dumps({"before_tick_mb": round(before, 1), "peak_mb": round(_peak_rss_mb(), 1)}))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--one-tick":
        one_tick(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit("usage: python -m bench.kube --one-tick SPOOL_PATH KUBECONFIG PODS")
