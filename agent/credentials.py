"""Assumed-role credentials with external IDs, and the AWS clients that sign with them.

Base credentials come from botocore's standard chain (environment, IRSA web identity,
instance profile, ...). For each (role, external id) the agent holds one botocore
``RefreshableCredentials`` backed by ``sts:AssumeRole``, so a daemon running for days renews
them before they expire. Endpoint configuration (``AWS_ENDPOINT_URL`` and friends) is left
to botocore.

Clients are shared: one botocore client per (service, region) serves every account. A
client costs about 1.4 MB and 18 ms to build, so one per (account, region, service) would
grow with the number of customers without bound. ``client()`` hands out an
``AccountClient``, a view that signs each of its calls with its own account's credentials:
the shared client's credentials read them from a context variable that only a view's call
sets, so outside one there are none, and a request is never signed with another account's.
"""

from __future__ import annotations

import functools
import random
import re
import socket
import threading
from collections.abc import Callable
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from botocore.config import Config
from botocore.credentials import CredentialProvider, CredentialResolver, Credentials, RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.retries.standard import RetryEventAdapter, StandardRetryConditions

from agent import __version__
from agent.botocore_data import new_session
from agent.clock import Clock
from agent.errors import AssumeRoleError, SamplingError
from agent.metrics import Metrics

RoleKey = tuple[str | None, str | None]  # (role arn, external id); (None, None) = own identity

ATTEMPTS = 8  # per AWS call, the first included
ASSUME_ROLE_IN_FLIGHT = 4  # STS throttles AssumeRole per caller: the agent is one caller for every account

CLIENT_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 1},  # retries are Backoff's: per call, not per client
    connect_timeout=10,
    read_timeout=30,
    max_pool_connections=128,  # one client serves every sampling worker (sampling.workers <= 128)
    account_id_endpoint_mode="disabled",  # one endpoint per region, whichever account a call is for
    user_agent_extra=f"usage-agent/{__version__}",
)

_ACTING_AS: ContextVar[Any] = ContextVar("usage_agent_acting_as", default=None)


def default_session_name() -> str:
    """``usage-agent-<host>``: what a customer sees in CloudTrail for our calls."""
    host = re.sub(r"[^\w+=,.@-]", "-", socket.gethostname())
    return f"usage-agent-{host}"[:64]


