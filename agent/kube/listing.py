"""Listing pods and namespaces: paged with limit/continue until the server says there is no
more (it may answer fewer than asked), a continue token that expired (410) restarting the
list a bounded number of times, every page inside the target's deadline and item cap."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from lightkube import Client
from lightkube.operators import exists
from lightkube.resources.core_v1 import Namespace

from agent.kube.cluster import Cluster, KubeError, api_error, status_of
from agent.kube.models import BilledPod

PAGE_SIZE = 500
MAX_ITEMS = 1_000_000  # per listing: a continue token that never ends stops here at the latest
MAX_RESTARTS = 3  # a continue token expired (410): the list starts over, this often
ALL = "*"


def selector(raw: str | None) -> dict[str, Any] | None:
    """A label selector as written, for lightkube: one requirement whose key is the whole
    expression (lightkube joins requirements as key + operator, and exists() adds nothing)."""
    return {raw: exists()} if raw else None


def _same(item: Any) -> Any:
    return item


def list_all(client: Client, cluster: Cluster, kind: type, namespace: str | None, labels: str | None, *,
             in_time: Callable[[str], None], page_size: int = PAGE_SIZE, max_items: int = MAX_ITEMS,
             convert: Callable[[Any], Any] = _same) -> tuple[list[Any], str | None]:
    """Every object of ``kind`` (in ``namespace``, ``ALL``, or cluster-scoped with None), each
    ``convert``ed as it arrives (None: left out; the models of a whole listing kept alive make the
    garbage collector walk them on every page), and the list's resourceVersion.
    ``in_time(what)`` raises once the target's deadline has passed."""
    what = f"list {kind._api_info.plural}"
    for attempt in range(MAX_RESTARTS + 1):
        in_time(what)
        kwargs: dict[str, Any] = {"chunk_size": page_size, "labels": selector(labels)}
        if namespace is not None:
            kwargs["namespace"] = namespace
        listing = client.list(kind, **kwargs)
        items: list[Any] = []
        count = 0
        try:
            for item in listing:
                kept = convert(item)
                if kept is not None:
                    items.append(kept)
                count += 1
                if count % page_size == 0:
                    in_time(f"{what}: stopped after {count} items")
                if count > max_items:
                    raise KubeError(f"kubernetes {what} in cluster {cluster.label}: more than {max_items} items; "
                                    "the listing is cut off rather than run forever")
            return items, _version(listing)
        except KubeError:
            raise
        except Exception as exc:  # noqa: BLE001 - lightkube, httpx2 and msgspec errors are translated here
            if status_of(exc) == 410 and attempt < MAX_RESTARTS:
                continue  # the continue token expired mid-list: a consistent list needs a fresh start
            if status_of(exc) == 410:
                break
            raise api_error(exc, cluster, None if namespace == ALL else namespace, what) from exc
    raise KubeError(f"kubernetes {what} in cluster {cluster.label}: the continue token expired "
                    f"{MAX_RESTARTS + 1} times in a row")


def _version(listing: Any) -> str | None:
    try:
        return str(listing.resourceVersion)
    except Exception:  # noqa: BLE001 - an empty first page may carry none
        return None


def pods(client: Client, cluster: Cluster, namespaces: Iterable[str], labels: str | None,
         in_time: Callable[[str], None], convert: Callable[[Any], Any] = _same,
         page_size: int = PAGE_SIZE) -> tuple[list[Any], dict[str, str | None]]:
    """The pods of every namespace (``()``: all at once), as much of them as billing reads
    (``BilledPod``), converted, and each listing's resourceVersion."""
    found: list[Any] = []
    versions: dict[str, str | None] = {}
    for namespace in tuple(namespaces) or (ALL,):
        items, version = list_all(client, cluster, BilledPod, namespace, labels, in_time=in_time, page_size=page_size,
                                  convert=convert)
        found += items
        versions[namespace] = version
    return found, versions


def namespace_labels(client: Client, cluster: Cluster, namespaces: Iterable[str],
                     in_time: Callable[[str], None]) -> dict[str, dict[str, str]]:
    """Each namespace's labels: the listed ones read one by one, else every namespace."""
    wanted = tuple(namespaces)
    if not wanted:
        items, _ = list_all(client, cluster, Namespace, None, None, in_time=in_time)
        return {ns.metadata.name: dict(ns.metadata.labels or {}) for ns in items if ns.metadata}
    labels = {}
    for name in wanted:
        in_time("get namespace")
        try:
            ns = client.get(Namespace, name)
        except Exception as exc:  # noqa: BLE001 - translated at the boundary
            if status_of(exc) == 404:
                labels[name] = {}
                continue
            raise api_error(exc, cluster, name, "get namespace") from exc
        labels[name] = dict(ns.metadata.labels or {}) if ns.metadata else {}
    return labels


__all__ = ["ALL", "PAGE_SIZE", "list_all", "namespace_labels", "pods", "selector"]
