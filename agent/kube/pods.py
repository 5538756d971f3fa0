"""What a pod is billed for: the scheduler's effective request of each resource and the span
it ran, as plain data that survives a restart in the sampler state.

Effective request, as the scheduler computes it (k8s.io/component-helpers resource.PodRequests,
KEP-753 sidecars): app containers and restartable init containers ("sidecars",
``restartPolicy: Always``) run together; an ordinary init container runs alongside the
sidecars started before it. The request is the larger of the two, plus ``spec.overhead``;
a pod-level ``spec.resources.requests`` (cpu, memory) replaces the containers' sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import msgspec

from agent.kube.quantity import parse_quantity
from agent.records import WIDE

GIB = Decimal(2**30)
ZERO = Decimal(0)
POD_LEVEL = ("cpu", "memory")  # the resources a pod-level request may set
ENDED = ("Succeeded", "Failed")
MICROSECOND = timedelta(microseconds=1)


def _requests(resources: Any) -> Mapping[str, Any]:
    return (resources.requests or {}) if resources is not None else {}


def _amount(requests: Mapping[str, Any], resource: str) -> Decimal:
    raw = requests.get(resource)
    return ZERO if raw is None else parse_quantity(raw)


def effective_request(spec: Any, resource: str) -> Decimal:
    """The pod's request of ``resource`` as the scheduler reserves it (ValueError: a bad quantity)."""
    pod_level = _requests(spec.resources).get(resource) if resource in POD_LEVEL else None
    if pod_level is not None:
        total = parse_quantity(pod_level)
    else:
        total = ZERO
        for c in spec.containers or ():  # the hot loop of a tick: a container without the request adds nothing
            raw = c.resources.requests.get(resource) if c.resources is not None and c.resources.requests else None
            if raw is not None:
                total += parse_quantity(raw)
        if spec.initContainers:
            sidecars = init = ZERO
            for container in spec.initContainers:
                amount = _amount(_requests(container.resources), resource)
                if container.restartPolicy == "Always":
                    sidecars += amount
                    init = max(init, sidecars)
                else:
                    init = max(init, amount + sidecars)
            total = max(total + sidecars, init)
    return total + _amount(spec.overhead, resource) if spec.overhead else total


def _finished(status: Any) -> datetime | None:
    """The latest finishedAt of any of its containers' terminated states."""
    statuses: Iterable[Any] = [*(status.containerStatuses or ()), *(status.initContainerStatuses or ()),
                               *(status.ephemeralContainerStatuses or ())]
    times = [s.state.terminated.finishedAt for s in statuses
             if s.state is not None and s.state.terminated is not None and s.state.terminated.finishedAt]
    return max(times) if times else None


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is timezone.utc:
        return moment
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


class PodUsage(msgspec.Struct, frozen=True, gc=False):
    """One pod: who it is, what it requests, when it ran (``end`` None: still running).
    A struct the garbage collector does not track (it holds no containers of itself): a tick
    keeps 10k of them alive while it allocates, and each full collection would walk them all."""

    uid: str
    namespace: str
    name: str
    node: str
    labels: Mapping[str, str]
    requests: Mapping[str, Decimal]  # metric -> amount
    start: datetime
    end: datetime | None

    def seconds_in(self, window_start: datetime, window_end: datetime) -> Decimal:
        """Seconds of its span inside (window_start, window_end], exact to the microsecond."""
        begin = max(self.start, window_start)
        finish = window_end if self.end is None else min(self.end, window_end)
        if finish <= begin:
            return Decimal(0)
        return Decimal((finish - begin) // MICROSECOND).scaleb(-6)

    def runs_at(self, moment: datetime) -> bool:
        return self.start <= moment and (self.end is None or moment < self.end)

    def to_state(self) -> tuple[Any, ...]:
        """As the sampler state keeps it: an array, not a mapping (10k pods a tick, 40% less JSON),
        a tuple the garbage collector stops tracking (a list would be walked until the next tick)."""
        (metric, amount), = self.requests.items()
        return (self.uid, self.namespace, self.name, self.node, self.labels, metric, str(amount),
                self.start.isoformat(), self.end.isoformat() if self.end else None)

    @classmethod
    def from_state(cls, raw: list[Any]) -> PodUsage:
        uid, namespace, name, node, labels, metric, amount, start, end = raw
        return cls(uid, namespace, name, node, dict(labels), {metric: Decimal(amount)}, datetime.fromisoformat(start),
                   datetime.fromisoformat(end) if end else None)


def request_of(spec: Any, metric: str, gpu_resource: str) -> Decimal:
    """A pod's request of what ``metric`` measures (cores, GiB, GPUs, or 1 pod)."""
    if metric == "pods":
        return Decimal(1)
    if metric == "memory_request_gib":
        return WIDE.divide(effective_request(spec, "memory"), GIB)
    return effective_request(spec, "cpu" if metric == "cpu_request_cores" else gpu_resource)


def usage_of(pod: Any, metric: str, gpu_resource: str, *, keep_labels: tuple[str, ...] | None = None,
             deleted_at: datetime | None = None) -> PodUsage | None:
    """A pod's usage of ``metric``, or None for a pod that never started (Pending without a
    start time). ``keep_labels``: the labels kept (None: all). ``deleted_at``: when a watch saw
    it deleted, the end of a span its containers did not close.
    ValueError: a quantity or field the API would not have given."""
    status, meta = pod.status, pod.metadata
    if status is None or status.startTime is None or meta is None or not meta.uid:
        return None
    start = _utc(status.startTime)
    end = None
    if status.phase in ENDED:
        finished = _finished(status)
        end = _utc(finished) if finished else start  # ended without any container having run
    elif deleted_at is not None:
        finished = _finished(status)
        end = _utc(finished) if finished else deleted_at
    if end is not None and end < start:
        end = start
    spec = pod.spec
    if spec is None:
        raise ValueError("the pod has no spec")
    labels = meta.labels or {}
    if keep_labels is not None:
        labels = {key: labels[key] for key in keep_labels if key in labels}
    return PodUsage(meta.uid, meta.namespace or "", meta.name or "", spec.nodeName or "", labels,
                    {metric: request_of(spec, metric, gpu_resource)}, start, end)

