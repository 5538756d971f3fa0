"""``usage-agent demo``: the real pipeline on an embedded AWS and a local Paigo backend.

moto runs in server mode on 127.0.0.1 with EBS volumes in two regions for two customers
plus one untagged volume; a Paigo-contract server runs on 127.0.0.1. The agent assumes a
role with an external id, samples four 15-minute ticks (time is injected, so this takes
seconds), spools, forwards through a burst of injected backend faults, and prints what
was sampled next to what the backend received.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.clock import Clock
    from agent.metrics import Metrics

ROLE_ARN = "arn:aws:iam::123456789012:role/usage-agent-demo"
EXTERNAL_ID = "demo-external-id"
DIMENSIONS = {
    "ebs-storage": "8a7b5f91-3b85-4cf4-8585-dcdf17f49004",
    "ebs-gib-hours": "0f6c2d7e-58a4-4a4e-9d0b-3c1f6a9e2b11",
    "pod-vcpu-hours": "5d1e9c3a-7b2f-4e8d-a6c4-2f9b8e1d0c37",
}
# (region, size GiB, type, customer tag or None)
VOLUMES = [
    ("us-east-1", 100, "gp3", "acme"),
    ("us-east-1", 50, "gp2", "acme"),
    ("us-east-1", 200, "io1", "globex"),
    ("eu-west-1", 500, "gp3", "globex"),
    ("eu-west-1", 20, "gp3", "acme"),
    ("eu-west-1", 30, "gp2", None),
]


def _seed(endpoint: str) -> list[tuple[str, str]]:
    import boto3

    created = []
    for region, size, volume_type, customer in VOLUMES:
        ec2 = boto3.client("ec2", region_name=region, endpoint_url=endpoint)
        kwargs: dict[str, Any] = {"Size": size, "VolumeType": volume_type, "AvailabilityZone": f"{region}a"}
        if volume_type == "io1":
            kwargs["Iops"] = 1000
        if customer:
            kwargs["TagSpecifications"] = [{"ResourceType": "volume", "Tags": [{"Key": "customer-id", "Value": customer}]}]
        created.append((region, ec2.create_volume(**kwargs)["VolumeId"]))
    return created


def _seed_pods(kube: Any, start: Any) -> None:
    """acme's namespace runs a 1.5-core web pod all along; globex labels a 2-core batch pod
    in a shared namespace that runs 20 minutes into the first hour for 30 minutes."""
    from agent.testing.kube_server import container, pod

    kube.add_namespace("tenant-acme", {"customer-id": "acme"})
    kube.add_namespace("shared")
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    kube.add_pod(pod("tenant-acme", "web", containers=[container("app", {"cpu": "1500m", "memory": "2Gi"})],
                     start=(start - timedelta(hours=1)).strftime(stamp)))
    kube.add_pod(pod("shared", "batch", labels={"customer-id": "globex"}, phase="Succeeded",
                     containers=[container("job", {"cpu": "2"})], start=(start + timedelta(minutes=5)).strftime(stamp),
                     finished=(start + timedelta(minutes=35)).strftime(stamp)))


def demo_config(backend_url: str, token_url: str, spool_path: str, kubeconfig: str | None = None) -> dict[str, Any]:
    common = {
        "cloud_platform": "aws",
        "resource_type": "ebs",
        "metric": "size_gib",
        "interval": "15m",
        "iam_role_arn": ROLE_ARN,
        "external_id": EXTERNAL_ID,
        "regions": ["us-east-1", "eu-west-1"],
        "customer": {"tag": "customer-id", "untagged": "skip"},
        "metadata": {"environment": "demo"},
    }
    return {
        "backend": {
            "type": "paigo",
            "url": backend_url,
            "token_url": token_url,
            "client_id": "${DEMO_CLIENT_ID}",
            "client_secret": "${DEMO_CLIENT_SECRET}",
        },
        "spool": {"path": spool_path},
        "measurements": [
            {"name": "ebs-storage", "dimension_id": DIMENSIONS["ebs-storage"], "mode": "gauge", **common},
            {"name": "ebs-gib-hours", "dimension_id": DIMENSIONS["ebs-gib-hours"], "mode": "time_weighted",
             "per": "hour", **common},
            *([{"name": "pod-vcpu-hours", "dimension_id": DIMENSIONS["pod-vcpu-hours"], "resource_type": "kubernetes_pod",
                "metric": "cpu_request_cores", "mode": "time_weighted", "per": "hour", "interval": "15m",
                "kubernetes": {"kubeconfig": kubeconfig}, "customer": {"tag": "customer-id"}}] if kubeconfig else []),
        ],
    }


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*headers), line, *(fmt.format(*row) for row in rows)])


def run_demo(*, metrics: Metrics, clock: Clock, out: Any = None) -> int:
    out = out or sys.stdout
    try:
        from moto.server import ThreadedMotoServer

        from agent.testing.kube_server import KubeApiServer
        from agent.testing.paigo_server import Fault, PaigoContractServer
    except ImportError as exc:
        print(f"the demo needs the demo extra: pip install 'usage-agent[demo]' ({exc})", file=sys.stderr)
        return 1
    from agent.config import parse_config
    from agent.credentials import SessionFactory
    from agent.forwarder import Forwarder
    from agent.records import format_decimal
    from agent.sinks import build_backend
    from agent.spool import Spool
    from agent.ticks import Agent

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DEMO_CLIENT_ID": "demo-client",
        "DEMO_CLIENT_SECRET": "demo-secret",
    })
    backend = PaigoContractServer(client_id="demo-client", client_secret="demo-secret").start()
    kube = KubeApiServer(page_cap=1).start()
    workdir = Path(tempfile.mkdtemp(prefix="usage-agent-demo-"))
    try:
        import yaml

        volumes = _seed(endpoint)
        start = clock.now().replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
        _seed_pods(kube, start)
        (workdir / "kubeconfig").write_text(yaml.safe_dump(kube.kubeconfig(cluster="demo-cluster")))
        raw = demo_config(backend.url, backend.token_url, str(workdir / "spool.db"), str(workdir / "kubeconfig"))
        cfg = parse_config(raw, "<demo>", dict(os.environ))
        spool = Spool(cfg.spool.path, cfg.spool.max_records, clock=clock, metrics=metrics)
        spool.claim()
        sink = build_backend(cfg.backend, metrics, clock)
        agent = Agent(cfg, SessionFactory(metrics=metrics, clock=clock), spool, metrics=metrics, clock=clock)
        forwarder = Forwarder(spool, sink.sink, sink.client, metrics=metrics, clock=clock,
                              base_backoff=0.05, max_backoff=0.2)
        # the backend starts with an outage: the records wait in the spool and are retried
        backend.script("/usage", Fault(status=503), Fault(status=429, retry_after="0"), Fault(drop=True))

        ticks = [start + timedelta(minutes=15 * i) for i in range(4)]
        sampled: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        sampled_records: dict[tuple[str, str], int] = defaultdict(int)
        print(f"moto (AWS) on {endpoint}, Paigo-contract backend on {backend.url}, spool {cfg.spool.path}", file=out)
        print(f"role {ROLE_ARN} assumed with external id {EXTERNAL_ID!r}; Kubernetes API contract server on "
              f"{kube.url} (pages of 1 pod)", file=out)
        for i, tick in enumerate(ticks):
            if i == 2:  # acme deletes its 50 GiB volume halfway through
                region, volume_id = volumes[1]
                import boto3

                boto3.client("ec2", region_name=region, endpoint_url=endpoint).delete_volume(VolumeId=volume_id)
                print(f"  {tick:%H:%M}  acme deleted {volume_id} (50 GiB)", file=out)
            for result in agent.sample_all(tick):
                for record in result.records:
                    sampled[(result.measurement, record.customer_id)] += record.value
                    sampled_records[(result.measurement, record.customer_id)] += 1
            pumped = forwarder.drain_until(deadline=clock.time() + 10)
            print(f"  tick {tick:%Y-%m-%d %H:%M}Z: {pumped.delivered} delivered, {pumped.retried} retried", file=out)

        received: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        received_records: dict[tuple[str, str], int] = defaultdict(int)
        by_dimension = {v: k for k, v in DIMENSIONS.items()}
        for body in backend.accepted:
            key = (by_dimension[body["dimensionId"]], body["customerId"])
            received[key] += Decimal(body["recordValue"])
            received_records[key] += 1
        rows = []
        units = {"ebs-storage": "GiB (sum of 4 gauges)", "ebs-gib-hours": "GiB-hours", "pod-vcpu-hours": "vCPU-hours"}
        for key in sorted(sampled):
            rows.append([key[0], key[1], units[key[0]], str(sampled_records[key]), format_decimal(sampled[key]),
                         str(received_records[key]), format_decimal(received[key])])
        print("", file=out)
        print(_table(["measurement", "customer", "unit", "records sampled", "value sampled",
                      "records received", "value received"], rows), file=out)
        counts = spool.counts()
        print("", file=out)
        print(f"spool: {counts['delivered']} delivered, {counts['pending'] + counts['leased']} unsent, "
              f"{counts['dead']} dead-lettered; backend saw {backend.usage_requests} requests, "
              f"{backend.duplicates()} duplicate ids, {backend.token_requests} token request(s)", file=out)
        print("the untagged 30 GiB volume in eu-west-1 was skipped (customer.untagged: skip); pods: acme's 1.5-core "
              "pod ran the whole hour (1.5 vCPU-hours), globex's 2-core pod 30 minutes (1 vCPU-hour)", file=out)
        agent.close()
        sink.close()
        spool.close()
        ok = counts["pending"] + counts["leased"] == 0 and sampled == received
        return 0 if ok else 1
    finally:
        backend.stop()
        kube.stop()
        moto.stop()
