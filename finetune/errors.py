"""User-facing errors: what went wrong, where, and how to fix it.

Every error a user can cause (a bad recipe, a bad data row, a missing run directory) is raised as
`UserError`; the CLI prints it without a traceback and exits with status 2. Internal failures
stay ordinary exceptions so their tracebacks reach a bug report.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input, located by a dotted key path or a file and row."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}" if self.where else self.what


class UserError(Exception):
    """Bad input; carries every problem found so the user can fix them all in one go."""

    def __init__(self, problems: list[Problem] | str, title: str = ""):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        self.problems = list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        head = self.title or ("1 problem" if len(self.problems) == 1 else f"{len(self.problems)} problems")
        lines = [f"error: {head}"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean `x`?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


class CheckFailed(Exception):
    """A built-in verification failed (e.g. merged logits differ); exit status 1, nothing left on disk."""
