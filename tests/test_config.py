"""Tests for agent.config: loading, validation messages, env expansion, secrets, aliases, defaults."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pydantic
import pytest
import yaml

from agent.config import check_structure, load_config, parse_backend, parse_duration, parse_measurement
from agent.errors import ConfigError
from agent.samplers import REGISTRY
from agent.settings import FileBackend, HttpBackend, OpenMeterBackend, PaigoBackend
from tests.support import cli

CONFIG_DIR = Path(__file__).parent.parent / "config"
SECRET = "s3cr3t-Value-9f2c"


# --------------------------------------------------------------------------- helpers


def backend(**fields: Any) -> dict[str, Any]:
    """A valid Paigo backend; a field set to None is removed."""
    base = {"type": "paigo", "client_id": "client-1", "client_secret": SECRET}
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


def measurement(**fields: Any) -> dict[str, Any]:
    """A valid ebs measurement; a field set to None is removed."""
    base = {
        "name": "ebs-storage",
        "dimension_id": "dim-1",
        "resource_type": "ebs",
        "regions": ["us-east-1"],
        "customer": {"id": "cust-1"},
    }
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


def doc(backend_: dict[str, Any] | None = None, measurements: list[Any] | None = None, **top: Any) -> str:
    """A whole config document as YAML text."""
    data = {"backend": backend_ or backend(), "measurements": [measurement()] if measurements is None else measurements}
    return yaml.safe_dump({**data, **top}, sort_keys=False)


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path, env: dict[str, str] | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    assert info.value.source == str(path)
    return info.value.problems


# --------------------------------------------------------------------------- 1. bad configs

M0 = "measurements[0]"

BAD_CONFIGS = [
    ("unknown top-level key", doc(telemetry={"on": True}), [("telemetry", "unknown key")]),
    ("unknown backend key", doc(backend(colour="red")), [("backend.colour", "unknown key")]),
    ("unknown measurement key", doc(measurements=[measurement(colour="red")]), [(f"{M0}.colour", "unknown key")]),
    ("missing client_id", doc(backend(client_id=None)), [("backend.client_id", "required key is missing")]),
    ("both secret and secret file", doc(backend(client_secret_file="secret.txt")),
     [("backend", "exactly one of client_secret or client_secret_file")]),
    ("neither secret nor secret file", doc(backend(client_secret=None)),
     [("backend", "exactly one of client_secret or client_secret_file")]),
    ("secret file missing", doc(backend(client_secret=None, client_secret_file="no-such-secret.txt")),
     [("backend.client_secret_file", "cannot read secret file")]),
    ("env var unset in backend", doc(backend(client_id="${PAIGO_ID}")),
     [("backend.client_id", "environment variable PAIGO_ID is not set")]),
    ("env var unset in metadata", doc(measurements=[measurement(metadata={"team": "${TEAM}"})]),
     [(f"{M0}.metadata.team", "environment variable TEAM is not set")]),
    ("interval with bad unit", doc(measurements=[measurement(interval="5x")]),
     [(f"{M0}.interval", "expected a duration such as 30s, 5m or 1h, got '5x'")]),
    ("zero interval", doc(measurements=[measurement(interval="0s")]), [(f"{M0}.interval", "longer than 0s")]),
    ("bad region name", doc(measurements=[measurement(regions=["us-east-1", "Mars-North"])]),
     [(f"{M0}.regions", "'Mars-North' is not an AWS region name")]),
    ("unknown resource_type", doc(measurements=[measurement(resource_type="sqs")]),
     [(f"{M0}.resource_type", "unknown resource type 'sqs'; expected one of: ")]),
    ("unknown ebs metric", doc(measurements=[measurement(metric="bytes")]),
     [(f"{M0}.metric", "ebs has no metric 'bytes'; expected one of: size_gib")]),
    ("filter not supported", doc(measurements=[measurement(filters={"instance_types": ["t3.micro"]})]),
     [(f"{M0}.filters.instance_types", "ebs does not support this filter; it supports: tags, volume_types")]),
    ("unknown filter", doc(measurements=[measurement(filters={"colour": ["red"]})]),
     [(f"{M0}.filters.colour", "unknown key")]),
    ("duplicate measurement names", doc(measurements=[measurement(), measurement(dimension_id="dim-2")]),
     [("measurements[1].name", "'ebs-storage' is already used by measurements[0]")]),
    ("customer with id and tag", doc(measurements=[measurement(customer={"id": "c", "tag": "customer-id"})]),
     [(f"{M0}.customer", "exactly one of customer.id or customer.tag")]),
    ("customer.untagged with id", doc(measurements=[measurement(customer={"id": "c", "untagged": "other"})]),
     [(f"{M0}.customer", "customer.untagged only applies with customer.tag")]),
    ("bad mode", doc(measurements=[measurement(mode="sum")]), [(f"{M0}.mode", "'gauge' or 'time_weighted'")]),
    ("malformed iam_role_arn", doc(measurements=[measurement(iam_role_arn="arn:aws:iam::123:role/x")]),
     [(f"{M0}.iam_role_arn", "expected arn:aws:iam::<12-digit account>:role/<name>")]),
    ("external_id without iam_role_arn", doc(measurements=[measurement(external_id="ext-123")]),
     [(f"{M0}.external_id", "an external id needs iam_role_arn")]),
    ("invalid YAML", "backend:\n  type: paigo\n client_id: x\n", [("", "line 3")]),
    ("list document", "- backend\n- measurements\n", [("", "expected a mapping")]),
    ("empty measurements", doc(measurements=[]), [("measurements", "at least 1 item")]),
    # durations past any sensible bound: once an OverflowError traceback
    ("interval past the bound", doc(measurements=[measurement(interval="99999999999d")]),
     [(f"{M0}.interval", "a duration must be at most 366d")]),
    ("retention past the bound", doc(spool={"retention": "367d"}), [("spool.retention", "at most 366d")]),
    ("duration in seconds past the bound", doc(backend(timeout=10**20)), [("backend.timeout", "at most 366d")]),
    ("duration with thousands of digits", doc(measurements=[measurement(interval="9" * 5000 + "s")]),
     [(f"{M0}.interval", "at most 366d")]),
    # empty secrets: an empty variable must not become an empty credential
    ("empty client_secret", doc(backend(client_secret="")), [("backend.client_secret", "a secret must not be empty")]),
    ("blank hmac_secret", doc({"type": "http", "url": "https://b.example", "hmac_secret": "  "}),
     [("backend.hmac_secret", "a secret must not be empty")]),
    ("empty openmeter token", doc({"type": "openmeter", "token": ""}), [("backend.token", "a secret must not be empty")]),
    ("empty header value", doc({"type": "http", "url": "https://b.example", "headers": {"Authorization": ""}}),
     [("backend.headers.Authorization", "a secret must not be empty")]),
    # ids that go into requests: no line breaks, control characters or surrounding spaces
    ("newline in dimension_id", doc(measurements=[measurement(dimension_id="dim-1\nX-Injected: 1")]),
     [(f"{M0}.dimension_id", "expected printable text without line breaks")]),
    ("control character in customer.id", doc(measurements=[measurement(customer={"id": "acme\x07"})]),
     [(f"{M0}.customer.id", "expected printable text")]),
    ("tab in client_id", doc(backend(client_id="client\t1")), [("backend.client_id", "expected printable text")]),
    ("carriage return in external_id", doc(measurements=[measurement(
        iam_role_arn="arn:aws:iam::123456789012:role/r", external_id="ext-1\r")]),
     [(f"{M0}.external_id", "expected printable text")]),
    ("leading space in event_type", doc(measurements=[measurement(event_type=" ebs")]),
     [(f"{M0}.event_type", "surrounding spaces")]),
    # YAML a safe loader types but Python cannot build: once a ValueError/TypeError traceback
    ("integer of 5000 digits", "backend: " + "1" * 5000 + "\n", [("", "invalid YAML value: Exceeds the limit")]),
    ("impossible date", "backend: 2026-13-45\n", [("", "invalid YAML value: month must be in 1..12")]),
    ("collection as a key", "? [a, b]\n: c\n", [("", "a key must be a plain value")]),
    ("nesting past the bound", "backend: " + "[" * 100 + "]" * 100 + "\n", [("", "nested deeper than 64 levels")]),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_reports_path_and_message(tmp_path: Path, text: str, expected: list[tuple[str, str]]) -> None:
    (tmp_path / "secret.txt").write_text("from-file\n", encoding="utf-8")  # for the "both secrets" case
    problems = problems_of(write(tmp_path, text))
    for path, fragment in expected:
        assert any(p == path and fragment in m for p, m in problems), f"{(path, fragment)} not in {problems}"
    # and nothing is reported anywhere else
    assert {p for p, _ in problems} == {p for p, _ in expected}


SEVERAL_ERROR_PATHS = [
    "measurements[1].interval",
    "measurements[1].mode",
    "measurements[1].regions",
    "measurements[2].metric",
]


def _several_errors_config() -> str:
    return doc(measurements=[
        measurement(name="ok-one"),
        measurement(name="broken", interval="5x", mode="sum", regions=["Mars-North"]),
        measurement(name="bad-metric", metric="bytes"),
    ])


def test_all_problems_are_reported_together_in_path_order(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, _several_errors_config()), {})
    assert [path for path, _ in info.value.problems] == SEVERAL_ERROR_PATHS
    assert "4 error(s)" in str(info.value)


# --------------------------------------------------------------------------- 2. CLI


def _validate(config: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli("validate", *flags, "-c", str(config), env={**(os.environ if env is None else env), "LOG_LEVEL": "warning"})


def test_cli_validate_bad_config_exits_2_and_lists_every_problem(tmp_path: Path) -> None:
    config = write(tmp_path, _several_errors_config())
    result = _validate(config)
    assert result.returncode == 2, result.stderr
    assert str(config) in result.stderr
    for path in SEVERAL_ERROR_PATHS:
        assert f"{path}:" in result.stderr


def test_cli_validate_good_config_exits_0(tmp_path: Path) -> None:
    config = write(tmp_path, doc())
    result = _validate(config)
    assert result.returncode == 0, result.stderr
    assert "ok (1 measurement(s), backend paigo)" in result.stdout


# --------------------------------------------------------------------------- 3. env expansion and secrets


def test_env_vars_are_substituted_and_double_dollar_is_literal(tmp_path: Path) -> None:
    text = doc(
        backend(client_id="${PAIGO_ID}", client_secret="pre-${PAIGO_SECRET}-post"),
        [measurement(metadata={"price": "$$5 per ${UNIT}", "literal": "$${NOT_EXPANDED}"})],
    )
    env = {"PAIGO_ID": "id-from-env", "PAIGO_SECRET": "xyz", "UNIT": "GiB"}
    cfg = load_config(write(tmp_path, text), env)
    assert cfg.backend.client_id == "id-from-env"
    assert cfg.backend.secret() == "pre-xyz-post"
    assert cfg.measurements[0].metadata == {"price": "$5 per GiB", "literal": "${NOT_EXPANDED}"}


# the backend lines exactly as the config contract writes them: ``${VAR}`` unquoted in a flow mapping
FLOW_BACKENDS = [
    "{type: paigo, client_id: ${PAIGO_CLIENT_ID}, client_secret: ${PAIGO_SECRET}}",
    "{type: openmeter, url: https://openmeter.cloud, token: ${OPENMETER_TOKEN}, source: usage-agent, batch_size: 100}",
    "{type: togai, url: https://api.togai.com, token: ${TOGAI_TOKEN}, attribute: value, batch_size: 500}",
    "{type: stripe, url: https://api.stripe.com, api_key: ${STRIPE_API_KEY}, customer_key: stripe_customer_id, "
    "value_key: value}",
    "{type: lago, url: https://api.getlago.com, api_key: ${LAGO_API_KEY}, customer_field: external_subscription_id, "
    "value_property: value}",
    "{type: orb, url: https://api.withorb.com, api_key: ${ORB_API_KEY}, customer_field: external_customer_id}",
    "{type: metronome, url: https://api.metronome.com, api_key: ${METRONOME_API_KEY}}",
]


@pytest.mark.parametrize("line", FLOW_BACKENDS)
def test_an_unquoted_variable_in_a_flow_mapping_is_expanded(tmp_path: Path, line: str) -> None:
    measurements = yaml.safe_dump({"measurements": [measurement(metadata={"note": "$${KEPT}"})]}, sort_keys=False)
    path = write(tmp_path, f"backend: {line}\n{measurements}")
    env = {name: f"secret-of-{name.lower()}" for name in ("PAIGO_CLIENT_ID", "PAIGO_SECRET", "OPENMETER_TOKEN",
           "TOGAI_TOKEN", "STRIPE_API_KEY", "LAGO_API_KEY", "ORB_API_KEY", "METRONOME_API_KEY")}
    cfg = load_config(path, env)
    fields = {name: getattr(cfg.backend, name) for name in ("client_id", "token", "api_key") if hasattr(cfg.backend, name)}
    values = [v if isinstance(v, str) else v.get_secret_value() if hasattr(v, "get_secret_value") else v.value
              for v in fields.values()]
    assert values and all(v.startswith("secret-of-") for v in values)
    assert cfg.measurements[0].metadata == {"note": "${KEPT}"}
    assert problems_of(path, {}) and all("is not set" in why for _, why in problems_of(path, {}))


def test_a_yaml_error_after_a_variable_keeps_its_column(tmp_path: Path) -> None:
    text = "backend: {type: file, path: ${OUT}, x: [}\n"
    column = text.index("[}") + 2  # the "}" where a node was expected, 1-based
    assert problems_of(write(tmp_path, text), {"OUT": "o"}) == [
        ("", f"invalid YAML at line 1, column {column}: did not find expected node content")]


def test_secret_file_is_read_stripped_and_resolved_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "paigo").write_text(f"  {SECRET}\n\n", encoding="utf-8")
    text = doc(backend(client_secret=None, client_secret_file="secrets/paigo"))
    assert Path.cwd() != tmp_path  # the relative path must not work by accident
    cfg = load_config(write(tmp_path, text), {})
    assert cfg.backend.secret() == SECRET


@pytest.mark.parametrize("source", ["inline", "env", "file"])
def test_secret_never_appears_in_repr_or_str(tmp_path: Path, source: str) -> None:
    (tmp_path / "secret.txt").write_text(SECRET, encoding="utf-8")
    fields = {
        "inline": {"client_secret": SECRET},
        "env": {"client_secret": "${PAIGO_CLIENT_SECRET}"},
        "file": {"client_secret": None, "client_secret_file": "secret.txt"},
    }[source]
    cfg = load_config(write(tmp_path, doc(backend(**fields))), {"PAIGO_CLIENT_SECRET": SECRET})
    assert cfg.backend.secret() == SECRET
    for text in (repr(cfg), str(cfg), repr(cfg.backend), str(cfg.backend)):
        assert SECRET not in text


# --------------------------------------------------------------------------- 4. Paigo camelCase aliases


def test_paigo_camel_case_aliases_give_the_same_model(tmp_path: Path) -> None:
    role = "arn:aws:iam::214826386939:role/paigo-scraper"
    snake = measurement(
        dimension_id="dim-9", iam_role_arn=role, external_id="123456789",
        cloud_platform="aws", regions=["eu-west-1"], resource_type="ebs",
    )
    camel = {k: v for k, v in snake.items() if k not in {
        "dimension_id", "iam_role_arn", "external_id", "cloud_platform", "regions", "resource_type"}}
    camel.update(dimensionId="dim-9", iamRoleArn=role, externalId="123456789",
                 cloudPlatform="aws", region="eu-west-1", resourceType="ebs")

    from_snake = load_config(write(tmp_path, doc(measurements=[snake]), "snake.yaml"), {})
    from_camel = load_config(write(tmp_path, doc(measurements=[camel]), "camel.yaml"), {})
    assert from_camel == from_snake
    m = from_camel.measurements[0]
    assert (m.dimension_id, m.iam_role_arn, m.external_id) == ("dim-9", role, "123456789")
    assert (m.regions, m.resource_type, m.roles()[0].arn) == (("eu-west-1",), "ebs", m.iam_role_arn)
    assert m.iam_role_arn is not None and m.iam_role_arn.split(":")[4] == "214826386939"


# --------------------------------------------------------------------------- 5. durations


@pytest.mark.parametrize(("value", "expected"), [
    ("30s", timedelta(seconds=30)),
    ("5m", timedelta(minutes=5)),
    ("1h", timedelta(hours=1)),
    ("1d", timedelta(days=1)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    (90, timedelta(seconds=90)),
])
def test_duration_parses(tmp_path: Path, value: Any, expected: timedelta) -> None:
    assert parse_duration(value) == expected
    cfg = load_config(write(tmp_path, doc(measurements=[measurement(interval=value)])), {})
    assert cfg.measurements[0].interval == expected


@pytest.mark.parametrize("value", ["-5m", "1.5h", "abc", "0s", 0, -30, "", True])
def test_duration_rejects(tmp_path: Path, value: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)
    problems = problems_of(write(tmp_path, doc(measurements=[measurement(interval=value)])))
    assert [p for p, _ in problems] == [f"{M0}.interval"]


# --------------------------------------------------------------------------- 6. defaults


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, doc()), {})
    m = cfg.measurements[0]
    assert m.metric == REGISTRY["ebs"].default_metric == "size_gib"  # resolved: no stage looks it up
    assert (m.mode, m.per, m.interval, m.group_by, m.decimals) == ("gauge", "hour", timedelta(hours=1), "customer", 9)
    assert (m.cloud_platform, m.customer.untagged, m.customer.fallback_id) == ("aws", "skip", None)
    assert cfg.spool.max_records == 1_000_000
    assert cfg.spool.path == "/var/lib/usage-agent/spool.db"
    assert cfg.backend.timeout == timedelta(seconds=10)


def test_relative_spool_path_is_resolved_against_config_dir(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, doc(spool={"path": "data/spool.db"})), {})
    assert cfg.spool.path == str(tmp_path / "data" / "spool.db")


# --------------------------------------------------------------------------- 7. shipped examples

EXAMPLES = sorted(CONFIG_DIR.glob("*.yaml"))


def test_example_configs_exist() -> None:
    assert len(EXAMPLES) >= 2, f"no example configs found in {CONFIG_DIR}"


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_structure_validates_without_its_environment(example: Path) -> None:
    """`validate --no-env`: the examples' ${VAR}s are unset and their secret files do not exist here."""
    document = check_structure(example, {})
    assert document["measurements"]


