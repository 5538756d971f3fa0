"""The agent's own exception tree; library exceptions are translated at the boundary."""

from __future__ import annotations

EXCERPT = 300  # characters of a peer's text that go into a reason or a log line (one body was 1 MB)


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """A peer's text as an error or a log line may show it: one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """The configuration file is unreadable or invalid; carries every problem found."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        super().__init__(self.render())

    SHOWN = 200  # a file of junk has tens of thousands of errors: the first ones say what is wrong

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.problems)} error(s)"]
        lines += [f"  {path or '<root>'}: {message}" for path, message in self.problems[:self.SHOWN]]
        if len(self.problems) > self.SHOWN:
            lines.append(f"  … and {len(self.problems) - self.SHOWN} more")
        return "\n".join(lines)


class SamplingError(AgentError):
    """Sampling one target failed; that target produces no records for the tick."""


class AssumeRoleError(SamplingError):
    """The configured role could not be assumed."""


class SpoolError(AgentError):
    """The spool file cannot be used."""


class SpoolFullError(SpoolError):
    """The spool holds max_records unsent records; new ticks are refused."""


class SpoolDiskLowError(SpoolFullError):
    """The spool's disk is below the free space kept for delivery outcomes; new ticks are refused."""


class ServeError(AgentError):
    """``server.listen`` cannot be served (the address is taken or not on this host)."""


class AuditError(AgentError):
    """The audit copy cannot be written; delivery outcomes are held until it can."""