def describe_aws_error(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'Unknown')}: {err.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


class CallCounter:
    """botocore ``response-received`` hook: every attempt (retries included), and the failed ones by code."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def __call__(self, event_name: str, parsed_response: Any = None, response_dict: Any = None,
                 exception: Exception | None = None, **_: Any) -> None:
        _, service, operation = event_name.split(".", 2)
        self._metrics.aws_api_calls.labels(service, operation).inc()
        if exception is not None:
            code = type(exception).__name__
        elif response_dict is not None and response_dict.get("status_code", 200) >= 300:
            code = ((parsed_response or {}).get("Error") or {}).get("Code") or str(response_dict["status_code"])
        else:
            return
        self._metrics.aws_api_errors.labels(service, operation, code).inc()


class Backoff:
    """botocore ``needs-retry`` handler: throttled (``Throttling``, ``RequestLimitExceeded`` ...)
    and transient failures are retried after a capped, fully jittered exponential delay that
    only the failed call's thread sleeps. botocore's own modes keep a retry quota, and in
    adaptive mode a send rate, per client: on a shared client one account's throttling would
    hold back every other account in the region."""

    def __init__(self, sleep: Callable[[float], None], attempts: int = ATTEMPTS,
                 cap: float = 20.0, jitter: Callable[[], float] = random.random):
        self._conditions = StandardRetryConditions(max_attempts=attempts)
        self._sleep = sleep
        self._cap = cap
        self._jitter = jitter

    def __call__(self, attempts: int, **kwargs: Any) -> int | None:
        context = RetryEventAdapter().create_retry_context(attempts=attempts, **kwargs)
        if not self._conditions.is_retryable(context):
            return None
        self._sleep(self._jitter() * min(self._cap, 2.0 ** (attempts - 1)))
        return 0  # slept already (injectable); botocore's own sleep is then zero


class _ActingAccount(Credentials):
    """What the shared clients sign with: the credentials of the account whose call is running."""

    def __init__(self) -> None:
        super().__init__("", "", method="usage-agent-account")

    def get_frozen_credentials(self) -> Any:
        credentials = _ACTING_AS.get()
        if credentials is None:  # a call outside an AccountClient: refuse rather than guess
            raise NoCredentialsError()
        return credentials.get_frozen_credentials()


class _ActingAccountProvider(CredentialProvider):
    METHOD = "usage-agent-account"

    def load(self) -> Credentials:
        return _ActingAccount()


class AccountClient:
    """One account's use of a shared (service, region) client: each API call, and each page its
    paginators fetch, and each URL it presigns, is signed with that account's credentials.
    Everything else (``meta``, ``exceptions``, ``can_paginate``) is the shared client's."""

    __slots__ = ("_client", "_credentials")

    def __init__(self, client: Any, credentials: Any):
        self._client = client
        self._credentials = credentials

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name in self._client.meta.method_to_api_mapping or name == "generate_presigned_url":
            return functools.partial(self._call, attr)
        return attr

    def _call(self, operation: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        token = _ACTING_AS.set(self._credentials)
        try:
            return operation(*args, **kwargs)
        finally:
            _ACTING_AS.reset(token)

    def get_paginator(self, operation_name: str) -> Any:
        shared = self._client.get_paginator(operation_name)
        # the same paginator over this view's (signed) operation; botocore keeps its config private
        return type(shared)(getattr(self, operation_name), shared._pagination_cfg, shared._model)


class SessionFactory:
    """The agent's AWS identities and clients: one refreshable credential set per (role, external
    id), one client per (service, region) for all of them, one STS client for the agent itself."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        clock: Clock,
        duration_seconds: int = 3600,
        session_name: str | None = None,
        assume_role_in_flight: int = ASSUME_ROLE_IN_FLIGHT,
    ):
        # one parsed copy of each service model (~20 MB for EC2) for both, and for the process
        self._base = new_session()  # the agent's own identity
        self._signing = new_session()  # the shared clients': whichever account calls
        self._signing.register_component("credential_provider", CredentialResolver([_ActingAccountProvider()]))
        self._metrics = metrics
        self._clock = clock  # now(): when the assumed credentials are renewed; sleep(): retry backoff
        self._duration = duration_seconds
        self._session_name = session_name or default_session_name()
        self._calls = CallCounter(metrics)
        self._backoff = Backoff(sleep=clock.sleep)
        self._assuming = threading.BoundedSemaphore(assume_role_in_flight)
        self._lock = threading.Lock()
        self._credentials: dict[RoleKey, Any] = {}
        self._building: dict[RoleKey, threading.Lock] = {}
        self._creating = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}
        self._accounts: dict[RoleKey, str] = {}
        self._sts_client: Any = None

    @property
    def home_region(self) -> str:
        """Where account-wide calls (STS, DescribeRegions) go: the configured region or us-east-1."""
        return self._base.get_config_variable("region") or "us-east-1"

    def _prepared(self, client: Any) -> Any:
        client.meta.events.register("response-received", self._calls)
        client.meta.events.register("needs-retry", self._backoff)
        return client

    def _sts(self) -> Any:
        with self._lock:
            if self._sts_client is None:
                self._sts_client = self._prepared(
                    self._base.create_client("sts", region_name=self.home_region, config=CLIENT_CONFIG))
            return self._sts_client

    def _assume(self, role_arn: str, external_id: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "RoleArn": role_arn,
            "RoleSessionName": self._session_name,
            "DurationSeconds": self._duration,
        }
        if external_id is not None:
            params["ExternalId"] = external_id
        try:
            with self._assuming:
                creds = self._sts().assume_role(**params)["Credentials"]
        except (ClientError, BotoCoreError) as exc:
            self._metrics.assume_role_failures.labels(role_arn).inc()
            raise AssumeRoleError(f"cannot assume {role_arn}: {describe_aws_error(exc)}") from exc
        self._metrics.token_refreshes.labels("aws_role").inc()
        expiry = creds["Expiration"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": expiry.isoformat() if isinstance(expiry, datetime) else str(expiry),
        }

    def credentials(self, role_arn: str | None, external_id: str | None) -> Any:
        """The role's credentials (assumed on first use, AssumeRoleError if refused), renewed
        by botocore before they expire; for no role, the agent's own."""
        key = (role_arn, external_id)
        with self._lock:
            cached = self._credentials.get(key)
            building = self._building.setdefault(key, threading.Lock())
        if cached is not None:
            return cached
        with building:  # threads sampling the same account wait for one AssumeRole, not one each
            with self._lock:
                cached = self._credentials.get(key)
            return cached if cached is not None else self._build(key)

    def _build(self, key: RoleKey) -> Any:
        role_arn, external_id = key
        if role_arn is None:
            credentials = self._base.get_credentials()
            if credentials is None:
                raise SamplingError("no AWS credentials: botocore's chain (environment, web identity, "
                                    "instance profile ...) found none")
        else:
            def refresh() -> dict[str, Any]:
                return self._assume(role_arn, external_id)

            first = refresh()  # fail now, loudly, rather than on the first API call
            credentials = RefreshableCredentials(
                access_key=first["access_key"],
                secret_key=first["secret_key"],
                token=first["token"],
                expiry_time=datetime.fromisoformat(first["expiry_time"]),
                refresh_using=refresh,
                method="sts-assume-role",
                time_fetcher=self._clock.now,
            )
        with self._lock:
            return self._credentials.setdefault(key, credentials)

    def client(self, service: str, region: str, role_arn: str | None, external_id: str | None) -> AccountClient:
        """A client for the account the role reaches (or our own), in ``region``."""
        credentials = self.credentials(role_arn, external_id)
        key = (service, region)
        with self._lock:
            shared = self._clients.get(key)
        if shared is None:
            with self._creating:  # botocore sessions are not safe for concurrent client creation
                with self._lock:
                    shared = self._clients.get(key)
                if shared is None:
                    shared = self._prepared(self._signing.create_client(service, region_name=region, config=CLIENT_CONFIG))
                    self._metrics.aws_clients_built.labels(service).inc()
                    with self._lock:
                        self._clients[key] = shared
        return AccountClient(shared, credentials)

    def account_id(self, role_arn: str | None, external_id: str | None) -> str:
        """The account a session acts in: from the role ARN, else from GetCallerIdentity."""
        if role_arn is not None:
            return role_arn.split(":")[4]
        key = (role_arn, external_id)
        with self._lock:
            cached = self._accounts.get(key)
        if cached is not None:
            return cached
        try:
            account = self._sts().get_caller_identity()["Account"]
        except (ClientError, BotoCoreError) as exc:
            raise SamplingError(f"cannot determine own AWS account: {describe_aws_error(exc)}") from exc
        with self._lock:
            return self._accounts.setdefault(key, account)
