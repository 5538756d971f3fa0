"""Kubernetes resource quantities (``250m``, ``512Mi``, ``1e3``) as exact Decimals, by the
grammar of apimachinery's resource.Quantity."""

from __future__ import annotations

import re
from functools import lru_cache
from decimal import Decimal
from typing import Any

from agent.records import WIDE

_SUFFIXES: dict[str, Decimal] = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
    **{f"{p}i": Decimal(2) ** (10 * (i + 1)) for i, p in enumerate("KMGTPE")},
}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d{1,3})|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)")
MAX_LENGTH = 64


def parse_quantity(raw: Any) -> Decimal:
    """The exact value of a quantity; ValueError for anything the API server would not accept
    and for negative amounts (a request is never negative)."""
    if type(raw) is str:  # the few distinct strings of a cluster's pods are parsed once
        return _parsed(raw)
    return _parse(raw)


@lru_cache(maxsize=4096)
def _parsed(raw: str) -> Decimal:
    return _parse(raw)


def _parse(raw: Any) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise ValueError(f"not a quantity: {str(raw)[:MAX_LENGTH]!r}")
    text = str(raw).strip()
    match = _QUANTITY.fullmatch(text) if len(text) <= MAX_LENGTH else None
    if match is None:
        raise ValueError(f"not a quantity: {text[:MAX_LENGTH]!r}")
    number, exponent, suffix = match.groups()
    value = Decimal(number)
    scale = Decimal(f"1{exponent}") if exponent else _SUFFIXES[suffix or ""]
    value = WIDE.multiply(value, scale)
    if value < 0:
        raise ValueError(f"negative quantity: {text!r}")
    return value
