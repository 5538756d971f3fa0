"""One tick of a kubernetes_pod target: list the pods (and, for tag attribution, their
namespaces), add what the watch saw end since the last tick and what the last tick
remembered, and give each pod's requests x the seconds it ran in the window (or its
requests if it runs at T), attributed by its label or else its namespace's."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import structlog
from msgspec.structs import replace

from agent.errors import excerpt
from agent.kube import listing
from agent.kube.cluster import Cluster, KubeconfigError, KubeError, client_for, resolve
from agent.kube.pods import PodUsage, usage_of
from agent.kube.watch import PodWatcher
from agent.records import WIDE
from agent.samplers.base import CLUSTER_REGION, ClientFor, Sample, Skipped, Target, TargetMemory
from agent.settings import Kubernetes, Measurement

log = structlog.get_logger("agent.kube")

MAX_REMEMBERED = 1_000_000


def place(m: Measurement) -> tuple[str, str] | None:
    """A kubeconfig cluster's target: its name; None for EKS (reached through the role)."""
    k = m.kubernetes
    assert k is not None, "config requires the kubernetes block"
    if k.eks_cluster is not None:
        return None
    try:
        return resolve(k).label, CLUSTER_REGION
    except KubeconfigError as exc:
        raise KubeError(str(exc)) from None


def _eks_cluster(clients: ClientFor, target: Target, k: Kubernetes) -> Cluster:
    """The EKS cluster through the measurement's role: its access kept in the target's memory
    (so the watch shares it) and its token asked for each request, renewed as it runs out."""
    from lightkube import KubeConfig
    from lightkube.config.models import Cluster as ClusterEntry
    from lightkube.config.models import User

    from agent.kube.eks import EksCredentials  # only the EKS form needs it

    assert k.eks_cluster is not None
    memory = target.memory
    credentials = memory.live.get("eks") if memory else None
    if not isinstance(credentials, EksCredentials):
        credentials = EksCredentials(clients, k.eks_cluster, memory.now if memory else lambda: datetime.now(timezone.utc))
        if memory is not None:
            memory.live["eks"] = credentials
    access = credentials.current()
    config = KubeConfig.from_one(
        cluster=ClusterEntry(server=access.server, certificate_auth_data=base64.b64encode(access.ca_pem).decode()),
        user=User()).get()
    return Cluster(k.eks_cluster, config, token=lambda: credentials.current().token)


def _client(memory: TargetMemory | None, cluster: Cluster) -> Any:
    """The target's client, kept across ticks while its kubeconfig (or EKS token) stays the same."""
    key = repr(cluster.config)  # in memory only: it holds the token
    held = memory.live.get("client") if memory else None
    if held is not None and held.key == key:
        return held.value
    if held is not None:
        held.close()
    client = client_for(cluster)
    if memory is not None:
        memory.live["client"] = _Client(client, key)
    return client


class _Client:
    def __init__(self, value: Any, key: str):
        self.value, self.key = value, key

    def close(self) -> None:
        self.value.close()


def _remembered(memory: TargetMemory | None, tick: datetime, listed: dict[str, PodUsage]) -> dict[str, PodUsage]:
    """The pods the last tick committed (if it was an earlier tick) that are not ``listed`` now
    (a listed pod's own entry is what the listing says: only the gone ones are decoded)."""
    if memory is None or not memory.state.get("tick") or memory.state["tick"] >= tick.isoformat():
        return {}
    try:
        return {raw[0]: PodUsage.from_state(raw) for raw in memory.state.get("pods", ()) if raw[0] not in listed}
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        log.warning("remembered pods unreadable; this tick uses the listing alone", error=excerpt(str(exc)))
        return {}


def _values(usage: PodUsage, m: Measurement, start: datetime, end: datetime) -> dict[str, Decimal] | None:
    # a resource the pod does not request is absent (as an AWS metric a resource lacks): no zero records
    if m.mode == "time_weighted":
        seconds = usage.seconds_in(start, end)
        if not seconds:
            return None
        return {metric: WIDE.multiply(amount, seconds) for metric, amount in usage.requests.items() if amount}
    return {metric: amount for metric, amount in usage.requests.items() if amount} if usage.runs_at(end) else None


def sample_pods(clients: ClientFor, target: Target) -> Iterator[Sample | Skipped]:
    m = target.measurement
    k = m.kubernetes
    assert k is not None, "config requires the kubernetes block"

    def in_time(what: str) -> None:
        if target.clock() >= target.deadline:
            raise KubeError(f"kubernetes {what} in cluster {cluster.label}: the target did not finish inside "
                            f"the measurement's interval ({m.interval_seconds}s)")

    if k.eks_cluster is not None:
        cluster = _eks_cluster(clients, target, k)
    else:
        try:
            cluster = resolve(k)
        except KubeconfigError as exc:
            raise KubeError(str(exc)) from None
    keys = m.customer_tags
    memory = target.memory
    client = _client(memory, cluster)
    def convert(pod: Any) -> PodUsage | Skipped | None:
        try:
            return usage_of(pod, m.metric, k.gpu_resource, keep_labels=keys)
        except ValueError as exc:
            meta = pod.metadata
            return Skipped(f"{meta.namespace}/{meta.name}" if meta else "?", f"unreadable pod: {excerpt(str(exc))}")

    try:
        listed, versions = listing.pods(client, cluster, k.namespaces, k.label_selector, in_time, convert)
        ns_labels = listing.namespace_labels(client, cluster, k.namespaces, in_time) if keys else {}
    finally:
        if memory is None:
            client.close()
    start, end = target.tick - m.interval, target.tick
    current: dict[str, PodUsage] = {}
    for usage in listed:
        if isinstance(usage, Skipped):
            yield usage
        else:
            current[usage.uid] = usage
    gone = _remembered(memory, end, current)
    watcher = memory.live.get("watch") if memory else None
    seen = watcher.seen() if isinstance(watcher, PodWatcher) else {}
    everything = dict(current)
    unseen = 0
    for uid, usage in {**gone, **seen}.items():
        if uid in current:
            continue
        if usage.end is None and uid in seen:  # deleted; the watch has not delivered the deletion yet
            usage = replace(usage, end=max(usage.start, min(memory.now() if memory else end, end)))
        elif usage.end is None:  # deleted while nobody watched: billed until the last tick it was listed at
            last = datetime.fromisoformat(memory.state["tick"]) if memory else usage.start
            usage = replace(usage, end=max(usage.start, last))
            unseen += 1
        everything[uid] = usage
    if unseen:
        log.warning("pods gone since the last tick without their end being seen (the agent was not watching); "
                    "each is billed until the last tick it was listed at", pods=unseen, cluster=cluster.label)
    per_pod = m.group_by == "resource"  # only a pod's own record carries its facts
    for uid, usage in everything.items():
        values = _values(usage, m, start, end)
        if values is None:
            continue
        ns = ns_labels.get(usage.namespace)
        yield target.sample(uid, values, {**ns, **usage.labels} if ns else usage.labels,
                            {"cluster": cluster.label, "namespace": usage.namespace, "pod": usage.name,
                             "node": usage.node, "uid": uid} if per_pod else {})
    if memory is not None:
        kept = [u for u in everything.values() if u.end is None or u.end > end][:MAX_REMEMBERED]
        memory.state = {"tick": end.isoformat(), "pods": [u.to_state() for u in kept]}
        if isinstance(watcher, PodWatcher):
            watcher.forget(end)
        elif memory.watch:
            memory.live["watch"] = PodWatcher(cluster, k.namespaces, k.label_selector, m.metric, k.gpu_resource, keys,
                                              versions, memory.now)
