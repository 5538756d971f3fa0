"""The shape the package keeps: no import cycle among agent/ modules, no module over 400 lines,
and commands that load only what they use (each CLI call pays for its imports)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import yaml

AGENT = Path(__file__).resolve().parents[1] / "agent"
MAX_LINES = 400


def _module(path: Path) -> str:
    parts = path.relative_to(AGENT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Each agent module and the agent modules it imports (at any level: lazy imports count too)."""
    modules = {_module(p): p for p in AGENT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from package import module` imports the module; `from module import name`, the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_agent_modules() -> None:
    graph = _imports()
    assert len(graph) > 20
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_over_400_lines() -> None:
    sizes = {str(p.relative_to(AGENT.parent)): len(p.read_text().splitlines()) for p in AGENT.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > MAX_LINES} == {}


# what sampling, metrics and the daemon's endpoints load: not for a command that reads config or the spool
HEAVY = ("botocore", "boto3", "prometheus_client", "http.server", "lightkube", "httpx")


def _loaded_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          cwd=AGENT.parent)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stderr.splitlines()[-1]))


def test_the_config_package_loads_no_aws_metrics_or_http() -> None:
    assert {m for m in HEAVY if m in _loaded_after("import agent.config")} == set()


def test_validate_loads_no_aws_metrics_or_http() -> None:
    example = AGENT.parent / "config" / "paigo-ebs.yaml"
    loaded = _loaded_after(f"from agent.cli import main\nassert main(['validate', '-c', {str(example)!r}, '--no-env']) == 0")
    assert {m for m in (*HEAVY, "structlog") if m in loaded} == set()  # nor logging: validate logs nothing
    assert "agent.samplers" in loaded  # the schema is generated from the registry: the probe did validate


def test_spool_commands_load_only_the_spool_section_schema(tmp_path: Path) -> None:
    from agent.spool import Spool

    Spool(tmp_path / "spool.db").close()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"backend": {"type": "paigo"}, "spool": {"path": str(tmp_path / "spool.db")}}))
    loaded = _loaded_after(f"from agent.cli import main\nassert main(['spool', 'stats', '-c', {str(config)!r}]) == 0")
    assert "agent.spool" in loaded  # the probe did read the spool
    unused = ("botocore", "boto3", "lightkube", "httpx",  # not prometheus_client: the spool counts into a Metrics
              "agent.samplers", "agent.config.schema", "agent.config.backends", "agent.salvage")
    assert {m for m in unused if m in loaded} == set()
