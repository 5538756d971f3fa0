"""Between ticks, in the daemon: a watch on a target's pods (from the resourceVersion of a
list, bookmarks keeping it current, a re-list on 410 Gone) records each pod's start and end,
so a pod that starts and is deleted between two ticks is still billed for its seconds."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import structlog
from lightkube.resources.core_v1 import Pod

from agent.kube import listing
from agent.kube.cluster import Cluster, client_for, status_of
from agent.kube.pods import PodUsage, usage_of

log = structlog.get_logger("agent.kube.watch")

SERVER_TIMEOUT = 300  # seconds a watch request lasts on the server before it is renewed
MAX_PODS = 1_000_000  # observed between two ticks; more is not a cluster to trust
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


def _deleted_at(pod: Any, now: datetime) -> datetime:
    meta = pod.metadata
    stamp = getattr(meta, "deletionTimestamp", None) if meta is not None else None
    return stamp if isinstance(stamp, datetime) and stamp <= now else now


class PodWatcher:
    """One thread per (measurement, namespace): ``seen()`` is what it observed since it started."""

    def __init__(self, cluster: Cluster, namespaces: Iterable[str], labels: str | None, metric: str, gpu_resource: str,
                 keep_labels: tuple[str, ...], versions: dict[str, str | None], now: Callable[[], datetime],
                 wait: Callable[[threading.Event, float], bool] | None = None):
        self.cluster = cluster
        self.labels = labels
        self.metric = metric
        self.gpu_resource = gpu_resource
        self.keep_labels = keep_labels
        self.now = now
        self._wait = wait or (lambda event, seconds: event.wait(seconds))
        self._lock = threading.Lock()
        self._seen: dict[str, PodUsage] = {}
        self._stop = threading.Event()
        self.events = 0  # watch events applied (ADDED, MODIFIED, DELETED)
        self._clients: list[Any] = []
        self._threads = [threading.Thread(target=self._run, args=(ns, versions.get(ns)), daemon=True,
                                          name=f"watch-{cluster.label}-{ns}") for ns in (tuple(namespaces) or (listing.ALL,))]
        for thread in self._threads:
            thread.start()

    def seen(self) -> dict[str, PodUsage]:
        with self._lock:
            return dict(self._seen)

    def forget(self, ended_by: datetime) -> None:
        """Drop pods whose span ended by ``ended_by``: no window still to be sampled needs them."""
        with self._lock:
            self._seen = {uid: u for uid, u in self._seen.items() if u.end is None or u.end > ended_by}

    def _record(self, pod: Any, deleted: bool) -> None:
        try:
            usage = usage_of(pod, self.metric, self.gpu_resource, keep_labels=self.keep_labels,
                             deleted_at=_deleted_at(pod, self.now()) if deleted else None)
        except ValueError as exc:  # the tick's list reports it, skipped, while it exists
            log.warning("watched pod unreadable", cluster=self.cluster.label, error=str(exc))
            return
        if usage is None:
            return
        with self._lock:
            if len(self._seen) < MAX_PODS or usage.uid in self._seen:
                self._seen[usage.uid] = usage
            self.events += 1

    def _run(self, namespace: str, version: str | None) -> None:
        failures = 0
        while not self._stop.is_set():
            client = client_for(self.cluster)
            self._clients.append(client)
            try:
                if version is None:  # a fresh list: where the watch starts from
                    _, version = listing.list_all(client, self.cluster, Pod, namespace, self.labels,
                                                  in_time=lambda _: None,
                                                  convert=lambda pod: self._record(pod, deleted=False))
                for kind, pod in client.watch(Pod, namespace=namespace, labels=listing.selector(self.labels),
                                              resource_version=version, server_timeout=SERVER_TIMEOUT):
                    failures = 0
                    version = getattr(pod.metadata, "resourceVersion", None) or version
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._record(pod, deleted=kind == "DELETED")
                    if self._stop.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - a watch that fails is renewed, never fatal
                if self._stop.is_set():
                    return
                if status_of(exc) == 410:  # the version is gone: what happened since cannot be seen
                    log.warning("watch expired (410); listing again: pods deleted in between are not seen",
                                cluster=self.cluster.label, namespace=namespace)
                    version = None
                    continue
                failures += 1
                log.warning("watch failed; retrying", cluster=self.cluster.label, namespace=namespace,
                            error=f"{type(exc).__name__}: {str(exc)[:300]}")
                if self._wait(self._stop, BACKOFF[min(failures, len(BACKOFF)) - 1]):
                    return
            finally:
                client.close()
                self._clients.remove(client)

    def close(self) -> None:
        self._stop.set()
        for client in list(self._clients):
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a stream another thread reads
                pass
        for thread in self._threads:
            thread.join(timeout=5)
