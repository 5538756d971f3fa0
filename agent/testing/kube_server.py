"""A Kubernetes API contract server on 127.0.0.1: pods and namespaces, listed (all namespaces
or one) with limit/continue and a page cap below the asked limit, label and field selectors,
410 Gone for an expired continue token or a stale resourceVersion, and watch streams of
ADDED / MODIFIED / DELETED and BOOKMARK events. Objects are what the API server returns, as
lightkube's models read them. A bearer token is checked (or ``verify_token`` decides)."""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.testing.server import Loopback

_REQUIREMENT = re.compile(r"^\s*(!?)\s*([A-Za-z0-9./_-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)|\s+(in|notin)\s*\(([^)]*)\))?\s*$")
FIELDS = {"metadata.name": ("metadata", "name"), "metadata.namespace": ("metadata", "namespace"),
          "spec.nodeName": ("spec", "nodeName"), "status.phase": ("status", "phase")}


def _split(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [p for p in [*parts, current] if p.strip()]


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """A label selector as the API server reads it; ValueError for one it would refuse."""
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in _split(selector):
        match = _REQUIREMENT.match(part)
        if not match:
            raise ValueError(f"unable to parse requirement: {part!r}")
        negated, key, op, value, set_op, values = match.groups()
        if negated:
            tests.append(lambda labels, k=key: k not in labels)
        elif op in ("=", "=="):
            tests.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            tests.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif set_op:
            chosen = {v.strip() for v in values.split(",") if v.strip()}
            if set_op == "in":
                tests.append(lambda labels, k=key, c=chosen: labels.get(k) in c)
            else:
                tests.append(lambda labels, k=key, c=chosen: labels.get(k) not in c)
        else:
            tests.append(lambda labels, k=key: k in labels)
    return lambda labels: all(test(labels) for test in tests)


def field_matcher(selector: str) -> Callable[[dict[str, Any]], bool]:
    tests = []
    for part in _split(selector):
        match = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not match or match.group(1) not in FIELDS:
            raise ValueError(f"field label not supported: {part!r}")
        field, op, value = match.groups()
        outer, inner = FIELDS[field]
        tests.append(lambda obj, o=outer, i=inner, v=value, eq=op != "!=": ((obj.get(o) or {}).get(i) or "") == v if eq
                     else ((obj.get(o) or {}).get(i) or "") != v)
    return lambda obj: all(test(obj) for test in tests)


def container(name: str, requests: dict[str, str] | None = None, restart_policy: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "image": "registry.example/app:1", "resources": {}}
    if requests:
        spec["resources"]["requests"] = dict(requests)
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    return spec


def pod(namespace: str, name: str, *, containers: list[dict[str, Any]] | None = None,
        init_containers: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None,
        phase: str = "Running", start: str | None = "2026-11-21T08:00:00Z", finished: str | None = None,
        overhead: dict[str, str] | None = None, pod_requests: dict[str, str] | None = None,
        node: str = "node-1", uid: str | None = None) -> dict[str, Any]:
    """A pod as the API server returns it; ``finished``: its container's terminated finishedAt."""
    containers = containers if containers is not None else [container("app", {"cpu": "1", "memory": "1Gi"})]
    spec: dict[str, Any] = {"containers": containers, "nodeName": node, "restartPolicy": "Never"}
    if init_containers:
        spec["initContainers"] = init_containers
    if overhead:
        spec["overhead"] = overhead
    if pod_requests:
        spec["resources"] = {"requests": pod_requests}
    status: dict[str, Any] = {"phase": phase}
    if start:
        status["startTime"] = start
        state: dict[str, Any] = {"running": {"startedAt": start}}
        if finished:
            state = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": start, "finishedAt": finished}}
        status["containerStatuses"] = [{"name": c["name"], "image": c["image"], "imageID": "", "ready": not finished,
                                        "restartCount": 0, "state": state} for c in containers]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}")),
                         "labels": labels or {}, "creationTimestamp": start or "2026-11-21T08:00:00Z"},
            "spec": spec, "status": status}


