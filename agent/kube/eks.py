"""EKS clusters in customers' accounts, reached through the measurement's assumed role.

``eks:DescribeCluster`` gives the API server's endpoint and CA. The bearer token is the one the
AWS IAM Authenticator (and so every EKS API server) accepts: ``k8s-aws-v1.`` + base64url of a
presigned STS ``GetCallerIdentity`` URL whose signature covers the ``x-k8s-aws-id: <cluster>``
header, made the way ``aws eks get-token`` makes it (botocore's presigner, the header added in a
before-sign hook). The API server replays the URL to STS with its own cluster name, so a token
is good for that one cluster, for 15 minutes after it was signed.

The token is a credential: it is kept out of reprs, and nothing here logs it.
"""

from __future__ import annotations

import base64
import binascii
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError

from agent.credentials import describe_aws_error
from agent.errors import SamplingError, excerpt

TOKEN_PREFIX = "k8s-aws-v1."
CLUSTER_ID_HEADER = "x-k8s-aws-id"
# X-Amz-Expires: STS ignores it (a presigned GetCallerIdentity lives 15 minutes after X-Amz-Date);
# authenticators up to 0.3.0 accept only 0..60, so every token generator sends 60
PRESIGN_EXPIRES = 60
TOKEN_LIFETIME = timedelta(minutes=15)
# renewed one minute early, as aws-iam-authenticator and `aws eks get-token` (14 minutes) do
RENEW_BEFORE = timedelta(minutes=1)

ClientFor = Callable[[str], Any]  # clients("eks"): a client for the role's account in the cluster's region


class EksError(SamplingError):
    """The cluster's endpoint, CA or token cannot be had: that target fails, loudly."""


@dataclass(frozen=True)
class EksAccess:
    """How to reach one cluster's API server until ``expires_at``: renew the token before then."""

    server: str  # https://<id>.<zone>.<region>.eks.amazonaws.com
    ca_pem: bytes = field(repr=False)  # the cluster's CA certificate(s), PEM
    token: str = field(repr=False)  # the bearer token: a credential
    expires_at: datetime


def eks_access(clients: ClientFor, cluster: str, *, now: datetime) -> EksAccess:
    """The endpoint, CA and a fresh token of ``cluster``, through the clients of the measurement's
    role (the agent's timeouts, retries and endpoint configuration). ``now`` is the wall time the
    token's expiry is reckoned from (it is signed with the same host clock)."""
    server, ca_pem = describe_cluster(clients("eks"), cluster)
    return EksAccess(server, ca_pem, eks_token(clients("sts"), cluster), now + TOKEN_LIFETIME - RENEW_BEFORE)


def describe_cluster(eks: Any, cluster: str) -> tuple[str, bytes]:
    """(endpoint, CA PEM) of an ACTIVE cluster; EksError saying what is wrong otherwise."""
    where = f"EKS cluster {cluster!r} in {eks.meta.region_name}"
    try:
        answer = eks.describe_cluster(name=cluster)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "ResourceNotFoundException":
            raise EksError(f"{where}: no such cluster (eks:DescribeCluster: {describe_aws_error(exc)})") from exc
        if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
            raise EksError(f"{where}: the role may not call eks:DescribeCluster on it (allow it: usage-agent "
                           f"iam-policy lists it): {describe_aws_error(exc)}") from exc
        raise EksError(f"{where}: eks:DescribeCluster failed: {describe_aws_error(exc)}") from exc
    except BotoCoreError as exc:  # no answer: connection, timeout, credentials
        raise EksError(f"{where}: eks:DescribeCluster got no answer: {excerpt(describe_aws_error(exc))}") from exc
    info = answer.get("cluster") if isinstance(answer, dict) else None
    if not isinstance(info, dict):
        raise EksError(f"{where}: eks:DescribeCluster answered without a cluster")
    status = info.get("status")
    if status != "ACTIVE":
        raise EksError(f"{where}: the cluster is {status or 'of unknown status'}, not ACTIVE; its API server "
                       "is not there to list pods from")
    endpoint = info.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme != "https" or not parts.hostname:
        raise EksError(f"{where}: eks:DescribeCluster gave no https endpoint ({excerpt(repr(endpoint))})")
    return endpoint, _ca_pem(where, (info.get("certificateAuthority") or {}).get("data"))


def _ca_pem(where: str, data: Any) -> bytes:
    """certificateAuthority.data (base64 of PEM) as PEM that TLS can load, or EksError."""
    if not isinstance(data, str) or not data:
        raise EksError(f"{where}: eks:DescribeCluster gave no certificateAuthority.data")
    try:
        pem = base64.b64decode(data, validate=True)
        trust = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        trust.load_verify_locations(cadata=pem.decode("ascii"))  # parses every certificate in it
    except (binascii.Error, UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
        raise EksError(f"{where}: certificateAuthority.data is not a base64 PEM CA certificate "
                       f"({type(exc).__name__}: {excerpt(str(exc), 120)})") from exc
    if not trust.cert_store_stats()["x509_ca"]:
        raise EksError(f"{where}: certificateAuthority.data holds no CA certificate")
    return pem


def _pop_cluster_id(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
    # the cluster rides in Params (as in `aws eks get-token`), so a shared client signs it only when asked
    if CLUSTER_ID_HEADER in params:
        context[CLUSTER_ID_HEADER] = params.pop(CLUSTER_ID_HEADER)


def _add_cluster_id_header(request: Any, **_: Any) -> None:
    if CLUSTER_ID_HEADER in request.context:
        request.headers[CLUSTER_ID_HEADER] = request.context[CLUSTER_ID_HEADER]


def eks_token(sts: Any, cluster: str) -> str:
    """The bearer token for ``cluster``, signed by ``sts``'s credentials at its (regional) endpoint."""
    events = sts.meta.events
    events.register("provide-client-params.sts.GetCallerIdentity", _pop_cluster_id, unique_id="usage-agent-k8s-aws-id")
    events.register("before-sign.sts.GetCallerIdentity", _add_cluster_id_header, unique_id="usage-agent-k8s-aws-id-header")
    try:
        url = sts.generate_presigned_url("get_caller_identity", Params={CLUSTER_ID_HEADER: cluster},
                                         ExpiresIn=PRESIGN_EXPIRES, HttpMethod="GET")
    except BotoCoreError as exc:  # no credentials to sign with
        raise EksError(f"EKS cluster {cluster!r}: cannot sign its token: {describe_aws_error(exc)}") from exc
    return TOKEN_PREFIX + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


class EksCredentials:
    """One cluster's access for a sampler: fetched on first use, fetched again once past
    ``expires_at``; every request asks ``current()``, so none is sent with a spent token."""

    def __init__(self, clients: ClientFor, cluster: str, now: Callable[[], datetime]):
        self._clients = clients
        self._cluster = cluster
        self._now = now
        self._lock = threading.Lock()
        self._access: EksAccess | None = None
        self._closed = False

    def current(self) -> EksAccess:
        with self._lock:  # a list and a watch renewing at once make one DescribeCluster, not two
            if self._closed:  # a watch still winding down asks nothing more of AWS
                raise EksError(f"EKS cluster {self._cluster!r}: its credentials are closed")
            now = self._now()
            if self._access is None or now >= self._access.expires_at:
                self._access = eks_access(self._clients, self._cluster, now=now)
            return self._access

    def close(self) -> None:
        """Forget the token for good (the target's memory closes what it holds)."""
        with self._lock:
            self._access, self._closed = None, True
