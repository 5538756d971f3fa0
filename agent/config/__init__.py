"""The YAML configuration, in two layers: the file's shape as pydantic models
(``agent.config.schema``, per resource type from the sampler registry) and the plain frozen
settings every stage past config reads (``agent.settings``).

Loading goes: read file (bounded) -> YAML -> ``${VAR}`` expansion -> pydantic (``extra="forbid"``)
-> cross-field checks -> ``agent.settings``. Every problem found on the way is collected with its
YAML path (``measurements[1].interval``) into one ``ConfigError``.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from agent import settings
from agent.config.errors import path_order, pydantic_problems, under
from agent.config.fields import parse_duration
from agent.config.paths import overlaps
from agent.config.reading import MAX_ALIAS_NODES, MAX_CONFIG_BYTES, UNSET_PLACEHOLDER, expand_env, read_yaml
from agent.config.spool import SpoolSection
from agent.errors import ConfigError

__all__ = [
    "BACKEND_TYPES", "MAX_ALIAS_NODES", "MAX_CONFIG_BYTES", "SOURCE_PATTERN", "check_structure", "load_config",
    "load_spool_config", "parse_audit", "parse_backend", "parse_config", "parse_duration", "parse_measurement",
]

# The schema of every section but the spool's (with the sampler registry it is generated from) is
# imported when first used: the spool commands read only their section.


def __getattr__(name: str) -> Any:
    if name in ("BACKEND_TYPES", "SOURCE_PATTERN"):
        from agent.config import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def _adapter(section: str) -> TypeAdapter[Any]:
    from agent.config.backends import Audit, Backend
    from agent.config.schema import Measurement

    return TypeAdapter({"measurement": Measurement, "backend": Backend, "audit": Audit}[section])


_NOT_A_MAPPING = "expected a mapping with backend, spool, server and measurements"
Problems = list[tuple[str, str]]


def _expanded(raw: Any, env: dict[str, str], no_env: bool) -> tuple[Any, Problems, set[str]]:
    """``raw`` with ``${VAR}`` expanded; the problems; the YAML paths built from an unset variable,
    whose other errors are not reported (once is enough; with ``no_env``, not at all)."""
    problems: Problems = []
    unset: Problems = []
    expanded = expand_env(raw, env, "", problems, unset, UNSET_PLACEHOLDER if no_env else "")
    return expanded, problems if no_env else problems + unset, {where for where, _ in problems + unset}


def parse_config(raw: Any, source: str, env: dict[str, str], base_dir: Path | None = None,
                 config_file: Path | None = None) -> settings.AgentConfig:
    """Validate an already-loaded YAML document; raises ConfigError with every problem."""
    cfg, _ = _validate(raw, source, env, base_dir, no_env=False, config_file=config_file)
    assert cfg is not None  # without no_env, every value was checked
    return cfg


def _validate(
    raw: Any, source: str, env: dict[str, str], base_dir: Path | None, no_env: bool,
    config_file: Path | None = None,
) -> tuple[settings.AgentConfig | None, Any]:
    """The config and the expanded document; ConfigError with every problem. ``no_env``: an
    unset ``${VAR}`` and what is built from it are not checked, ``*_file`` secrets are not read,
    and the config is None when a value from an unset variable kept it from being built."""
    from agent.config.checks import measurement_problems, sync_problems, type_problems
    from agent.config.schema import AgentConfig

    if not isinstance(raw, dict):
        raise ConfigError(source, [("", _NOT_A_MAPPING)])
    expanded, problems, skip = _expanded(raw, env, no_env)
    context = {"base_dir": str(base_dir) if base_dir else None, "no_env": no_env}
    cfg: settings.AgentConfig | None = None
    found: Problems = []
    try:
        cfg = AgentConfig.model_validate(expanded, context=context).to_settings()
    except ValidationError as exc:
        found += pydantic_problems(exc)
    found += measurement_problems(expanded.get("measurements"))
    found += sync_problems(expanded)
    found += type_problems(_valid_measurements(cfg, expanded.get("measurements"), context))
    problems += [p for p in found if not under(p[0], skip)]
    problems += overlaps(expanded, base_dir or Path.cwd(), skip, config_file)
    if problems:
        raise ConfigError(source, sorted(problems, key=path_order))
    return cfg, expanded


def _valid_measurements(cfg: settings.AgentConfig | None, raw: Any,
                        context: dict[str, Any]) -> list[tuple[int, settings.Measurement]]:
    """The measurements that validated, by index: all of ``cfg``'s, or (when another section
    failed) each that validates on its own, so its type's checks are reported too."""
    if cfg is not None:
        return list(enumerate(cfg.measurements))
    valid = []
    for i, item in enumerate(raw if isinstance(raw, list) else ()):
        try:
            valid.append((i, _adapter("measurement").validate_python(item, context=context).to_settings()))
        except ValidationError:
            continue  # its errors are reported with the document's
    return valid


