"""Paigo's dimensions as measurements: ``GET {url}/dimensions`` read with the Paigo backend's
token over the agent's one client, and each dimension the agent can meter derived into a
measurement through the same validation as a YAML measurement.

A dimension is metered when its ``measurement.measurementMode`` is ``infrastructureBased``,
its ``measurementConfiguration.cloudPlatform`` is ``aws``, its ``resourceType`` is one the
agent samples (``PAIGO_TYPES``) and it names an ``iamRoleArn``. Every other dimension is
skipped with its reason. The measurement's name comes from ``dimensionId`` alone, so a
renamed dimension keeps its record ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from agent.config import parse_measurement
from agent.errors import ConfigError, excerpt
from agent.metrics import Metrics
from agent.samplers import REGISTRY
from agent.settings import Measurement, PaigoBackend, PaigoSync
from agent.sinks.base import NotSendable, redirected, transport_failure
from agent.sinks.paigo import ClientCredentialsToken
from agent.sinks.transport import request, send

# Paigo's resourceType -> the agent's resource type
PAIGO_TYPES: Mapping[str, str] = {"ebs": "ebs", "ebssnapshot": "ebs_snapshot", "ec2": "ec2"}
# Paigo's resource types the agent does not derive, and why
NOT_DERIVED: Mapping[str, str] = {
    "ec2egress": "the agent has no EC2 network-egress sampler; a YAML measurement with resource_type: cloudwatch "
                 "(AWS/EC2 NetworkOut, InstanceId: '*') meters it",
    "k8spod": "a Kubernetes pod measurement needs a kubeconfig or an EKS cluster name, which a Paigo measurement "
              "does not carry; define it in the YAML (resource_type: kubernetes_pod)",
}
# Paigo's aggregationInterval (default hour) -> the sampling interval; ticks are aligned multiples of
# it, so a month (whole days, of varying number) is sampled daily, and "none" at the default hour
INTERVALS: Mapping[str, str] = {"hour": "1h", "day": "1d", "month": "1d", "none": "1h"}
DEFAULT_AGGREGATION = "hour"

MAX_BODY = 8 * 2**20  # bytes of the dimensions answer read
MAX_DIMENSIONS = 5000  # dimensions in one answer; more is not an answer to trust
MAX_MEASUREMENTS = 256  # measurements derived; further dimensions are skipped (each is a job and a thread)
_KEPT_KEYS = ("dimensionId", "dimensionName", "aggregationInterval", "measurement")
# the measurement's keys as Paigo names them, for the reason a dimension is skipped
_PAIGO_FIELDS = {"iam_role_arn": "iamRoleArn", "external_id": "externalId", "regions": "region",
                 "dimension_id": "dimensionId", "interval": "aggregationInterval"}


class DimensionsUnavailable(Exception):
    """Paigo's dimensions could not be read; the message says which peer and why."""


@dataclass(frozen=True)
class SkippedDimension:
    dimension: str  # its dimensionId, or its place in the answer when it has none
    name: str  # its dimensionName ("" when none)
    reason: str
    kind: str  # the metric's label: no_measurement | mode | cloud | resource_type | role | invalid | duplicate | limit


@dataclass(frozen=True)
class Derived:
    """The measurements the dimensions give (each with the YAML it is made from), the dimensions
    skipped, and those a YAML measurement meters already (dimension id -> its name)."""

    measurements: tuple[Measurement, ...] = ()
    documents: tuple[dict[str, Any], ...] = ()
    skipped: tuple[SkippedDimension, ...] = ()
    left_to_yaml: Mapping[str, str] = field(default_factory=dict)


def measurement_name(dimension_id: str) -> str:
    """``paigo-<dimensionId>`` for an id that is already a name's characters (a UUID); otherwise
    its slug and a hash of the id, so two ids never share a name."""
    slug = re.sub(r"[^a-z0-9]+", "-", dimension_id.lower()).strip("-")
    if slug == dimension_id and len(slug) <= 57:
        return f"paigo-{slug}"
    digest = hashlib.sha256(dimension_id.encode()).hexdigest()[:10]
    return f"paigo-{slug[:45]}-{digest}".replace("--", "-")


