"""vCPUs and memory of EC2 instance types (RDS classes map onto them), cached per process.

Instance type specifications do not differ between regions or accounts, so one cache
serves every target; a type is described once, in batches of 100 (the API's limit).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from agent.errors import excerpt
from agent.samplers.base import CallError, Target

BATCH = 100


@dataclass(frozen=True, slots=True)
class InstanceType:
    vcpus: Decimal
    memory_gib: Decimal


_cache: dict[str, InstanceType] = {}
_unknown: set[str] = set()
_lock = threading.Lock()


def _parse(entry: dict[str, Any]) -> InstanceType:
    return InstanceType(
        vcpus=Decimal(entry["VCpuInfo"]["DefaultVCpus"]),
        memory_gib=Decimal(entry["MemoryInfo"]["SizeInMiB"]) / 1024,
    )


def _describe(target: Target, ec2: Any, names: list[str]) -> None:
    from botocore.exceptions import ClientError  # botocore is imported where sampling is, not with the registry

    try:
        pages = target.pages(ec2, "describe_instance_types", "InstanceTypes", InstanceTypes=names)
        found = {e["InstanceType"]: _parse(e) for page in pages for e in page}
    except (KeyError, TypeError, ArithmeticError) as exc:
        raise CallError(f"{target.measurement.resource_type}: ec2 DescribeInstanceTypes in "
                        f"{target.account}/{target.region}: unusable answer: {excerpt(repr(exc))}") from exc
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "InvalidInstanceType":
            raise
        if len(names) > 1:  # one unknown name fails the whole call: isolate it
            for name in names:
                _describe(target, ec2, [name])
            return
        found = {}
    with _lock:
        _cache.update(found)
        _unknown.update(set(names) - set(found))


def lookup(target: Target, ec2: Any, names: Iterable[str]) -> dict[str, InstanceType]:
    """The specifications of the named types that exist; unknown names are left out."""
    wanted = set(names)
    with _lock:
        missing = sorted(wanted - _cache.keys() - _unknown)
    for start in range(0, len(missing), BATCH):
        _describe(target, ec2, missing[start : start + BATCH])
    with _lock:
        return {name: _cache[name] for name in wanted if name in _cache}


def forget() -> None:
    """Empty the cache (tests that stub different answers for the same type)."""
    with _lock:
        _cache.clear()
        _unknown.clear()