def parse_measurement(raw: dict[str, Any], source: str = "<measurement>") -> settings.Measurement:
    """One YAML measurement (no ``${VAR}``s) checked as ``measurements[0]`` of a config would be."""
    from agent.config.checks import measurement_problems, type_problems

    m, problems = None, measurement_problems([raw])
    try:
        m = _adapter("measurement").validate_python(raw).to_settings()
    except ValidationError as exc:
        problems += pydantic_problems(exc, ("measurements", 0))
    problems += type_problems([(0, m)] if m else [])
    if problems or m is None:
        raise ConfigError(source, sorted(problems, key=path_order))
    return m


def parse_backend(raw: dict[str, Any], source: str = "<backend>") -> settings.Backend:
    """One YAML ``backend`` section (no ``${VAR}``s, ``*_file`` paths as given)."""
    return _section("backend", raw, source)  # type: ignore[no-any-return]


def parse_audit(raw: dict[str, Any], source: str = "<audit>") -> settings.Audit:
    """One YAML ``audit`` section."""
    return _section("audit", raw, source)  # type: ignore[no-any-return]


def _section(key: str, raw: dict[str, Any], source: str) -> Any:
    try:
        return _adapter(key).validate_python(raw).to_settings()
    except ValidationError as exc:
        raise ConfigError(source, sorted(pydantic_problems(exc, (key,)), key=path_order)) from None


_File = TypeVar("_File", settings.Spool, settings.JsonlFile)


def _resolved(section: _File, base_dir: Path) -> _File:
    """Relative file paths are relative to the config file."""
    return replace(section, path=str(base_dir / section.path))


def load_config(path: str | Path, env: dict[str, str]) -> settings.AgentConfig:
    path = Path(path)
    cfg = parse_config(read_yaml(path), str(path), env, base_dir=path.parent, config_file=path)
    backend = _resolved(cfg.backend, path.parent) if isinstance(cfg.backend, settings.FileBackend) else cfg.backend
    audit = _resolved(cfg.audit, path.parent) if cfg.audit is not None else None
    return replace(cfg, spool=_resolved(cfg.spool, path.parent), backend=backend, audit=audit)


def check_structure(path: str | Path, env: dict[str, str]) -> dict[str, Any]:
    """``validate --no-env``: every check but those that need the deployment's environment
    (unset ``${VAR}``s, ``*_file`` secrets); returns the document, ``${VAR}``s expanded."""
    path = Path(path)
    _, expanded = _validate(read_yaml(path), str(path), env, path.parent, no_env=True, config_file=path)
    return expanded  # type: ignore[no-any-return]


def load_spool_config(path: str | Path, env: dict[str, str]) -> settings.Spool:
    """Only the ``spool`` section: the backend's variables and secret files are not needed."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [("", _NOT_A_MAPPING)])
    expanded, problems, skip = _expanded({k: v for k, v in raw.items() if k == "spool"}, env, no_env=False)
    spool: settings.Spool | None = None
    try:
        spool = SpoolSection.model_validate(expanded).spool.to_settings()
    except ValidationError as exc:
        problems += [p for p in pydantic_problems(exc) if not under(p[0], skip)]
    problems += overlaps(expanded, path.parent, skip, path)  # `spool salvage` would replace the config
    if problems or spool is None:
        raise ConfigError(str(path), sorted(problems, key=path_order))
    return _resolved(spool, path.parent)
