"""kubernetes_pod in the EKS form end to end: the measurement's role (moto, with its external id)
describes the cluster, whose endpoint is the Kubernetes contract server on https://127.0.0.1
with the cluster's CA, and the server accepts only the IAM Authenticator token for that
cluster, checked as STS would (the signature over x-k8s-aws-id, with moto's secret key)."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightkube import KubeConfig
from lightkube.config.models import Cluster as Entry
from lightkube.config.models import User
from lightkube.resources.core_v1 import Pod

from agent.clock import SystemClock
from agent.config import parse_config
from agent.credentials import SessionFactory
from agent.kube.cluster import Cluster, client_for
from agent.metrics import Metrics
from agent.testing.eks_token import verify_eks_token
from agent.testing.kube_server import KubeApiServer, container, pod
from agent.ticks import Agent
from tests.conftest import ACCOUNT, EXTERNAL_ID, ROLE_ARN, Aws
from tests.eks_cluster import CLUSTER, REGION, ca_certificate, create_cluster, moto_secret, seed_cluster
from tests.support import cli

T = datetime(2026, 11, 21, 10, 0, tzinfo=timezone.utc)  # the window is (09:00, 10:00]


class Tokens:
    """The contract server's verify_token: what an API server for ``cluster`` accepts, and each token presented."""

    def __init__(self, cluster: str = CLUSTER):
        self.cluster = cluster
        self.presented: list[str] = []

    def __call__(self, token: str) -> bool:
        self.presented.append(token)
        return verify_eks_token(token, self.cluster, secret_key=moto_secret)


def tls_context(tmp_path: Path) -> ssl.SSLContext:
    cert, key = ca_certificate()
    (tmp_path / "server.crt").write_bytes(cert)
    (tmp_path / "server.key").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    return context


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., KubeApiServer]]:
    started: list[KubeApiServer] = []

    def start(tokens: Tokens) -> KubeApiServer:
        server = KubeApiServer(verify_token=tokens, page_cap=2, tls=tls_context(tmp_path)).start()
        started.append(server)
        server.add_namespace("tenant-a", {"customer-id": "acme"})
        server.add_namespace("tenant-b", {"customer-id": "globex"})
        # acme all hour, 1.75 cores; globex 2 cores from 09:30 to 09:45:30 (930 s), then Succeeded
        server.add_pod(pod("tenant-a", "web", containers=[container("a", {"cpu": "250m"}), container("b", {"cpu": "1.5"})]))
        server.add_pod(pod("tenant-b", "job", containers=[container("a", {"cpu": "2000m"})], phase="Succeeded",
                           start="2026-11-21T09:30:00Z", finished="2026-11-21T09:45:30Z"))
        return server

    yield start
    for server in started:
        server.stop()


def eks_measurement(**overrides: Any) -> dict[str, Any]:
    return {"name": "pod-vcpu-hours", "dimension_id": "dim-vcpu", "resource_type": "kubernetes_pod",
            "metric": "cpu_request_cores", "mode": "time_weighted", "per": "hour", "interval": "1h",
            "kubernetes": {"eks_cluster": CLUSTER}, "iam_role_arn": ROLE_ARN, "external_id": EXTERNAL_ID,
            "regions": [REGION], "customer": {"tag": "customer-id", "untagged": "skip"}, **overrides}


def write_config(tmp_path: Path, *measurements: dict[str, Any]) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"backend": {"type": "file", "path": str(tmp_path / "usage.jsonl")},
                                    "spool": {"path": str(tmp_path / "spool.db")},
                                    "measurements": list(measurements) or [eks_measurement()]}))
    return path


def once(config: Path) -> subprocess.CompletedProcess[str]:
    return cli("once", "-c", str(config), "--at", T.isoformat())


def test_once_meters_an_eks_clusters_pods_through_the_role(aws: Aws, servers: Any, tmp_path: Path) -> None:
    tokens = Tokens()
    kube = servers(tokens)
    create_cluster(aws, endpoint=kube.url, ca_pem=ca_certificate()[0])
    done = once(write_config(tmp_path))
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert {r["customer_id"]: Decimal(r["value"]) for r in records} == {
        "acme": Decimal("1.75"), "globex": (Decimal(2) * Decimal(930) / Decimal(3600)).quantize(Decimal("1e-9"))}
    assert {(r["metadata"]["accounts"], r["metadata"]["regions"]) for r in records} == {(ACCOUNT, REGION)}
    (assumed,) = aws.assumed_roles()  # DescribeCluster and the token, both as the customer's role
    assert (assumed.role_arn, assumed.external_id) == (ROLE_ARN, EXTERNAL_ID)
    assert tokens.presented and all(verify_eks_token(t, CLUSTER, secret_key=moto_secret) for t in tokens.presented)
    assert kube.page_sizes and max(kube.page_sizes) == 2  # the contract server's pages, followed to the end
    # the token is a credential: not in the logs, not in the spool
    spool = b"".join(p.read_bytes() for p in tmp_path.glob("spool.db*"))
    for token in set(tokens.presented):
        assert token[11:40] not in done.stderr and token[11:40].encode() not in spool


