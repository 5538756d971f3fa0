"""Assumed-role sessions with external IDs that refresh themselves.

Base credentials come from botocore's standard chain (environment, IRSA web identity,
instance profile, ...). For each (role, external id) one session is built whose
credentials are botocore ``RefreshableCredentials`` backed by ``sts:AssumeRole``, so a
daemon running for days renews them before they expire. Endpoint configuration
(``AWS_ENDPOINT_URL`` and friends) is left to botocore.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import BotoCoreError, ClientError

from agent import __version__
from agent.errors import AssumeRoleError, SamplingError
from agent.telemetry import ASSUME_ROLE_FAILURES, AWS_API_ERRORS, TOKEN_REFRESHES

Clock = Callable[[], datetime]
RoleKey = tuple[str | None, str | None]  # (role arn, external id); (None, None) = own identity

CLIENT_CONFIG = Config(
    retries={"mode": "adaptive", "max_attempts": 8},
    connect_timeout=10,
    read_timeout=30,
    user_agent_extra=f"usage-agent/{__version__}",
)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def default_session_name() -> str:
    """``usage-agent-<host>``: what a customer sees in CloudTrail for our calls."""
    host = re.sub(r"[^\w+=,.@-]", "-", socket.gethostname())
    return f"usage-agent-{host}"[:64]


def describe_aws_error(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'Unknown')}: {err.get('Message', '')}".rstrip(": ")
    return f"{type(exc).__name__}: {exc}"


def count_aws_errors(event_name: str, parsed_response: Any = None, response_dict: Any = None,
                     exception: Exception | None = None, **_: Any) -> None:
    """botocore ``response-received`` hook: every failed attempt, retried ones included, by code."""
    _, service, operation = event_name.split(".", 2)
    if exception is not None:
        code = type(exception).__name__
    elif response_dict is not None and response_dict.get("status_code", 200) >= 300:
        code = ((parsed_response or {}).get("Error") or {}).get("Code") or str(response_dict["status_code"])
    else:
        return
    AWS_API_ERRORS.labels(service, operation, code).inc()


def _counted(client: Any) -> Any:
    client.meta.events.register("response-received", count_aws_errors)
    return client


class SessionFactory:
    """Builds and caches one boto3 session (and its clients) per (role, external id)."""

    def __init__(
        self,
        base_session: boto3.Session | None = None,
        clock: Clock = utc_now,
        duration_seconds: int = 3600,
        session_name: str | None = None,
    ):
        self._base = base_session or boto3.Session()
        self._clock = clock
        self._duration = duration_seconds
        self._session_name = session_name or default_session_name()
        self._lock = threading.Lock()
        self._sessions: dict[RoleKey, boto3.Session] = {}
        self._building: dict[RoleKey, threading.Lock] = {}
        self._creating = threading.Lock()
        self._clients: dict[tuple[RoleKey, str, str], Any] = {}
        self._accounts: dict[RoleKey, str] = {}
        self._sts_client: Any = None

    @property
    def home_region(self) -> str:
        """Where account-wide calls (STS, DescribeRegions) go: the configured region or us-east-1."""
        return self._base.region_name or "us-east-1"

    def _sts(self) -> Any:
        with self._lock:
            if self._sts_client is None:
                self._sts_client = _counted(self._base.client("sts", region_name=self.home_region, config=CLIENT_CONFIG))
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
            creds = self._sts().assume_role(**params)["Credentials"]
        except (ClientError, BotoCoreError) as exc:
            ASSUME_ROLE_FAILURES.labels(role_arn).inc()
            raise AssumeRoleError(f"cannot assume {role_arn}: {describe_aws_error(exc)}") from exc
        TOKEN_REFRESHES.labels("aws_role").inc()
        expiry = creds["Expiration"]
        return {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": expiry.isoformat() if isinstance(expiry, datetime) else str(expiry),
        }

    def session(self, role_arn: str | None, external_id: str | None) -> boto3.Session:
        key = (role_arn, external_id)
        with self._lock:
            cached = self._sessions.get(key)
            building = self._building.setdefault(key, threading.Lock())
        if cached is not None:
            return cached
        with building:  # threads sampling the same account wait for one AssumeRole, not one each
            with self._lock:
                cached = self._sessions.get(key)
            return cached if cached is not None else self._build(key)

    def _build(self, key: RoleKey) -> boto3.Session:
        role_arn, external_id = key
        if role_arn is None:
            session = self._base
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
                time_fetcher=self._clock,
            )
            core = botocore.session.get_session()
            # share the parsed service models: a loader per role costs ~20 MB
            core.register_component("data_loader", self._base._session.get_component("data_loader"))
            core._credentials = credentials  # botocore has no public setter for this
            session = boto3.Session(botocore_session=core)
        with self._lock:
            return self._sessions.setdefault(key, session)

    def credentials(self, role_arn: str | None, external_id: str | None) -> Any:
        return self.session(role_arn, external_id).get_credentials()

    def client(self, service: str, region: str, role_arn: str | None, external_id: str | None) -> Any:
        key = ((role_arn, external_id), service, region)
        with self._lock:
            cached = self._clients.get(key)
        if cached is not None:
            return cached
        session = self.session(role_arn, external_id)
        with self._creating:  # boto3 sessions are not safe for concurrent client creation
            with self._lock:
                cached = self._clients.get(key)
            if cached is None:
                cached = _counted(session.client(service, region_name=region, config=CLIENT_CONFIG))
                with self._lock:
                    self._clients[key] = cached
        return cached

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