def kept(dimensions: Sequence[Any]) -> list[Any]:
    """The part of each dimension derivation reads: what is persisted for a restart during an outage."""
    return [{k: d[k] for k in _KEPT_KEYS if k in d} if isinstance(d, dict) else d for d in dimensions]


def _customer(sync: PaigoSync) -> dict[str, str]:
    c = sync.customer
    return {"id": c.id} if c.id is not None else {"tag": c.tag or "", "untagged": c.untagged}


def _text(value: Any) -> str:
    return excerpt(value, 120) if isinstance(value, str) else ""


def document(dimension: Mapping[str, Any], sync: PaigoSync) -> dict[str, Any] | tuple[str, str]:
    """The YAML measurement a dimension gives, or (kind, reason) when it gives none."""
    measurement = dimension.get("measurement")
    if not isinstance(measurement, dict):
        return "no_measurement", "no measurement is attached to the dimension"
    mode = measurement.get("measurementMode")
    if mode != "infrastructureBased":
        return "mode", f"measurementMode {_text(mode) or 'missing'}: the agent meters infrastructureBased ones only"
    conf = measurement.get("measurementConfiguration")
    conf = conf if isinstance(conf, dict) else {}
    cloud = conf.get("cloudPlatform")
    if cloud != "aws":
        return "cloud", f"cloudPlatform {_text(cloud) or 'missing'}: the agent meters aws only"
    paigo_type = conf.get("resourceType") if isinstance(conf.get("resourceType"), str) else None
    if paigo_type in NOT_DERIVED:
        return "resource_type", f"resourceType {paigo_type}: {NOT_DERIVED[paigo_type]}"
    if paigo_type is None or paigo_type not in PAIGO_TYPES:
        return "resource_type", (f"resourceType {_text(paigo_type) or 'missing'} is not one the agent meters "
                                 f"({', '.join(PAIGO_TYPES)})")
    if not conf.get("iamRoleArn"):
        return "role", "no iamRoleArn: the agent samples a customer's account only through its role"
    interval = dimension.get("aggregationInterval", DEFAULT_AGGREGATION)
    if not isinstance(interval, str) or interval not in INTERVALS:
        return "invalid", f"aggregationInterval {_text(interval) or 'of another type'} is not one of {', '.join(INTERVALS)}"
    resource_type = PAIGO_TYPES[paigo_type]
    doc: dict[str, Any] = {
        "name": measurement_name(dimension["dimensionId"]), "dimension_id": dimension["dimensionId"],
        "resource_type": resource_type, "metric": REGISTRY[resource_type].default_metric, "mode": "gauge",
        "interval": INTERVALS[interval], "iam_role_arn": conf["iamRoleArn"]}
    if conf.get("externalId") is not None:
        doc["external_id"] = conf["externalId"]
    return doc | {"regions": [conf.get("region")], "customer": _customer(sync), "group_by": sync.group_by}


def _invalid(exc: ConfigError) -> str:
    """The first problem of a derived measurement, named by Paigo's field."""
    path, message = exc.problems[0] if exc.problems else ("", "invalid")
    key = path.removeprefix("measurements[0].").split(".")[0].split("[")[0]
    return f"{_PAIGO_FIELDS.get(key, key)}: {excerpt(message, 200)}"


def derive(dimensions: Sequence[Any], sync: PaigoSync, yaml: Sequence[Measurement] = ()) -> Derived:
    """The measurements ``dimensions`` give beside the YAML's, in dimensionId order."""
    by_dimension = {m.dimension_id: m.name for m in yaml}
    taken = {m.name for m in yaml}
    skipped: list[SkippedDimension] = []
    found: dict[str, tuple[Measurement, dict[str, Any]]] = {}
    left: dict[str, str] = {}
    for i, d in enumerate(dimensions):
        did = d.get("dimensionId") if isinstance(d, dict) else None
        if not isinstance(did, str) or not did.strip():
            skipped.append(SkippedDimension(f"data[{i}]", "", "no dimensionId", "invalid"))
            continue
        name = _text(d.get("dimensionName"))
        if did in by_dimension:
            left[did] = by_dimension[did]
            continue
        if did in found:
            skipped.append(SkippedDimension(did, name, "the answer lists this dimensionId more than once", "duplicate"))
            continue
        doc = document(d, sync)
        if isinstance(doc, tuple):
            skipped.append(SkippedDimension(did, name, doc[1], doc[0]))
            continue
        if doc["name"] in taken:
            skipped.append(SkippedDimension(did, name, f"its name {doc['name']} is a YAML measurement's", "duplicate"))
            continue
        try:
            found[did] = (parse_measurement(doc, f"Paigo dimension {did}"), doc)
        except ConfigError as exc:
            skipped.append(SkippedDimension(did, name, _invalid(exc), "invalid"))
    ordered = [found[did] for did in sorted(found)]
    for m, _ in ordered[MAX_MEASUREMENTS:]:
        skipped.append(SkippedDimension(m.dimension_id, "", f"more than {MAX_MEASUREMENTS} measurements come "
                                                            "from Paigo; the first ones by dimensionId are metered",
                                        "limit"))
    ordered = ordered[:MAX_MEASUREMENTS]
    return Derived(tuple(m for m, _ in ordered), tuple(doc for _, doc in ordered), tuple(skipped), left)


