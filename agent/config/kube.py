"""The ``kubernetes`` block of a kubernetes_pod measurement."""

from __future__ import annotations

import re
from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator

from agent import settings
from agent.config.fields import Model, Text, listed_once

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_RESOURCE_NAME = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_SELECTOR = re.compile(r"^[A-Za-z0-9_./!=(), -]+$")
_EKS_NAME = re.compile(r"^[0-9A-Za-z][A-Za-z0-9_-]{0,99}$")
_NAMES = {"eks_cluster": (_EKS_NAME, "an EKS cluster name (letters, digits, '-', '_'; at most 100)"),
          "gpu_resource": (_RESOURCE_NAME, "an extended resource name such as nvidia.com/gpu")}


class Kubernetes(Model):
    plain = settings.Kubernetes
    essential: ClassVar[str] = "kubernetes (kubeconfig, context, namespaces, label_selector; or eks_cluster; " \
                               "{} reads the in-cluster service account)"

    kubeconfig: Text | None = Field(default=None, min_length=1, max_length=4096)
    context: Text | None = Field(default=None, min_length=1, max_length=253)
    namespaces: list[str] = Field(default_factory=list, max_length=1000)
    label_selector: Text | None = Field(default=None, min_length=1, max_length=1024)
    eks_cluster: str | None = Field(default=None, max_length=100)
    gpu_resource: str = Field(default="nvidia.com/gpu", max_length=253)

    @field_validator("namespaces")
    @classmethod
    def _namespace_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _DNS_LABEL.match(name) or len(name) > 63:
                raise ValueError(f"{name[:80]!r} is not a namespace name (a DNS label: a-z, 0-9, '-')")
        return listed_once(names, "namespaces")

    @field_validator("label_selector")
    @classmethod
    def _selector(cls, value: str | None) -> str | None:
        if value is not None and (not _SELECTOR.match(value) or value.count("(") != value.count(")")):
            raise ValueError(f"not a label selector such as 'billing=on,tier in (gold,silver)': {value[:80]!r}")
        return value

    @field_validator(*_NAMES)
    @classmethod
    def _name(cls, value: str | None, info: ValidationInfo) -> str | None:
        pattern, what = _NAMES[info.field_name]
        if value is not None and not pattern.match(value):
            raise ValueError(f"{value[:80]!r} is not {what}")
        return value
