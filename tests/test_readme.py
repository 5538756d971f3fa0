"""The README's examples: every ```yaml block parses, every block that is a whole config validates
with the agent's own loader (its ${VAR}s set and its secret files created by the test), and the
Paigo body shown is the one the agent sends."""

from __future__ import annotations

import json
import re
import textwrap
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from agent.config import BACKEND_TYPES, load_config, parse_backend, parse_measurement
from agent.convert import convert
from agent.errors import ConfigError
from agent.samplers.base import Sample
from agent.delivery import bodies
from agent.metrics import Metrics
from agent.sinks.paigo import PaigoSink
from agent.testing.paigo_server import usage_record_schema

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^([ \t]*)```ya?ml\b[^\n]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)  # in a list item too
ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def yaml_blocks() -> list[tuple[int, str]]:
    """(line of the opening fence, text) of every ```yaml block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(2))) for m in FENCE.finditer(text)]


def is_whole_config(document: Any) -> bool:
    return isinstance(document, dict) and ("measurements" in document or "backend" in document)


def parsed(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # test_every_yaml_block_parses says where and why


BLOCKS = yaml_blocks()
WHOLE_CONFIGS = [(line, text) for line, text in BLOCKS if is_whole_config(parsed(text))]


def secret_files(node: Any) -> list[str]:
    """The paths a config reads secrets from: every *_file value and every header_files value."""
    if isinstance(node, list):
        return [path for item in node for path in secret_files(item)]
    if not isinstance(node, dict):
        return []
    found = []
    for key, value in node.items():
        if key == "header_files" and isinstance(value, dict):
            found += [v for v in value.values() if isinstance(v, str)]
        elif isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
            found.append(value)
        else:
            found += secret_files(value)
    return found


@pytest.mark.parametrize("block", [text for _, text in BLOCKS], ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_every_yaml_block_parses(block: str) -> None:
    assert yaml.safe_load(block) is not None


@pytest.mark.parametrize("block", [text for _, text in WHOLE_CONFIGS], ids=[f"README.md:{line}" for line, _ in WHOLE_CONFIGS])
def test_every_whole_config_validates(block: str, tmp_path: Path) -> None:
    document = yaml.safe_load(block)
    env = {name: f"value-of-{name}" for name in ENV_REF.findall(block)}
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    for i, path in enumerate(secret_files(document)):
        secret = secrets / f"secret-{i}"
        secret.write_text(f"secret-{i}\n")
        variable = ENV_REF.fullmatch(path)
        if variable:
            env[variable.group(1)] = str(secret)
        else:
            block = block.replace(path, str(secret))
    config = tmp_path / "config.yaml"
    config.write_text(block, encoding="utf-8")
    try:
        cfg = load_config(config, env)
    except ConfigError as exc:
        pytest.fail(exc.render())
    assert cfg.backend.type == document["backend"]["type"]


def test_the_readme_shows_a_whole_config_for_every_backend() -> None:
    assert {yaml.safe_load(text)["backend"]["type"] for _, text in WHOLE_CONFIGS} == set(BACKEND_TYPES)


def test_the_paigo_body_shown_is_what_the_agent_sends() -> None:
    text = README.read_text(encoding="utf-8")
    (shown,) = [json.loads(m.group(1)) for m in re.finditer(r"^```json\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
                if '"recordValue"' in m.group(1)]
    measurement = parse_measurement({
        "name": "ebs-storage", "dimension_id": "8a7b5f91-3b85-4cf4-8585-dcdf17f49004", "resource_type": "ebs",
        "regions": ["us-east-1"], "customer": {"tag": "customer-id"}, "metadata": {"environment": "prod"}})
    samples = [Sample(volume, "us-east-1", "214826386939", {"size_gib": Decimal(gib)}, {"customer-id": "acme"})
               for volume, gib in (("vol-1", 100), ("vol-2", 7))]
    (record,) = convert(measurement, "size_gib", "GiB", samples, datetime(2026, 11, 21, 10, tzinfo=timezone.utc)).records
    sink = PaigoSink(parse_backend({"type": "paigo", "client_id": "client-abc", "client_secret": "s3cr3t"}),
                     httpx.Client(), Metrics())
    body = json.loads(bodies(sink, [record])[0])  # a dry run sends nothing
    assert json.dumps(body) == json.dumps(shown)  # key order included
    jsonschema.Draft7Validator(usage_record_schema()).validate(body)
