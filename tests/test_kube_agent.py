"""kubernetes_pod through the CLI (validate, once --at T, a re-run) and in the daemon's
shape: a watch between ticks, state committed with each tick, a restart that remembers."""

from __future__ import annotations

import json
import subprocess
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from structlog.testing import capture_logs

from agent.config import parse_config
from agent.credentials import SessionFactory
from agent.metrics import Metrics
from agent.spool import Spool
from agent.testing.kube_server import KubeApiServer, container, pod
from agent.ticks import Agent
from tests.support import FakeClock, cli, wait_for
from tests.test_kubernetes_pod_sampler import DIM, T, kubeconfig, seed


def document(tmp_path: Path, kube: KubeApiServer, **kubernetes: Any) -> dict[str, Any]:
    return {"backend": {"type": "file", "path": str(tmp_path / "usage.jsonl")},
            "spool": {"path": str(tmp_path / "spool.db")},
            "measurements": [{
                "name": "pod-vcpu-hours", "dimension_id": DIM, "resource_type": "kubernetes_pod",
                "metric": "cpu_request_cores", "mode": "time_weighted", "per": "hour", "interval": "1h",
                "kubernetes": {"kubeconfig": str(kubeconfig(tmp_path, kube)), "context": "test", **kubernetes},
                "customer": {"tag": "customer-id", "untagged": "skip"}, "group_by": "customer"}]}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return cli(*args)


def test_validate_and_once_at_t_write_exact_records_and_a_rerun_writes_nothing_new(tmp_path: Path) -> None:
    with KubeApiServer(page_cap=2) as kube:
        kube.add_namespace("tenant-a", {"customer-id": "acme"})
        kube.add_namespace("tenant-b", {"customer-id": "globex"})
        seed(kube)
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(document(tmp_path, kube, namespaces=["tenant-a", "tenant-b"])))
        checked = run("validate", "-c", str(path))
        assert checked.returncode == 0, checked.stderr
        first = run("once", "-c", str(path), "--at", "2026-11-21T10:30:00Z")
        assert first.returncode == 0, first.stderr
        lines = (tmp_path / "usage.jsonl").read_text().splitlines()
        bodies = {b["customer_id"]: b for b in map(json.loads, lines)}
        assert {c: Decimal(b["value"]) for c, b in bodies.items()} == {
            "acme": Decimal("2.266666667"), "globex": Decimal("3.075416667")}
        assert bodies["acme"]["timestamp"] == "2026-11-21T10:00:00Z"
        again = run("once", "-c", str(path), "--at", "2026-11-21T10:00:00Z")
        assert again.returncode == 0, again.stderr
        assert (tmp_path / "usage.jsonl").read_text().splitlines() == lines


def test_config_errors_name_the_yaml_path_and_the_kubeconfig(tmp_path: Path) -> None:
    with KubeApiServer() as kube:
        raw = document(tmp_path, kube)
        raw["measurements"][0]["regions"] = ["us-east-1"]
        broken = tmp_path / "broken-kubeconfig"
        broken.write_text("clusters: [\n")
        raw["measurements"][0]["kubernetes"]["kubeconfig"] = str(broken)
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(raw))
        checked = run("validate", "-c", str(path))
    assert checked.returncode == 2
    assert "measurements[0].regions: does not apply to kubernetes_pod without kubernetes.eks_cluster" in checked.stdout + checked.stderr
    assert f"measurements[0].kubernetes.kubeconfig: kubeconfig {broken}: not YAML" in checked.stdout + checked.stderr
    assert "Traceback" not in checked.stderr


def test_eks_form_needs_exactly_one_region(tmp_path: Path) -> None:
    with KubeApiServer() as kube:
        raw = document(tmp_path, kube)
    raw["measurements"][0]["kubernetes"] = {"eks_cluster": "prod"}
    raw["measurements"][0]["regions"] = ["us-east-1", "eu-west-1"]
    try:
        parse_config(raw, "<t>", {})
    except Exception as exc:  # noqa: BLE001 - the ConfigError's text is what a user reads
        assert "measurements[0].regions: kubernetes.eks_cluster needs exactly one region" in str(exc)
    else:
        raise AssertionError("two regions were accepted for an EKS cluster")


def _watcher(agent: Agent) -> Any:
    (memory,) = agent._memories.values()
    return memory.live["watch"]


