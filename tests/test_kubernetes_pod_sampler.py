"""kubernetes_pod end to end over the Kubernetes API contract server on 127.0.0.1: effective
requests, running spans pro-rated into the window, label-over-namespace attribution,
namespace filter, pages capped below the limit, 410 restarts and refused identities."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.clock import SystemClock
from agent.config import parse_config
from agent.credentials import SessionFactory
from agent.kube.quantity import parse_quantity
from agent.metrics import Metrics
from agent.samplers.kubernetes_pod import SPEC
from agent.ticks import Agent
from agent.testing.kube_server import KubeApiServer, container, pod

T = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)  # the tick; its hour window is (09:00, 10:00]
DIM = "dim-vcpu"


@pytest.fixture
def kube() -> Any:
    with KubeApiServer(page_cap=2) as server:
        server.add_namespace("tenant-a", {"customer-id": "acme"})
        server.add_namespace("tenant-b", {"customer-id": "globex"})
        server.add_namespace("kube-system")
        yield server


def seed(server: KubeApiServer) -> None:
    # acme, all hour: 250m + 1.5 = 1.75 cores, 512Mi + 1Gi memory
    server.add_pod(pod("tenant-a", "web", containers=[container("a", {"cpu": "250m", "memory": "512Mi"}),
                                                      container("b", {"cpu": "1.5", "memory": "1Gi"})]))
    # acme, 09:30:00 -> 09:45:30 (930 s), Succeeded: 2000m
    server.add_pod(pod("tenant-a", "job", containers=[container("a", {"cpu": "2000m", "memory": "1G"})],
                       phase="Succeeded", start="2026-11-21T09:30:00Z", finished="2026-11-21T09:45:30Z"))
    # a label overrides the namespace's: globex's pod in acme's namespace; init 4 cores > 1 + 0.5 sidecar
    server.add_pod(pod("tenant-a", "batch", labels={"customer-id": "globex"},
                       containers=[container("a", {"cpu": "1", "nvidia.com/gpu": "2"})],
                       init_containers=[container("init", {"cpu": "4"}),
                                        container("proxy", {"cpu": "500m"}, restart_policy="Always")],
                       overhead={"cpu": "100m"}, start="2026-11-21T09:15:00Z"))
    # globex, pod-level request 3 cores, started 09:59:59.5 (0.5 s)
    server.add_pod(pod("tenant-b", "api", containers=[container("a", {"cpu": "1"})], pod_requests={"cpu": "3"},
                       start="2026-11-21T09:59:59.500000Z"))
    server.add_pod(pod("tenant-b", "waiting", phase="Pending", start=None))  # never started: nothing
    server.add_pod(pod("kube-system", "dns", containers=[container("a", {"cpu": "1e-1"})]))  # no customer: skipped
    server.add_pod(pod("tenant-b", "later", start="2026-11-21T10:00:01Z"))  # after T


def kubeconfig(tmp_path: Path, server: KubeApiServer, **kw: Any) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(server.kubeconfig(**kw)))
    return path


def config(tmp_path: Path, server: KubeApiServer, *measurements: dict[str, Any]) -> Any:
    return parse_config({"backend": {"type": "file", "path": str(tmp_path / "out.jsonl")},
                         "spool": {"path": str(tmp_path / "spool.db")}, "measurements": list(measurements)},
                        "<test>", {}, base_dir=tmp_path)


def m(tmp_path: Path, server: KubeApiServer, metric: str = "cpu_request_cores", **overrides: Any) -> dict[str, Any]:
    return {"name": f"pods-{metric.replace('_', '-')}", "dimension_id": DIM, "resource_type": "kubernetes_pod",
            "metric": metric, "mode": "time_weighted", "per": "hour", "interval": "1h",
            "kubernetes": {"kubeconfig": str(kubeconfig(tmp_path, server))},
            "customer": {"tag": "customer-id", "untagged": "skip"}, **overrides}


def collect(tmp_path: Path, server: KubeApiServer, *measurements: dict[str, Any]) -> dict[str, Any]:
    cfg = config(tmp_path, server, *measurements)
    metrics, clock = Metrics(), SystemClock()
    agent = Agent(cfg, SessionFactory(metrics=metrics, clock=clock), None, metrics=metrics, clock=clock)
    try:
        return {mm.name: agent.collect(mm, T) for mm in cfg.measurements}
    finally:
        agent.close()


def values(result: Any) -> dict[str, Decimal]:
    assert result.error is None and not result.failed_targets, result
    return {r.customer_id: r.value for r in result.records}


@pytest.mark.parametrize(("raw", "exact"), [
    ("250m", "0.25"), ("1.5", "1.5"), ("2000m", "2"), ("512Mi", "536870912"), ("1Gi", "1073741824"),
    ("1G", "1000000000"), ("1e3", "1000"), ("128974848", "128974848"), ("1.5Ki", "1536"), ("2Ei", str(2 * 2**60)),
    ("1E", "1000000000000000000"), ("100n", "0.0000001"), (".5", "0.5"), ("3k", "3000"), ("1E-3", "0.001"), (7, "7"),
])
def test_quantities_parse_exactly(raw: Any, exact: str) -> None:
    assert parse_quantity(raw) == Decimal(exact)


@pytest.mark.parametrize("raw", ["", "1.2.3", "5Xi", "-1", "1 Gi", "1e", None, 1.5, True, "1" * 100])
def test_bad_quantities_are_refused(raw: Any) -> None:
    with pytest.raises(ValueError):
        parse_quantity(raw)


def test_cpu_hours_per_customer_with_effective_requests_and_partial_spans(tmp_path: Path, kube: KubeApiServer) -> None:
    seed(kube)
    got = values(collect(tmp_path, kube, m(tmp_path, kube))["pods-cpu-request-cores"])
    # acme: 1.75 x 1 h + 2 x 930/3600 h; globex: (max(1 + 0.5, 4) + 0.1) x 45 min + 3 x 0.5 s
    nine = Decimal("1e-9")
    assert got == {"acme": (Decimal("1.75") + Decimal(2) * Decimal(930) / Decimal(3600)).quantize(nine),
                   "globex": (Decimal("4.1") * Decimal("0.75") + Decimal(3) * Decimal("0.5") / Decimal(3600)).quantize(nine)}
    assert got["acme"] == Decimal("2.266666667")
    assert got["globex"] == Decimal("3.075416667")
    assert kube.page_sizes and max(kube.page_sizes) == 2  # 8 pods in pages of 2, though 500 were asked for
    assert any("limit=500" in r for r in kube.requests)


def test_memory_gpu_and_pod_gauges(tmp_path: Path, kube: KubeApiServer) -> None:
    seed(kube)
    results = collect(tmp_path, kube,
                      m(tmp_path, kube, "memory_request_gib"),
                      m(tmp_path, kube, "gpu_request"),
                      m(tmp_path, kube, "pods", mode="gauge", name="running-pods"))
    memory = values(results["pods-memory-request-gib"])
    # acme: 1.5 GiB all hour + 1e9 bytes for 930 s
    assert memory == {"acme": (Decimal("1.5") + Decimal(10**9) / Decimal(2**30) * Decimal(930) / Decimal(3600)
                               ).quantize(Decimal("1e-9"))}
    assert values(results["pods-gpu-request"]) == {"globex": Decimal("1.5")}  # 2 GPUs x 45 min
    # at T: web (acme); batch and api (globex); the job ended, the pending pod never started
    assert values(results["running-pods"]) == {"acme": Decimal(1), "globex": Decimal(2)}


def test_namespace_filter_and_server_side_label_selector(tmp_path: Path, kube: KubeApiServer) -> None:
    seed(kube)
    kube.add_pod(pod("tenant-b", "unbilled", labels={"billing": "off"}, containers=[container("a", {"cpu": "8"})]))
    only_b = m(tmp_path, kube, name="tenant-b")
    only_b["kubernetes"] = {**only_b["kubernetes"], "namespaces": ["tenant-b"], "label_selector": "billing!=off"}
    got = values(collect(tmp_path, kube, only_b)["tenant-b"])
    assert got == {"globex": (Decimal(3) * Decimal("0.5") / Decimal(3600)).quantize(Decimal("1e-9"))}
    assert got["globex"] == Decimal("0.000416667")
    lists = [r for r in kube.requests if "/pods" in r]
    assert lists and all(r.startswith("/api/v1/namespaces/tenant-b/pods?") and "labelSelector=billing%21%3Doff" in r
                         for r in lists)


def test_group_by_resource_gives_one_record_per_pod_with_its_facts(tmp_path: Path, kube: KubeApiServer) -> None:
    seed(kube)
    (result,) = collect(tmp_path, kube, m(tmp_path, kube, group_by="resource", customer={"id": "vendor"})).values()
    by_pod = {r.metadata["pod"]: r for r in result.records}
    assert sorted(by_pod) == ["api", "batch", "dns", "job", "web"]
    job = by_pod["job"]
    assert job.value == Decimal("0.516666667")  # 2 cores x 930 s
    assert {k: job.metadata[k] for k in ("namespace", "node", "cluster")} == {
        "namespace": "tenant-a", "node": "node-1", "cluster": "test-cluster"}
    assert job.resource == f"kubernetes:test-cluster:kubernetes:{job.metadata['uid']}"


def test_an_expired_continue_token_restarts_the_list(tmp_path: Path, kube: KubeApiServer) -> None:
    seed(kube)
    kube.expire_continue_tokens = 1
    got = values(collect(tmp_path, kube, m(tmp_path, kube))["pods-cpu-request-cores"])
    assert got["acme"] == Decimal("2.266666667")
    assert sum("continue=" not in r and "/api/v1/pods" in r for r in kube.requests) == 2  # listed from the start twice


def test_expired_continue_tokens_past_the_restart_budget_fail_the_target(tmp_path: Path, kube: KubeApiServer) -> None:
    seed(kube)
    kube.expire_continue_tokens = 100
    result = collect(tmp_path, kube, m(tmp_path, kube))["pods-cpu-request-cores"]
    assert result.records == [] and "continue token expired 4 times" in (result.error or "")


@pytest.mark.parametrize(("code", "setup"), [
    (401, lambda server: setattr(server, "token", "another")),
    (403, lambda server: server.forbidden.add("tenant-a")),
])
def test_a_refused_identity_fails_the_target_naming_cluster_and_namespace(
        tmp_path: Path, kube: KubeApiServer, code: int, setup: Any) -> None:
    seed(kube)
    spec = m(tmp_path, kube)
    spec["kubernetes"]["namespaces"] = ["tenant-a"]
    setup(kube)
    result = collect(tmp_path, kube, spec)["pods-cpu-request-cores"]
    assert result.records == [] and len(result.failed_targets) == 1
    error = result.error or ""
    assert f": {code} " in error and "cluster test-cluster" in error and "namespace tenant-a" in error
    assert kube.url in error


def test_the_sampler_module_declares_the_eks_action_only_for_eks() -> None:
    assert SPEC.actions_for(config_measurement(eks_cluster=None)) == ()
    assert SPEC.actions_for(config_measurement(eks_cluster="prod")) == ("eks:DescribeCluster",)


def config_measurement(eks_cluster: str | None) -> Any:
    from agent.config import parse_measurement

    raw: dict[str, Any] = {"name": "p", "dimension_id": DIM, "resource_type": "k8spod", "customer": {"id": "a"},
                           "kubernetes": {"eks_cluster": eks_cluster} if eks_cluster else {}}
    if eks_cluster:
        raw["regions"] = ["us-east-1"]
    return parse_measurement(raw)