class DimensionReader:
    """``GET {url}/dimensions`` with the token the Paigo sink sends ``/usage`` with."""

    def __init__(self, backend: PaigoBackend, client: httpx.Client, token: ClientCredentialsToken, metrics: Metrics):
        self.url = f"{backend.url}/dimensions"
        self._client = client
        self._token = token
        self._metrics = metrics
        self._timeout = backend.timeout.total_seconds()

    def read(self) -> list[Any]:
        """Every dimension Paigo answers; DimensionsUnavailable naming the peer and what went wrong."""
        for _ in range(2):  # a refused token is replaced once
            try:
                token = self._token.get()
            except NotSendable as exc:
                raise DimensionsUnavailable(exc.outcome.reason) from None
            try:
                answer = send(self._client, request("GET", self.url, {"Authorization": f"Bearer {token}",
                                                                      "Accept": "application/json"}, b""),
                              self._timeout, self._metrics, cap=MAX_BODY)
            except httpx.HTTPError as exc:
                raise DimensionsUnavailable(f"{self.url}: {transport_failure(exc, self._timeout).reason}") from None
            if answer.status != 401:
                self._token.accepted(token)
                return self._dimensions(answer)
            held = self._token.after_401(token)
            if held is not None:
                raise DimensionsUnavailable(held.reason)
        raise DimensionsUnavailable(f"{self.url} answered 401 to a new token too")

    def _dimensions(self, answer: Any) -> list[Any]:
        if 300 <= answer.status < 400:
            raise DimensionsUnavailable(redirected(answer).reason)
        if not 200 <= answer.status < 300:
            raise DimensionsUnavailable(f"{self.url} answered {answer.status} with {answer.describe()}")
        if not answer.complete:
            raise DimensionsUnavailable(f"{self.url} answered more than {MAX_BODY} bytes; the answer is not read")
        try:
            payload = json.loads(answer.body)
        except (ValueError, RecursionError):
            payload = None
        data = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(data, list):
            raise DimensionsUnavailable(f"{self.url} answered {answer.status} with {answer.describe()}, "
                                        f'not a JSON object with a "data" array')
        if len(data) > MAX_DIMENSIONS:
            raise DimensionsUnavailable(f"{self.url} answered {len(data)} dimensions, more than the "
                                        f"{MAX_DIMENSIONS} the agent reads")
        return data


def render_yaml(derived: Derived) -> str:
    """``measurements:`` as a user could paste it into a config, the rest as comments."""
    import yaml

    lines = [f"# {len(derived.measurements)} measurement(s) from Paigo's dimensions; "
             f"{len(derived.skipped)} dimension(s) skipped, {len(derived.left_to_yaml)} metered by the YAML"]
    lines.append(yaml.safe_dump({"measurements": list(derived.documents)}, sort_keys=False, width=1000).rstrip())
    lines += [f"# metered by the YAML's measurement {name}: {excerpt(did, 120)}"
              for did, name in sorted(derived.left_to_yaml.items())]
    lines += [f"# skipped {excerpt(s.dimension, 120)}" + (f" ({s.name})" if s.name else "") + f": {excerpt(s.reason)}"
              for s in derived.skipped]
    return "\n".join(lines) + "\n"
