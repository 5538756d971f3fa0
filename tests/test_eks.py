"""EKS access: DescribeCluster through the assumed role (moto in server mode), the IAM
Authenticator's token, what an API server checks of it, and its renewal."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber

from agent.clock import SystemClock
from agent.credentials import SessionFactory
from agent.kube.eks import EksCredentials, EksError, describe_cluster, eks_access, eks_token
from agent.metrics import Metrics
from agent.telemetry import redact_text
from agent.testing.eks_token import eks_token_problem, verify_eks_token
from tests.conftest import EXTERNAL_ID, ROLE_ARN, Aws, offline_client
from tests.eks_cluster import CLUSTER, REGION, ca_certificate, create_cluster, moto_secret, seed_cluster

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
ENDPOINT = "https://ABCDEF0123456789.gr7.us-east-1.eks.amazonaws.com"


def role_clients(region: str = REGION) -> Any:
    """The clients a sampler is given for the measurement's role: the agent's own factory."""
    factory = SessionFactory(metrics=Metrics(), clock=SystemClock())
    return lambda service: factory.client(service, region, ROLE_ARN, EXTERNAL_ID)


def presigned_url(token: str) -> str:
    encoded = token.removeprefix("k8s-aws-v1.")
    return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def test_access_is_the_clusters_endpoint_and_ca_and_a_token_signed_by_the_assumed_role(aws: Aws) -> None:
    ca_pem, _ = ca_certificate()
    create_cluster(aws, endpoint=ENDPOINT, ca_pem=ca_pem)
    access = eks_access(role_clients(), CLUSTER, now=NOW)
    assert (access.server, access.ca_pem) == (ENDPOINT, ca_pem)
    assert access.expires_at == NOW + timedelta(minutes=14)  # 15 minutes, renewed one early
    url = presigned_url(access.token)
    assert url.startswith(f"{aws.endpoint}/?")  # STS at the endpoint botocore is configured with (moto here)
    params = query(url)
    assert params["Action"] == "GetCallerIdentity" and params["Version"] == "2011-06-15"
    assert params["X-Amz-Expires"] == "60" and params["X-Amz-SignedHeaders"] == "host;x-k8s-aws-id"
    (assumed,) = aws.assumed_roles()
    assert assumed.role_arn == ROLE_ARN and assumed.external_id == EXTERNAL_ID
    assert params["X-Amz-Credential"].split("/")[:3] == [assumed.access_key_id, params["X-Amz-Date"][:8], REGION]
    assert params["X-Amz-Security-Token"] == assumed.session_token
    assert eks_token_problem(access.token, CLUSTER, secret_key=moto_secret) is None


def test_the_token_is_good_for_its_own_cluster_only(aws: Aws) -> None:
    create_cluster(aws, endpoint=ENDPOINT, ca_pem=ca_certificate()[0])
    token = eks_access(role_clients(), CLUSTER, now=NOW).token
    assert verify_eks_token(token, CLUSTER, secret_key=moto_secret)
    assert eks_token_problem(token, "staging", secret_key=moto_secret) == (
        "the signature does not match (the token is not for cluster 'staging', or was altered)")
    assert eks_token_problem(token, CLUSTER, secret_key=lambda key: None) == (
        f"STS does not know the access key {query(presigned_url(token))['X-Amz-Credential'].split('/')[0]!r}")


def test_the_token_is_presigned_for_the_regional_sts_endpoint() -> None:
    sts = offline_client("sts", "eu-west-1")  # no endpoint override: botocore's own resolution
    token = eks_token(sts, "billing-eu")
    assert token.startswith("k8s-aws-v1.") and "=" not in token
    url = presigned_url(token)
    assert url.startswith("https://sts.eu-west-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15&")
    assert verify_eks_token(token, "billing-eu", secret_key={"x": "x"}.get, loopback_http=False)
    assert not verify_eks_token(token, "billing", secret_key={"x": "x"}.get)


def test_a_missing_cluster_names_it(aws: Aws) -> None:
    with pytest.raises(EksError, match=r"^EKS cluster 'prod' in us-east-1: no such cluster \(eks:DescribeCluster: "
                                       r"ResourceNotFoundException: No cluster found for name: prod\.\)$"):
        eks_access(role_clients(), CLUSTER, now=NOW)


def test_a_cluster_not_active_is_refused(aws: Aws) -> None:
    create_cluster(aws, endpoint=ENDPOINT, ca_pem=ca_certificate()[0], status="CREATING")
    with pytest.raises(EksError, match=r"^EKS cluster 'prod' in us-east-1: the cluster is CREATING, not ACTIVE"):
        eks_access(role_clients(), CLUSTER, now=NOW)


def test_a_ca_that_is_not_a_pem_certificate_is_refused(aws: Aws) -> None:
    create_cluster(aws, endpoint=ENDPOINT)  # moto's own certificateAuthority.data: random characters
    with pytest.raises(EksError, match=r"^EKS cluster 'prod' in us-east-1: certificateAuthority.data is not a base64 "
                                       r"PEM CA certificate"):
        eks_access(role_clients(), CLUSTER, now=NOW)
    seed_cluster(ca_pem=b"-----BEGIN CERTIFICATE-----\nMIIBkTCB+wIJAKHBfpegPjMCMA0GCSqGSIb3DQEBBQUAMA0xCzAJBgNV\n"
                        b"-----END CERTIFICATE-----\n")
    with pytest.raises(EksError, match=r"certificateAuthority.data is not a base64 PEM CA certificate \(SSLError"):
        eks_access(role_clients(), CLUSTER, now=NOW)


def test_an_endpoint_that_is_not_https_is_refused(aws: Aws) -> None:
    create_cluster(aws, endpoint="http://10.0.0.1", ca_pem=ca_certificate()[0])
    with pytest.raises(EksError, match=r"^EKS cluster 'prod' in us-east-1: eks:DescribeCluster gave no https "
                                       r"endpoint \('http://10.0.0.1'\)$"):
        eks_access(role_clients(), CLUSTER, now=NOW)


def test_a_role_without_describe_cluster_is_told_what_to_allow() -> None:
    eks = offline_client("eks", "eu-west-1")
    with Stubber(eks) as stub:
        stub.add_client_error("describe_cluster", service_error_code="AccessDeniedException", http_status_code=403,
                              service_message="User: arn:aws:sts::1:assumed-role/r/s is not authorized to perform: "
                                              "eks:DescribeCluster", expected_params={"name": "prod"})
        with pytest.raises(EksError, match=r"^EKS cluster 'prod' in eu-west-1: the role may not call eks:DescribeCluster "
                                           r"on it \(allow it: usage-agent iam-policy lists it\): AccessDeniedException: "):
            describe_cluster(eks, "prod")


def test_an_answer_without_an_endpoint_is_refused() -> None:
    eks = offline_client("eks", "eu-west-1")
    with Stubber(eks) as stub:
        stub.add_response("describe_cluster", {"cluster": {"name": "prod", "status": "ACTIVE"}})
        with pytest.raises(EksError, match=r"gave no https endpoint \(None\)$"):
            describe_cluster(eks, "prod")


def test_no_answer_is_an_eks_error() -> None:
    eks = boto3.client("eks", region_name="eu-west-1", endpoint_url="http://127.0.0.1:9", aws_access_key_id="x",
                       aws_secret_access_key="x", config=Config(retries={"total_max_attempts": 1}, connect_timeout=2))
    with pytest.raises(EksError, match=r"^EKS cluster 'prod' in eu-west-1: eks:DescribeCluster got no answer: "
                                       r"EndpointConnectionError: "):
        describe_cluster(eks, "prod")


def test_the_token_stays_out_of_reprs_and_logs(aws: Aws) -> None:
    create_cluster(aws, endpoint=ENDPOINT, ca_pem=ca_certificate()[0])
    access = eks_access(role_clients(), CLUSTER, now=NOW)
    assert access.token not in repr(access) and "ca_pem" not in repr(access)
    assert repr(access) == f"EksAccess(server={ENDPOINT!r}, expires_at={NOW + timedelta(minutes=14)!r})"


def test_an_eks_token_is_redacted_wherever_a_log_line_quotes_it() -> None:
    token = eks_token(offline_client("sts"), CLUSTER)
    for line in (f"Authorization: Bearer {token}", f"sent {token} to the API server",
                 f"ApiException(headers={{'authorization': 'Bearer {token}'}})", f"token={token}"):
        redacted = redact_text(line)
        assert token[11:] not in redacted and "[redacted]" in redacted, redacted
    assert redact_text(f"sent {token} to the API server") == "sent k8s-aws-v1.[redacted] to the API server"


def test_credentials_are_renewed_once_past_their_expiry_and_not_before(aws: Aws) -> None:
    ca_pem, _ = ca_certificate()
    create_cluster(aws, endpoint=ENDPOINT, ca_pem=ca_pem)
    now = [NOW]
    credentials = EksCredentials(role_clients(), CLUSTER, lambda: now[0])
    first = credentials.current()
    seed_cluster(endpoint="https://MOVED.gr7.us-east-1.eks.amazonaws.com")  # what a renewal would read
    now[0] = NOW + timedelta(minutes=13, seconds=59)
    assert credentials.current() is first  # still good: no DescribeCluster, no new token
    now[0] = first.expires_at
    renewed = credentials.current()
    assert renewed is not first and renewed.server == "https://MOVED.gr7.us-east-1.eks.amazonaws.com"
    assert renewed.expires_at == first.expires_at + timedelta(minutes=14)
    assert verify_eks_token(renewed.token, CLUSTER, secret_key=moto_secret)
    credentials.close()  # as the target's memory closes: a watch winding down gets no new token
    with pytest.raises(EksError, match=r"^EKS cluster 'prod': its credentials are closed$"):
        credentials.current()


def token_for(url: str) -> str:
    return "k8s-aws-v1." + base64.urlsafe_b64encode(url.encode()).decode().rstrip("=")


def signed_now() -> tuple[str, datetime]:
    """A genuine token and the time it was signed at."""
    token = eks_token(offline_client("sts", "us-east-1"), CLUSTER)
    return token, datetime.strptime(query(presigned_url(token))["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)


@pytest.mark.parametrize(("change", "problem"), [
    (lambda t, u: "k8s-aws-v2." + t[11:], "token lacks the 'k8s-aws-v1.' prefix"),
    (lambda t, u: t + "=" * (-len(t[11:]) % 4 or 4), "token is padded (base64url without padding expected)"),
    (lambda t, u: t[:20] + "*" + t[21:], "token is not base64url"),
    (lambda t, u: t + "A" * 4096, "token is longer than 4096 bytes"),
    (lambda t, u: token_for(u.replace("https://", "http://")), "unexpected scheme 'http' in the presigned URL"),
    (lambda t, u: token_for(u.replace("sts.us-east-1.amazonaws.com", "sts.us-east-1.evil.example")),
     "unexpected host 'sts.us-east-1.evil.example' in the presigned URL"),
    (lambda t, u: token_for(u.replace(".com/?", ".com/x?")), "unexpected path in the presigned URL"),
    (lambda t, u: token_for(u + "&Foo=1"), "query parameter 'Foo' is not allowed"),
    (lambda t, u: token_for(u + "&Action=AssumeRole"), "query parameter 'Action' has more than one value"),
    (lambda t, u: token_for(u.replace("GetCallerIdentity", "GetSessionToken")),
     "the presigned URL is not an STS GetCallerIdentity (Version 2011-06-15) call"),
    (lambda t, u: token_for(u.replace("host%3Bx-k8s-aws-id", "host")), "the x-k8s-aws-id header is not signed"),
    (lambda t, u: token_for(u.replace("X-Amz-Expires=60", "X-Amz-Expires=901")), "invalid X-Amz-Expires '901' (0..900 expected)"),
])
def test_what_an_api_server_refuses(change: Any, problem: str) -> None:
    token, _ = signed_now()
    assert eks_token_problem(change(token, presigned_url(token)), CLUSTER) == problem


def test_a_token_lives_fifteen_minutes_after_it_was_signed() -> None:
    token, signed_at = signed_now()
    assert eks_token_problem(token, CLUSTER, now=signed_at + timedelta(minutes=15)) is None
    assert eks_token_problem(token, CLUSTER, now=signed_at + timedelta(minutes=15, seconds=1)) == (
        f"the token expired at {(signed_at + timedelta(minutes=15)).isoformat()}")
    assert eks_token_problem(token, CLUSTER, now=signed_at - timedelta(minutes=6)) == "X-Amz-Date is in the future"


def test_an_altered_token_fails_the_signature() -> None:
    token, _ = signed_now()
    url = presigned_url(token)
    assert verify_eks_token(token, CLUSTER, secret_key={"x": "x"}.get)
    assert not verify_eks_token(token, CLUSTER, secret_key={"x": "other"}.get)
    assert not verify_eks_token(token_for(url.replace("X-Amz-Expires=60", "X-Amz-Expires=600")), CLUSTER,
                                secret_key={"x": "x"}.get)

