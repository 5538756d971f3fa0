"""Config loading is bounded: file size, alias expansion; `--no-env` and the spool-only load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from agent.config import MAX_ALIAS_NODES, MAX_CONFIG_BYTES, check_structure, load_config, load_spool_config
from agent.errors import ConfigError
from tests.test_config import backend, doc, measurement, problems_of, write


def alias_bomb(levels: int) -> str:
    """Each level is a list of nine aliases of the one before: 9**levels nodes once loaded."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n" + doc()


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    started = time.monotonic()
    problems = problems_of(write(tmp_path, alias_bomb(6)))  # 531441 nodes; 9 levels took 1.2 GB and 60 s
    assert problems == [("", f"invalid YAML at line 5, column 10: aliases expand to more than {MAX_ALIAS_NODES} nodes")]
    assert time.monotonic() - started < 10


def test_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    text = (
        f"backend: {yaml.safe_dump(backend(), default_flow_style=True)}"
        "measurements:\n"
        "  - &first {name: a, dimension_id: dim-a, resource_type: ebs, regions: [us-east-1], customer: {id: acme}}\n"
        "  - {<<: *first, name: b, dimension_id: dim-b, regions: [eu-west-1]}\n"  # a merge key, overridden
    )
    cfg = load_config(write(tmp_path, text), {})
    assert [(m.name, m.regions, m.customer) for m in cfg.measurements] == [
        ("a", ("us-east-1",), cfg.measurements[0].customer), ("b", ("eu-west-1",), cfg.measurements[0].customer)]
    for depth in (7, 8):  # the budget counts every expansion, however deep the nesting
        assert "aliases expand" in problems_of(write(tmp_path, alias_bomb(depth)))[0][1]


def test_a_recursive_alias_is_refused(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, "backend: &loop [*loop]\n"))
    assert problems == [("", "invalid YAML at line 1, column 17: "
                             "alias *loop refers to an anchor that is undefined or contains the alias")]


def test_a_config_file_larger_than_the_cap_is_not_read(tmp_path: Path) -> None:
    path = write(tmp_path, doc() + "#" * MAX_CONFIG_BYTES)
    assert problems_of(path) == [("", "file is larger than 1 MiB")]
    assert load_config(write(tmp_path, doc() + "#" * (MAX_CONFIG_BYTES - 2000), "fits.yaml"), {}).measurements


# --------------------------------------------------------------------------- validate --no-env


NEEDS_ENV = doc(
    backend(client_id="${PAIGO_CLIENT_ID}", client_secret=None, client_secret_file="/run/secrets/none"),
    [measurement(dimension_id="${DIMENSION}", iam_role_arn="${ROLE_ARN}", metadata={"team": "${TEAM}"})],
)


def test_no_env_checks_structure_without_variables_or_secret_files(tmp_path: Path) -> None:
    path = write(tmp_path, NEEDS_ENV)
    assert {p for p, _ in problems_of(path)} == {
        "backend.client_id", "backend.client_secret_file", "measurements[0].dimension_id",
        "measurements[0].iam_role_arn", "measurements[0].metadata.team"}
    document = check_structure(path, {})
    assert document["measurements"][0]["name"] == "ebs-storage"


def test_no_env_still_reports_what_the_environment_cannot_fix(tmp_path: Path) -> None:
    text = NEEDS_ENV.replace("resource_type: ebs", "resource_type: sqs").replace("name: ebs-storage", "name: X")
    with pytest.raises(ConfigError) as info:
        check_structure(write(tmp_path, text + "colour: red\n"), {})
    assert [p for p, _ in info.value.problems] == ["colour", "measurements[0].name", "measurements[0].resource_type"]


def test_no_env_checks_a_variable_that_is_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_structure(write(tmp_path, NEEDS_ENV), {"ROLE_ARN": "not-an-arn"})
    assert [p for p, _ in info.value.problems] == ["measurements[0].iam_role_arn"]


# --------------------------------------------------------------------------- spool commands' load


def test_the_spool_section_loads_without_the_backend_environment(tmp_path: Path) -> None:
    path = write(tmp_path, NEEDS_ENV.replace("backend:", "spool: {path: data/spool.db, max_records: 7}\nbackend:"))
    spool = load_spool_config(path, {})
    assert (spool.path, spool.max_records) == (str(tmp_path / "data" / "spool.db"), 7)


def test_the_spool_section_alone_still_reports_its_own_problems(tmp_path: Path) -> None:
    path = write(tmp_path, doc(spool={"path": "${SPOOL_DIR}/spool.db", "max_records": 0, "colour": "red"}))
    with pytest.raises(ConfigError) as info:
        load_spool_config(path, {})
    assert info.value.problems == [
        ("spool.colour", "unknown key"),
        ("spool.max_records", "Input should be greater than or equal to 1"),
        ("spool.path", "environment variable SPOOL_DIR is not set"),
    ]


@pytest.mark.parametrize(("text", "expected"), [
    # a field from an unset ${VAR} used to keep the checks of its whole section from running
    ("backend: {type: paigo, client_id: '${ID}'}\n",
     [("backend", "set exactly one of client_secret or client_secret_file")]),
    ("backend: {type: http, url: '${URL}', hmac_secret: a, hmac_secret_file: b}\n",
     [("backend", "set at most one of hmac_secret or hmac_secret_file")]),
    ("backend: {type: http, url: 'https://x.example', headers: {X-A: '$TOKEN'}}\n",
     [("backend.headers.X-A", "'$TOKEN' is not expanded: write ${NAME} (no defaults), or $$ for a literal $")]),
])
def test_no_env_still_reports_what_an_unset_variable_does_not_explain(
    tmp_path: Path, text: str, expected: list[tuple[str, str]]
) -> None:
    path = write(tmp_path, text + "measurements:\n  - {name: a, dimension_id: '${DIM}', resource_type: ebs, "
                                  "regions: ['${REGION}'], customer: {id: '${CUSTOMER}'}}\n")
    with pytest.raises(ConfigError) as info:
        check_structure(path, {})
    assert info.value.problems == expected