def test_cli_validate_no_env_passes_an_example_whose_variables_are_unset() -> None:
    example = CONFIG_DIR / "http-ebs.yaml"
    env = {k: v for k, v in os.environ.items() if k not in ("BILLING_API_TOKEN", "USAGE_HMAC_FILE")}
    strict = _validate(example, env=env)
    assert strict.returncode == 2 and "BILLING_API_TOKEN is not set" in strict.stderr
    loose = _validate(example, "--no-env", env=env)
    assert loose.returncode == 0, loose.stderr
    assert "structure ok (1 measurement(s), backend http)" in loose.stdout


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(tmp_path: Path, example: Path) -> None:
    secret_file = tmp_path / "paigo-client-secret"
    secret_file.write_text("secret-from-file\n", encoding="utf-8")
    env = {
        "PAIGO_CLIENT_ID": "example-client",
        "PAIGO_CLIENT_SECRET": "secret-from-env",
        "PAIGO_CLIENT_SECRET_FILE": str(secret_file),
        "OPENMETER_TOKEN": "secret-from-env",
        "BILLING_API_TOKEN": "secret-from-env",
        "USAGE_HMAC_FILE": str(secret_file),
        "STRIPE_API_KEY": "secret-from-env",
        "METRONOME_API_KEY": "secret-from-env",
        "TOGAI_TOKEN": "secret-from-env",
        "LAGO_API_KEY": "secret-from-env",
        "ORB_API_KEY": "secret-from-env",
    }
    cfg = load_config(example, env)
    backend = cfg.backend
    if isinstance(backend, PaigoBackend):
        assert backend.client_id == "example-client"
        assert backend.secret() in {"secret-from-env", "secret-from-file"}
    elif isinstance(backend, OpenMeterBackend):
        assert backend.token is not None and backend.token.get_secret_value() == "secret-from-env"
    elif isinstance(backend, HttpBackend):
        assert backend.header_values()["Authorization"] == "Bearer secret-from-env"
        assert backend.hmac_secret is not None and backend.hmac_secret.get_secret_value() == "secret-from-file"
    elif backend.type in ("stripe", "metronome"):
        assert backend.api_key.get_secret_value() == "secret-from-env"
    elif backend.type == "togai":
        assert backend.token.get_secret_value() == "secret-from-env"
    elif backend.type in ("lago", "orb"):
        assert backend.api_key.get_secret_value() == "secret-from-env"
    else:
        assert isinstance(backend, FileBackend) and Path(backend.path).is_absolute()
    assert cfg.measurements and all(m.roles() and m.resource_type in REGISTRY for m in cfg.measurements)


