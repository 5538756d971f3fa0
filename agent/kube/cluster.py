"""Which cluster a measurement reads and how: its kubeconfig (or the in-cluster service
account), a lightkube client over a bounded transport, and the agent's errors for what
the API server answers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from lightkube import ApiError, Client, ConfigError, KubeConfig
from lightkube.config.client_adapter import verify_cluster
from lightkube.config.kubeconfig import SingleConfig

from agent.errors import SamplingError, excerpt
from agent.settings import Kubernetes

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
MAX_KUBECONFIG_BYTES = 4 * 2**20
MAX_ANSWER_BYTES = 64 * 2**20  # one page of pods (a 500-pod page is about 2 MB)
MAX_WATCH_BYTES = 256 * 2**20  # one watch request; it is renewed from its last resourceVersion
TIMEOUT = httpx2.Timeout(30.0, connect=10.0)


class KubeError(SamplingError):
    """A cluster could not be listed: its target emits no records for the tick."""


class KubeAuthError(KubeError):
    """The API server refused the agent's identity (401) or its permissions (403)."""


class KubeconfigError(ValueError):
    """A kubeconfig that cannot be used: the message names the file and what is wrong."""


@dataclass(frozen=True)
class Cluster:
    label: str  # the cluster's name in logs and records: its kubeconfig cluster, or "in-cluster"
    config: SingleConfig
    # a bearer token asked for each request (an EKS token, renewed as it runs out); None: the config's user
    token: Callable[[], str] | None = field(default=None, repr=False, compare=False)


def read_kubeconfig(path: Path, context: str | None) -> Cluster:
    import yaml

    try:
        with path.open("rb") as handle:
            text = handle.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as exc:
        raise KubeconfigError(f"kubeconfig {path}: cannot be read ({exc.strerror or exc})") from None
    if len(text) > MAX_KUBECONFIG_BYTES:
        raise KubeconfigError(f"kubeconfig {path}: larger than {MAX_KUBECONFIG_BYTES} bytes")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KubeconfigError(f"kubeconfig {path}: not YAML: {excerpt(str(exc))}") from None
    if not isinstance(raw, dict):
        raise KubeconfigError(f"kubeconfig {path}: expected a mapping with clusters, users and contexts")
    try:
        config = KubeConfig.from_dict(raw, fname=path).get(context_name=context)
    except ConfigError as exc:
        raise KubeconfigError(f"kubeconfig {path}: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KubeconfigError(f"kubeconfig {path}: malformed ({type(exc).__name__}: {excerpt(str(exc))})") from None
    if config is None or config.cluster is None or not config.cluster.server:
        raise KubeconfigError(f"kubeconfig {path}: the context names no cluster with a server")
    if not str(config.cluster.server).startswith(("https://", "http://")):
        raise KubeconfigError(f"kubeconfig {path}: server {str(config.cluster.server)[:100]!r} is not an http(s) URL")
    name = next((c.get("context", {}).get("cluster") for c in raw.get("contexts") or ()
                 if isinstance(c, dict) and c.get("name") == config.context_name), None)
    return Cluster(str(name or config.context_name or config.cluster.server), config)


def kubeconfig_path(k: Kubernetes, env: Mapping[str, str]) -> Path | None:
    """The file a measurement reads, or None for the in-cluster service account."""
    if k.kubeconfig:
        return Path(k.kubeconfig)
    if (SERVICE_ACCOUNT / "token").is_file() and env.get("KUBERNETES_SERVICE_HOST"):
        return None
    if env.get("KUBECONFIG"):
        return Path(env["KUBECONFIG"].split(os.pathsep)[0]).expanduser()
    return Path("~/.kube/config").expanduser()


def resolve(k: Kubernetes) -> Cluster:
    """The cluster of a measurement: KubeconfigError naming the file and what is wrong."""
    path = kubeconfig_path(k, os.environ)
    if path is not None:
        return read_kubeconfig(path, k.context)
    try:
        return Cluster("in-cluster", KubeConfig.from_service_account().get())
    except (ConfigError, KeyError, OSError) as exc:
        raise KubeconfigError(f"in-cluster service account {SERVICE_ACCOUNT}: {exc}") from None


class _Capped(httpx2.SyncByteStream):
    def __init__(self, inner: Any, limit: int, url: str):
        self.inner, self.limit, self.url = inner, limit, url

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self.inner:
            seen += len(chunk)
            if seen > self.limit:
                raise httpx2.ReadError(f"{self.url}: answer larger than {self.limit} bytes; not read further")
            yield chunk

    def close(self) -> None:
        self.inner.close()


class BoundedTransport(httpx2.BaseTransport):
    """TLS as the kubeconfig says; every answer read only so far; watches ask for bookmarks."""

    def __init__(self, config: SingleConfig, token: Callable[[], str] | None = None):
        plain = str(config.cluster.server).startswith("http://")  # no TLS: no context to build (0.15 s)
        context = False if plain else verify_cluster(config.cluster, config.user, config.abs_file, trust_env=False)
        self.inner = httpx2.HTTPTransport(verify=context, trust_env=False)
        self.token = token

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if self.token is not None:  # each request, a watch's renewals included, with a token still good
            request.headers["Authorization"] = f"Bearer {self.token()}"
        watching = request.url.params.get("watch") == "true"
        if watching:  # lightkube's watch() does not ask for bookmarks; the agent keeps its place with them
            request.url = request.url.copy_add_param("allowWatchBookmarks", "true")
        response = self.inner.handle_request(request)
        limit = MAX_WATCH_BYTES if watching else MAX_ANSWER_BYTES
        return httpx2.Response(response.status_code, headers=response.headers,
                               stream=_Capped(response.stream, limit, str(request.url.copy_with(query=None))),
                               extensions=response.extensions)

    def close(self) -> None:
        self.inner.close()


def client_for(cluster: Cluster, timeout: httpx2.Timeout = TIMEOUT) -> Client:
    return Client(cluster.config, timeout=timeout, trust_env=False,
                  transport=BoundedTransport(cluster.config, cluster.token))


def api_error(exc: Exception, cluster: Cluster, namespace: str | None, what: str) -> KubeError:
    """The agent's error for a failed call: 401/403 as KubeAuthError, naming cluster and namespace."""
    where = f"cluster {cluster.label} ({cluster.config.cluster.server}), " + (
        f"namespace {namespace}" if namespace else "all namespaces")
    code = status_of(exc)
    if code is not None:
        message = excerpt(exc.status.message or "") if isinstance(exc, ApiError) else ""
        if code in (401, 403):
            why = "the token was refused" if code == 401 else "the identity may not do this (RBAC)"
            if code == 401 and cluster.token is not None:  # an EKS token: the cluster does not know the role
                why += " (map the role in an EKS access entry or aws-auth)"
            return KubeAuthError(f"kubernetes {what} in {where}: {code} {why}: {message}")
        return KubeError(f"kubernetes {what} in {where}: {code} {message}")
    return KubeError(f"kubernetes {what} in {where}: {excerpt(f'{type(exc).__name__}: {exc}')}")


def status_of(exc: Exception) -> int | None:
    """The HTTP status of a refused call (an ApiError, or a non-JSON error answer), else None."""
    if isinstance(exc, ApiError):
        return exc.status.code
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None
