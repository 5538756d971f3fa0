"""The ``backend`` and ``audit`` sections of the YAML schema."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ByteSize, Field, SecretStr, ValidationInfo, field_validator, model_validator

from agent import settings
from agent.config.fields import Duration, HttpUrl, Model, Secret, SecretFile, Text, secret_from_file, stringify


class PaigoBackend(Model):
    plain = settings.PaigoBackend

    type: Literal["paigo"]
    url: HttpUrl = "https://api.prod.paigo.tech"
    token_url: HttpUrl = "https://auth.paigo.tech/oauth/token"
    audience: Text = "https://qnonyh1pc7.execute-api.us-east-1.amazonaws.com"
    client_id: Text = Field(min_length=1)
    client_secret: Secret | None = None
    client_secret_file: SecretFile = None
    timeout: Duration = timedelta(seconds=10)
    max_in_flight: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _one_secret(self) -> PaigoBackend:
        if (self.client_secret is None) == (self.client_secret_file is None):
            raise ValueError("set exactly one of client_secret or client_secret_file")
        if self.client_secret is None:
            object.__setattr__(self, "client_secret", self.client_secret_file)
        return self

def _at_most_one(model: BaseModel, name: str) -> SecretStr | None:
    """``name`` or ``name_file`` (already read into a secret); both set is an error."""
    value, from_file = getattr(model, name), getattr(model, f"{name}_file")
    if value is not None and from_file is not None:
        raise ValueError(f"set at most one of {name} or {name}_file")
    return value if value is not None else from_file


# A safe subset of RFC 3986 URI references (CloudEvents ``source`` must be one, or OpenMeter
# refuses every event): scheme:[//host[:port]]/path, scheme:path, or a relative path without ':'.
SOURCE_PATTERN = (r"^(?:[A-Za-z][A-Za-z0-9+.\-]*:(?://[A-Za-z0-9\-._~]*(?::[0-9]*)?(?:/[A-Za-z0-9\-._~/:@]*)?"
                  r"|(?!//)[A-Za-z0-9\-._~/:@]*)|[A-Za-z0-9\-._~/]+)$")
_URI_REFERENCE = re.compile(SOURCE_PATTERN)


class OpenMeterBackend(Model):
    plain = settings.OpenMeterBackend

    type: Literal["openmeter"]
    url: HttpUrl = "https://openmeter.cloud"
    token: Secret | None = None
    token_file: SecretFile = None
    source: str = Field(default="usage-agent", max_length=255)
    batch_size: int = Field(default=100, ge=1, le=1000)
    timeout: Duration = timedelta(seconds=10)

    @field_validator("source")
    @classmethod
    def _uri_reference(cls, source: str) -> str:
        if not _URI_REFERENCE.match(source):
            raise ValueError(f"expected a URI reference such as usage-agent, urn:acme:agent or https://agent.example.com, got {source!r}")
        return source

    @model_validator(mode="after")
    def _one_token(self) -> OpenMeterBackend:
        token = _at_most_one(self, "token")
        if token is not None and not _HEADER_VALUE.match(token.get_secret_value()):
            # sent as the Authorization header: refused by httpx at every request, retried forever
            raise ValueError("the token must be printable ASCII, without line breaks or control characters")
        object.__setattr__(self, "token", token)
        return self


_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# set by the sink itself: the body's type and length, and the signature
RESERVED_HEADERS = ("content-type", "content-length", "host", "transfer-encoding",
                    "x-usage-timestamp", "x-usage-signature")


_HEADER_VALUE = re.compile(r"^[\t\x20-\x7e]*$")  # what httpx can encode and h11 will send


def _header_value(name: str, value: str) -> str:
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name}: a value must not contain line breaks")
    if not _HEADER_VALUE.match(value):
        raise ValueError(f"header {name}: a value must be printable ASCII, without control characters")
    return value


class HttpBackend(Model):
    plain = settings.HttpBackend

    type: Literal["http"]
    url: HttpUrl
    headers: dict[str, Annotated[Secret, BeforeValidator(stringify)]] = Field(default_factory=dict)
    header_files: dict[str, SecretStr] = Field(default_factory=dict)  # header name -> file holding the value
    hmac_secret: Secret | None = None
    hmac_secret_file: SecretFile = None
    batch_size: int = Field(default=100, ge=1, le=1000)
    timeout: Duration = timedelta(seconds=10)

    @field_validator("header_files", mode="before")
    @classmethod
    def _read_header_files(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, dict):
            return value
        out = {}
        for name, path in value.items():
            try:
                out[name] = secret_from_file(path, info)
            except ValueError as exc:
                raise ValueError(f"header {name}: {exc}") from None
        return out

    @model_validator(mode="after")
    def _checks(self) -> HttpBackend:
        names = [*self.headers, *self.header_files]
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid HTTP header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name} is set by the agent and cannot be configured")
        lowered = [n.lower() for n in names]
        if len(set(lowered)) != len(lowered):
            raise ValueError("a header is configured more than once (headers and header_files together)")
        for name, value in {**self.headers, **self.header_files}.items():
            _header_value(name, value.get_secret_value())
        object.__setattr__(self, "hmac_secret", _at_most_one(self, "hmac_secret"))
        return self


def _bearer(model: BaseModel, name: str) -> SecretStr:
    """``name`` or ``name_file``, exactly one: sent as ``Authorization: Bearer``, so header-safe."""
    value, from_file = getattr(model, name), getattr(model, f"{name}_file")
    if (value is None) == (from_file is None):
        raise ValueError(f"set exactly one of {name} or {name}_file")
    secret: SecretStr = value if value is not None else from_file
    if not _HEADER_VALUE.match(secret.get_secret_value()):
        raise ValueError(f"the {name} must be printable ASCII, without line breaks or control characters")
    return secret


class ApiKeyBackend(Model):
    """A backend authenticated by ``api_key`` or ``api_key_file``, exactly one."""

    api_key: Secret | None = None
    api_key_file: SecretFile = None
    timeout: Duration = timedelta(seconds=10)

    @model_validator(mode="after")
    def _one_key(self) -> ApiKeyBackend:
        object.__setattr__(self, "api_key", _bearer(self, "api_key"))
        return self


# a key of a Stripe meter event's payload: it goes into the form field name payload[<key>]
PayloadKey = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.\-]+$")]


class StripeBackend(ApiKeyBackend):
    plain = settings.StripeBackend

    type: Literal["stripe"]
    url: HttpUrl = "https://api.stripe.com"
    customer_key: PayloadKey = "stripe_customer_id"
    value_key: PayloadKey = "value"
    max_in_flight: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _checks(self) -> StripeBackend:
        if self.customer_key == self.value_key:
            raise ValueError(f"customer_key and value_key must differ (both are {self.customer_key!r})")
        return self


class MetronomeBackend(ApiKeyBackend):
    plain = settings.MetronomeBackend

    type: Literal["metronome"]
    url: HttpUrl = "https://api.metronome.com"


class TogaiBackend(Model):
    plain = settings.TogaiBackend

    type: Literal["togai"]
    url: HttpUrl = "https://api.togai.com"
    token: Secret | None = None
    token_file: SecretFile = None
    attribute: Text = Field(default="value", min_length=1, max_length=50)  # Togai's Attribute.name
    batch_size: int = Field(default=500, ge=1, le=500)  # /ingestBatch takes 1 to 500 events
    timeout: Duration = timedelta(seconds=10)

    @model_validator(mode="after")
    def _one_token(self) -> TogaiBackend:
        object.__setattr__(self, "token", _bearer(self, "token"))
        return self


class LagoBackend(ApiKeyBackend):
    plain = settings.LagoBackend

    type: Literal["lago"]
    url: HttpUrl = "https://api.getlago.com"
    customer_field: str = "external_subscription_id"
    value_property: Text = Field(default="value", min_length=1, max_length=255)
    batch_size: int = Field(default=100, ge=1, le=100)  # /api/v1/events/batch takes at most 100 events

    @field_validator("customer_field")
    @classmethod
    def _subscription(cls, field: str) -> str:
        if field == "external_customer_id":  # dropped from event input in Lago v1.7.0: such events are never billed
            raise ValueError("Lago ignores external_customer_id on events (since v1.7.0) and bills an event only "
                             "through its subscription: use external_subscription_id, with each customer id set "
                             "to the subscription's external id")
        if field != "external_subscription_id":
            raise ValueError(f"expected external_subscription_id, got {field!r:.60}")
        return field


class OrbBackend(ApiKeyBackend):
    plain = settings.OrbBackend

    type: Literal["orb"]
    url: HttpUrl = "https://api.withorb.com"
    customer_field: Literal["external_customer_id", "customer_id"] = "external_customer_id"
    batch_size: int = Field(default=500, ge=1, le=500)


class JsonlFile(Model):
    path: str = Field(min_length=1)  # relative paths: relative to the config file
    max_bytes: ByteSize = Field(default=ByteSize(100 * 2**20), ge=1024, le=2**50)  # rotate before a file would pass this
    keep: int = Field(default=10, ge=1, le=100_000)  # rotated files kept; older ones are deleted


class FileBackend(JsonlFile):
    plain = settings.FileBackend

    type: Literal["file"]


class Audit(JsonlFile):
    """A local JSON Lines copy of every record the backend accepted."""

    plain = settings.Audit


Backend = Annotated[PaigoBackend | OpenMeterBackend | HttpBackend | FileBackend
                    | StripeBackend
                    | MetronomeBackend
                    | TogaiBackend
                    | LagoBackend
                    | OrbBackend, Field(discriminator="type")]
BACKEND_TYPES = ("paigo", "openmeter", "http", "file",
                 "stripe",
                 "metronome",
                 "togai",
                 "lago",
                 "orb")