def test_a_file_of_junk_prints_the_first_errors_and_how_many_more(tmp_path: Path) -> None:
    junk = "".join(f"junk{n}: 1\n" for n in range(5000))
    config = write(tmp_path, "backend: {type: file, path: out.jsonl}\nmeasurements: []\n" + junk)
    result = _validate(config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    header = next(line for line in lines if line.startswith(f"{config}: "))
    total = int(header.split(": ")[1].split()[0])
    shown = [line for line in lines if line.startswith("  junk")]
    assert total > 5000 and len(shown) == 200
    assert lines[-1] == f"  … and {total - 200} more"


# --------------------------------------------------------------------------- 8. the settings layer


def _walk(value: Any, where: str = "cfg") -> Any:
    """Every (path, value) inside a settings object."""
    yield where, value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, (tuple, MappingProxyType)):
        items = value.items() if isinstance(value, MappingProxyType) else enumerate(value)
        for key, item in items:
            yield from _walk(item, f"{where}[{key!r}]")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_stages_get_plain_frozen_settings(tmp_path: Path, example: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n", encoding="utf-8")
    env = {name: "from-env" for name in ("PAIGO_CLIENT_ID", "PAIGO_CLIENT_SECRET", "OPENMETER_TOKEN", "BILLING_API_TOKEN",
                                               "STRIPE_API_KEY", "METRONOME_API_KEY",
                                               "TOGAI_TOKEN", "LAGO_API_KEY", "ORB_API_KEY")}
    cfg = load_config(example, {**env, "PAIGO_CLIENT_SECRET_FILE": str(secret_file), "USAGE_HMAC_FILE": str(secret_file)})
    for where, value in _walk(cfg):
        assert not isinstance(value, (pydantic.BaseModel, pydantic.SecretStr, list, dict, set)), (where, type(value))
        if dataclasses.is_dataclass(value):
            assert type(value).__module__ == "agent.settings" and type(value).__dataclass_params__.frozen, where
    assert all(m.metric in REGISTRY[m.resource_type].metrics for m in cfg.measurements)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.spool.path = "elsewhere"  # type: ignore[misc]


def test_the_sampler_registry_imports_no_config() -> None:
    """The registry is data below config: config is generated from it, never the other way."""
    code = "import sys, agent.samplers; print(sorted(m for m in sys.modules if m.startswith('agent.config')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_one_measurement_or_backend_is_checked_as_in_a_config() -> None:
    m = parse_measurement(measurement(resource_type="ec2", filters={"states": ["stopped"]}))
    assert (m.metric, m.filters.states, m.filters.volume_types) == ("count", ("stopped",), ())
    with pytest.raises(ConfigError) as info:
        parse_measurement(measurement(metric="bytes", customer=None))
    assert info.value.problems == [(f"{M0}.customer", "required key is missing"),
                                   (f"{M0}.metric", "ebs has no metric 'bytes'; expected one of: size_gib, iops, "
                                                    "throughput_mibps, count")]
    assert parse_backend(backend()).secret() == SECRET
    with pytest.raises(ConfigError) as info:
        parse_backend(backend(max_in_flight=0))
    assert [p for p, _ in info.value.problems] == ["backend.max_in_flight"]