class KubeApiServer(Loopback):
    """The API server's pods and namespaces. ``page_cap``: at most this many items a page,
    whatever limit was asked. ``forbidden``: namespaces (``*``: all-namespace lists) answered 403."""

    def __init__(self, token: str = "kube-token", *, verify_token: Callable[[str], bool] | None = None,
                 page_cap: int | None = None, watch_timeout: float = 5.0, port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.token = token
        self.verify_token = verify_token
        self.page_cap = page_cap
        self.watch_timeout = watch_timeout  # longest a watch request stays open
        self.forbidden: set[str] = set()
        self.expire_continue_tokens = 0  # the next N continue tokens presented are answered 410
        self._lock = threading.Condition()
        self._version = 100
        self._compacted = 0  # resourceVersions below this are gone (410)
        self._pods: dict[tuple[str, str], dict[str, Any]] = {}
        self._namespaces: dict[str, dict[str, Any]] = {}
        self._events: list[tuple[int, str, dict[str, Any]]] = []
        self.requests: list[str] = []  # every request's path and query
        self.page_sizes: list[int] = []  # items in each list page served
        self._stopping = False
        super().__init__(self._handler(), port, tls)  # tls: https, as an EKS endpoint is (its CA is the test's)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        super().stop()

    def kubeconfig(self, context: str = "test", cluster: str = "test-cluster", token: str | None = None) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Config", "current-context": context,
                "clusters": [{"name": cluster, "cluster": {"server": self.url}}],
                "users": [{"name": "agent", "user": {"token": token or self.token}}],
                "contexts": [{"name": context, "context": {"cluster": cluster, "user": "agent"}}]}

    # -- state ------------------------------------------------------------------------

    def _bump(self, kind: str, obj: dict[str, Any]) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        self._events.append((self._version, kind, json.loads(json.dumps(obj))))
        self._lock.notify_all()

    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {
                "name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, name)), "labels": labels or {}},
                "status": {"phase": "Active"}}
            self._namespaces[name] = ns
            self._version += 1
            ns["metadata"]["resourceVersion"] = str(self._version)

    def add_pod(self, obj: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            kind = "MODIFIED" if key in self._pods else "ADDED"
            self._pods[key] = obj
            self._bump(kind, obj)
            return obj

    def delete_pod(self, namespace: str, name: str, at: str | None = None) -> None:
        with self._lock:
            obj = self._pods.pop((namespace, name))
            if at:
                obj["metadata"]["deletionTimestamp"] = at
            self._bump("DELETED", obj)

    def compact(self) -> None:
        """Forget every resourceVersion so far: watches and continue tokens from before get 410."""
        with self._lock:
            self._compacted = self._version + 1
            self._events.clear()

    # -- the API ----------------------------------------------------------------------

    def _authorized(self, header: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        presented = header[len("Bearer "):].strip()
        return self.verify_token(presented) if self.verify_token else presented == self.token

    def _list(self, kind: str, namespace: str | None, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        try:
            labels = label_matcher(query.get("labelSelector", ""))
            fields = field_matcher(query.get("fieldSelector", ""))
        except ValueError as exc:
            return 400, status(400, "BadRequest", str(exc))
        limit = int(query.get("limit") or 0) or None
        offset = 0
        with self._lock:
            if "continue" in query:
                try:
                    token = json.loads(base64.urlsafe_b64decode(query["continue"]))
                    version, offset = int(token["rv"]), int(token["offset"])
                except (ValueError, KeyError, TypeError):
                    return 400, status(400, "BadRequest", "invalid continue token")
                if self.expire_continue_tokens or version < self._compacted:
                    self.expire_continue_tokens = max(0, self.expire_continue_tokens - 1)
                    return 410, status(410, "Expired", "The provided continue parameter is too old to display a "
                                                       "consistent list result. You can start a new list without "
                                                       "the continue parameter.")
            source = self._pods if kind == "pods" else {(n, n): o for n, o in self._namespaces.items()}
            chosen = [json.loads(json.dumps(o)) for key, o in sorted(source.items())
                      if (namespace is None or key[0] == namespace)
                      and labels(o["metadata"].get("labels") or {}) and fields(o)]
            version = self._version
        size = min(x for x in (limit, self.page_cap, len(chosen) - offset) if x is not None)
        page = chosen[offset:offset + size]
        self.page_sizes.append(len(page))
        meta: dict[str, Any] = {"resourceVersion": str(version)}
        if limit is not None and offset + len(page) < len(chosen):
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(
                {"rv": version, "offset": offset + len(page)}).encode()).decode()
        list_kind = "PodList" if kind == "pods" else "NamespaceList"
        return 200, {"apiVersion": "v1", "kind": list_kind, "metadata": meta, "items": page}

    def _watch(self, handler: BaseHTTPRequestHandler, namespace: str | None, query: dict[str, str]) -> None:
        labels = label_matcher(query.get("labelSelector", ""))
        since = int(query.get("resourceVersion") or 0)
        timeout = min(float(query.get("timeoutSeconds") or self.watch_timeout), self.watch_timeout)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def send(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        ends = time.monotonic() + timeout
        with self._lock:
            if since and since < self._compacted:
                send({"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since}")})
                handler.wfile.write(b"0\r\n\r\n")
                return
            cursor = since or self._version
            bookmarked = False
            while not self._stopping and time.monotonic() < ends:
                fresh = [(v, k, o) for v, k, o in self._events if v > cursor]
                for version, kind, obj in fresh:
                    cursor = version
                    if (namespace is None or obj["metadata"]["namespace"] == namespace) and \
                            labels(obj["metadata"].get("labels") or {}):
                        send({"type": kind, "object": obj})
                if bookmarks and (fresh or not bookmarked):
                    send({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                                         "metadata": {"resourceVersion": str(self._version)}}})
                    bookmarked = True
                    cursor = max(cursor, self._version)
                self._lock.wait(timeout=max(0.0, min(0.05, ends - time.monotonic())))
        handler.wfile.write(b"0\r\n\r\n")

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return

            def _json(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                server.requests.append(self.path)
                if not server._authorized(self.headers.get("Authorization", "")):
                    self._json(401, status(401, "Unauthorized", "Unauthorized"))
                    return
                parts = url.path.strip("/").split("/")
                namespace = None
                if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5 and parts[4] == "pods":
                    kind, namespace = "pods", parts[3]
                elif parts == ["api", "v1", "pods"]:
                    kind = "pods"
                elif parts == ["api", "v1", "namespaces"]:
                    kind = "namespaces"
                elif parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4:
                    self._namespace(parts[3])
                    return
                else:
                    self._json(404, status(404, "NotFound", "the server could not find the requested resource"))
                    return
                if (namespace or "*") in server.forbidden:
                    where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
                    self._json(403, status(403, "Forbidden", f'{kind} is forbidden: User "agent" cannot list '
                                                             f'resource "{kind}" in API group "" {where}'))
                    return
                if query.get("watch") == "true":
                    server._watch(self, namespace, query)
                    return
                self._json(*server._list(kind, namespace, query))

            def _namespace(self, name: str) -> None:
                if name in server.forbidden:
                    self._json(403, status(403, "Forbidden", f'namespaces "{name}" is forbidden'))
                    return
                with server._lock:
                    ns = server._namespaces.get(name)
                if ns is None:
                    self._json(404, status(404, "NotFound", f'namespaces "{name}" not found'))
                else:
                    self._json(200, ns)

        return Handler


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