def test_a_cluster_that_does_not_accept_the_role_fails_its_target_loudly(aws: Aws, servers: Any, tmp_path: Path) -> None:
    kube = servers(Tokens("staging"))  # an API server of another cluster: the signature cannot match
    create_cluster(aws, endpoint=kube.url, ca_pem=ca_certificate()[0])
    done = once(write_config(tmp_path))
    assert done.returncode == 1
    assert (f"kubernetes list pods in cluster {CLUSTER} ({kube.url}), all namespaces: 401 the token was refused "
            "(map the role in an EKS access entry or aws-auth)") in done.stderr
    assert not (tmp_path / "usage.jsonl").exists() or (tmp_path / "usage.jsonl").read_text() == ""


def test_a_role_that_cannot_describe_the_cluster_fails_its_target_with_the_reason(aws: Aws, tmp_path: Path) -> None:
    done = once(write_config(tmp_path))  # no such cluster in the role's account
    assert done.returncode == 1
    assert f"EKS cluster '{CLUSTER}' in {REGION}: no such cluster (eks:DescribeCluster: ResourceNotFoundException" in done.stderr
    assert "Traceback" not in done.stderr


def test_iam_policy_lets_the_role_describe_eks_clusters(aws: Aws, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(KubeApiServer().kubeconfig()))
    ebs = {"name": "ebs", "dimension_id": "dim-ebs", "resource_type": "ebs", "interval": "1h", "iam_role_arn": ROLE_ARN,
           "external_id": EXTERNAL_ID, "regions": [REGION], "customer": {"tag": "customer-id"}}
    in_cluster = eks_measurement(name="local-pods", kubernetes={"kubeconfig": str(kubeconfig)})
    for key in ("iam_role_arn", "external_id", "regions"):
        del in_cluster[key]
    config = write_config(tmp_path, eks_measurement(), ebs, in_cluster)
    done = cli("iam-policy", "-c", str(config))
    assert done.returncode == 0, done.stderr
    (role,) = json.loads(done.stdout)["roles"]
    assert role["measurements"] == ["pod-vcpu-hours", "ebs"]
    assert role["permission_policy"]["Statement"][0]["Action"] == ["ec2:DescribeVolumes", "eks:DescribeCluster"]
    assert role["trust_policy"]["Statement"][0]["Condition"] == {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}
    # the kubeconfig measurement needs no AWS permission: its cluster's RBAC governs it
    assert json.loads(done.stdout)["agent_policy"]["Statement"] == [
        {"Sid": "AssumeCustomerRoles", "Effect": "Allow", "Action": "sts:AssumeRole", "Resource": [ROLE_ARN]}]


class WallClock(SystemClock):
    """The system clock with a wall time the test sets (when the token runs out); the rest is real."""

    def __init__(self, now: datetime):
        super().__init__()
        self.wall = now

    def now(self) -> datetime:
        return self.wall


def test_the_token_is_renewed_once_it_runs_out_and_not_before(aws: Aws, servers: Any, tmp_path: Path) -> None:
    first, second = Tokens(), Tokens()
    kube, moved = servers(first), servers(second)
    create_cluster(aws, endpoint=kube.url, ca_pem=ca_certificate()[0])
    cfg = parse_config(yaml.safe_load(write_config(tmp_path).read_text()), "<test>", {})
    clock, metrics = WallClock(T), Metrics()
    agent = Agent(cfg, SessionFactory(metrics=metrics, clock=SystemClock()), None, metrics=metrics, clock=clock)
    (m,) = cfg.measurements
    try:
        assert agent.collect(m, T).records
        seed_cluster(endpoint=moved.url)  # what DescribeCluster says from now on: only a renewal reads it
        clock.wall = T + timedelta(minutes=13, seconds=59)
        assert agent.collect(m, T).records
        assert first.presented and not second.presented  # the first access, still good
        clock.wall = T + timedelta(minutes=14)  # 15 minutes from the signing, less the margin
        result = agent.collect(m, T)
        assert result.error is None and not result.failed_targets, result
        assert second.presented and all(verify_eks_token(t, CLUSTER, secret_key=moto_secret) for t in second.presented)
    finally:
        agent.close()


def test_every_request_asks_for_the_token_afresh(tmp_path: Path) -> None:
    presented: list[str] = []
    with KubeApiServer(verify_token=lambda t: presented.append(t) or True, tls=tls_context(tmp_path)) as server:
        server.add_namespace("tenant-a")
        server.add_pod(pod("tenant-a", "web"))
        config = KubeConfig.from_one(cluster=Entry(server=server.url, certificate_auth_data=base64.b64encode(
            ca_certificate()[0]).decode()), user=User()).get()
        issued = iter(["token-1", "token-2", "token-3"])
        cluster = Cluster(CLUSTER, config, token=lambda: next(issued))
        for _ in range(2):  # as the watch renews its request: a client each time, one token source
            client = client_for(cluster)
            try:
                assert [p.metadata.name for p in client.list(Pod, namespace="tenant-a")] == ["web"]
            finally:
                client.close()
    assert presented == ["token-1", "token-2"]
