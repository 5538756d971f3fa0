"""Checks no one field's model can make: across measurements (unique names), across keys of
one measurement as written (the two account forms), and those a resource type declares."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.samplers import REGISTRY
from agent.settings import Measurement


def measurement_problems(measurements: Any) -> list[tuple[str, str]]:
    """On the expanded YAML, so they add to pydantic's errors."""
    if not isinstance(measurements, list):
        return []
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(measurements):
        if not isinstance(raw, dict):
            continue
        where = f"measurements[{i}]"
        name = raw.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append((f"{where}.name", f"{name!r} is already used by measurements[{seen[name]}]"))
            seen.setdefault(name, i)
        problems += _account_problems(raw, where)
    return problems


def type_problems(measurements: Iterable[tuple[int, Measurement]]) -> list[tuple[str, str]]:
    """What each resource type checks (``SamplerSpec.check``) on each measurement that validated."""
    return [(f"measurements[{i}].{path}", message)
            for i, m in measurements if (check := REGISTRY[m.resource_type].check) is not None
            for path, message in check(m)]


def _raw_key(raw: dict[str, Any], *names: str) -> str | None:
    """Which spelling of a field (snake_case or Paigo's camelCase) the YAML used."""
    return next((n for n in names if n in raw), None)


def _account_problems(raw: dict[str, Any], where: str) -> list[tuple[str, str]]:
    """The single-role form and ``accounts:`` exclude each other; every account needs a customer."""
    problems: list[tuple[str, str]] = []
    role_key = _raw_key(raw, "iam_role_arn", "iamRoleArn")
    external_key = _raw_key(raw, "external_id", "externalId")
    accounts = raw.get("accounts")
    if accounts is not None:
        for key in (role_key, external_key):
            if key:
                problems.append((f"{where}.{key}", "use either accounts or iam_role_arn/external_id, not both"))
        if "customer" not in raw and isinstance(accounts, list):
            for j, account in enumerate(accounts):
                if isinstance(account, dict) and "customer" not in account:
                    problems.append((f"{where}.accounts[{j}].customer",
                                     "required key is missing (or set customer on the measurement)"))
        return problems
    if external_key and role_key is None:
        problems.append((f"{where}.{external_key}", "an external id needs iam_role_arn"))
    if "customer" not in raw:
        problems.append((f"{where}.customer", "required key is missing"))
    return problems


def sync_problems(document: Any) -> list[tuple[str, str]]:
    """``paigo_sync`` reads Paigo's dimensions with the Paigo backend's token; without it, the
    YAML must hold at least one measurement."""
    if not isinstance(document, dict):
        return []
    backend = document.get("backend")
    kind = backend.get("type") if isinstance(backend, dict) else None
    if document.get("paigo_sync") is not None:
        if isinstance(kind, str) and kind != "paigo":
            return [("paigo_sync", f"needs backend.type: paigo (the dimensions are read from Paigo with its "
                                   f"token), got backend.type: {kind}")]
        return []
    if document.get("measurements", []) == []:
        return [("measurements", "at least 1 item is needed (or a paigo_sync section, to read them from Paigo)")]
    return []
