"""Errors a user can cause and fix: entry points print them without a traceback and exit with code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config, path, data line). Entry points print str(e) and exit 2."""


class ConfigError(UserError):
    """One or more problems in a config file; each line names the JSON path it is about."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}{where}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))
