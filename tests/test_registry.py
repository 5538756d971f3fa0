"""The registry checks itself: every sampler declares what config, iam-policy and the README need,
and has a test module of its own."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from dataclasses import fields
import re
from pathlib import Path

import pytest

import agent.samplers
from agent.samplers import REGISTRY, SamplerSpec
from agent.samplers.base import ID_SCOPES
from agent.settings import Filters

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^[a-z][a-z0-9_]*$")
IAM_ACTION = re.compile(r"^[a-z0-9-]+:[A-Z][A-Za-z0-9]+$")

TYPES = sorted(REGISTRY)


def test_every_sampler_module_is_registered() -> None:
    specs = [
        getattr(importlib.import_module(f"agent.samplers.{info.name}"), "SPEC", None)
        for info in pkgutil.iter_modules(agent.samplers.__path__)
    ]
    defined = [spec for spec in specs if isinstance(spec, SamplerSpec)]
    assert len(defined) == len(REGISTRY)
    assert all(REGISTRY[spec.resource_type] is spec for spec in defined)


@pytest.mark.parametrize("resource_type", TYPES)
def test_declares_metrics_with_units_and_descriptions(resource_type: str) -> None:
    spec = REGISTRY[resource_type]
    assert spec.resource_type == resource_type and NAME.match(resource_type)
    assert spec.metrics
    for name, metric in spec.metrics.items():
        assert NAME.match(name), name
        assert metric.unit.strip() and metric.description.strip(), name
    assert spec.default_metric in spec.metrics
    assert spec.description.strip()


@pytest.mark.parametrize("resource_type", TYPES)
def test_declares_well_formed_iam_actions_and_known_filters(resource_type: str) -> None:
    spec = REGISTRY[resource_type]
    assert isinstance(spec.iam_actions, tuple) and (spec.iam_actions or not spec.regional)  # a cluster: RBAC
    for action in spec.iam_actions:
        assert IAM_ACTION.match(action), action
    assert len(set(spec.iam_actions)) == len(spec.iam_actions)
    assert set(spec.filters) <= {f.name for f in fields(Filters)}


def _module(spec: SamplerSpec) -> str:
    """The module that declares the spec (its sample function may be the engine's)."""
    (name,) = [info.name for info in pkgutil.iter_modules(agent.samplers.__path__)
               if getattr(importlib.import_module(f"agent.samplers.{info.name}"), "SPEC", None) is spec]
    return f"agent.samplers.{name}"


def _imports(tree: ast.Module) -> set[str]:
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def _exact_asserts(tree: ast.Module) -> list[ast.Assert]:
    """The asserts that compare with a Decimal built in the test: ``assert x == Decimal(7)``."""
    def decimal_call(node: ast.AST) -> bool:
        return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Decimal"

    return [node for node in ast.walk(tree) if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare)
            and any(decimal_call(part) for operand in (node.test.left, *node.test.comparators)
                    for part in ast.walk(operand))]


@pytest.mark.parametrize(("source", "exact"), [
    ("from decimal import Decimal  # Decimal(1)\nassert total == 3\n", False),
    ("x = Decimal(1)\nassert str(x)\n", False),
    ("assert sample.values == {'size_gib': Decimal(100)}\n", True),
])
def test_exact_asserts_are_comparisons_with_decimals_not_mentions(source: str, exact: bool) -> None:
    assert bool(_exact_asserts(ast.parse(source))) is exact


@pytest.mark.parametrize("resource_type", TYPES)
def test_has_a_test_module_with_exact_numbers(resource_type: str) -> None:
    spec = REGISTRY[resource_type]
    path = ROOT / "tests" / f"test_{resource_type}_sampler.py"
    assert path.is_file(), f"{resource_type} has no {path.relative_to(ROOT)}"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert _module(spec) in _imports(tree), f"{path.name} does not import {_module(spec)}"
    assert len(_exact_asserts(tree)) >= 2, f"{path.name} compares no sampled value with an exact Decimal"


@pytest.mark.parametrize("resource_type", TYPES)
def test_is_documented_in_the_readme(resource_type: str) -> None:
    spec = REGISTRY[resource_type]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Resource types", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{resource_type}` |")]
    assert len(rows) == 1, f"README.md needs one resource-type row for {resource_type}"
    for metric in spec.metrics:
        assert f"`{metric}`" in rows[0], metric
    for action in spec.iam_actions:
        assert f"`{action}`" in rows[0], action


FIELDS = re.compile(r"\{(\w+)\}")


@pytest.mark.parametrize("resource_type", TYPES)
def test_declares_how_its_ids_are_scoped_and_its_identity_follows(resource_type: str) -> None:
    """A resource is its id only within the scope AWS gives the id: the identity adds the rest."""
    spec = REGISTRY[resource_type]
    assert spec.id_scope in ID_SCOPES
    fields = set(FIELDS.findall(spec.identity))
    needed = {"account-region": {"account", "region"}, "region": {"region"}, "partition": set()}[spec.id_scope]
    assert fields - {"partition"} == needed | {"id"}, spec.identity
    assert spec.identity.startswith("arn:{partition}:") or not spec.identity.startswith("arn:")
    # the same id in another region (or account, where the scope says so) is another resource
    here = spec.resource("us-east-1", "111111111111", "orders")
    assert here == spec.resource("us-east-1", "111111111111", "orders") and "orders" in here
    assert (here != spec.resource("eu-west-1", "111111111111", "orders")) == ("region" in needed)
    assert (here != spec.resource("us-east-1", "222222222222", "orders")) == ("account" in needed)
    assert here != spec.resource("us-east-1", "111111111111", "orders-2")


def test_the_readme_names_each_types_identity() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Resource types", 1)[1].split("\n#", 1)[0]
    for resource_type, spec in REGISTRY.items():
        (row,) = [line for line in section.splitlines() if line.startswith(f"| `{resource_type}` |")]
        assert f"`{spec.identity.replace('{partition}', 'aws')}`" in row, resource_type