def test_a_pod_started_and_deleted_between_two_ticks_is_billed_by_the_watch(tmp_path: Path) -> None:
    with KubeApiServer(page_cap=2) as kube:
        kube.add_namespace("tenant-a", {"customer-id": "acme"})
        kube.add_pod(pod("tenant-a", "web", containers=[container("a", {"cpu": "1"})], start="2026-11-21T09:30:00Z"))
        cfg = parse_config(document(tmp_path, kube), "<t>", {})
        (m,) = cfg.measurements
        clock = FakeClock(T.timestamp())
        metrics = Metrics()
        spool = Spool(cfg.spool.path, clock=clock, metrics=metrics)
        agent = Agent(cfg, SessionFactory(metrics=metrics, clock=clock), spool, metrics=metrics, clock=clock)
        agent.watch_between_ticks = True
        try:
            first = agent.sample_tick(m, T)
            assert [(r.customer_id, r.value) for r in first.records] == [("acme", Decimal("0.5"))]
            watcher = _watcher(agent)
            wait_for(lambda: kube.requests and any("watch=true" in r for r in kube.requests), what="the watch")
            # between the ticks: a 2-core pod runs 10:10:00 -> 10:20:15 and is deleted
            kube.add_pod(pod("tenant-a", "burst", containers=[container("a", {"cpu": "2"})],
                             start="2026-11-21T10:10:00Z"))
            clock.advance(25 * 60)
            kube.delete_pod("tenant-a", "burst", at="2026-11-21T10:20:15Z")
            wait_for(lambda: watcher.events >= 2, what="the watch to see the pod come and go")
            clock.advance(35 * 60)
            second = agent.sample_tick(m, T + timedelta(hours=1))
            # web all hour (1) + burst 2 cores x 615 s
            assert [(r.customer_id, r.value) for r in second.records] == [
                ("acme", (Decimal(1) + Decimal(2) * Decimal(615) / Decimal(3600)).quantize(Decimal("1e-9")))]
            assert second.records[0].value == Decimal("1.341666667")
            state = spool.sampler_state(m.name)
            (target,) = state.values()
            assert target["tick"] == "2026-11-21T11:00:00+00:00"
            assert [p[2] for p in target["pods"]] == ["web"]  # burst ended before the next window: dropped
            rerun = agent.sample_tick(m, T + timedelta(hours=1))
            assert rerun.inserted == 0  # the tick's record id is spooled already
        finally:
            agent.close()
            spool.close()


def test_a_restart_remembers_running_pods_and_logs_those_gone_unseen(tmp_path: Path) -> None:
    with KubeApiServer() as kube:
        kube.add_namespace("tenant-a", {"customer-id": "acme"})
        kube.add_pod(pod("tenant-a", "web", containers=[container("a", {"cpu": "1"})], start="2026-11-21T09:30:00Z"))
        cfg = parse_config(document(tmp_path, kube), "<t>", {})
        (m,) = cfg.measurements
        clock, metrics = FakeClock(T.timestamp()), Metrics()

        def one_tick(at: Any) -> Any:
            spool = Spool(cfg.spool.path, clock=clock, metrics=metrics)
            agent = Agent(cfg, SessionFactory(metrics=metrics, clock=clock), spool, metrics=metrics, clock=clock)
            try:
                return agent.sample_tick(m, at)
            finally:
                agent.close()
                spool.close()

        assert one_tick(T).records[0].value == Decimal("0.5")
        kube.delete_pod("tenant-a", "web")  # while no agent runs
        with capture_logs() as logs:
            second = one_tick(T + timedelta(hours=1))
    # gone unseen: billed until the last tick it was listed at (10:00), nothing in (10:00, 11:00]
    assert second.records == [] and second.error is None
    (gap,) = [e for e in logs if e["event"].startswith("pods gone since the last tick without their end being seen")]
    assert gap["pods"] == 1 and gap["cluster"] == "test-cluster"


def test_iam_policy_asks_nothing_for_a_kubeconfig_cluster(tmp_path: Path) -> None:
    with KubeApiServer() as kube:
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(document(tmp_path, kube)))
        printed = run("iam-policy", "-c", str(path))
    assert printed.returncode == 0, printed.stderr
    policy = json.loads(printed.stdout)
    assert policy["roles"] == [] and policy["agent_policy"]["Statement"] == []
