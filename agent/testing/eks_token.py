"""What an EKS API server checks of a bearer token (aws-iam-authenticator's ``Verify``), for the
Kubernetes contract server: ``verify_token=lambda t: verify_eks_token(t, "prod")``.

The authenticator checks the token's form, then replays the presigned URL to STS with its own
``x-k8s-aws-id`` header: STS recomputes the signature, so a token signed for another cluster
fails there. Given the signer's secret key (``secret_key``: the test's STS issued it), this
recomputes the SigV4 signature with botocore's signer the same way; without it, only the form
is checked, and the cluster only as far as the header is signed at all.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from urllib.parse import parse_qs, urlsplit, urlunsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

TOKEN_PREFIX = "k8s-aws-v1."
CLUSTER_ID_HEADER = "x-k8s-aws-id"
MAX_TOKEN_BYTES = 4 * 1024  # the authenticator's maxTokenLenBytes
LIFETIME = timedelta(minutes=15)  # after X-Amz-Date, whatever X-Amz-Expires says
CLOCK_SKEW = timedelta(minutes=5)  # STS refuses a signature dated further ahead ("not yet current")
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
# the query parameters the authenticator allows (its parameterWhitelist), lower-cased
ALLOWED_PARAMETERS = frozenset({"action", "version", "x-amz-algorithm", "x-amz-credential", "x-amz-date",
                                "x-amz-expires", "x-amz-security-token", "x-amz-signature", "x-amz-signedheaders"})
# regional and global STS endpoints of the aws, aws-cn and aws-us-gov partitions (and their FIPS forms)
STS_HOST = re.compile(r"^sts(?:-fips)?(?:\.[a-z]{2}(?:-[a-z]+)+-\d)?\.amazonaws\.com(?:\.cn)?$")


def eks_token_problem(token: str, cluster: str, *, secret_key: Callable[[str], str | None] | None = None,
                      now: datetime | None = None, loopback_http: bool = True) -> str | None:
    """Why an API server for ``cluster`` refuses ``token``, or None when it accepts it.
    ``loopback_http`` admits http://127.0.0.1 (a test's STS) beside https STS endpoints."""
    if len(token.encode()) > MAX_TOKEN_BYTES:
        return f"token is longer than {MAX_TOKEN_BYTES} bytes"
    if not token.startswith(TOKEN_PREFIX):
        return f"token lacks the {TOKEN_PREFIX!r} prefix"
    encoded = token[len(TOKEN_PREFIX):]
    if "=" in encoded:
        return "token is padded (base64url without padding expected)"
    try:
        url = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "token is not base64url"
    parts = urlsplit(url)
    if parts.scheme == "https":
        if not STS_HOST.match(parts.hostname or ""):
            return f"unexpected host {parts.hostname!r} in the presigned URL"
    elif not (loopback_http and parts.scheme == "http" and parts.hostname == "127.0.0.1"):
        return f"unexpected scheme {parts.scheme!r} in the presigned URL"
    if parts.path != "/" or parts.fragment:
        return "unexpected path in the presigned URL"
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return "malformed query in the presigned URL"
    params: dict[str, str] = {}
    for key, values in query.items():
        if key.lower() not in ALLOWED_PARAMETERS:
            return f"query parameter {key!r} is not allowed"
        if len(values) != 1 or key.lower() in params:
            return f"query parameter {key!r} has more than one value"
        params[key.lower()] = values[0]
    if params.get("action") != "GetCallerIdentity" or params.get("version") != "2011-06-15":
        return "the presigned URL is not an STS GetCallerIdentity (Version 2011-06-15) call"
    if params.get("x-amz-algorithm") != "AWS4-HMAC-SHA256":
        return "the presigned URL is not signed with SigV4 (AWS4-HMAC-SHA256)"
    signed = params.get("x-amz-signedheaders", "").split(";")
    if CLUSTER_ID_HEADER not in (name.lower() for name in signed):
        return f"the {CLUSTER_ID_HEADER} header is not signed"
    expires = params.get("x-amz-expires", "")
    if not expires.isdigit() or int(expires) > 900:
        return f"invalid X-Amz-Expires {expires!r} (0..900 expected)"
    scope = params.get("x-amz-credential", "").split("/")
    if len(scope) != 5 or scope[3:] != ["sts", "aws4_request"] or not scope[0]:
        return "X-Amz-Credential is not an STS SigV4 credential scope"
    try:
        signed_at = datetime.strptime(params.get("x-amz-date", ""), DATE_FORMAT).replace(tzinfo=timezone.utc)
    except ValueError:
        return "X-Amz-Date is missing or malformed"
    if scope[1] != signed_at.strftime("%Y%m%d"):
        return "X-Amz-Credential's date is not X-Amz-Date's"
    now = now or datetime.now(timezone.utc)
    if now > signed_at + LIFETIME:
        return f"the token expired at {(signed_at + LIFETIME).isoformat()}"
    if signed_at > now + CLOCK_SKEW:
        return "X-Amz-Date is in the future"
    if secret_key is None:
        return None
    return _signature_problem(parts.geturl(), params, signed, scope, cluster, secret_key)


def _signature_problem(url: str, params: dict[str, str], signed: list[str], scope: list[str], cluster: str,
                       secret_key: Callable[[str], str | None]) -> str | None:
    """What STS finds when the API server replays the URL with ``x-k8s-aws-id: <cluster>``."""
    secret = secret_key(scope[0])
    if secret is None:
        return f"STS does not know the access key {scope[0]!r}"
    headers = {}
    for name in signed:
        if name == CLUSTER_ID_HEADER:
            headers[name] = cluster  # the API server sends its own name, whatever the token was made for
        elif name != "host":  # botocore's signer takes the host from the URL
            return f"the signed header {name!r} is one the API server does not send"
    # the URL as signed: everything but the signature, in its original order and encoding
    split = urlsplit(url)
    unsigned = "&".join(p for p in split.query.split("&") if not p.lower().startswith("x-amz-signature="))
    request = AWSRequest(method="GET", url=urlunsplit(split._replace(query=unsigned)), headers=headers)
    request.context["timestamp"] = params["x-amz-date"]
    signer = SigV4Auth(Credentials(scope[0], secret, params.get("x-amz-security-token")), scope[3], scope[2])
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, params.get("x-amz-signature", "")):
        return f"the signature does not match (the token is not for cluster {cluster!r}, or was altered)"
    return None


def verify_eks_token(token: str, cluster: str, *, secret_key: Callable[[str], str | None] | None = None,
                     now: datetime | None = None, loopback_http: bool = True) -> bool:
    """True when an API server for ``cluster`` accepts ``token`` (``eks_token_problem`` says why not)."""
    return eks_token_problem(token, cluster, secret_key=secret_key, now=now, loopback_http=loopback_http) is None
